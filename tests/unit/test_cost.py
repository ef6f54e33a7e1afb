"""GPU-seconds and cost accounting (lora_operator.cost), table-driven.

Behaviours tested:
- an attempt's run time is its trainer's startedAt → finishedAt (→ now while running); a pod
  that never started, or no pod, is 0;
- settling adds a finished attempt to its pool once; settling it again changes nothing;
- the totals add the running attempt to its pool, in whole minutes (a status write a minute at most);
- the cost at per-GPU-hour prices, all-on-demand and the saving; no prices, no cost;
- reconcile settles a finished attempt's GPU-seconds × GPUs into the pool it ran in and shows the cost.
"""

from __future__ import annotations

from typing import Any

import pytest

from lora_operator import cost
from lora_operator.classify import parse_time
from lora_operator.placement import ON_DEMAND, POOL_LABEL, SPOT
from lora_operator.reconcile import Observed, reconcile
from lora_operator.settings import Settings
from tests.unit.builders import NOW, SETTINGS, make_job, make_pod, ts


def pod_with(state: dict[str, Any]) -> dict[str, Any]:
    return {"status": {"containerStatuses": [{"name": "trainer", "state": state}]}}


@pytest.mark.parametrize(("pod", "seconds"), [
    (pod_with({"terminated": {"startedAt": ts(700), "finishedAt": ts(100), "exitCode": 75}}), 600.0),
    (pod_with({"running": {"startedAt": ts(90)}}), 90.0),
    (pod_with({"waiting": {"reason": "ContainerCreating"}}), 0.0),
    (pod_with({"terminated": {"exitCode": 137}}), 0.0),  # no times: unknown, counted as 0
    (None, 0.0),
])
def test_run_seconds(pod: dict | None, seconds: float) -> None:
    assert cost.run_seconds(pod, NOW, parse_time) == seconds


def test_settle_once_per_attempt() -> None:
    s1 = cost.settle(None, 1, SPOT, 1200.0)
    assert s1 == {"attempt": 1, "spotGpuSeconds": 1200.0, "onDemandGpuSeconds": 0.0}
    s2 = cost.settle({"settled": s1}, 2, ON_DEMAND, 300.0)
    assert s2 == {"attempt": 2, "spotGpuSeconds": 1200.0, "onDemandGpuSeconds": 300.0}
    assert cost.settle({"settled": s2}, 2, ON_DEMAND, 300.0) == s2  # a repeated pass


@pytest.mark.parametrize(("pool", "running", "spot", "demand"), [
    (SPOT, 150.0, 220.0, 300.0),  # the running share moves in whole minutes
    (ON_DEMAND, 150.0, 100.0, 420.0),
    (ON_DEMAND, 59.0, 100.0, 300.0),
    (None, 150.0, 100.0, 300.0),
])
def test_usage_adds_the_running_attempt(pool: str | None, running: float, spot: float, demand: float) -> None:
    settled = {"attempt": 2, "spotGpuSeconds": 100.0, "onDemandGpuSeconds": 300.0}
    used = cost.usage(settled, pool, running)
    assert (used["spotGpuSeconds"], used["onDemandGpuSeconds"]) == (spot, demand)


@pytest.mark.parametrize(("spot_s", "demand_s", "prices", "want"), [
    (3600, 3600, (1.0, 3.0), {"spot": 1.0, "onDemand": 3.0, "total": 4.0, "allOnDemand": 6.0, "saved": 2.0}),
    (7200, 0, (0.5, 2.0), {"spot": 1.0, "onDemand": 0.0, "total": 1.0, "allOnDemand": 4.0, "saved": 3.0}),
    (0, 1800, (1.0, 4.0), {"spot": 0.0, "onDemand": 2.0, "total": 2.0, "allOnDemand": 2.0, "saved": 0.0}),
    (3600, 0, (0.0, 0.0), None),
])
def test_estimate(spot_s: float, demand_s: float, prices: tuple[float, float], want: dict | None) -> None:
    got = cost.estimate(spot_s, demand_s, *prices, "USD")
    assert got == (None if want is None else {"currency": "USD", **want})


def test_reconcile_settles_by_pool_and_prices() -> None:
    settings = Settings(**{**SETTINGS.model_dump(), "spot_gpu_hour_price": 1.0, "on_demand_gpu_hour_price": 3.0})
    fallback = {"nodeSelector": {"pool": "od"}, "afterPreemptions": 5}
    status = {"phase": "Running", "attempt": 2, "preemptions": 1, "failures": 0,
              "usage": {"spotGpuSeconds": 3600.0, "onDemandGpuSeconds": 0.0,
                        "settled": {"attempt": 1, "spotGpuSeconds": 3600.0, "onDemandGpuSeconds": 0.0}},
              "placement": {"pool": ON_DEMAND, "reason": "SpotPreemptions", "message": "", "recentPreemptions": []}}
    pod = make_pod(2, phase="Succeeded", exit_code=0)
    pod["status"]["containerStatuses"][0]["state"]["terminated"].update(startedAt=ts(1900), finishedAt=ts(100))
    pod["metadata"]["labels"][POOL_LABEL] = "on-demand"
    job = make_job(status=status, resources={"gpus": 2}, spot={"fallback": fallback})
    d = reconcile(Observed(job=job, pods=[pod], now=NOW), settings)
    assert d.status["phase"] == "Succeeded"
    assert (d.status["usage"]["spotGpuSeconds"], d.status["usage"]["onDemandGpuSeconds"]) == (3600.0, 3600.0)
    assert d.status["cost"] == {"currency": "USD", "spot": 1.0, "onDemand": 3.0, "total": 4.0, "allOnDemand": 6.0,
                                "saved": 2.0}
