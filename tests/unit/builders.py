"""Small fluent builders for operator unit tests: jobs, pods, progress, a fixed clock."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from typing import Any

from lora_operator.settings import Settings

NOW = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
SETTINGS = Settings(
    trainer_image="trainer:test", progress_interval=15, pending_deadline=600, terminating_grace=300,
    backoff_base=10, backoff_max=600,
)

MINIMAL_SPEC: dict[str, Any] = {
    "baseModel": {"uri": "s3://models/sd15/"},
    "dataset": {"uri": "s3://datasets/portraits/"},
    "training": {"maxTrainSteps": 100},
    "output": {"uri": "s3://loras/job/"},
    "storage": {"endpoint": "http://minio:9000", "credentialsSecret": "s3-creds"},
}


def ts(seconds_ago: float = 0) -> str:
    """An RFC 3339 timestamp `seconds_ago` before NOW."""
    return (NOW - timedelta(seconds=seconds_ago)).strftime("%Y-%m-%dT%H:%M:%SZ")


def make_job(name: str = "job", status: dict[str, Any] | None = None, generation: int = 1, **spec: Any) -> dict[str, Any]:
    """A LoRATrainingJob body; keyword args replace top-level spec blocks."""
    body_spec = copy.deepcopy(MINIMAL_SPEC)
    body_spec.update(spec)
    return {
        "apiVersion": "lora-operator.dev/v1alpha1",
        "kind": "LoRATrainingJob",
        "metadata": {"name": name, "namespace": "ml", "uid": "uid-1", "generation": generation},
        "spec": body_spec,
        "status": status or {},
    }


def make_pod(
    attempt: int = 1,
    job: str = "job",
    phase: str = "Running",
    exit_code: int | None = None,
    terminated_reason: str | None = None,
    message: str | None = None,
    disruption: str | None = None,
    pod_reason: str | None = None,
    waiting: str | None = None,
    unschedulable: bool = False,
    created_ago: float = 60,
    deleting_ago: float | None = None,
    node: str = "node-1",
) -> dict[str, Any]:
    """A trainer pod as the API returns it, with just the status the test cares about."""
    status: dict[str, Any] = {"phase": phase, "conditions": []}
    state: dict[str, Any] = {}
    if exit_code is not None:
        state["terminated"] = {"exitCode": exit_code, "reason": terminated_reason or ("Completed" if exit_code == 0 else "Error")}
        if message is not None:
            state["terminated"]["message"] = message
    elif waiting:
        state["waiting"] = {"reason": waiting, "message": f"{waiting} details"}
    elif phase == "Running":
        state["running"] = {"startedAt": ts(30)}
    status["containerStatuses"] = [{"name": "trainer", "state": state}]
    if disruption:
        status["conditions"].append({"type": "DisruptionTarget", "status": "True", "reason": disruption,
                                     "message": f"{disruption} happened"})
    if unschedulable:
        status["conditions"].append({"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                     "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."})
    if pod_reason:
        status["reason"] = pod_reason
    meta: dict[str, Any] = {
        "name": f"{job}-a{attempt}", "namespace": "ml", "creationTimestamp": ts(created_ago),
        "labels": {"lora-operator.dev/job": job, "lora-operator.dev/attempt": str(attempt)},
    }
    if deleting_ago is not None:
        meta["deletionTimestamp"] = ts(deleting_ago)
    return {"metadata": meta, "spec": {"nodeName": node} if not unschedulable else {}, "status": status}
