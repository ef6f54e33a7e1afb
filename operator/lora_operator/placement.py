"""Spot → on-demand fallback (pure): which pool the next attempt goes to, and why.

spec.resources.nodeSelector/tolerations name the spot pool; spec.spot.fallback names an
on-demand pool and the triggers:
- `afterPreemptions` spot preemptions within `windowSeconds` (counted from the last switch to
  spot, so a return to spot does not fall straight back on old preemptions);
- a spot pod unschedulable (PodScheduled False, reason Unschedulable) for `unschedulableSeconds`:
  the pod is deleted and the next attempt goes on-demand, without charging a preemption or a
  failure (status.lastAttempt says Rescheduled, reason SpotUnschedulable).
`returnToSpot: AfterAttempt` sends the attempt after an on-demand one back to spot; `Never`
keeps the job on on-demand. The state lives in status.placement (see `Placement`); pods carry
the label `lora-operator.dev/pool` so accounting knows where each attempt ran.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

SPOT = "Spot"
ON_DEMAND = "OnDemand"
POOL_LABEL = "lora-operator.dev/pool"
POOL_LABEL_VALUES = {SPOT: "spot", ON_DEMAND: "on-demand"}
# Reasons in status.placement and in events.
SPOT_PREEMPTED = "SpotPreemptions"
SPOT_UNSCHEDULABLE = "SpotUnschedulable"
RETURNED_TO_SPOT = "ReturnedToSpot"
ON_SPOT = "OnSpot"
MAX_RECORDED = 100  # afterPreemptions is at most 100: no more times are ever needed


@dataclass(frozen=True)
class Placement:
    """status.placement: the pool of the current/next attempt and the recent spot preemptions."""

    pool: str = SPOT
    reason: str = ON_SPOT
    message: str = "attempts run on the spot pool (spec.resources)"
    preemptions: tuple[str, ...] = field(default_factory=tuple)  # RFC 3339 times since the last switch to spot

    def to_status(self) -> dict[str, Any]:
        """As written in status.placement."""
        return {"pool": self.pool, "reason": self.reason, "message": self.message,
                "recentPreemptions": list(self.preemptions)}

    @staticmethod
    def from_status(data: Mapping[str, Any] | None) -> Placement:
        """From status.placement (absent: a job that starts on spot)."""
        if not data:
            return Placement()
        pool = data.get("pool") if data.get("pool") in (SPOT, ON_DEMAND) else SPOT
        times = tuple(str(t) for t in data.get("recentPreemptions") or [] if isinstance(t, str))
        return Placement(pool, str(data.get("reason") or ON_SPOT), str(data.get("message") or ""), times)


def _within(times: Sequence[str], now: datetime, window: float, parse: Any) -> int:
    start = now - timedelta(seconds=window)
    return sum(1 for t in times if (when := parse(t)) is not None and when > start)


def after_preemption(fb: Any, current: Placement, now: datetime, now_text: str, parse: Any) -> Placement:
    """The placement of the next attempt after the current one was preempted (fb: FallbackSpec)."""
    if current.pool == ON_DEMAND:
        return after_on_demand(fb, current)
    times = (*current.preemptions, now_text)[-MAX_RECORDED:]
    count = _within(times, now, fb.window_seconds, parse)
    if fb.after_preemptions is not None and count >= fb.after_preemptions:
        return Placement(ON_DEMAND, SPOT_PREEMPTED,
                         f"{count} spot preemptions within {fb.window_seconds}s (spec.spot.fallback.afterPreemptions "
                         f"{fb.after_preemptions}): the next attempt runs on the on-demand pool", ())
    return Placement(SPOT, current.reason, current.message, times)


def after_on_demand(fb: Any, current: Placement) -> Placement:
    """The placement after an on-demand attempt ended without finishing (returnToSpot decides)."""
    if fb.return_to_spot == "AfterAttempt":
        return Placement(SPOT, RETURNED_TO_SPOT, "the on-demand attempt ended; spec.spot.fallback.returnToSpot is "
                         "AfterAttempt: the next attempt runs on the spot pool", ())
    return current


def unschedulable_since(pod: Mapping[str, Any], parse: Any) -> datetime | None:
    """Since when the scheduler has found no node for the pod (None if it has not said so)."""
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False" and cond.get("reason") == "Unschedulable":
            return parse(cond.get("lastTransitionTime")) or parse((pod.get("metadata") or {}).get("creationTimestamp"))
    return None


def unschedulable_fallback(fb: Any, current: Placement, pod: Mapping[str, Any], now: datetime,
                           parse: Any) -> Placement | None:
    """The on-demand placement when a spot pod has been unschedulable for unschedulableSeconds, else None."""
    if fb is None or fb.unschedulable_seconds is None or current.pool != SPOT:
        return None
    since = unschedulable_since(pod, parse)
    if since is None or (now - since).total_seconds() < fb.unschedulable_seconds:
        return None
    return Placement(ON_DEMAND, SPOT_UNSCHEDULABLE,
                     f"the spot pod was unschedulable for {(now - since).total_seconds():.0f}s "
                     f"(spec.spot.fallback.unschedulableSeconds {fb.unschedulable_seconds}): replaced on the on-demand "
                     "pool without counting a preemption or a failure", ())


def pool_of(pod: Mapping[str, Any]) -> str:
    """The pool a pod was placed in, from its label (spot when unlabelled)."""
    value = ((pod.get("metadata") or {}).get("labels") or {}).get(POOL_LABEL)
    return ON_DEMAND if value == POOL_LABEL_VALUES[ON_DEMAND] else SPOT


def node_placement(resources: Any, fb: Any, pool: str) -> tuple[dict[str, str], list[Any]]:
    """(nodeSelector, tolerations as spec models) of a pod in `pool`: the fallback's replace the spot ones."""
    if pool == ON_DEMAND and fb is not None:
        return dict(fb.node_selector), list(fb.tolerations)
    return dict(resources.node_selector), list(resources.tolerations)
