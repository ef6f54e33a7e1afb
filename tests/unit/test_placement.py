"""Spot → on-demand fallback: the placement decision, the pod it builds, and its reconcile hooks.

Behaviours tested:
- after K spot preemptions within the window the next attempt goes on-demand; older ones, or
  fewer, keep spot; afterPreemptions unset never falls back on preemptions;
- after an on-demand attempt: returnToSpot AfterAttempt goes back to spot (with a fresh count),
  Never stays;
- a spot pod unschedulable for unschedulableSeconds falls back; shorter, unset, or already
  on-demand does not;
- an on-demand pod carries the fallback's nodeSelector and tolerations instead of the spot ones,
  and the pool label;
- reconcile: the K-th preemption moves the placement to OnDemand and the next pod is built
  there; an unschedulable spot pod past T is deleted and replaced on on-demand without counting
  a preemption or a failure (lastAttempt Rescheduled, reason SpotUnschedulable); before T (even
  past the pending deadline) it is not Stalled, since the operator will act.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from lora_operator.classify import parse_time
from lora_operator.placement import (
    ON_DEMAND,
    POOL_LABEL,
    SPOT,
    Placement,
    after_on_demand,
    after_preemption,
    unschedulable_fallback,
)
from lora_operator.pods import build_pod
from lora_operator.reconcile import CreatePod, DeletePod, Observed, reconcile
from lora_operator.spec import FallbackSpec
from lora_operator.status import get_condition
from tests.unit.builders import NOW, SETTINGS, make_job, make_pod, ts

FALLBACK: dict[str, Any] = {
    "nodeSelector": {"pool": "on-demand"},
    "tolerations": [{"key": "on-demand", "operator": "Exists", "effect": "NoSchedule"}],
    "afterPreemptions": 2, "windowSeconds": 600, "unschedulableSeconds": 300,
}
SPOT_RESOURCES = {"gpus": 2, "nodeSelector": {"pool": "spot"},
                  "tolerations": [{"key": "spot", "operator": "Exists", "effect": "NoSchedule"}]}


def fb(**over: Any) -> FallbackSpec:
    return FallbackSpec.model_validate({**FALLBACK, **over})


@pytest.mark.parametrize(("before", "over", "pool"), [
    ([], {}, SPOT),  # 1 of 2
    ([ts(100)], {}, ON_DEMAND),  # 2 within 600 s
    ([ts(700)], {}, SPOT),  # the older one is out of the window
    ([ts(100)], {"afterPreemptions": None}, SPOT),  # no preemption trigger
    ([ts(100), ts(50)], {"afterPreemptions": 4}, SPOT),
    ([ts(100), ts(50), ts(10)], {"afterPreemptions": 4}, ON_DEMAND),
])
def test_after_preemption(before: list[str], over: dict, pool: str) -> None:
    new = after_preemption(fb(**over), Placement(preemptions=tuple(before)), NOW, ts(0), parse_time)
    assert new.pool == pool
    if pool == ON_DEMAND:
        assert new.reason == "SpotPreemptions" and new.preemptions == ()
    else:
        assert new.preemptions[-1] == ts(0)


@pytest.mark.parametrize(("mode", "pool"), [("AfterAttempt", SPOT), ("Never", ON_DEMAND)])
def test_after_on_demand(mode: str, pool: str) -> None:
    current = Placement(ON_DEMAND, "SpotPreemptions", "x")
    assert after_on_demand(fb(returnToSpot=mode), current).pool == pool
    # A preempted on-demand attempt follows the same setting.
    assert after_preemption(fb(returnToSpot=mode), current, NOW, ts(0), parse_time).pool == pool


@pytest.mark.parametrize(("unschedulable_for", "over", "pool", "falls_back"), [
    (400, {}, SPOT, True),
    (200, {}, SPOT, False),
    (400, {"unschedulableSeconds": None}, SPOT, False),
    (400, {}, ON_DEMAND, False),
    (None, {}, SPOT, False),  # scheduled, or the scheduler has not said
])
def test_unschedulable_fallback(unschedulable_for: float | None, over: dict, pool: str, falls_back: bool) -> None:
    pod = make_pod(phase="Pending", unschedulable=unschedulable_for is not None)
    for c in pod["status"]["conditions"]:
        c["lastTransitionTime"] = ts(unschedulable_for or 0)
    new = unschedulable_fallback(fb(**over), Placement(pool), pod, NOW, parse_time)
    assert (new is not None) is falls_back
    if new:
        assert (new.pool, new.reason) == (ON_DEMAND, "SpotUnschedulable")


def test_on_demand_pod_gets_the_fallback_placement() -> None:
    job = make_job(resources=SPOT_RESOURCES, spot={"fallback": FALLBACK})
    spot, demand = build_pod(job, 1, SETTINGS), build_pod(job, 2, SETTINGS, pool=ON_DEMAND)
    assert spot["spec"]["nodeSelector"] == {"pool": "spot"}
    assert spot["spec"]["tolerations"][0]["key"] == "spot"
    assert spot["metadata"]["labels"][POOL_LABEL] == "spot"
    assert demand["spec"]["nodeSelector"] == {"pool": "on-demand"}
    assert demand["spec"]["tolerations"] == [{"key": "on-demand", "operator": "Exists", "effect": "NoSchedule"}]
    assert demand["metadata"]["labels"][POOL_LABEL] == "on-demand"
    assert POOL_LABEL not in build_pod(make_job(), 1, SETTINGS)["metadata"]["labels"]


def _preempted(attempt: int) -> dict:
    pod = make_pod(attempt, phase="Failed", exit_code=75)
    pod["metadata"]["labels"][POOL_LABEL] = "spot"
    return pod


def test_reconcile_falls_back_after_preemptions() -> None:
    job_blocks = {"resources": SPOT_RESOURCES, "spot": {"fallback": FALLBACK}}
    status = {"phase": "Running", "attempt": 2, "preemptions": 1, "failures": 0,
              "placement": {"pool": SPOT, "reason": "OnSpot", "message": "", "recentPreemptions": [ts(60)]}}
    d = reconcile(Observed(job=make_job(status=status, **job_blocks), pods=[_preempted(2)], now=NOW), SETTINGS)
    assert d.status["placement"]["pool"] == ON_DEMAND
    assert d.status["preemptions"] == 2
    pod = next(a.pod for a in d.actions if isinstance(a, CreatePod))
    assert pod["metadata"]["name"] == "job-a3" and pod["spec"]["nodeSelector"] == {"pool": "on-demand"}
    assert any(e.reason == "SpotPreemptions" for e in d.events)


def test_reconcile_replaces_unschedulable_spot_pod_without_counting() -> None:
    job = make_job(status={"phase": "Pending", "attempt": 1, "preemptions": 0, "failures": 0},
                   resources=SPOT_RESOURCES, spot={"fallback": FALLBACK})
    pod = make_pod(phase="Pending", unschedulable=True, created_ago=400)
    pod["status"]["conditions"][0]["lastTransitionTime"] = ts(400)
    d = reconcile(Observed(job=job, pods=[pod], now=NOW), SETTINGS)
    assert [(a.name, a.grace_seconds) for a in d.actions if isinstance(a, DeletePod)] == [("job-a1", 0)]
    assert (d.status["preemptions"], d.status["failures"]) == (0, 0)
    assert d.status["lastAttempt"]["result"] == "Rescheduled"
    assert d.status["lastAttempt"]["reason"] == "SpotUnschedulable"
    assert d.status["placement"]["pool"] == ON_DEMAND
    # Next pass: the pod is gone, attempt 2 starts on on-demand.
    d = reconcile(Observed(job={**job, "status": d.status}, pods=[], now=NOW + timedelta(seconds=1)), SETTINGS)
    pod2 = next(a.pod for a in d.actions if isinstance(a, CreatePod))
    assert pod2["spec"]["nodeSelector"] == {"pool": "on-demand"}
    assert (d.status["preemptions"], d.status["failures"]) == (0, 0)


def test_unschedulable_spot_pod_is_not_stalled_while_the_fallback_waits() -> None:
    blocks = {"resources": SPOT_RESOURCES, "spot": {"fallback": {**FALLBACK, "unschedulableSeconds": 3600}}}
    job = make_job(status={"phase": "Pending", "attempt": 1, "preemptions": 0, "failures": 0}, **blocks)
    pod = make_pod(phase="Pending", unschedulable=True, created_ago=2 * SETTINGS.pending_deadline)
    pod["metadata"]["labels"][POOL_LABEL] = "spot"
    pod["status"]["conditions"][0]["lastTransitionTime"] = ts(2 * SETTINGS.pending_deadline)
    d = reconcile(Observed(job=job, pods=[pod], now=NOW), SETTINGS)
    assert get_condition(d.status["conditions"], "Stalled")["status"] == "False"
    assert not [a for a in d.actions if isinstance(a, DeletePod)]
    # Without the unschedulable trigger the same pod is Stalled after the pending deadline.
    plain = make_job(status=job["status"], resources=SPOT_RESOURCES, spot={"fallback": FALLBACK | {"unschedulableSeconds": None}})
    d = reconcile(Observed(job=plain, pods=[pod], now=NOW), SETTINGS)
    assert get_condition(d.status["conditions"], "Stalled")["reason"] == "Unschedulable"
