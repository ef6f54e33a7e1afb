"""When a finished job is deleted (pure): spec.ttlSecondsAfterFinished, as Kubernetes Jobs have it.

The clock starts at status.completionTime (set when the job turned Succeeded or Failed). Once the
TTL has passed, the operator deletes the job; its pods go with it by owner references (the API
server's garbage collector), and nothing under spec.output.uri is touched: the LoRA, checkpoints
and logs stay in S3. Unset keeps the job forever; 0 deletes it as soon as it finishes. Editing
the TTL of a finished job takes effect at once (the edit wakes the job's loop).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class TtlDecision:
    """Delete the job now, or look again in `wait` seconds; `expires` is when the TTL ends."""

    delete: bool
    wait: float | None
    expires: datetime | None = None


KEEP = TtlDecision(delete=False, wait=None)
TTL_EXPIRED = "TTLExpired"  # the Event reason when the operator deletes a finished job


def ttl_decision(finished_at: datetime | None, ttl_seconds: int | None, now: datetime) -> TtlDecision:
    """What to do with a finished job: keep it (no TTL, or not finished), delete it, or wait."""
    if ttl_seconds is None or finished_at is None:
        return KEEP
    expires = finished_at.timestamp() + ttl_seconds
    left = expires - now.timestamp()
    when = datetime.fromtimestamp(expires, tz=finished_at.tzinfo)
    if left <= 0:
        return TtlDecision(delete=True, wait=None, expires=when)
    return TtlDecision(delete=False, wait=left, expires=when)
