"""Progress for people: a live bar on a terminal, periodic plain log lines otherwise."""

from __future__ import annotations

import logging
import sys
import time

from tqdm import tqdm

log = logging.getLogger(__name__)


class ProgressReporter:
    """Tracks step rate, loss and ETA; draws a tqdm bar on a TTY or logs every `every` steps."""

    def __init__(self, total: int, start: int = 0, every: int = 10, tty: bool | None = None):
        self.total = total
        self.start_step = start
        self.every = every
        self.last_loss: float | None = None
        self._tokens = 0
        self._t0 = time.monotonic()
        self._step = start
        use_tty = sys.stderr.isatty() if tty is None else tty
        self._bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True) if use_tty else None

    @property
    def rate(self) -> float | None:
        """Optimizer steps per second since this attempt started."""
        done = self._step - self.start_step
        elapsed = time.monotonic() - self._t0
        return done / elapsed if done > 0 and elapsed > 0 else None

    @property
    def token_rate(self) -> float | None:
        """Tokens trained per second since this attempt started; None when batches carry no tokens."""
        elapsed = time.monotonic() - self._t0
        return self._tokens / elapsed if self._tokens and elapsed > 0 else None

    @property
    def eta(self) -> float | None:
        """Seconds until the last step at the current rate."""
        rate = self.rate
        return (self.total - self._step) / rate if rate else None

    def update(self, step: int, loss: float, tokens: int = 0, note: str = "") -> None:
        """Record a finished optimizer step (and the tokens it trained on); `note` ends its log line (GPU stats)."""
        self.last_loss = loss
        self._tokens += tokens
        advanced = step - self._step
        self._step = step
        if self._bar is not None:
            self._bar.update(advanced)
            tokens = self.token_rate
            self._bar.set_postfix(loss=f"{loss:.4f}", **({"tok/s": f"{tokens:.0f}"} if tokens is not None else {}))
        elif step % self.every == 0 or step == self.total:
            log.info("%s", step_line(step, self.total, loss, self.rate, self.token_rate, self.eta, note))

    def close(self) -> None:
        """Stop drawing the bar."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def step_line(step: int, total: int, loss: float, rate: float | None, token_rate: float | None,
              eta: float | None, note: str = "") -> str:
    """The plain-log progress line (pure); tokens/s only when the batches carried tokens (text tasks)."""
    tokens = f" {token_rate:.0f} tok/s" if token_rate is not None else ""
    return (f"step {step}/{total} loss {loss:.4f} {rate or 0.0:.2f} it/s{tokens} eta {eta or 0.0:.0f}s"
            + (f" {note}" if note else ""))
