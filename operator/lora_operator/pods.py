"""The trainer pod of one attempt (pure): `build_pod(job, attempt, settings) -> dict`.

The name `<job>-a<attempt>` is deterministic, so creating it twice is a 409, never a second pod.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lora_operator.classify import ATTEMPT_LABEL, JOB_LABEL, TRAINER_CONTAINER
from lora_operator.settings import Settings
from lora_operator.spec import (
    API_VERSION,
    CACHE_DIR,
    KIND,
    SCRATCH_DIR,
    JobSpec,
    parse_spec,
    to_train_config,
)
from lora_trainer.contract import ENV_ATTEMPT, ENV_CACHE_DIR, ENV_CONFIG

TRAINER_UID = 1000
COMMAND = ["lora-train"]


def pod_name(job_name: str, attempt: int) -> str:
    """Name of the pod of an attempt."""
    return f"{job_name}-a{attempt}"


def owner_reference(job: Mapping[str, Any]) -> dict[str, Any]:
    """The controller owner reference that makes the pod part of the job (and GC'd with it)."""
    meta = job["metadata"]
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _env(spec: JobSpec, attempt: int) -> list[dict[str, Any]]:
    config = to_train_config(spec)
    env: list[dict[str, Any]] = [
        {"name": ENV_CONFIG, "value": config.model_dump_json(exclude_none=True)},
        {"name": ENV_ATTEMPT, "value": str(attempt)},
        {"name": ENV_CACHE_DIR, "value": CACHE_DIR},
        {"name": "HOME", "value": SCRATCH_DIR},
        {"name": "TMPDIR", "value": SCRATCH_DIR},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    storage = spec.storage
    if storage.credentials_secret:
        # Only a reference: the keys never pass through the operator into the pod spec.
        for var, key in (("AWS_ACCESS_KEY_ID", storage.access_key_id_key),
                         ("AWS_SECRET_ACCESS_KEY", storage.secret_access_key_key)):
            env.append({"name": var, "valueFrom": {"secretKeyRef": {"name": storage.credentials_secret, "key": key}}})
    if storage.region:
        env.append({"name": "AWS_DEFAULT_REGION", "value": storage.region})
    return env


def _resources(spec: JobSpec) -> dict[str, Any]:
    res = spec.resources
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if res.gpus:
        limits[res.gpu_resource_name] = str(res.gpus)
        requests[res.gpu_resource_name] = str(res.gpus)
    if res.memory:
        requests["memory"] = limits["memory"] = res.memory
    if res.cpu:
        requests["cpu"] = res.cpu
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def _tolerations(spec: JobSpec) -> list[dict[str, Any]]:
    out = []
    for t in spec.resources.tolerations:
        item: dict[str, Any] = {"operator": t.operator}
        if t.key:
            item["key"] = t.key
        if t.value and t.operator == "Equal":
            item["value"] = t.value
        if t.effect:
            item["effect"] = t.effect
        if t.toleration_seconds is not None:
            item["tolerationSeconds"] = t.toleration_seconds
        out.append(item)
    return out


def build_pod(job: Mapping[str, Any], attempt: int, settings: Settings, spec: JobSpec | None = None) -> dict[str, Any]:
    """The Pod manifest of `attempt` of `job` (raises SpecError if the spec cannot run)."""
    spec = spec or parse_spec(job.get("spec") or {})
    meta = job["metadata"]
    name = meta["name"]
    res = spec.resources
    container: dict[str, Any] = {
        "name": TRAINER_CONTAINER,
        "image": spec.image or settings.trainer_image,
        "command": list(COMMAND),
        "env": _env(spec, attempt),
        "resources": _resources(spec),
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": TRAINER_UID,
            "runAsGroup": TRAINER_UID,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [
            {"name": "scratch", "mountPath": SCRATCH_DIR},
            {"name": "dshm", "mountPath": "/dev/shm"},
        ],
    }
    if spec.image_pull_policy:
        container["imagePullPolicy"] = spec.image_pull_policy
    scratch: dict[str, Any] = {"sizeLimit": res.scratch_size} if res.scratch_size else {}
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",  # the operator decides about retries, not the kubelet
        "terminationGracePeriodSeconds": spec.spot.termination_grace_period_seconds,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": TRAINER_UID,
            "runAsGroup": TRAINER_UID,
            "fsGroup": TRAINER_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [
            {"name": "scratch", "emptyDir": scratch},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": res.shm_size}},
        ],
    }
    if res.node_selector:
        pod_spec["nodeSelector"] = dict(res.node_selector)
    if res.tolerations:
        pod_spec["tolerations"] = _tolerations(spec)
    if res.priority_class_name:
        pod_spec["priorityClassName"] = res.priority_class_name
    if spec.service_account_name:
        pod_spec["serviceAccountName"] = spec.service_account_name
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod_name(name, attempt),
            "namespace": meta.get("namespace", "default"),
            "labels": {
                JOB_LABEL: name,
                ATTEMPT_LABEL: str(attempt),
                "app.kubernetes.io/name": "lora-trainer",
                "app.kubernetes.io/managed-by": "lora-operator",
            },
            "ownerReferences": [owner_reference(job)],
        },
        "spec": pod_spec,
    }
