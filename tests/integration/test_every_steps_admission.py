"""`spec.checkpoint.everySteps` as the API server admits it: an integer >= 1 or "auto", nothing else.

Behaviours tested (on each Kubernetes target, the emulator and the real control plane):
- a job with `everySteps: auto` or an integer is created, and the server fills `minSteps`/`maxSteps`
  with their defaults (10, 1000);
- "banana", 0, "500" (a number as a string) and 2.5 are refused with 422 naming
  spec.checkpoint.everySteps, so a typo fails at `kubectl apply`, not in the pod.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import kubernetes
import pytest
import yaml
from kubernetes.client.rest import ApiException

from lora_operator.spec import GROUP, PLURAL, VERSION
from tests.support.kube import KubeTarget

JOB = yaml.safe_load((Path(__file__).resolve().parents[2] / "examples" / "tiny-job.yaml").read_text())


def create(kube_api: KubeTarget, namespace: str, name: str, every: object) -> dict:
    job = copy.deepcopy(JOB)
    job["metadata"] = {"name": name, "namespace": namespace}
    job["spec"]["checkpoint"] = {"everySteps": every}
    with kube_api.api_client() as client:
        return kubernetes.client.CustomObjectsApi(client).create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, job)


def test_every_steps_auto_or_integer(kube_api: KubeTarget, kube_namespace: str) -> None:
    for i, every in enumerate(("auto", 25)):
        made = create(kube_api, kube_namespace, f"every-{i}", every)
        assert made["spec"]["checkpoint"] == {"everySteps": every, "minSteps": 10, "maxSteps": 1000, "keepLast": 3}


@pytest.mark.parametrize("every", ["banana", 0, "500", 2.5])
def test_bad_every_steps_refused_naming_the_field(kube_api: KubeTarget, kube_namespace: str, every: object) -> None:
    with pytest.raises(ApiException) as info:
        create(kube_api, kube_namespace, "bad-every", every)
    assert info.value.status == 422
    assert "spec.checkpoint.everySteps" in json.loads(info.value.body)["message"]
