"""Where and when an attempt may run, as steps of one reconcile: queue admission and pool placement.

`SchedulingSteps` is mixed into reconcile's `_Run` (it uses its status `s`, clock `now`, settings,
decision `d` and helpers). The decisions are the pure functions of lora_operator.queueing (a pod
held by a scheduling gate is Pending/Queued; the pending deadline starts at admission),
lora_operator.placement (spot → on-demand fallback) and lora_operator.cost (GPU-seconds, cost).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import datetime
from typing import Any

from lora_operator import cost
from lora_operator import status as st
from lora_operator.classify import Outcome, Reason, Result, attempt_of, parse_time, phase
from lora_operator.jobset import group_queued
from lora_operator.placement import (
    ON_DEMAND,
    SPOT,
    Placement,
    after_on_demand,
    after_preemption,
    pool_of,
    unschedulable_fallback,
)
from lora_operator.queueing import admission, is_queued, queued_message
from lora_operator.settings import Settings
from lora_operator.spec import JobSpec


class SchedulingSteps:
    """Reconcile steps for spec.queueName and spec.spot.fallback (see the module docstring)."""

    s: dict[str, Any]
    now: datetime
    settings: Settings
    d: Any  # reconcile.Decision
    pods: list[Mapping[str, Any]]
    pod: Callable[[int], Mapping[str, Any] | None]
    delete: Callable[[Mapping[str, Any], int | None, str], None]
    spend: Callable[[Outcome, JobSpec], None]
    event: Callable[[str, str, str], None]
    set_phase: Callable[..., None]
    classified: Callable[[], bool]

    def next_pool(self, spec: JobSpec) -> str:
        """The pool the next attempt's pod goes to."""
        return Placement.from_status(self.s.get("placement")).pool if spec.spot.fallback else SPOT

    def queued(self, pod: Mapping[str, Any], spec: JobSpec) -> bool:
        """A pod held by a scheduling gate (Kueue) is Pending/Queued, never Stalled; record its admission."""
        held = is_queued(pod)
        return self.hold(held, queued_message(pod, spec.queue_name) if held else "")

    def queued_group(self, pods: list[Mapping[str, Any]], jobset: Mapping[str, Any] | None, spec: JobSpec) -> bool:
        """spec.nodes > 1: a JobSet Kueue holds (suspended, no pods yet) is Pending/Queued, never Stalled."""
        held = jobset is not None and group_queued(pods, jobset)
        name = ((jobset or {}).get("metadata") or {}).get("name", "?")
        return self.hold(held, f"JobSet {name} waits for admission in LocalQueue {spec.queue_name} (Kueue keeps it "
                               "suspended); the pending deadline starts once admitted")

    def hold(self, held: bool, message: str) -> bool:
        """Record the attempt's admission (status.admission); while held, the job is Pending/Queued."""
        record = admission(self.s.get("admission"), self.s["attempt"], held, st.rfc3339(self.now))
        if record is None:
            self.s.pop("admission", None)
        else:
            self.s["admission"] = record
        if held:
            self.set_phase("Pending", Reason.QUEUED, message)
            self.d.requeue(self.settings.progress_interval)
        return held

    def attempt_usage(self, attempt: int, spec: JobSpec, fallback_pool: str) -> tuple[str, float]:
        """The pool and GPU-seconds of an attempt so far: its pod's, or the sum over its group's pods."""
        pods = [p for p in self.pods if attempt_of(p) == attempt] if spec.nodes > 1 else \
            [p for p in [self.pod(attempt)] if p is not None]
        pool = pool_of(pods[0]) if pods else fallback_pool
        return pool, sum(cost.run_seconds(p, self.now, parse_time) for p in pods) * spec.resources.gpus

    def rescheduled(self, pod: Mapping[str, Any], spec: JobSpec) -> bool:
        """A spot pod unschedulable past spec.spot.fallback.unschedulableSeconds is replaced on on-demand."""
        current = Placement.from_status(self.s.get("placement"))
        new = unschedulable_fallback(spec.spot.fallback, replace(current, pool=pool_of(pod)), pod, self.now, parse_time)
        if new is None:
            if spec.spot.fallback and spec.spot.fallback.unschedulable_seconds and phase(pod) == "Pending":
                self.d.requeue(min(self.settings.progress_interval, spec.spot.fallback.unschedulable_seconds))
            return False
        self.delete(pod, 0, new.reason)
        self.s["placement"] = new.to_status()
        self.spend(Outcome(Result.RESCHEDULED, new.reason, new.message), spec)
        return True

    def will_reschedule(self, pod: Mapping[str, Any], spec: JobSpec, reason: str) -> bool:
        """An unschedulable spot pod that the fallback will replace needs no human: not Stalled."""
        fb = spec.spot.fallback
        return (reason == Reason.UNSCHEDULABLE and fb is not None and fb.unschedulable_seconds is not None
                and pool_of(pod) == SPOT)

    def account(self, outcome: Outcome, spec: JobSpec) -> None:
        """spec.spot.fallback: settle the ended attempt's GPU-seconds and choose the next attempt's pool."""
        fb = spec.spot.fallback
        if fb is None:
            return
        attempt = self.s["attempt"]
        current = Placement.from_status(self.s.get("placement"))
        pool, seconds = self.attempt_usage(attempt, spec, current.pool)
        self.s["usage"] = cost.usage(cost.settle(self.s.get("usage"), attempt, pool, seconds), None, 0.0)
        new = current
        if outcome.result is Result.PREEMPTED and not spec.suspend:
            new = after_preemption(fb, replace(current, pool=pool), self.now, st.rfc3339(self.now), parse_time)
        elif outcome.result is Result.FAILED and pool == ON_DEMAND:
            new = after_on_demand(fb, current)
        if new.pool != current.pool:
            self.event("Normal", new.reason, new.message)
        self.s["placement"] = new.to_status()

    def report_usage(self, spec: JobSpec) -> None:
        """status.usage with the running attempt, and status.cost at the configured prices."""
        if spec.spot.fallback is None:
            return
        self.s.setdefault("placement", Placement().to_status())
        settled = (self.s.get("usage") or {}).get("settled") or cost.settle(None, 0, SPOT, 0.0)
        pool, live = (None, 0.0) if self.classified() else self.attempt_usage(self.s["attempt"], spec, "")
        self.s["usage"] = used = cost.usage(settled, pool or None, live)
        priced = cost.estimate(used["spotGpuSeconds"], used["onDemandGpuSeconds"], self.settings.spot_gpu_hour_price,
                               self.settings.on_demand_gpu_hour_price, self.settings.currency)
        if priced is not None:
            self.s["cost"] = priced
