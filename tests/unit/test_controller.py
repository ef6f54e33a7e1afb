"""Pure bits of the Kopf wiring.

Behaviours tested:
- Kopf's per-event "Handler ... succeeded." lines of the wake-up handlers are dropped; every other
  line (our reconcile logs, failures, other handlers) passes;
- a status the API refuses (422) is logged once, a short status with the condition StatusRejected
  is written in its place so the job moves on, and each transition's Events are posted once
  however many passes are refused; once the API accepts the full status again, the condition
  turns False; if even the short status is refused, no Event is posted at all.
  (An in-memory API stands in for the server: the thing under test is the controller.)
"""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import Callable, Mapping
from typing import Any

import pytest

from lora_operator import kube as k
from lora_operator.controller import (
    Memo,
    QuietWakeups,
    StatusRefused,
    _LoopState,
    build_registry,
    reconcile_job,
)
from lora_operator.emulator.patches import merge_patch
from lora_operator.status import get_condition
from tests.unit.builders import SETTINGS, make_job, make_pod, ts


@pytest.mark.parametrize(("message", "kept"), [
    ("Handler 'build_registry.<locals>.pod_event' succeeded.", False),
    ("Handler 'build_registry.<locals>.job_event' succeeded.", False),
    ("Handler 'build_registry.<locals>.job_event' failed with an exception and will try again in 60 seconds: x", True),
    ("Handler 'build_registry.<locals>.configure' succeeded.", True),
    ("attempt 2: Preempted: attempt 1: PreemptionByScheduler: preempted", True),
])
def test_quiet_wakeups(message: str, kept: bool) -> None:
    record = logging.LogRecord("kopf.objects", logging.INFO, __file__, 1, message, None, None)
    assert QuietWakeups().filter(record) is kept


class FakeApi:
    """One job and its pods in memory; `refuse(status)` says whether a /status write gets a 422."""

    def __init__(self, job: dict[str, Any], pods: list[dict[str, Any]], refuse: Callable[[Mapping[str, Any]], bool]) -> None:
        self.job, self.pods, self.refuse = job, pods, refuse
        self.writes = 0

    async def get_job(self, namespace: str, name: str) -> dict[str, Any]:
        return copy.deepcopy(self.job)

    async def list_pods(self, namespace: str, job: str) -> list[dict[str, Any]]:
        return copy.deepcopy(self.pods)

    async def create_pod(self, pod: Mapping[str, Any]) -> dict[str, Any]:
        self.pods.append(dict(pod))
        return dict(pod)

    async def delete_pod(self, namespace: str, name: str, grace_seconds: int | None = None) -> None:
        self.pods = [p for p in self.pods if p["metadata"]["name"] != name]

    async def patch_job_status(self, namespace: str, name: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        status = merge_patch(self.job.get("status") or {}, dict(patch))
        if self.refuse(status):
            raise k.Invalid(f'LoRATrainingJob "{name}" is invalid: status.outputs: Forbidden', 422)
        self.job["status"] = status
        self.writes += 1
        return copy.deepcopy(self.job)

    async def read_secret(self, namespace: str, name: str) -> None:
        return None

    async def node_ready(self, name: str) -> None:
        return None


def test_refused_status_is_logged_once_marked_and_events_posted_once(caplog: pytest.LogCaptureFixture) -> None:
    status = {"phase": "Running", "attempt": 1, "preemptions": 0, "failures": 0, "startTime": ts(600)}
    api = FakeApi(make_job(status=status), [make_pod(phase="Failed", exit_code=1)],
                  refuse=lambda s: "outputs" in s)  # a refusal the bounding cannot foresee
    events: list[tuple[str, str]] = []
    memo = Memo(settings=SETTINGS, kube=api, events=lambda job, t, reason, m: events.append((t, reason)))  # type: ignore[arg-type]
    loop, logger = _LoopState(), logging.getLogger("test.controller")

    with caplog.at_level(logging.ERROR, logger="test.controller"):
        for _ in range(4):
            asyncio.run(reconcile_job(memo, "ml", "job", logger, loop))
    stored = api.job["status"]
    assert (stored["phase"], stored["failures"], stored["lastAttempt"]["attempt"]) == ("Recovering", 1, 1)
    rejected = get_condition(stored["conditions"], "StatusRejected")
    assert rejected is not None and rejected["status"] == "True" and "status.outputs" in rejected["message"]
    assert events == [("Warning", "Failed"), ("Normal", "Recovering")]
    assert len([r for r in caplog.records if "refused the job's status" in r.getMessage()]) == 1
    assert api.writes == 1  # later passes decided the same short status: nothing to write

    api.refuse = lambda s: False
    asyncio.run(reconcile_job(memo, "ml", "job", logger, loop))
    rejected = get_condition(api.job["status"]["conditions"], "StatusRejected")
    assert rejected is not None and (rejected["status"], rejected["reason"]) == ("False", "StatusAccepted")
    assert "outputs" in api.job["status"] and events == [("Warning", "Failed"), ("Normal", "Recovering")]


def test_no_events_when_even_the_short_status_is_refused() -> None:
    status = {"phase": "Running", "attempt": 1, "preemptions": 0, "failures": 0, "startTime": ts(600)}
    api = FakeApi(make_job(status=status), [make_pod(phase="Failed", exit_code=1)], refuse=lambda s: True)
    events: list[str] = []
    memo = Memo(settings=SETTINGS, kube=api, events=lambda job, t, reason, m: events.append(reason))  # type: ignore[arg-type]
    for _ in range(3):
        with pytest.raises(StatusRefused):
            asyncio.run(reconcile_job(memo, "ml", "job", logging.getLogger("test.controller"), _LoopState()))
    assert events == [] and api.job["status"]["phase"] == "Running"


def test_daemons_put_no_finalizer_on_jobs() -> None:
    """Kopf's daemon decorator always asks for a finalizer; build_registry takes that back (a Kopf
    upgrade that renames these internals fails here, not as jobs that cannot be deleted)."""
    registry = build_registry(Memo(settings=SETTINGS, kube=None))  # type: ignore[arg-type]
    daemons = registry._spawning.get_all_handlers()  # noqa: SLF001
    assert daemons and all(h.requires_finalizer is False for h in daemons)
    # LeanDiffBaseStorage keeps only the generation of a job: right only while nothing detects changes.
    assert registry._changing.get_all_handlers() == []  # noqa: SLF001
