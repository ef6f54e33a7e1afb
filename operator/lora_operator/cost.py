"""GPU-time and cost accounting (pure): GPU-seconds on spot and on on-demand, and what they cost.

An attempt's GPU-seconds are its trainer container's run time (startedAt → finishedAt, or → now
while it runs) times the GPUs it holds; a pod that never started costs nothing. Finished
attempts are settled into status.usage.settled once, when the operator classifies them (so a
repeated pass never counts one twice); the totals add the running attempt. Prices per GPU-hour
come from the operator's settings (chart values `prices`); with no prices set, status.cost is
left out. `saved` is what the same GPU-seconds would have cost all on on-demand, minus the cost.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from lora_operator.placement import ON_DEMAND, SPOT

LIVE_STEP_SECONDS = 60.0


def run_seconds(pod: Mapping[str, Any] | None, now: datetime, parse: Any) -> float:
    """Seconds the pod's trainer ran: started → finished (→ now while running); 0 if it never started."""
    if not pod:
        return 0.0
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    cs = next((c for c in statuses if c.get("name") == "trainer"), statuses[0] if statuses else {})
    state = cs.get("state") or {}
    terminated = state.get("terminated") or (cs.get("lastState") or {}).get("terminated")
    if terminated:
        start, end = parse(terminated.get("startedAt")), parse(terminated.get("finishedAt"))
    else:
        start, end = parse((state.get("running") or {}).get("startedAt")), now
    if start is None or end is None:
        return 0.0
    return max(0.0, (end - start).total_seconds())


def settle(usage: Mapping[str, Any] | None, attempt: int, pool: str, gpu_seconds: float) -> dict[str, Any]:
    """status.usage.settled with a finished attempt added (once: an attempt already settled is ignored)."""
    settled = dict((usage or {}).get("settled") or {"attempt": 0, "spotGpuSeconds": 0.0, "onDemandGpuSeconds": 0.0})
    if attempt <= int(settled.get("attempt") or 0):
        return settled
    key = "onDemandGpuSeconds" if pool == ON_DEMAND else "spotGpuSeconds"
    settled[key] = round(float(settled.get(key) or 0.0) + gpu_seconds, 1)
    settled["attempt"] = attempt
    return settled


def usage(settled: Mapping[str, Any], running_pool: str | None, running_gpu_seconds: float) -> dict[str, Any]:
    """status.usage: settled attempts plus the running one (in `running_pool`, None if none runs),
    whose share moves in steps of LIVE_STEP_SECONDS so a running job's status changes once a minute
    at most for it (a status write per job per pass would load the API server at scale)."""
    running_gpu_seconds = running_gpu_seconds // LIVE_STEP_SECONDS * LIVE_STEP_SECONDS
    spot = float(settled.get("spotGpuSeconds") or 0.0) + (running_gpu_seconds if running_pool == SPOT else 0.0)
    demand = float(settled.get("onDemandGpuSeconds") or 0.0) + (running_gpu_seconds if running_pool == ON_DEMAND else 0.0)
    return {"spotGpuSeconds": round(spot, 1), "onDemandGpuSeconds": round(demand, 1), "settled": dict(settled)}


def estimate(spot_gpu_seconds: float, on_demand_gpu_seconds: float, spot_price: float, on_demand_price: float,
             currency: str) -> dict[str, Any] | None:
    """status.cost from GPU-seconds and per-GPU-hour prices; None when no price is configured."""
    if spot_price <= 0 and on_demand_price <= 0:
        return None
    spot = spot_gpu_seconds / 3600 * spot_price
    demand = on_demand_gpu_seconds / 3600 * on_demand_price
    all_demand = (spot_gpu_seconds + on_demand_gpu_seconds) / 3600 * on_demand_price
    return {"currency": currency, "spot": round(spot, 4), "onDemand": round(demand, 4), "total": round(spot + demand, 4),
            "allOnDemand": round(all_demand, 4), "saved": round(all_demand - spot - demand, 4)}
