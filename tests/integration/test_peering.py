"""Two operator replicas with Kopf peering, as the chart runs them (real processes, on each Kubernetes target).

Behaviours tested:
- two replicas whose priorities come from their pod names (POD_NAME, hashed) see each other in
  the KopfPeering object with distinct priorities; exactly one of them works: a job gets one pod
  and one status, however long both run;
- the reason the priorities must differ: two replicas of equal priority both pause, and a job
  gets no pod at all.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml

from lora_operator.settings import priority_from_name
from lora_operator.spec import GROUP, PLURAL, VERSION
from tests.e2e.deadlines import FUNC_ONLY, set_deadline, startup_reference
from tests.support.kube import KubeTarget, eventually

pytestmark = FUNC_ONLY
ROOT = Path(__file__).resolve().parents[2]
PEERING_CRD = ROOT / "charts" / "lora-operator" / "crds" / "kopfpeerings.kopf.dev.yaml"
PEERING = "lora-operator"
JOB_LABEL = "lora-operator.dev/job"
REPLICAS = ("lora-operator-6f7d9c8b5-x2kqz", "lora-operator-6f7d9c8b5-p9w4m")


@contextlib.contextmanager
def replicas(kube_api: KubeTarget, namespace: str, tmp_path: Path, *extra: str) -> Iterator[list[subprocess.Popen]]:
    """The two operator pods of a Deployment: own processes (own Kopf identities), own POD_NAME."""
    procs = []
    for pod in REPLICAS:
        env = {**os.environ, "POD_NAME": pod, "LORA_OPERATOR_PROGRESS_INTERVAL": "1",
               "LORA_OPERATOR_ALLOWED_ENDPOINTS": "*,127.0.0.1"}  # examples/tiny-job.yaml's S3
        log = open(tmp_path / f"{pod}.log", "w")  # noqa: SIM115 (closed with the process)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "lora_operator", "run", "--namespace", namespace, "--peering", PEERING,
             "--kubeconfig", str(kube_api.kubeconfig), "--liveness", "", "--trainer-image", "trainer:test", *extra],
            env=env, stdout=log, stderr=subprocess.STDOUT))
    try:
        yield procs
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture(scope="module")
def startup() -> float:
    """The time an operator process needs to import its code here, now (tests/e2e/deadlines.py)."""
    return startup_reference()


def register_within(startup: float) -> float:
    """How long two starting replicas get to show up in the KopfPeering: 30 s on an idle machine,
    more when a process start-up is slower (two replicas start at once on 2 cores)."""
    return max(30.0, 15 * startup)


@pytest.fixture(autouse=True)
def deadline(request: pytest.FixtureRequest, startup: float) -> float:
    return set_deadline(request, 60 + 3 * register_within(startup))


@pytest.fixture
def peering(kube_api: KubeTarget, kube_namespace: str) -> Iterator[kubernetes.client.CustomObjectsApi]:
    kube_api.register_crd(yaml.safe_load(PEERING_CRD.read_text()))
    with kube_api.api_client() as client:
        custom = kubernetes.client.CustomObjectsApi(client)
        custom.create_namespaced_custom_object("kopf.dev", "v1", kube_namespace, "kopfpeerings", {
            "apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": PEERING}})
        yield custom


def peers(custom: kubernetes.client.CustomObjectsApi, namespace: str) -> dict[str, Any]:
    body = custom.get_namespaced_custom_object("kopf.dev", "v1", namespace, "kopfpeerings", PEERING)
    return body.get("status") or {}


def job(name: str) -> dict[str, Any]:
    spec = yaml.safe_load((ROOT / "examples" / "tiny-job.yaml").read_text())["spec"]
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "LoRATrainingJob", "metadata": {"name": name}, "spec": spec}


def pods(kube_api: KubeTarget, namespace: str, name: str) -> list[str]:
    with kube_api.api_client() as client:
        items = kubernetes.client.CoreV1Api(client).list_namespaced_pod(namespace, label_selector=f"{JOB_LABEL}={name}").items
    return sorted(p.metadata.name for p in items)


def _both_registered(custom: kubernetes.client.CustomObjectsApi, namespace: str) -> dict[str, Any]:
    found = peers(custom, namespace)
    assert len(found) == 2, found
    return found


def test_hashed_priorities_let_exactly_one_replica_work(kube_api: KubeTarget, kube_namespace: str,
                                                        peering: kubernetes.client.CustomObjectsApi,
                                                        tmp_path: Path, startup: float) -> None:
    with replicas(kube_api, kube_namespace, tmp_path):
        found = eventually(lambda: _both_registered(peering, kube_namespace), register_within(startup), 0.2)
        assert sorted(p["priority"] for p in found.values()) == sorted(priority_from_name(n) for n in REPLICAS)
        peering.create_namespaced_custom_object(GROUP, VERSION, kube_namespace, PLURAL, job("shared"))
        eventually(lambda: _assert(pods(kube_api, kube_namespace, "shared") == ["shared-a1"]), register_within(startup))
        time.sleep(3)  # several reconcile ticks of whichever replica is active
        assert pods(kube_api, kube_namespace, "shared") == ["shared-a1"]
        status = peering.get_namespaced_custom_object(GROUP, VERSION, kube_namespace, PLURAL, "shared")["status"]
        assert status["attempt"] == 1


def test_equal_priorities_pause_both_replicas(kube_api: KubeTarget, kube_namespace: str,
                                              peering: kubernetes.client.CustomObjectsApi, tmp_path: Path,
                                              startup: float) -> None:
    with replicas(kube_api, kube_namespace, tmp_path, "--priority", "7"):
        found = eventually(lambda: _both_registered(peering, kube_namespace), register_within(startup), 0.2)
        assert [p["priority"] for p in found.values()] == [7, 7]
        time.sleep(2)  # both have seen each other's heartbeat
        peering.create_namespaced_custom_object(GROUP, VERSION, kube_namespace, PLURAL, job("frozen"))
        time.sleep(5)
        assert pods(kube_api, kube_namespace, "frozen") == []


def _assert(condition: bool) -> None:
    assert condition
