"""The trainer pod of one attempt (pure): `build_pod(job, attempt, settings) -> dict`.

The name `<job>-a<attempt>` is deterministic, so creating it twice is a 409, never a second pod.
The job's name is also a label value, so `check_job_name` holds it to MAX_JOB_NAME characters
of a label value even where the CRD's CEL rule is not enforced (an older API server, a
hand-made object in a test): the builder never makes a label value over 63 characters or a
name over 253, it raises SpecError naming metadata.name instead.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from lora_operator.classify import ATTEMPT_LABEL, JOB_LABEL, TRAINER_CONTAINER
from lora_operator.placement import POOL_LABEL, POOL_LABEL_VALUES, SPOT, node_placement
from lora_operator.preemption import rate_env
from lora_operator.queueing import pod_labels
from lora_operator.settings import Settings
from lora_operator.spec import (
    API_VERSION,
    CACHE_DIR,
    KIND,
    MAX_JOB_NAME,
    SCRATCH_DIR,
    JobSpec,
    SpecError,
    parse_spec,
    to_train_config,
)
from lora_trainer.contract import ENV_ATTEMPT, ENV_CACHE_DIR, ENV_CONFIG, ENV_NPROC_PER_NODE, ENV_RUN_ID
from lora_trainer.determinism import CUBLAS_ENV, settings_for
from lora_trainer.interval import AUTO

TRAINER_UID = 1000
COMMAND = ["lora-train"]
MAX_LABEL_VALUE = 63
MAX_POD_NAME = 253
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def pod_name(job_name: str, attempt: int) -> str:
    """Name of the pod of an attempt."""
    return f"{job_name}-a{attempt}"


def check_job_name(name: str) -> None:
    """Raise SpecError unless the job's name can be a label value and a pod name prefix."""
    if not name or len(name) > MAX_JOB_NAME or not _LABEL_VALUE.match(name):
        shown = name if len(name) <= 80 else name[:77] + "..."
        raise SpecError("metadata.name", f"{shown!r} ({len(name)} characters) must be 1 to {MAX_JOB_NAME} "
                        "characters of a label value (letters, digits, '-', '_', '.'), because pods are named "
                        "<job>-a<attempt> and labelled with it; create the job under a shorter name")


def check_pod_identity(name: str, labels: Mapping[str, str]) -> None:
    """Raise SpecError if a pod name or a label value is over the API server's limits."""
    if len(name) > MAX_POD_NAME:
        raise SpecError("metadata.name", f"pod name {name[:60]!r}... is {len(name)} characters, over {MAX_POD_NAME}")
    for key, value in labels.items():
        if len(value) > MAX_LABEL_VALUE or not _LABEL_VALUE.match(value):
            raise SpecError("metadata.name", f"label {key}={value[:60]!r} is not a label value of at most "
                            f"{MAX_LABEL_VALUE} characters; create the job under a shorter name")


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


def _env(spec: JobSpec, attempt: int, run: str) -> list[dict[str, Any]]:
    config = to_train_config(spec)
    env: list[dict[str, Any]] = [
        {"name": ENV_CONFIG, "value": config.model_dump_json(exclude_none=True)},
        {"name": ENV_ATTEMPT, "value": str(attempt)},
        {"name": ENV_CACHE_DIR, "value": CACHE_DIR},
        {"name": "HOME", "value": SCRATCH_DIR},
        {"name": "TMPDIR", "value": SCRATCH_DIR},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        # Attempts count per job; the trainer continues the output's fence across jobs (re-apply).
        {"name": ENV_RUN_ID, "value": run},
    ]
    # cuBLAS reads its workspace setting when it starts: it must be in the environment before the
    # process runs (determinism: exact on a GPU; lora_trainer.determinism).
    if workspace := settings_for(config.device, config.determinism).cublas_workspace:
        env.append({"name": CUBLAS_ENV, "value": workspace})
    storage = spec.storage
    if storage.credentials_secret:
        # Only a reference: the keys never pass through the operator into the pod spec.
        for var, key in (("AWS_ACCESS_KEY_ID", storage.access_key_id_key),
                         ("AWS_SECRET_ACCESS_KEY", storage.secret_access_key_key)):
            env.append({"name": var, "valueFrom": {"secretKeyRef": {"name": storage.credentials_secret, "key": key}}})
    if storage.region:
        env.append({"name": "AWS_DEFAULT_REGION", "value": storage.region})
    if spec.resources.gpus > 1:  # lora-train starts one torch.distributed worker per GPU
        env.append({"name": ENV_NPROC_PER_NODE, "value": str(spec.resources.gpus)})
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


def _tolerations(tolerations: list[Any]) -> list[dict[str, Any]]:
    out = []
    for t in tolerations:
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


def build_pod(job: Mapping[str, Any], attempt: int, settings: Settings, spec: JobSpec | None = None,
              pool: str = SPOT) -> dict[str, Any]:
    """The Pod manifest of `attempt` of `job` in `pool` (raises SpecError if the spec cannot run)."""
    spec = spec or parse_spec(job.get("spec") or {})
    meta = job["metadata"]
    name = meta["name"]
    check_job_name(name)
    res = spec.resources
    container: dict[str, Any] = {
        "name": TRAINER_CONTAINER,
        "image": spec.image or settings.trainer_image,
        "command": list(COMMAND),
        "env": _env(spec, attempt, str(meta.get("uid") or "")),
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
    if spec.checkpoint.every_steps == AUTO:  # the trainer's checkpoint interval follows the preemption rate
        container["env"].append(rate_env(job.get("status") or {}, settings.preemption_rate_per_hour,
                                         settings.preemption_rate_prior_hours, res.gpus * spec.nodes))
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
    fallback = spec.spot.fallback
    node_selector, tolerations = node_placement(res, fallback, pool)
    if node_selector:
        pod_spec["nodeSelector"] = node_selector
    if tolerations:
        pod_spec["tolerations"] = _tolerations(tolerations)
    if res.priority_class_name:
        pod_spec["priorityClassName"] = res.priority_class_name
    if spec.service_account_name:
        pod_spec["serviceAccountName"] = spec.service_account_name
    labels = {
        JOB_LABEL: name,
        ATTEMPT_LABEL: str(attempt),
        "app.kubernetes.io/name": "lora-trainer",
        "app.kubernetes.io/managed-by": "lora-operator",
        **pod_labels(spec.queue_name),
        **({POOL_LABEL: POOL_LABEL_VALUES[pool]} if fallback is not None else {}),
    }
    check_pod_identity(pod_name(name, attempt), labels)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod_name(name, attempt),
            "namespace": meta.get("namespace", "default"),
            "labels": labels,
            "ownerReferences": [owner_reference(job)],
        },
        "spec": pod_spec,
    }
