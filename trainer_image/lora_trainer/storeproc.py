"""A Store whose calls run in a child process, so background uploads never hold the trainer's GIL.

Why: boto3 spends a few milliseconds of pure-Python CPU per request (building, signing, parsing).
On an upload thread inside the trainer, each burst holds the GIL while the training loop waits to
get it back after every torch kernel; with a checkpoint every few seconds that costs 15-20% of
steps/s on small models. In a child process the same work runs beside the loop instead.

Semantics are those of the wrapped store: every call is synchronous and returns what the store
returned or raises what it raised (TrainerError subclasses keep their type; other exceptions come
back as RuntimeError naming the original type). The child ignores SIGTERM/SIGINT (the trainer
decides when to stop) and dies with the trainer: on Linux through PR_SET_PDEATHSIG, elsewhere
when its stdin closes. A child found dead is restarted before the next call; a call it cannot
answer raises StorageUnavailable, so the uploader's retry policy applies.

Protocol: pickles over the child's stdin/stdout, parent to child only; both ends are this module.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import pickle
import signal
import subprocess
import sys
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from lora_trainer import checkpoint
from lora_trainer.config import S3Config
from lora_trainer.contract import LatestPointer
from lora_trainer.errors import StorageUnavailable, TrainerError
from lora_trainer.storage import FILE_CONCURRENCY, ObjectInfo, Store, open_store, parse_uri

log = logging.getLogger(__name__)

ENV_PARENT = "LORA_STOREPROC_PARENT"
PR_SET_PDEATHSIG = 1


class StoreProcess(Store):
    """The Store at `uri`, served by a child process (`python -m lora_trainer.storeproc`)."""

    def __init__(self, uri: str, s3: S3Config) -> None:
        loc = parse_uri(uri)
        self._open = (uri, s3.model_dump(mode="json"))
        self.uri = f"s3://{loc.bucket}/{loc.prefix}".rstrip("/")  # as S3Store reports it
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._closed = False  # after close(), a leftover upload thread must not start a new child
        self._start()

    def _start(self) -> None:
        env = {**os.environ, ENV_PARENT: str(os.getpid())}
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "lora_trainer.storeproc"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            env=env, close_fds=True,
        )
        self._send(self._open)

    def _send(self, message: Any) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        pickle.dump(message, self._proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
        self._proc.stdin.flush()

    def _call(self, name: str, *args: Any) -> Any:
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self.url()}: the upload store is closed")
            try:
                if self._proc is None or self._proc.poll() is not None:
                    self._start()
                self._send((name, args))
                assert self._proc is not None and self._proc.stdout is not None
                ok, value, records = pickle.load(self._proc.stdout)
            except (OSError, EOFError, ValueError, pickle.UnpicklingError) as exc:  # ValueError: a closed pipe
                self._kill()
                raise StorageUnavailable(f"{self.url()}: the upload process stopped ({exc!r}); restarting it") from None
        for name, level, message in records:  # the child's log lines, as if logged here
            logging.getLogger(name).log(level, "%s", message)
        if ok:
            return value
        raise value

    def _kill(self) -> None:
        if self._proc is not None:
            with contextlib.suppress(OSError):
                self._proc.kill()
            self._proc.wait()
            self._proc = None

    def close(self) -> None:
        """Stop the child: at once if a call is still in flight (the trainer is exiting, as a
        thread's upload would stop with the process), else by closing its stdin."""
        self._closed = True
        if not self._lock.acquire(blocking=False):
            proc = self._proc
            if proc is not None:
                with contextlib.suppress(OSError):
                    proc.kill()
            return
        try:
            if self._proc is not None and self._proc.stdin is not None:
                with contextlib.suppress(OSError):
                    self._proc.stdin.close()
                try:
                    self._proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self._kill()
                self._proc = None
        finally:
            self._lock.release()

    def put_file(self, key: str, path: Path) -> None:
        self._call("put_file", key, path)

    def put_bytes(self, key: str, data: bytes) -> str:
        return self._call("put_bytes", key, data)

    def get_bytes(self, key: str) -> bytes:
        return self._call("get_bytes", key)

    def get_file(self, key: str, path: Path) -> None:
        self._call("get_file", key, path)

    def list_info(self, prefix: str = "") -> list[ObjectInfo]:
        return self._call("list_info", prefix)

    def delete(self, keys: Iterable[str]) -> None:
        self._call("delete", list(keys))

    def put_files(self, items: Sequence[tuple[Path, str]], workers: int = FILE_CONCURRENCY) -> None:
        self._call("put_files", list(items), workers)

    def commit(self, local_dir: Path, *args: Any) -> LatestPointer:
        """`checkpoint.commit` run whole in the child: hashing, fencing checks and uploads."""
        return self._call("commit", local_dir, *args)

    def get_files(self, items: Sequence[tuple[str, Path]], workers: int = FILE_CONCURRENCY) -> None:
        self._call("get_files", list(items), workers)


def open_upload_store(uri: str, s3: S3Config) -> Store:
    """The store background uploads use: S3 in a child process; a local folder in-process (cheap)."""
    if parse_uri(uri).is_local:
        return open_store(uri, s3)
    return StoreProcess(uri, s3)


def commit_checkpoint(store: Store, local_dir: Path, step: int, attempt: int, config_hash: str,
                      training_fields: dict[str, Any], keep_last: int, world_size: int = 1) -> LatestPointer:
    """`checkpoint.commit`, in the child process when `store` is served by one."""
    args = (local_dir, step, attempt, config_hash, training_fields, keep_last, world_size)
    if isinstance(store, StoreProcess):
        return store.commit(*args)
    return checkpoint.commit(store, *args)


class _Captured(logging.Handler):
    """Keeps the child's log records so each reply carries them back to the trainer's log."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[tuple[str, int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.name, record.levelno, record.getMessage()))


def _portable(exc: BaseException) -> BaseException:
    """`exc` if it survives pickling with its type; else a RuntimeError that names it."""
    if isinstance(exc, TrainerError):
        with contextlib.suppress(Exception):
            pickle.loads(pickle.dumps(exc))
            return exc
    return RuntimeError(f"{type(exc).__name__}: {exc}")


def _die_with_parent(parent: int) -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(0)


def serve(inp: BinaryIO, out: BinaryIO) -> None:
    """The child's loop: open the store named by the first message, then answer calls until EOF."""
    captured = _Captured()
    root = logging.getLogger()
    root.addHandler(captured)
    root.setLevel(logging.INFO)
    uri, s3 = pickle.load(inp)
    store = open_store(uri, S3Config.model_validate(s3))
    while True:
        try:
            name, args = pickle.load(inp)
        except EOFError:
            return
        try:
            result = checkpoint.commit(store, *args) if name == "commit" else getattr(store, name)(*args)
            ok, value = True, result
        except Exception as exc:  # noqa: BLE001 - every error goes back to the caller
            ok, value = False, _portable(exc)
        records, captured.records = captured.records, []
        pickle.dump((ok, value, records), out, protocol=pickle.HIGHEST_PROTOCOL)
        out.flush()


def main() -> None:
    """Entry point of the child process."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.environ.get(ENV_PARENT)
    if parent:
        _die_with_parent(int(parent))
    # Pickles own stdout: anything a library prints must not corrupt the stream.
    out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    serve(sys.stdin.buffer, out)


if __name__ == "__main__":
    main()
