"""Bounding in-process work by its progress instead of by fixed seconds.

A module fixture that trains in the test process (tests/integration/test_train.py) can take ten
minutes on a loaded 2-core machine and one on an idle one. pytest-timeout's fixed budget fails it
on the loaded machine; no budget at all lets a hang block CI. `stall_guard` is the middle: the
work may take as long as it keeps writing, and a log silent for `seconds` interrupts the run.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
import time
from collections.abc import Iterator
from pathlib import Path

# Longer than any single step or save of the tests' tiny models at load 25 on 2 cores.
STALL_SECONDS = 600.0


def _mark(path: Path) -> tuple[int, float] | None:
    """Size and newest mtime of a file, or of the files in a folder (None while it is absent)."""
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    marks = []
    for file in files:
        with contextlib.suppress(FileNotFoundError):
            st = file.stat()
            marks.append((st.st_size, st.st_mtime))
    if not marks:
        return None
    return sum(m[0] for m in marks), max(m[1] for m in marks)


class Stalled(AssertionError):
    """The guarded work's log was silent too long."""


def _raise_in(thread_id: int) -> None:
    # An exception set on the thread itself, not SIGINT (interrupt_main): tests of the trainer's
    # signal handling leave SIGINT handlers that would swallow it.
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(Stalled))


@contextlib.contextmanager
def stall_guard(log: Path, seconds: float = STALL_SECONDS, poll: float = 1.0) -> Iterator[None]:
    """Fail the block if `log` (a file, or a folder of logs) has not changed for `seconds`."""
    done, lock = threading.Event(), threading.Lock()
    caller = threading.get_ident()

    def watch() -> None:
        last, since = _mark(log), time.monotonic()
        while not done.wait(poll):
            now = _mark(log)
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since > seconds:
                with lock:  # never after the block has ended
                    if not done.is_set():
                        _raise_in(caller)
                return

    thread = threading.Thread(target=watch, name="stall-guard", daemon=True)
    thread.start()
    try:
        yield
    except Stalled as exc:
        raise Stalled(f"{log} was silent for {seconds:.0f}s: the run hangs") from exc
    finally:
        with lock:
            done.set()
        thread.join()
