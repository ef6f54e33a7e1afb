"""The plain-log progress line (lora_trainer.progress.step_line and ProgressReporter off a terminal).

Behaviours tested:
- the line reads `step N/T loss L R it/s [K tok/s] eta Es [note]`: tokens/s only when the batches
  carried tokens (text tasks), nothing invented for image runs; unknown rate and eta print as 0;
- the reporter logs tokens/s for an attempt that reported tokens and leaves it out otherwise, and
  the line still starts as tests/e2e/chaos.py's STEP_LINE expects.
"""

from __future__ import annotations

import logging

import pytest

from lora_trainer.progress import ProgressReporter, step_line
from tests.e2e.chaos import STEP_LINE


@pytest.mark.parametrize(("args", "line"), [
    ((3, 10, 0.51234, 2.5, None, 2.8, ""), "step 3/10 loss 0.5123 2.50 it/s eta 3s"),
    ((3, 10, 0.51234, 2.5, 1234.56, 2.8, ""), "step 3/10 loss 0.5123 2.50 it/s 1235 tok/s eta 3s"),
    ((1, 10, 2.0, None, None, None, ""), "step 1/10 loss 2.0000 0.00 it/s eta 0s"),
    ((5, 5, 1.0, 1.0, 80.0, 0.0, "gpu mem 1.0/24.0 GiB peak 1.0 GiB"),
     "step 5/5 loss 1.0000 1.00 it/s 80 tok/s eta 0s gpu mem 1.0/24.0 GiB peak 1.0 GiB"),
])
def test_step_line(args: tuple, line: str) -> None:
    assert step_line(*args) == line


@pytest.mark.parametrize(("tokens", "shows"), [(0, False), (512, True)])
def test_reporter_shows_tokens_only_when_given(tokens: int, shows: bool, caplog: pytest.LogCaptureFixture) -> None:
    reporter = ProgressReporter(total=2, every=1, tty=False)
    with caplog.at_level(logging.INFO, logger="lora_trainer.progress"):
        reporter.update(1, 0.5, tokens=tokens)
        reporter.update(2, 0.4, tokens=tokens)
    lines = [f"lora_trainer.progress: {r.getMessage()}" for r in caplog.records]
    assert len(lines) == 2 and all(STEP_LINE.search(line) for line in lines)
    assert all((" tok/s " in line) == shows for line in lines), lines
