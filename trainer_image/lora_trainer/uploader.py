"""Background uploads: an ordered queue of jobs on one worker thread, so training never waits on S3.

Jobs run one at a time in submission order (a checkpoint's commit never overtakes the files it
depends on; progress.json never goes backwards); a job may upload its own files in parallel.
A job that raises StorageUnavailable is retried with exponential backoff until `retry_deadline`
seconds have passed since it started. If it still fails (or raises anything else, such as
StaleAttempt), the jobs queued behind it are dropped and the error is raised, once, by the next
`submit()`, `wait()` or `close()`; after that the uploader accepts new jobs again.

Preemption: the loop submits a commit, then `job.wait(grace)` (or `uploader.wait(grace)`); False
means the commit did not finish in time and the previously committed checkpoint is still the
newest valid one (the commit protocol in `checkpoint` guarantees it).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lora_trainer.errors import StorageUnavailable
from lora_trainer.storage import StorageRejected, Store

log = logging.getLogger(__name__)


class UploaderClosed(RuntimeError):
    """submit() after close()."""


class Job:
    """A handle on one submitted job: wait for it, then read `result` or `error`."""

    def __init__(self, label: str, fn: Callable[[], Any], coalesce_key: str | None) -> None:
        self.label = label
        self.fn = fn
        self.coalesce_key = coalesce_key
        self.result: Any = None
        self.error: BaseException | None = None
        self.attempts = 0
        self._done = threading.Event()

    def done(self) -> bool:
        return self._done.is_set()

    @property
    def ok(self) -> bool:
        """True once the job finished without error (e.g. the checkpoint is committed)."""
        return self._done.is_set() and self.error is None

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job finished (ok or failed); False if `timeout` seconds passed first."""
        return self._done.wait(timeout)

    def _finish(self, result: Any = None, error: BaseException | None = None) -> None:
        self.result, self.error = result, error
        self._done.set()

    def __repr__(self) -> str:
        state = "ok" if self.ok else ("failed" if self.done() else "pending")
        return f"Job({self.label!r}, {state})"


class BackgroundUploader:
    """Runs upload jobs in order on a daemon thread, retrying transient storage errors."""

    def __init__(
        self,
        *,
        retry_deadline: float = 300.0,
        backoff_initial: float = 0.5,
        backoff_max: float = 10.0,
        name: str = "uploader",
    ) -> None:
        self.retry_deadline = retry_deadline
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self._queue: deque[Job] = deque()
        self._running: Job | None = None
        self._error: BaseException | None = None
        self._closed = False
        self._stop = threading.Event()
        self._cond = threading.Condition()
        # Daemon: if the grace period runs out mid-upload, the process may still exit; the
        # commit protocol keeps the previous checkpoint valid.
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def submit(self, label: str, fn: Callable[[], Any], *, coalesce_key: str | None = None) -> Job:
        """Queue `fn` (idempotent: it may run again on retry). With `coalesce_key`, a queued job
        with the same key that has not started yet is replaced (progress.json, logs)."""
        with self._cond:
            self._raise_pending()
            if self._closed:
                raise UploaderClosed(f"cannot queue {label!r}: the uploader is closed")
            if coalesce_key is not None:
                for job in self._queue:
                    if job.coalesce_key == coalesce_key:
                        job.fn, job.label = fn, label
                        return job
            job = Job(label, fn, coalesce_key)
            self._queue.append(job)
            self._cond.notify_all()
            return job

    def submit_files(
        self, store: Store, items: Sequence[tuple[Path, str]], *, label: str, coalesce_key: str | None = None
    ) -> Job:
        """Queue an upload of (local path, key) pairs, in parallel within the job."""
        pairs = list(items)
        return self.submit(label, lambda: store.put_files(pairs), coalesce_key=coalesce_key)

    @property
    def pending(self) -> int:
        """Jobs queued or running."""
        with self._cond:
            return len(self._queue) + (self._running is not None)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every queued job has finished; False if `timeout` passed first.
        Raises the error of a failed job (once)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._queue or self._running is not None:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
            self._raise_pending()
            return True

    def close(self, timeout: float | None = None) -> bool:
        """Finish queued jobs (up to `timeout`), then stop the worker; False if jobs were left."""
        try:
            finished = self.wait(timeout)
        finally:
            with self._cond:
                self._closed = True
                self._cond.notify_all()
        if finished:
            self._stop.set()
            self._thread.join(timeout=5)
        return finished

    def _raise_pending(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                job = self._running = self._queue.popleft()
            error = self._run(job)
            with self._cond:
                self._running = None
                if error is not None:
                    self._error = error
                    dropped = list(self._queue)
                    self._queue.clear()
                    for other in dropped:
                        other._finish(error=StorageUnavailable(f"{other.label}: dropped because {job.label} failed"))
                    if dropped:
                        log.error("dropped %d queued upload(s) after %s failed", len(dropped), job.label)
                self._cond.notify_all()

    def _run(self, job: Job) -> BaseException | None:
        def counted() -> Any:
            job.attempts += 1
            return job.fn()

        try:
            result = retry_storage(
                job.label, counted, self.retry_deadline, self.backoff_initial, self.backoff_max, self._stop
            )
        except BaseException as exc:  # noqa: BLE001 - surfaced to the caller by submit/wait/close
            if not isinstance(exc, StorageUnavailable) or isinstance(exc, StorageRejected):
                log.error("%s failed: %s: %s", job.label, type(exc).__name__, exc)
            job._finish(error=exc)
            return exc
        job._finish(result=result)
        return None


def retry_storage(
    label: str,
    fn: Callable[[], Any],
    deadline: float,
    backoff_initial: float = 0.5,
    backoff_max: float = 10.0,
    stop: threading.Event | None = None,
) -> Any:
    """Call `fn`, retrying StorageUnavailable with exponential backoff until `deadline` seconds pass.

    StorageRejected (bad credentials, no bucket) and every other error are raised at once."""
    started = time.monotonic()
    delay = backoff_initial
    tries = 0
    while True:
        tries += 1
        try:
            return fn()
        except StorageRejected:
            raise
        except StorageUnavailable as exc:
            elapsed = time.monotonic() - started
            if elapsed + delay > deadline or (stop is not None and stop.is_set()):
                error = StorageUnavailable(
                    f"{label}: storage still unavailable after {elapsed:.0f}s and {tries} tries "
                    f"({exc}); check the store, the job will retry on the next attempt"
                )
                log.error("%s", error)
                raise error from exc
            log.warning("%s: try %d failed (%s); retrying in %.1fs", label, tries, exc, delay)
            if stop is not None:
                stop.wait(delay)
            else:
                time.sleep(delay)
            delay = min(delay * 2, backoff_max)
