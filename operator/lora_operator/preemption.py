"""The preemption rate a job's next attempt is told (pure), for `checkpoint.everySteps: auto`.

The trainer turns the rate into its checkpoint interval (lora_trainer.interval): it reads it from
LORA_PREEMPTION_RATE_PER_HOUR when it starts. The rate is the job's own, preemptions over the
hours it has spent on spot (from `status.startTime` to the end of its last attempt,
`status.lastAttempt.finishedAt`), with the pool's configured rate standing in for the history the
job does not have yet: the pool's rate counts as `preemption_rate_prior_hours` hours of it
(a Gamma-Poisson posterior mean):

    rate = (preemptions + pool_rate * prior_hours) / (spot_hours + prior_hours)

A new job gets the pool's rate; one with many hours behind it gets its own; in between the two
blend, so one early preemption does not swing the interval to its minimum. A prior of 0 hours
uses the observed rate as soon as the job has any history. Time suspended or backing off between
attempts counts as time on spot: a slight underestimate of the rate, never an overestimate. A job
with spec.spot.fallback accounts its GPU-seconds per pool (status.usage): its spot hours come from
there, so time on on-demand does not dilute the spot rate.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lora_operator.classify import parse_time
from lora_trainer.contract import ENV_PREEMPTION_RATE


def spot_hours(status: Mapping[str, Any], gpus_per_attempt: int = 0) -> float:
    """The job's hours on spot: its settled spot GPU-seconds over the attempt's GPUs when it accounts
    them (spec.spot.fallback: status.usage), else from the first attempt's start to the end of the
    last finished one (0 without both)."""
    settled = (status.get("usage") or {}).get("settled") or {}
    if gpus_per_attempt > 0 and int(settled.get("attempt") or 0) > 0:
        return float(settled.get("spotGpuSeconds") or 0.0) / gpus_per_attempt / 3600.0
    start = parse_time(status.get("startTime"))
    end = parse_time((status.get("lastAttempt") or {}).get("finishedAt"))
    if start is None or end is None or end <= start:
        return 0.0
    return (end - start).total_seconds() / 3600.0


def rate_per_hour(status: Mapping[str, Any], pool_rate: float, prior_hours: float, gpus_per_attempt: int = 0) -> float:
    """The job's preemptions per hour on spot, blended with the pool's rate (worth `prior_hours` of history)."""
    hours = spot_hours(status, gpus_per_attempt)
    preemptions = max(0, int(status.get("preemptions") or 0))
    if hours + prior_hours <= 0:
        return pool_rate
    return (preemptions + pool_rate * prior_hours) / (hours + prior_hours)


def rate_env(status: Mapping[str, Any], pool_rate: float, prior_hours: float, gpus_per_attempt: int = 0) -> dict[str, str]:
    """The pod's LORA_PREEMPTION_RATE_PER_HOUR entry."""
    rate = rate_per_hour(status, pool_rate, prior_hours, gpus_per_attempt)
    return {"name": ENV_PREEMPTION_RATE, "value": f"{rate:.6g}"}
