"""The trainer pod of an attempt.

Behaviours tested:
- deterministic name, job/attempt labels and a controller owner reference;
- the resolved TrainConfig goes in as LORA_TRAIN_CONFIG JSON, the attempt as LORA_ATTEMPT, and
  LORA_TERMINATION_LOG is left to the trainer's default;
- credentials only by secretKeyRef, with configurable keys; no secret → no AWS_* variables;
- GPUs, memory, placement and grace period from the spec; a hardened security context with
  writable /scratch and /dev/shm emptyDirs;
- the pod validates against the upstream Pod schema;
- a job name that would make a label value over 63 characters (or not a label value) is refused
  with SpecError naming metadata.name, even without the CRD's CEL rule.
"""

from __future__ import annotations

import json

import kubernetes_validate
import pytest

from lora_operator.pods import build_pod, check_job_name
from lora_operator.spec import SpecError
from lora_trainer.config import TrainConfig
from tests.unit.builders import SETTINGS, make_job


def env(pod: dict) -> dict[str, dict]:
    return {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}


def test_identity_and_ownership() -> None:
    pod = build_pod(make_job("tiny"), 3, SETTINGS)
    meta = pod["metadata"]
    assert meta["name"] == "tiny-a3" and meta["namespace"] == "ml"
    assert meta["labels"]["lora-operator.dev/job"] == "tiny"
    assert meta["labels"]["lora-operator.dev/attempt"] == "3"
    (owner,) = meta["ownerReferences"]
    assert owner == {"apiVersion": "lora-operator.dev/v1alpha1", "kind": "LoRATrainingJob", "name": "tiny",
                     "uid": "uid-1", "controller": True, "blockOwnerDeletion": True}


def test_contract_env() -> None:
    pod = build_pod(make_job(), 2, SETTINGS)
    e = env(pod)
    config = TrainConfig.model_validate(json.loads(e["LORA_TRAIN_CONFIG"]["value"]))
    assert config.output_dir == "s3://loras/job/" and config.max_train_steps == 100
    assert e["LORA_ATTEMPT"]["value"] == "2"
    assert e["LORA_CACHE_DIR"]["value"] == "/scratch/cache"
    assert e["HOME"]["value"] == "/scratch" and e["TMPDIR"]["value"] == "/scratch"
    assert "LORA_TERMINATION_LOG" not in e
    c = pod["spec"]["containers"][0]
    assert c["command"] == ["lora-train"] and "args" not in c
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert c["image"] == "trainer:test"


def test_credentials_by_reference_with_custom_keys() -> None:
    storage = {"credentialsSecret": "creds", "accessKeyIdKey": "id", "secretAccessKeyKey": "key"}
    e = env(build_pod(make_job(storage=storage), 1, SETTINGS))
    assert e["AWS_ACCESS_KEY_ID"] == {"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "id"}}}
    assert e["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "creds", "key": "key"}
    assert "AWS_ACCESS_KEY_ID" not in env(build_pod(make_job(storage={}), 1, SETTINGS))


def test_resources_and_placement() -> None:
    job = make_job(
        image="my/trainer:1",
        resources={"gpus": 2, "memory": "24Gi", "cpu": "4", "nodeSelector": {"pool": "spot"},
                   "tolerations": [{"key": "spot", "value": "true", "effect": "NoSchedule"}],
                   "priorityClassName": "low"},
        spot={"terminationGracePeriodSeconds": 90},
    )
    pod = build_pod(job, 1, SETTINGS)
    spec, c = pod["spec"], pod["spec"]["containers"][0]
    assert c["image"] == "my/trainer:1"
    assert c["resources"] == {"requests": {"nvidia.com/gpu": "2", "memory": "24Gi", "cpu": "4"},
                              "limits": {"nvidia.com/gpu": "2", "memory": "24Gi"}}
    assert spec["nodeSelector"] == {"pool": "spot"}
    assert spec["tolerations"] == [{"operator": "Equal", "key": "spot", "value": "true", "effect": "NoSchedule"}]
    assert spec["priorityClassName"] == "low"
    assert spec["terminationGracePeriodSeconds"] == 90
    assert spec["restartPolicy"] == "Never"
    assert json.loads(env(pod)["LORA_TRAIN_CONFIG"]["value"])["preemption_grace_seconds"] == 85.0


def test_cpu_job_asks_for_no_gpu() -> None:
    c = build_pod(make_job(resources={"gpus": 0}), 1, SETTINGS)["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in json.dumps(c["resources"])


def test_hardened_security_context() -> None:
    pod = build_pod(make_job(), 1, SETTINGS)
    c = pod["spec"]["containers"][0]
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] and sc["runAsUser"] == 1000 and sc["readOnlyRootFilesystem"]
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes[mounts["/scratch"]]["emptyDir"] == {}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"


@pytest.mark.parametrize("version", ["1.30.0", "1.33.0"])
def test_pod_validates_against_upstream_schema(version: str) -> None:
    job = make_job(resources={"gpus": 1, "memory": "8Gi", "tolerations": [{"operator": "Exists"}]})
    kubernetes_validate.validate(build_pod(job, 1, SETTINGS), version, strict=True)


@pytest.mark.parametrize("name", ["j" * 53, "j" * 64, "j" * 253, "", "-starts-with-dash"])
def test_unfit_job_names_are_refused(name: str) -> None:
    with pytest.raises(SpecError) as info:
        build_pod(make_job(name), 1, SETTINGS)
    assert info.value.field == "metadata.name" and "shorter name" in str(info.value)


def test_longest_name_fits_every_limit() -> None:
    name = "j" * 52
    check_job_name(name)
    pod = build_pod(make_job(name), 100_100, SETTINGS)  # past every budget's largest attempt
    assert all(len(v) <= 63 for v in pod["metadata"]["labels"].values())
    kubernetes_validate.validate(pod, "1.30.0", strict=True)
