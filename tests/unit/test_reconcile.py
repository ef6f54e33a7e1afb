"""The reconcile decision: job + pods + now (+ progress) → actions, events and the new status.

Behaviours tested (one row or test each):
- a new job gets pod a1; a running pod makes the job Running; exit 0 → Succeeded, Ready;
- preemption (DisruptionTarget, node shutdown, exit 75, vanished pod) starts the next attempt
  at once and counts a preemption, not a failure; over spot.maxPreemptions the job fails;
- a failure waits out an exponential backoff, then retries; over backoffLimit the job fails;
- a permanent trainer error fails the job with the trainer's message;
- stuck pods set Stalled after the deadline; an invalid image name fails the job at once;
- a pod stuck Terminating on a NotReady node is force-deleted and the job moves on, once;
- suspend deletes the pod with its grace period and counts nothing; resume starts a new attempt;
- a bad spec fails the job naming the field; never two live pods; a pod one attempt ahead of
  the status (lost status write) is adopted, not duplicated; decisions are stable when repeated;
- pods of a deleted job with the same name (another owner uid) are neither adopted nor counted:
  the new job waits until the garbage collector frees the pod name;
- hostile inputs never make an unwritable status: a 2000-character trainer reason and a 40 KB
  latest.json path are bounded, the job still moves on; a name too long for a label fails the
  job (InvalidSpec) instead of making a pod; an output inside an input fails naming both fields;
- a status marked StatusRejected is cleared once a full status is decided again.
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest

from lora_operator.reconcile import CreatePod, Decision, DeletePod, Observed, reconcile
from lora_operator.status import get_condition
from lora_trainer.contract import LatestPointer, Progress
from tests.unit.builders import NOW, SETTINGS, make_job, make_pod, ts

TM_78 = '{"reason": "InvalidConfig", "step": 0, "message": "base model has no unet/ folder"}'


def decide(job: dict, pods: list[dict] | None = None, now=NOW, **kw: Any) -> Decision:
    return reconcile(Observed(job=job, pods=pods or [], now=now, **kw), SETTINGS)


def running(attempt: int = 1, **status: Any) -> dict:
    base = {"phase": "Running", "attempt": attempt, "preemptions": 0, "failures": 0, "startTime": ts(600)}
    base.update(status)
    return base


def cond(d: Decision, ctype: str) -> dict:
    c = get_condition(d.status.get("conditions") or [], ctype)
    assert c is not None, f"no {ctype} condition"
    return dict(c)


def created(d: Decision) -> list[str]:
    return [a.pod["metadata"]["name"] for a in d.actions if isinstance(a, CreatePod)]


def deleted(d: Decision) -> list[tuple[str, int | None]]:
    return [(a.name, a.grace_seconds) for a in d.actions if isinstance(a, DeletePod)]


def test_new_job_creates_first_pod() -> None:
    d = decide(make_job())
    assert created(d) == ["job-a1"]
    s = d.status
    assert (s["phase"], s["attempt"], s["preemptions"], s["failures"], s["observedGeneration"]) == ("Pending", 1, 0, 0, 1)
    assert s["startTime"] == ts(0) and s["outputs"]["weights"] == "s3://loras/job/pytorch_lora_weights.safetensors"
    assert cond(d, "Reconciling")["status"] == "True" and cond(d, "Ready")["status"] == "False"
    assert [e.reason for e in d.events] == ["AttemptStarted"]  # it implies Pending: one Event per new job, not two


def test_running_pod() -> None:
    d = decide(make_job(status=running(phase="Pending")), [make_pod(phase="Running")])
    assert d.actions == [] and d.status["phase"] == "Running"
    assert cond(d, "Stalled")["status"] == "False"


@pytest.mark.parametrize(
    ("pod", "reason"),
    [
        (make_pod(phase="Failed", exit_code=143, disruption="PreemptionByScheduler"), "PreemptionByScheduler"),
        (make_pod(phase="Failed", pod_reason="NodeShutdown"), "NodeShutdown"),
        (make_pod(phase="Failed", exit_code=75), "Preempted"),
        (None, "PodVanished"),
    ],
)
def test_preemption_starts_next_attempt_at_once(pod: dict | None, reason: str) -> None:
    d = decide(make_job(status=running()), [pod] if pod else [])
    assert created(d) == ["job-a2"]
    s = d.status
    assert (s["phase"], s["attempt"], s["preemptions"], s["failures"]) == ("Recovering", 2, 1, 0)
    assert s["lastAttempt"]["reason"] == reason and s["lastAttempt"]["attempt"] == 1
    assert cond(d, "Preempted")["status"] == "True"
    assert "Preempted" in [e.reason for e in d.events]


def test_preemption_budget() -> None:
    job = make_job(status=running(attempt=3, preemptions=2), spot={"maxPreemptions": 2})
    d = decide(job, [make_pod(3, phase="Failed", disruption="PreemptionByScheduler")])
    assert created(d) == [] and d.status["phase"] == "Failed"
    assert d.status["reason"] == "PreemptionLimitExceeded" and "spec.spot.maxPreemptions" in d.status["message"]


def test_failure_backs_off_then_retries() -> None:
    d = decide(make_job(status=running()), [make_pod(phase="Failed", exit_code=137, terminated_reason="OOMKilled")])
    s = d.status
    assert created(d) == [] and (s["phase"], s["failures"], s["preemptions"]) == ("Recovering", 1, 0)
    assert s["nextAttemptTime"] == "2025-01-01T12:00:10Z" and d.requeue_after == 10
    assert "spec.resources.memory" in s["message"]
    pods = [make_pod(phase="Failed", exit_code=137, terminated_reason="OOMKilled")]
    early = decide(make_job(status=s), pods, now=NOW + timedelta(seconds=5))
    assert created(early) == [] and early.requeue_after == 5
    late = decide(make_job(status=s), pods, now=NOW + timedelta(seconds=10))
    assert created(late) == ["job-a2"] and late.status["failures"] == 1 and "nextAttemptTime" not in late.status


def test_backoff_limit() -> None:
    job = make_job(status=running(attempt=2, failures=1), failurePolicy={"backoffLimit": 1})
    d = decide(job, [make_pod(2, phase="Failed", exit_code=1)])
    assert d.status["phase"] == "Failed" and d.status["reason"] == "BackoffLimitExceeded"
    assert cond(d, "Stalled")["status"] == "True" and d.status["completionTime"] == ts(0)


def test_success() -> None:
    d = decide(make_job(status=running()), [make_pod(phase="Succeeded", exit_code=0)])
    assert d.actions == [] and d.status["phase"] == "Succeeded"
    assert cond(d, "Ready")["status"] == "True" and cond(d, "Reconciling")["status"] == "False"
    assert d.status["completionTime"] == ts(0)


def test_permanent_error_carries_trainer_message() -> None:
    d = decide(make_job(status=running()), [make_pod(phase="Failed", exit_code=78, message=TM_78)])
    assert created(d) == [] and d.status["phase"] == "Failed" and d.status["reason"] == "InvalidConfig"
    assert "base model has no unet/ folder" in d.status["message"]
    assert d.status["lastAttempt"]["exitCode"] == 78 and d.status["failures"] == 0


@pytest.mark.parametrize(
    ("pod", "reason"),
    [
        (make_pod(phase="Pending", unschedulable=True, created_ago=700), "Unschedulable"),
        (make_pod(phase="Pending", waiting="ImagePullBackOff", created_ago=700), "ImagePullBackOff"),
        (make_pod(phase="Pending", waiting="CreateContainerConfigError", created_ago=700), "CreateContainerConfigError"),
    ],
)
def test_stalled(pod: dict, reason: str) -> None:
    d = decide(make_job(status=running(phase="Pending")), [pod])
    assert d.actions == [] and d.status["phase"] == "Pending"
    assert cond(d, "Stalled")["status"] == "True" and cond(d, "Stalled")["reason"] == reason
    assert [e.reason for e in d.events] == [reason]
    again = decide(make_job(status=d.status), [pod])
    assert again.events == [] and again.status == d.status


def test_not_yet_stalled_requeues_at_deadline() -> None:
    d = decide(make_job(status=running(phase="Pending")), [make_pod(phase="Pending", unschedulable=True, created_ago=100)])
    assert cond(d, "Stalled")["status"] == "False" and d.requeue_after == 500


def test_invalid_image_fails_at_once() -> None:
    d = decide(make_job(status=running(phase="Pending")), [make_pod(phase="Pending", waiting="InvalidImageName", created_ago=1)])
    assert deleted(d) == [("job-a1", 0)] and d.status["phase"] == "Failed" and d.status["reason"] == "InvalidImageName"


def test_stuck_terminating_on_lost_node_is_force_deleted_once() -> None:
    pod = make_pod(phase="Running", deleting_ago=400, node="n1")
    d = decide(make_job(status=running()), [pod], nodes_ready={"n1": False})
    assert deleted(d) == [("job-a1", 0)] and created(d) == [] and d.status["preemptions"] == 1
    assert d.status["lastAttempt"]["reason"] == "NodeLost"
    # Still listed (the delete is in flight): nothing more; once gone: the next attempt, no double count.
    again = decide(make_job(status=d.status), [pod], nodes_ready={"n1": False})
    assert created(again) == [] and again.status["preemptions"] == 1
    gone = decide(make_job(status=d.status), [])
    assert created(gone) == ["job-a2"] and gone.status["preemptions"] == 1


def test_older_attempt_stuck_terminating_on_lost_node_does_not_block_forever() -> None:
    stray = make_pod(1, phase="Running", deleting_ago=400, node="n1")
    status = running(attempt=2, phase="Recovering", lastAttempt={"attempt": 2, "result": "Preempted"})
    d = decide(make_job(status=status), [stray], nodes_ready={"n1": False})
    assert deleted(d) == [("job-a1", 0)] and created(d) == []
    waiting = decide(make_job(status=status), [stray], nodes_ready={"n1": True})
    assert waiting.actions == []  # its kubelet still answers: let it finish the grace period
    gone = decide(make_job(status=d.status), [])
    assert created(gone) == ["job-a3"]


def test_terminating_on_ready_node_waits() -> None:
    d = decide(make_job(status=running()), [make_pod(phase="Running", deleting_ago=400, node="n1")], nodes_ready={"n1": True})
    assert d.actions == [] and d.status["preemptions"] == 0


def test_suspend_and_resume() -> None:
    job = make_job(status=running(), suspend=True)
    d = decide(job, [make_pod(phase="Running")])
    assert deleted(d) == [("job-a1", 30)] and d.status["phase"] == "Suspended"
    assert cond(d, "Suspended")["status"] == "True"
    stopped = [make_pod(phase="Failed", exit_code=75, deleting_ago=1)]
    d2 = decide(make_job(status=d.status, suspend=True), stopped)
    assert d2.actions == [] and d2.status["preemptions"] == 0 and d2.status["phase"] == "Suspended"
    assert cond(d2, "Reconciling")["status"] == "False"
    d3 = decide(make_job(status=d2.status, suspend=False, generation=3), stopped)
    assert created(d3) == ["job-a2"] and d3.status["phase"] == "Recovering" and d3.status["preemptions"] == 0
    assert cond(d3, "Suspended")["status"] == "False" and d3.status["observedGeneration"] == 3
    assert "Resumed" in [e.reason for e in d3.events]


def test_suspended_before_start_creates_nothing() -> None:
    d = decide(make_job(suspend=True))
    assert d.actions == [] and d.status["phase"] == "Suspended" and d.status["attempt"] == 0


def test_bad_spec_fails_naming_field() -> None:
    d = decide(make_job(training={"maxTrainSteps": 10, "warmupSteps": 50}))
    assert d.actions == [] and d.status["phase"] == "Failed" and d.status["reason"] == "InvalidSpec"
    assert d.status["message"].startswith("spec.training.warmupSteps:")
    assert cond(d, "Stalled")["status"] == "True"


def test_lost_status_write_adopts_pod_instead_of_duplicating() -> None:
    # The previous decision created job-a2 after classifying a1 but its status write was lost.
    pods = [make_pod(1, phase="Failed", disruption="PreemptionByScheduler"), make_pod(2, phase="Pending")]
    d = decide(make_job(status=running()), pods)
    assert created(d) == [] and deleted(d) == [] and d.status["attempt"] == 2 and d.status["preemptions"] == 1
    d2 = decide(make_job(status=d.status), pods)
    assert d2.actions == [] and d2.status["preemptions"] == 1


def owned_by(pod: dict, uid: str) -> dict:
    pod["metadata"]["ownerReferences"] = [{"apiVersion": "lora-operator.dev/v1alpha1", "kind": "LoRATrainingJob",
                                           "name": "job", "uid": uid, "controller": True}]
    return pod


@pytest.mark.parametrize("old_pod", [
    make_pod(1, phase="Succeeded", exit_code=0),
    make_pod(1, phase="Failed", exit_code=78, message=TM_78),
    make_pod(1, phase="Running"),
], ids=["succeeded", "permanent", "running"])
def test_pod_of_a_deleted_namesake_job_is_not_ours(old_pod: dict) -> None:
    pods = [owned_by(old_pod, "uid-of-deleted-job")]
    d = decide(make_job(), pods)  # the new job has uid-1 and no status yet
    assert d.actions == [] and d.status["attempt"] == 0 and d.status["phase"] == "Pending"
    assert (d.status["preemptions"], d.status["failures"]) == (0, 0)
    assert "garbage-collected" in d.status["message"] and d.requeue_after is not None and d.requeue_after <= 2
    assert cond(d, "Stalled")["status"] == "False"
    gone = decide(make_job(status=d.status), [])
    assert created(gone) == ["job-a1"]


def test_own_pod_by_uid_is_adopted() -> None:
    pods = [owned_by(make_pod(1, phase="Pending"), "uid-1")]
    d = decide(make_job(status={"attempt": 0}), pods)
    assert created(d) == [] and d.status["attempt"] == 1


def test_never_two_live_pods() -> None:
    pods = [make_pod(1, phase="Running"), make_pod(2, phase="Running")]
    d = decide(make_job(status=running(attempt=2)), pods)
    assert deleted(d) == [("job-a1", 30)] and created(d) == []


def test_terminal_job_deletes_leftover_live_pods() -> None:
    d = decide(make_job(status={"phase": "Succeeded", "attempt": 1}), [make_pod(1, phase="Running")])
    assert deleted(d) == [("job-a1", None)] and d.status["phase"] == "Succeeded"


def test_old_finished_pods_are_cleaned_up() -> None:
    pods = [make_pod(1, phase="Failed", exit_code=75), make_pod(2, phase="Failed", exit_code=75), make_pod(3)]
    d = decide(make_job(status=running(attempt=3, lastAttempt={"attempt": 2})), pods)
    assert deleted(d) == [("job-a1", None)]


def test_progress_and_checkpoint_mirrored_with_one_event() -> None:
    progress = Progress(step=20, total_steps=100, loss=0.5, updated=ts(1))
    latest = LatestPointer(step=20, attempt=1, path="checkpoints/step-000000020", time=ts(2))
    d = decide(make_job(status=running()), [make_pod()], progress=progress, latest=latest)
    assert d.status["progress"]["percent"] == 20.0
    assert d.status["latestCheckpoint"]["uri"] == "s3://loras/job/checkpoints/step-000000020"
    assert [e.reason for e in d.events] == ["CheckpointCommitted"]
    again = decide(make_job(status=d.status), [make_pod()], progress=progress, latest=latest)
    assert again.events == [] and again.status == d.status


def test_repeated_decision_is_stable() -> None:
    d = decide(make_job())
    again = decide(make_job(status=d.status), [make_pod(phase="Pending", created_ago=0)])
    assert again.actions == [] and again.events == [] and again.status == d.status


def test_hostile_reason_and_checkpoint_path_are_bounded() -> None:
    from lora_operator.crd import build_crd
    from lora_operator.emulator.schema import validate

    tm = json.dumps({"reason": "R" * 2000, "step": 3, "message": "boom"})
    latest = LatestPointer(step=3, attempt=1, path="checkpoints/" + "p" * 40_000)
    d = decide(make_job(status=running()), [make_pod(phase="Failed", exit_code=1, message=tm)], latest=latest)
    assert created(d) == [] and d.status["phase"] == "Recovering" and d.status["failures"] == 1
    schema = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    assert validate(schema, d.status, "status") == []
    assert d.status["lastAttempt"]["reason"] == "R" * 1024
    assert all(len(e.reason) <= 1024 and len(e.message) <= 1024 for e in d.events)


def test_job_name_too_long_for_a_label_fails_the_job() -> None:
    d = decide(make_job("j" * 60))
    assert created(d) == [] and (d.status["phase"], d.status["reason"]) == ("Failed", "InvalidSpec")
    assert d.status["message"].startswith("metadata.name:")


def test_output_inside_an_input_fails_the_job() -> None:
    d = decide(make_job(output={"uri": "s3://datasets/portraits/lora/"}))
    assert created(d) == [] and (d.status["phase"], d.status["reason"]) == ("Failed", "InvalidSpec")
    assert "spec.output.uri" in d.status["message"] and "spec.dataset.uri" in d.status["message"]


def test_status_rejected_is_cleared_by_a_full_status() -> None:
    rejected = {"type": "StatusRejected", "status": "True", "reason": "StatusRejected", "message": "x",
                "lastTransitionTime": ts(60)}
    d = decide(make_job(status=running(conditions=[rejected])), [make_pod(phase="Running")])
    assert (cond(d, "StatusRejected")["status"], cond(d, "StatusRejected")["reason"]) == ("False", "StatusAccepted")
