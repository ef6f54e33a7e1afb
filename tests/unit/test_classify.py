"""Classifying trainer pods.

Behaviours tested:
- finished pods map to the right result in the documented order (exit 0, DisruptionTarget, node
  reasons, OOMKilled, exit codes, deleted while running);
- the trainer's JSON termination message (or the log tail) becomes the outcome's message;
- stuck pods (unschedulable, image pull, missing secret) only count after the deadline, and an
  invalid image name is fatal at once;
- pods stuck Terminating are force-deleted only on a NotReady node past the grace;
- exponential backoff is capped;
- exit 71 (a step ran out of memory) is permanent with reason OutOfMemory and the trainer's advice,
  or the spec fields to lower when the pod left none;
- exit 77 (the store refused the trainer for good) is permanent with reason StorageRejected and a
  message naming the spec fields to check; reasons from the trainer or the kubelet are cleaned.
"""

from __future__ import annotations

import json

import pytest

from lora_operator.classify import (
    Reason,
    Result,
    classify_finished,
    next_backoff,
    stuck,
    stuck_terminating,
    termination_message,
)
from tests.unit.builders import NOW, make_pod

OOM_TM = json.dumps({"reason": "OutOfMemory", "step": 11, "message": "out of memory on cuda during step 12: "
                    "lower batch_size (now 4, e.g. 2) and raise gradient_accumulation_steps (now 1, e.g. 2)"})
TM = json.dumps({"reason": "InvalidConfig", "step": 0, "checkpoint": None, "message": "learning_rate: too big"})


@pytest.mark.parametrize(
    ("pod", "result", "reason"),
    [
        (make_pod(phase="Succeeded", exit_code=0), Result.SUCCEEDED, Reason.SUCCEEDED),
        (make_pod(phase="Failed", exit_code=0, disruption="PreemptionByScheduler"), Result.SUCCEEDED, Reason.SUCCEEDED),
        (make_pod(phase="Failed", exit_code=137, disruption="PreemptionByScheduler"), Result.PREEMPTED, "PreemptionByScheduler"),
        (make_pod(phase="Failed", exit_code=143, disruption="DeletionByTaintManager"), Result.PREEMPTED, "DeletionByTaintManager"),
        (make_pod(phase="Failed", exit_code=1, disruption="EvictionByEvictionAPI"), Result.PREEMPTED, "EvictionByEvictionAPI"),
        (make_pod(phase="Failed", disruption="DeletionByPodGC"), Result.PREEMPTED, "DeletionByPodGC"),
        (make_pod(phase="Failed", exit_code=137, disruption="TerminationByKubelet"), Result.PREEMPTED, "TerminationByKubelet"),
        (make_pod(phase="Failed", pod_reason="Shutdown"), Result.PREEMPTED, "Shutdown"),
        (make_pod(phase="Failed", pod_reason="NodeShutdown", exit_code=137), Result.PREEMPTED, "NodeShutdown"),
        (make_pod(phase="Failed", pod_reason="Evicted"), Result.PREEMPTED, "Evicted"),
        (make_pod(phase="Failed", pod_reason="UnexpectedAdmissionError"), Result.PREEMPTED, "UnexpectedAdmissionError"),
        (make_pod(phase="Failed", exit_code=137, terminated_reason="OOMKilled"), Result.FAILED, Reason.OOM_KILLED),
        # The order decides: a disruption or a node reason outranks OOMKilled and the exit code rules.
        (make_pod(phase="Failed", exit_code=137, terminated_reason="OOMKilled", disruption="PreemptionByScheduler"),
         Result.PREEMPTED, "PreemptionByScheduler"),
        (make_pod(phase="Failed", exit_code=137, terminated_reason="OOMKilled", pod_reason="NodeShutdown"),
         Result.PREEMPTED, "NodeShutdown"),
        (make_pod(phase="Failed", exit_code=78, message=TM, disruption="DeletionByTaintManager"),
         Result.PREEMPTED, "DeletionByTaintManager"),
        (make_pod(phase="Failed", exit_code=78, message=TM, terminated_reason="OOMKilled"), Result.FAILED, Reason.OOM_KILLED),
        (make_pod(phase="Failed", exit_code=75), Result.PREEMPTED, Reason.PREEMPTED),
        (make_pod(phase="Failed", exit_code=78, message=TM), Result.PERMANENT, "InvalidConfig"),
        (make_pod(phase="Failed", exit_code=65), Result.PERMANENT, "ExitCode65"),
        (make_pod(phase="Failed", exit_code=64), Result.PERMANENT, "ExitCode64"),
        (make_pod(phase="Failed", exit_code=77), Result.PERMANENT, Reason.STORAGE_REJECTED),
        (make_pod(phase="Failed", exit_code=71), Result.PERMANENT, Reason.OUT_OF_MEMORY),
        (make_pod(phase="Failed", exit_code=71, message=OOM_TM), Result.PERMANENT, Reason.OUT_OF_MEMORY),
        # The kernel's OOMKilled (the pod's memory limit) outranks the exit code, and is retried.
        (make_pod(phase="Failed", exit_code=71, message=OOM_TM, terminated_reason="OOMKilled"),
         Result.FAILED, Reason.OOM_KILLED),
        (make_pod(phase="Failed", exit_code=77, message=json.dumps({"reason": "StorageRejected", "message": "NoSuchBucket"})),
         Result.PERMANENT, Reason.STORAGE_REJECTED),
        # A reason the API would refuse in a condition is cleaned to CamelCase of at most 1024 bytes.
        (make_pod(phase="Failed", exit_code=1, message=json.dumps({"reason": "R" * 2000, "message": "m"})),
         Result.FAILED, "R" * 1024),
        (make_pod(phase="Failed", exit_code=78, message=json.dumps({"reason": "bad config!", "message": "m"})),
         Result.PERMANENT, "BadConfig"),
        (make_pod(phase="Failed", pod_reason="OutOfnvidia.com/gpu"), Result.PREEMPTED, "OutOfnvidiaComGpu"),
        (make_pod(phase="Failed", exit_code=79), Result.FAILED, Reason.ERROR),
        (make_pod(phase="Failed", exit_code=1), Result.FAILED, Reason.ERROR),
        (make_pod(phase="Failed", exit_code=3), Result.FAILED, Reason.ERROR),
        (make_pod(phase="Failed", exit_code=137), Result.FAILED, Reason.ERROR),
        (make_pod(phase="Failed", exit_code=143, deleting_ago=5), Result.PREEMPTED, Reason.POD_DELETED),
        (make_pod(phase="Failed"), Result.FAILED, Reason.POD_FAILED),
    ],
)
def test_finished_pods(pod: dict, result: Result, reason: str) -> None:
    outcome = classify_finished(pod)
    assert outcome is not None
    assert (outcome.result, outcome.reason) == (result, reason)


@pytest.mark.parametrize("pod", [make_pod(phase="Running"), make_pod(phase="Pending"), make_pod(phase="Running", deleting_ago=1)])
def test_live_pods_have_no_outcome(pod: dict) -> None:
    assert classify_finished(pod) is None


@pytest.mark.parametrize(("message", "says"), [
    (OOM_TM, "lower batch_size (now 4, e.g. 2)"),  # the trainer's values win
    ("", "lower spec.training.batchSize"),  # a pod that left no message: the spec fields to change
])
def test_out_of_memory_exit_is_permanent_and_names_the_remedies(message: str, says: str) -> None:
    outcome = classify_finished(make_pod(phase="Failed", exit_code=71, message=message))
    assert outcome is not None and outcome.result is Result.PERMANENT
    assert says in outcome.message


def test_termination_message_json_carries_step_and_checkpoint() -> None:
    msg = json.dumps({"reason": "StorageUnavailable", "step": 120, "checkpoint": "checkpoints/step-000000100",
                      "message": "s3 down"})
    outcome = classify_finished(make_pod(phase="Failed", exit_code=3, message=msg))
    assert outcome is not None
    assert (outcome.reason, outcome.step, outcome.checkpoint, outcome.message) == (
        "StorageUnavailable", 120, "checkpoints/step-000000100", "s3 down")


def test_termination_message_falls_back_to_last_log_line() -> None:
    pod = make_pod(phase="Failed", exit_code=1, message="Traceback...\n  File x\nRuntimeError: CUDA error\n")
    assert termination_message(pod)[0] == "RuntimeError: CUDA error"


def test_permanent_error_keeps_trainer_message() -> None:
    outcome = classify_finished(make_pod(phase="Failed", exit_code=78, message=TM))
    assert outcome is not None and outcome.message == "learning_rate: too big"


@pytest.mark.parametrize(
    ("pod", "reason", "fatal"),
    [
        (make_pod(phase="Pending", unschedulable=True, created_ago=601), Reason.UNSCHEDULABLE, False),
        (make_pod(phase="Pending", waiting="ImagePullBackOff", created_ago=601), Reason.IMAGE_PULL, False),
        (make_pod(phase="Pending", waiting="ErrImagePull", created_ago=601), Reason.ERR_IMAGE_PULL, False),
        (make_pod(phase="Pending", waiting="CreateContainerConfigError", created_ago=601), Reason.CONFIG_ERROR, False),
        (make_pod(phase="Pending", waiting="InvalidImageName", created_ago=1), Reason.INVALID_IMAGE, True),
    ],
)
def test_stuck_pods(pod: dict, reason: str, fatal: bool) -> None:
    found = stuck(pod, NOW, deadline=600)
    assert found is not None and (found.reason, found.fatal) == (reason, fatal)
    assert found.message


@pytest.mark.parametrize(
    "pod",
    [
        make_pod(phase="Pending", unschedulable=True, created_ago=30),
        make_pod(phase="Pending", waiting="ImagePullBackOff", created_ago=30),
        make_pod(phase="Pending", waiting="ContainerCreating", created_ago=900),
        make_pod(phase="Running", created_ago=900),
    ],
)
def test_not_stuck(pod: dict) -> None:
    assert stuck(pod, NOW, deadline=600) is None


def test_missing_secret_message_names_the_field() -> None:
    found = stuck(make_pod(phase="Pending", waiting="CreateContainerConfigError", created_ago=700), NOW, 600)
    assert found is not None and "spec.storage.credentialsSecret" in found.message


@pytest.mark.parametrize(
    ("deleting_ago", "node_ready", "expected"),
    [(400, False, True), (400, None, True), (400, True, False), (100, False, False)],
)
def test_stuck_terminating(deleting_ago: float, node_ready: bool | None, expected: bool) -> None:
    pod = make_pod(phase="Running", deleting_ago=deleting_ago)
    assert stuck_terminating(pod, NOW, 300, node_ready) is expected


@pytest.mark.parametrize(("failures", "expected"), [(1, 10), (2, 20), (3, 40), (7, 600), (30, 600)])
def test_backoff(failures: int, expected: float) -> None:
    assert next_backoff(failures, 10, 600) == expected


def test_storage_rejected_message_names_the_fields() -> None:
    outcome = classify_finished(make_pod(phase="Failed", exit_code=77))
    assert outcome is not None and outcome.result is Result.PERMANENT
    assert "spec.storage.credentialsSecret" in outcome.message and "spec.output.uri" in outcome.message
