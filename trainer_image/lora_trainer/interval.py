"""The checkpoint interval from the preemption rate: Young/Daly, in steps (`save_steps: auto`).

A checkpoint holds the loop up for C seconds (the commit cost: saving the state and handing it to
the uploader, which runs beside the loop); a preemption loses the work since the last commit.
With preemptions at rate λ (mean time between them M = 1/λ), the interval τ that minimises the
expected waste is Young's τ = √(2CM), refined by Daly (2006) for C not ≪ M:
τ = √(2CM)·(1 + ⅓√(C/2M) + ⅑·C/2M) − C for C < 2M, else M. Divided by the measured step time and
held to [min, max], that is how many steps the loop trains before its next checkpoint.

`Cadence` applies it in the loop: the first checkpoint of an attempt comes `min_save_steps` after
it starts (nothing is measured yet); after each checkpoint the interval is computed again from
the commit cost and step time measured so far (exponential averages). An auto checkpoint is put
off while the previous one is still uploading, so at most one commit is ever in flight. The last
step is always checkpointed, as with a fixed `save_steps`. Where checkpoints fall never changes
what is trained: each step's randomness comes from (seed, step) and the data position is in the
checkpoint, so a resume from any committed step is exact whatever the cadence.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from lora_trainer.contract import ENV_PREEMPTION_RATE
from lora_trainer.errors import ConfigError

log = logging.getLogger(__name__)

AUTO = "auto"
# The rate `lora-train` assumes when nobody says (run by hand, without the operator): about six
# preemptions a day, a busy spot GPU pool. The operator's setting has the same default.
DEFAULT_RATE_PER_HOUR = 0.25
DEFAULT_MIN_STEPS = 10
DEFAULT_MAX_STEPS = 1000
MAX_RATE_PER_HOUR = 3_600_000.0  # one a millisecond: anything above is a typo, not a pool
SMOOTHING = 0.5  # weight of the newest measurement in the running averages


def young_seconds(commit_seconds: float, mtbf_seconds: float) -> float:
    """Young's first-order optimum: √(2CM) seconds of training between checkpoints."""
    return math.sqrt(2.0 * max(0.0, commit_seconds) * mtbf_seconds)


def daly_seconds(commit_seconds: float, mtbf_seconds: float) -> float:
    """Daly's higher-order optimum (equal to Young's as C/M → 0; M itself once C ≥ 2M)."""
    c, m = max(0.0, commit_seconds), mtbf_seconds
    if math.isinf(m):
        return math.inf
    if c >= 2.0 * m:
        return m
    x = c / (2.0 * m)
    return max(0.0, math.sqrt(2.0 * c * m) * (1.0 + math.sqrt(x) / 3.0 + x / 9.0) - c)


def mtbf_seconds(rate_per_hour: float) -> float:
    """Mean seconds between preemptions at `rate_per_hour` (inf for a rate of 0)."""
    return math.inf if rate_per_hour <= 0 else 3600.0 / rate_per_hour


def interval_steps(commit_seconds: float, step_seconds: float, rate_per_hour: float,
                   min_steps: int, max_steps: int) -> int:
    """Steps between checkpoints: Daly's τ over the step time, rounded, held to [min_steps, max_steps]."""
    tau = daly_seconds(commit_seconds, mtbf_seconds(rate_per_hour))
    if math.isinf(tau) or step_seconds <= 0:
        return max_steps
    return int(min(max_steps, max(min_steps, round(tau / step_seconds))))


def read_rate(environ: Mapping[str, str]) -> float | None:
    """The preemption rate per hour the operator put in the environment; None when absent.

    ConfigError (exit 78) naming the variable when it is not a number in [0, 3.6e6]."""
    raw = environ.get(ENV_PREEMPTION_RATE, "").strip()
    if not raw:
        return None
    try:
        rate = float(raw)
    except ValueError:
        rate = math.nan
    if not (0.0 <= rate <= MAX_RATE_PER_HOUR):
        raise ConfigError(f"{ENV_PREEMPTION_RATE}: {raw[:40]!r} is not a rate per hour from 0 to "
                          f"{MAX_RATE_PER_HOUR:g}; set it to e.g. 0.5, or unset it for {DEFAULT_RATE_PER_HOUR}")
    return rate


def _average(old: float | None, new: float) -> float:
    return new if old is None else SMOOTHING * new + (1.0 - SMOOTHING) * old


@dataclass
class Cadence:
    """When the loop commits a checkpoint: every `every` steps, or auto (Young/Daly), or never."""

    every: int | None = None  # a fixed save_steps
    auto: bool = False
    rate_per_hour: float = DEFAULT_RATE_PER_HOUR
    min_steps: int = DEFAULT_MIN_STEPS
    max_steps: int = DEFAULT_MAX_STEPS
    attempt: int = 0
    next_step: int = 0  # auto: the step the next checkpoint is due at
    commit_seconds: float | None = None
    step_seconds: float | None = None
    _window: tuple[int, float] = (0, 0.0)  # (step, time) the current stretch of training began
    _committed: Callable[[], bool] | None = field(default=None, repr=False)

    @classmethod
    def start(cls, save_steps: int | str | None, min_steps: int, max_steps: int, step: int, now: float,
              attempt: int = 0, rate_per_hour: float | None = None) -> Cadence:
        """The cadence of an attempt that starts training at `step` (monotonic time `now`)."""
        if save_steps != AUTO:
            return cls(every=save_steps if isinstance(save_steps, int) else None, attempt=attempt)
        rate = DEFAULT_RATE_PER_HOUR if rate_per_hour is None else rate_per_hour
        log.info("attempt %d step %d: checkpoint interval auto at %g preemptions/h (%s); first checkpoint at "
                 "step %d, then Young/Daly within %d..%d steps", attempt, step, rate,
                 "from the operator" if rate_per_hour is not None else "the default", step + min_steps,
                 min_steps, max_steps)
        return cls(auto=True, rate_per_hour=rate, min_steps=min_steps, max_steps=max_steps, attempt=attempt,
                   next_step=step + min_steps, _window=(step, now))

    def due(self, step: int, total: int) -> bool:
        """Whether the loop commits a checkpoint after `step` of `total`."""
        if not (self.auto or self.every):
            return False
        if step == total:
            return True
        if not self.auto:
            return step % self.every == 0  # type: ignore[operator]
        return step >= self.next_step and (self._committed is None or self._committed())

    def saved(self, step: int, began: float, ended: float, committed: Callable[[], bool] | None = None) -> None:
        """Record a checkpoint taken after `step` that held the loop from `began` to `ended`; auto
        measures the commit cost and step time and sets the next checkpoint's step."""
        if not self.auto:
            return
        start_step, start_time = self._window
        if step > start_step:
            self.step_seconds = _average(self.step_seconds, (began - start_time) / (step - start_step))
        self.commit_seconds = _average(self.commit_seconds, ended - began)
        late = step - self.next_step
        steps = interval_steps(self.commit_seconds, self.step_seconds or 0.0, self.rate_per_hour,
                               self.min_steps, self.max_steps)
        self.next_step, self._window, self._committed = step + steps, (step, ended), committed
        log.info("attempt %d step %d: checkpoint interval auto: commit %.4gs, step %.4gs, %g preemptions/h -> "
                 "%d steps (bounds %d..%d); next checkpoint at step %d%s", self.attempt, step,
                 self.commit_seconds, self.step_seconds or 0.0, self.rate_per_hour, steps, self.min_steps,
                 self.max_steps, self.next_step,
                 f" (this one was put off {late} steps while the previous commit uploaded)" if late > 0 else "")
