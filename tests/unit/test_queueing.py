"""Kueue admission: queue labels, the Queued classification, and the pending deadline from admission.

Behaviours tested:
- spec.queueName puts kueue.x-k8s.io/queue-name on the pod (none when empty); a JobSet carries the
  label and its pods do not, and a labelled suspended JobSet is queued; a queue name that is no label value is refused naming the field;
- a Pending pod held by a scheduling gate (Kueue's or any other, or PodScheduled SchedulingGated)
  is queued; a running, finished or deleting pod is not; stuck() never calls a queued pod stuck;
- reconcile: a gated pod makes the job Pending/Queued (not Stalled) long past the pending
  deadline, and records when it was queued; once the gate is gone the deadline counts from the
  admission, so a pod created long ago but admitted just now is not Stalled; past the deadline
  from admission it is.
"""

from __future__ import annotations

from typing import Any

import pytest

from lora_operator.classify import parse_time, stuck
from lora_operator.pods import build_pod
from lora_operator.queueing import (
    KUEUE_GATE,
    QUEUE_LABEL,
    admission,
    deadline_start,
    is_queued,
    jobset_labels,
    jobset_queued,
    pod_labels,
)
from lora_operator.reconcile import Observed, reconcile
from lora_operator.spec import SpecError, parse_spec
from lora_operator.status import get_condition
from tests.unit.builders import MINIMAL_SPEC, NOW, SETTINGS, make_job, make_pod, ts


def gated(pod: dict[str, Any], *gates: str) -> dict[str, Any]:
    pod["spec"] = {"schedulingGates": [{"name": g} for g in gates]}
    pod["status"] = {"phase": "Pending"}
    return pod


def test_queue_labels_on_pod_and_jobset() -> None:
    job = make_job(queueName="gpu-queue")
    pod = build_pod(job, 1, SETTINGS)
    assert pod["metadata"]["labels"][QUEUE_LABEL] == "gpu-queue"
    assert QUEUE_LABEL not in build_pod(make_job(), 1, SETTINGS)["metadata"]["labels"]
    assert jobset_labels("gpu-queue") == {QUEUE_LABEL: "gpu-queue"}
    assert pod_labels("gpu-queue", in_jobset=True) == {}
    assert pod_labels("") == {}
    held = {"metadata": {"labels": jobset_labels("gpu-queue")}, "spec": {"suspend": True}}
    assert jobset_queued(held)
    assert not jobset_queued({**held, "spec": {"suspend": False}})  # admitted
    assert not jobset_queued({"metadata": {}, "spec": {"suspend": True}})  # suspended by someone, not Kueue


def test_queue_name_must_be_a_label_value() -> None:
    with pytest.raises(SpecError) as err:
        parse_spec({**MINIMAL_SPEC, "queueName": "no spaces!"})
    assert err.value.field == "spec.queueName"


@pytest.mark.parametrize(("pod", "queued"), [
    (gated(make_pod(phase="Pending"), KUEUE_GATE), True),
    (gated(make_pod(phase="Pending"), "example.com/other-gate"), True),
    ({**make_pod(phase="Pending"), "status": {"phase": "Pending", "conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "SchedulingGated"}]}}, True),
    (make_pod(phase="Pending"), False),
    (make_pod(phase="Pending", unschedulable=True), False),
    (make_pod(phase="Running"), False),
    (make_pod(phase="Failed", exit_code=1), False),
    ({**gated(make_pod(phase="Pending"), KUEUE_GATE), "metadata": {"deletionTimestamp": ts(1)}}, False),
])
def test_is_queued(pod: dict[str, Any], queued: bool) -> None:
    assert is_queued(pod) is queued
    if queued:
        assert stuck(pod, NOW, 0) is None  # never Stalled while queued


@pytest.mark.parametrize(("old", "queued", "want"), [
    (None, True, {"attempt": 2, "queuedAt": "T"}),
    ({"attempt": 2, "queuedAt": "Q"}, True, {"attempt": 2, "queuedAt": "Q"}),
    ({"attempt": 2, "queuedAt": "Q"}, False, {"attempt": 2, "queuedAt": "Q", "admittedAt": "T"}),
    ({"attempt": 2, "queuedAt": "Q", "admittedAt": "A"}, False, {"attempt": 2, "queuedAt": "Q", "admittedAt": "A"}),
    ({"attempt": 1, "queuedAt": "Q", "admittedAt": "A"}, False, None),  # an older attempt's record goes
    (None, False, None),
])
def test_admission_record(old: dict | None, queued: bool, want: dict | None) -> None:
    assert admission(old, 2, queued, "T") == want


def test_deadline_start() -> None:
    created = parse_time(ts(900))
    assert deadline_start(None, 1, created, parse_time) == created
    assert deadline_start({"attempt": 1, "queuedAt": ts(900)}, 1, created, parse_time) == created
    assert deadline_start({"attempt": 1, "queuedAt": ts(900), "admittedAt": ts(5)}, 1, created, parse_time) == parse_time(ts(5))
    assert deadline_start({"attempt": 0, "queuedAt": ts(900), "admittedAt": ts(5)}, 1, created, parse_time) == created


def test_reconcile_queued_then_admitted() -> None:
    status = {"phase": "Pending", "attempt": 1, "preemptions": 0, "failures": 0}
    pod = gated(make_pod(phase="Pending", created_ago=5 * SETTINGS.pending_deadline), KUEUE_GATE)
    d = reconcile(Observed(job=make_job(status=status, queueName="q"), pods=[pod], now=NOW), SETTINGS)
    assert (d.status["phase"], d.status["reason"]) == ("Pending", "Queued")
    assert "LocalQueue q" in d.status["message"]
    assert get_condition(d.status["conditions"], "Stalled")["status"] == "False"
    assert d.status["admission"] == {"attempt": 1, "queuedAt": ts(0)}
    # The gate goes: the deadline counts from now, not from the pod's creation long ago.
    admitted = make_pod(phase="Pending", unschedulable=True, created_ago=5 * SETTINGS.pending_deadline)
    d = reconcile(Observed(job=make_job(status=d.status, queueName="q"), pods=[admitted], now=NOW), SETTINGS)
    assert d.status["admission"]["admittedAt"] == ts(0)
    assert get_condition(d.status["conditions"], "Stalled")["status"] == "False"
    assert d.requeue_after == pytest.approx(SETTINGS.pending_deadline)
    # Past the deadline from admission it is Stalled like any unschedulable pod.
    later = NOW.replace(minute=NOW.minute + 11)
    d = reconcile(Observed(job=make_job(status=d.status, queueName="q"), pods=[admitted], now=later), SETTINGS)
    assert get_condition(d.status["conditions"], "Stalled")["reason"] == "Unschedulable"
