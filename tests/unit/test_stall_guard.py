"""tests.support.stall: a silent log fails the block, a growing one (a folder of logs) lets it run past the stall time."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.support.stall import stall_guard


def test_silent_log_fails(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    log.write_text("a")
    with pytest.raises(AssertionError, match="silent"):
        with stall_guard(log, seconds=0.5, poll=0.05):
            for _ in range(100):  # the exception lands between bytecodes, not inside one sleep
                time.sleep(0.05)


def test_growing_log_passes(tmp_path: Path) -> None:
    d = tmp_path / "logs"
    d.mkdir()
    with stall_guard(d, seconds=0.5, poll=0.05):
        for i in range(20):
            (d / "m").write_text("x" * i)
            time.sleep(0.1)
