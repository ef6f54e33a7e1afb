"""SIGTERM handling: a flag the training loop polls between optimizer steps.

The handler only records the request, so a SIGTERM that lands during a checkpoint save lets the
save finish; the loop then commits and exits 75 within the preemption grace budget.
"""

from __future__ import annotations

import logging
import signal
import time

log = logging.getLogger(__name__)


class StopFlag:
    """Set by SIGTERM/SIGINT (or by hand in tests); remembers when it was first set."""

    def __init__(self) -> None:
        self.requested_at: float | None = None
        self._unannounced: str | None = None

    @property
    def requested(self) -> bool:
        """Whether a stop was asked for (the first look logs it)."""
        if self._unannounced is not None:
            log.warning("%s received: finishing the current step, then checkpointing", self._unannounced)
            self._unannounced = None
        return self.requested_at is not None

    def request(self, signum: int | None = None) -> None:
        """Ask the loop to stop after the current optimizer step."""
        if self.requested_at is None:
            self.requested_at = time.monotonic()
            # Logged by the next look, not here: a handler that logs while the interrupted code is
            # writing a log line hits a reentrant write on stderr.
            self._unannounced = signal.Signals(signum).name if signum else "request"

    def remaining(self, budget: float) -> float:
        """Seconds left of `budget` counted from the stop request (never negative)."""
        if self.requested_at is None:
            return budget
        return max(0.0, budget - (time.monotonic() - self.requested_at))

    def install(self) -> StopFlag:
        """Route SIGTERM and SIGINT to this flag."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, _frame: self.request(signum))
        return self
