"""Kueue admission with the real operator on a real control plane: a queued job waits as `Queued`.

Kueue's CRDs are installed: Kueue's published ones when LORA_TEST_KUEUE_CRDS names a folder of
them (e.g. .cache/third_party/kueue, never committed), else the minimal stand-ins we author in
tests/fixtures/kueue (CI, a fresh machine). A ResourceFlavor, a ClusterQueue with a GPU quota
and a LocalQueue are created as a platform team would. Kueue itself does not run: the test plays
it. Its webhook gates every pod labelled with a queue at creation (a real API server accepts
scheduling gates only at creation, and afterwards only their removal), which the test does with a
MutatingAdmissionPolicy (admissionregistration.k8s.io/v1, served by kube-apiserver 1.36); its
admission is the removal of the gate, which the test does by a patch.

Behaviours tested:
- the job's pod carries kueue.x-k8s.io/queue-name: <LocalQueue> and is created gated;
- while gated the job is Pending with reason Queued, not Stalled, for well past the pending
  deadline, and status.admission records when it was queued;
- once the gate goes the pending deadline starts: an unschedulable pod is not Stalled at once
  (although created long ago), but is after the deadline from admission;
- the pod then runs and the job Succeeds.
The emulator has no admission control (no policies, no webhooks), so it cannot gate a pod at
creation the way Kueue does: the test skips there with that reason. The Queued decision itself
is table-tested in tests/unit/test_queueing.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import time
from collections.abc import Iterator
from typing import Any

import kubernetes
import pytest
import yaml
from kubernetes.client.rest import ApiException

from lora_operator.queueing import KUEUE_GATE, QUEUE_LABEL
from tests.integration.test_operator import Cluster, _assert, cluster, job_spec, operator  # noqa: F401
from tests.support.kube import KubeTarget, eventually

pytestmark = pytest.mark.timeout(120)
KUEUE_CRDS_ENV = "LORA_TEST_KUEUE_CRDS"
FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "kueue"
KUEUE = ("kueue.x-k8s.io", "v1beta2")
PENDING_DEADLINE = 3.0
STATUS_TIME_RESOLUTION = 1.0  # status times are whole seconds: admittedAt may read up to 1 s early


def kueue_crds() -> list[dict[str, Any]]:
    """Kueue's CRDs: the published ones from LORA_TEST_KUEUE_CRDS, else our minimal stand-ins."""
    folder = pathlib.Path(os.environ.get(KUEUE_CRDS_ENV) or FIXTURES)
    docs = [d for f in sorted(folder.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text(encoding="utf-8")) if d]
    assert {d["spec"]["names"]["kind"] for d in docs} >= {"ResourceFlavor", "ClusterQueue", "LocalQueue"}, folder
    return docs


def raw(client: kubernetes.client.ApiClient, method: str, path: str, body: Any = None) -> dict[str, Any]:
    """One request with the client's credentials; the JSON answer (ApiException-like AssertionError else)."""
    method, url, headers, data, _ = client.param_serialize(
        method, path, header_params={"Accept": "application/json", "Content-Type": "application/json"},
        body=body, auth_settings=["BearerToken"])
    response = client.call_api(method, url, header_params=headers, body=data)
    response.read()
    assert response.status < 300, f"{method} {path}: {response.status} {response.data[:500]!r}"
    return json.loads(response.data or b"{}")


def gate_policy(ns: str) -> list[tuple[str, dict[str, Any]]]:
    """Kueue's pod webhook as a MutatingAdmissionPolicy: a pod created in `ns` with a queue label
    gets the scheduling gate kueue.x-k8s.io/admission."""
    name = f"kueue-gate-{ns}"
    policy = {
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingAdmissionPolicy",
        "metadata": {"name": name},
        "spec": {
            "matchConstraints": {"resourceRules": [{"apiGroups": [""], "apiVersions": ["v1"],
                                                    "operations": ["CREATE"], "resources": ["pods"]}]},
            "matchConditions": [{"name": "queued", "expression":
                                 f"has(object.metadata.labels) && '{QUEUE_LABEL}' in object.metadata.labels"}],
            "failurePolicy": "Fail",
            "reinvocationPolicy": "Never",
            "mutations": [{"patchType": "ApplyConfiguration", "applyConfiguration": {"expression":
                           f'Object{{spec: Object.spec{{schedulingGates: [Object.spec.schedulingGates{{name: '
                           f'"{KUEUE_GATE}"}}]}}}}'}}],
        },
    }
    binding = {
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingAdmissionPolicyBinding",
        "metadata": {"name": name},
        "spec": {"policyName": name,
                 "matchResources": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}}}},
    }
    return [("mutatingadmissionpolicies", policy), ("mutatingadmissionpolicybindings", binding)]


@contextlib.contextmanager
def kueue_webhook(client: kubernetes.client.ApiClient, ns: str) -> Iterator[None]:
    """The gate policy, active (a dry-run pod comes back gated), removed afterwards."""
    base = "/apis/admissionregistration.k8s.io/v1"
    objects = gate_policy(ns)
    for plural, body in objects:
        raw(client, "POST", f"{base}/{plural}", body)
    probe = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "probe", "labels": {QUEUE_LABEL: "probe"}},
             "spec": {"containers": [{"name": "c", "image": "probe"}]}}

    def active() -> None:
        made = raw(client, "POST", f"/api/v1/namespaces/{ns}/pods?dryRun=All", probe)
        assert [g["name"] for g in made["spec"].get("schedulingGates") or []] == [KUEUE_GATE]

    try:
        eventually(active, 30, 0.2)  # the API server loads policies from its informer, a moment later
        yield
    finally:
        for plural, body in reversed(objects):
            with contextlib.suppress(AssertionError):
                raw(client, "DELETE", f"{base}/{plural}/{body['metadata']['name']}")


def queues(custom: kubernetes.client.CustomObjectsApi, ns: str) -> str:
    """A ResourceFlavor, a ClusterQueue with a GPU quota and a LocalQueue in `ns`; the LocalQueue's name."""
    group, version = KUEUE
    names = {"flavor": f"gpu-{ns}", "cq": f"team-{ns}", "lq": "team-a"}
    custom.create_cluster_custom_object(group, version, "resourceflavors", {
        "apiVersion": f"{group}/{version}", "kind": "ResourceFlavor", "metadata": {"name": names["flavor"]},
        "spec": {"nodeLabels": {"pool": "gpu"}}})
    custom.create_cluster_custom_object(group, version, "clusterqueues", {
        "apiVersion": f"{group}/{version}", "kind": "ClusterQueue", "metadata": {"name": names["cq"]},
        "spec": {"namespaceSelector": {}, "resourceGroups": [{
            "coveredResources": ["cpu", "memory", "nvidia.com/gpu"],
            "flavors": [{"name": names["flavor"], "resources": [
                {"name": "cpu", "nominalQuota": "32"}, {"name": "memory", "nominalQuota": "256Gi"},
                {"name": "nvidia.com/gpu", "nominalQuota": "8"}]}]}]}})
    custom.create_namespaced_custom_object(group, version, ns, "localqueues", {
        "apiVersion": f"{group}/{version}", "kind": "LocalQueue", "metadata": {"name": names["lq"]},
        "spec": {"clusterQueue": names["cq"]}})
    return names["lq"]


def test_queued_job_waits_as_queued(kube_api: KubeTarget, cluster: Cluster) -> None:  # noqa: F811 (imported fixture)
    if not kube_api.is_real:
        pytest.skip("the emulator has no admission control (MutatingAdmissionPolicy or webhooks), so it cannot gate "
                    "a pod at creation as Kueue's webhook does; runs on the real control plane")
    c = cluster
    for crd in kueue_crds():
        kube_api.register_crd(crd)
    with kube_api.api_client() as client, kueue_webhook(client, c.ns), \
            operator(kube_api, c.ns, pending_deadline=PENDING_DEADLINE):
        queue = queues(c.custom, c.ns)
        c.create_job("queued", job_spec(queueName=queue, resources={"gpus": 1}))
        eventually(lambda: _assert(c.pods("queued") == ["queued-a1"]), 20)
        pod = c.raw_pod("queued-a1")
        assert pod["metadata"]["labels"][QUEUE_LABEL] == queue
        assert pod["spec"]["schedulingGates"] == [{"name": KUEUE_GATE}]
        eventually(lambda: _assert(c.status("queued").get("reason") == "Queued"), 20)

        time.sleep(2 * PENDING_DEADLINE)  # queued well past the pending deadline
        st = c.status("queued")
        assert (st["phase"], st["reason"]) == ("Pending", "Queued"), st
        assert f"LocalQueue {queue}" in st["message"]
        assert c.condition("queued", "Stalled")["status"] == "False"
        assert st["admission"]["attempt"] == 1 and "admittedAt" not in st["admission"]

        # Kueue admits the workload: it removes the gate; the scheduler finds no node at first.
        c.core.patch_namespaced_pod("queued-a1", c.ns, [{"op": "remove", "path": "/spec/schedulingGates"}])
        admitted = time.monotonic()
        c.set_status("queued-a1", {"phase": "Pending", "conditions": [
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
             "message": "0/1 nodes are available: 1 Insufficient nvidia.com/gpu."}]})
        eventually(lambda: _assert("admittedAt" in (c.status("queued").get("admission") or {})), 10)
        if time.monotonic() - admitted < PENDING_DEADLINE - STATUS_TIME_RESOLUTION:  # counted from the admission
            assert c.condition("queued", "Stalled")["status"] == "False"
        eventually(lambda: _assert(c.condition("queued", "Stalled").get("reason") == "Unschedulable"), 20)
        assert time.monotonic() - admitted >= PENDING_DEADLINE - STATUS_TIME_RESOLUTION

        c.run("queued-a1")
        eventually(lambda: _assert(c.status("queued").get("phase") == "Running"), 10)
        assert c.condition("queued", "Stalled")["status"] == "False"
        c.finish("queued-a1", 0, reason="Completed")
        eventually(lambda: _assert(c.status("queued").get("phase") == "Succeeded"), 10)
        for plural, name in (("clusterqueues", f"team-{c.ns}"), ("resourceflavors", f"gpu-{c.ns}")):
            with contextlib.suppress(ApiException):
                c.custom.delete_cluster_custom_object(*KUEUE, plural, name)
