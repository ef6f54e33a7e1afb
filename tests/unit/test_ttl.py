"""spec.ttlSecondsAfterFinished: the pure decision, and what reconcile does with it.

Behaviours tested:
- ttl_decision: no TTL or not finished → keep; past the TTL (or at it, or TTL 0) → delete; before
  it → wait exactly the time left;
- a finished job past its TTL gets one DeleteJob action and a TTLExpired event; before it, a
  requeue at the expiry; a running job with a TTL, or a finished one without, gets neither.
"""

from __future__ import annotations

from datetime import timedelta

import pytest

from lora_operator.reconcile import DeleteJob, Observed, reconcile
from lora_operator.ttl import ttl_decision
from tests.unit.builders import NOW, SETTINGS, make_job, make_pod, ts


@pytest.mark.parametrize(("finished_ago", "ttl", "delete", "wait"), [
    (None, 60, False, None),   # not finished
    (10, None, False, None),   # no TTL: kept forever
    (10, 0, True, None),       # 0: deleted as soon as it finished
    (60, 60, True, None),      # exactly at the TTL
    (61, 60, True, None),
    (10, 60, False, 50.0),     # 50 s to go
    (0, 3600, False, 3600.0),
])
def test_ttl_decision(finished_ago: float | None, ttl: int | None, delete: bool, wait: float | None) -> None:
    finished = None if finished_ago is None else NOW - timedelta(seconds=finished_ago)
    due = ttl_decision(finished, ttl, NOW)
    assert (due.delete, due.wait) == (delete, wait)


def finished(phase: str = "Succeeded", ago: float = 30) -> dict:
    return {"phase": phase, "reason": "Completed", "attempt": 1, "preemptions": 0, "failures": 0,
            "lastAttempt": {"attempt": 1, "result": "Succeeded", "reason": "Succeeded", "finishedAt": ts(ago)},
            "startTime": ts(600), "completionTime": ts(ago)}


@pytest.mark.parametrize(("status", "ttl", "deletes", "requeue"), [
    (finished(ago=30), 10, True, None),
    (finished("Failed", ago=30), 10, True, None),
    (finished(ago=30), 100, False, 70.0),
    (finished(ago=30), None, False, None),
    ({"phase": "Running", "attempt": 1, "preemptions": 0, "failures": 0}, 0, False, None),
], ids=["succeeded-expired", "failed-expired", "waiting", "no-ttl", "running"])
def test_reconcile_deletes_finished_jobs_after_their_ttl(status: dict, ttl: int | None, deletes: bool,
                                                          requeue: float | None) -> None:
    spec = {} if ttl is None else {"ttlSecondsAfterFinished": ttl}
    pods = [make_pod(1, phase="Succeeded" if status["phase"] != "Running" else "Running",
                     exit_code=0 if status["phase"] != "Running" else None)]
    d = reconcile(Observed(job=make_job(status=status, **spec), pods=pods, now=NOW), SETTINGS)
    assert [type(a) for a in d.actions] == ([DeleteJob] if deletes else [])
    assert [e.reason for e in d.events] == (["TTLExpired"] if deletes else [])
    assert d.requeue_after == requeue
    assert d.status["phase"] == status["phase"]
