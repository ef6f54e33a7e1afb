"""Spot → on-demand fallback with the real operator (Kopf), on the emulator and a real control plane.

Behaviours tested (the test is the kubelet and the cloud: it binds pods, writes their status and
writes the spot reclaims):
- a job that keeps losing its spot nodes (two reclaims within spec.spot.fallback.windowSeconds,
  afterPreemptions 2) moves to on-demand: attempt 3 carries the fallback's nodeSelector and
  tolerations (not the spot ones) and the pool label; it finishes Succeeded, and its status
  shows placement OnDemand, the GPU-seconds split (from the pods' start/finish times × GPUs)
  and the cost at the operator's prices, with what spot saved; `kubectl get ltj -o wide`
  (the server-side Table, priority-1 columns) shows the same numbers;
- a spot pod unschedulable (PodScheduled False, Unschedulable) for unschedulableSeconds is
  deleted and replaced on on-demand, counting no preemption and no failure
  (lastAttempt Rescheduled, reason SpotUnschedulable).
"""

from __future__ import annotations

import json
from typing import Any

import kubernetes
import pytest

from lora_operator.spec import GROUP, PLURAL, VERSION
from tests.integration.test_operator import Cluster, _assert, cluster, job_spec, operator  # noqa: F401
from tests.support.kube import KubeTarget, eventually

pytestmark = pytest.mark.timeout(120)
TABLE_ACCEPT = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"
SPOT = {"gpus": 2, "nodeSelector": {"pool": "spot"},
        "tolerations": [{"key": "spot", "operator": "Exists", "effect": "NoSchedule"}]}
FALLBACK = {"nodeSelector": {"pool": "on-demand"},
            "tolerations": [{"key": "on-demand", "operator": "Equal", "value": "yes", "effect": "NoSchedule"}],
            "afterPreemptions": 2, "windowSeconds": 3600}
PRICES = {"spot_gpu_hour_price": 1.0, "on_demand_gpu_hour_price": 3.0}


def ran(c: Cluster, pod: str, started: str, finished: str, exit_code: int, reclaimed: bool = False) -> None:
    """The kubelet's last status of a pod that ran from `started` to `finished`; a reclaim is the
    node's shutdown manager marking it (DisruptionTarget) after the trainer checkpointed (exit 75)."""
    c.run(pod)
    conditions = [{"type": "DisruptionTarget", "status": "True", "reason": "TerminationByKubelet",
                   "message": "spot instance reclaimed: node shutting down"}] if reclaimed else []
    c.set_status(pod, {"phase": "Succeeded" if exit_code == 0 else "Failed", "conditions": conditions,
                       "containerStatuses": [{"name": "trainer", "ready": False, "restartCount": 0,
                                              "image": "trainer:test", "imageID": "",
                                              "state": {"terminated": {"exitCode": exit_code, "reason": "Completed",
                                                                       "startedAt": started,
                                                                       "finishedAt": finished}}}]})


def table_row(client: kubernetes.client.ApiClient, ns: str, name: str) -> dict[str, Any]:
    """`kubectl get ltj <name> -o wide` as the API server prints it: column name → cell."""
    path = f"/apis/{GROUP}/{VERSION}/namespaces/{ns}/{PLURAL}/{name}"
    method, url, headers, body, _ = client.param_serialize("GET", path, header_params={"Accept": TABLE_ACCEPT},
                                                           auth_settings=["BearerToken"])
    response = client.call_api(method, url, header_params=headers, body=body)
    response.read()
    table = json.loads(response.data)
    return dict(zip([c["name"] for c in table["columnDefinitions"]], table["rows"][0]["cells"], strict=True))


def test_keeps_losing_spot_then_finishes_on_demand(kube_api: KubeTarget, cluster: Cluster) -> None:  # noqa: F811 (the imported fixture)
    c = cluster
    with operator(kube_api, c.ns, **PRICES):
        c.create_job("flaky", job_spec(resources=SPOT, spot={"fallback": FALLBACK}))
        for attempt, (start, end) in enumerate([("00:00:00", "00:10:00"), ("01:00:00", "01:10:00")], start=1):
            pod = f"flaky-a{attempt}"
            eventually(lambda pod=pod: _assert(pod in c.pods("flaky")), 20)
            spec = c.pod(pod).spec
            assert spec.node_selector == {"pool": "spot"} and spec.tolerations[0].key == "spot"
            assert c.pod(pod).metadata.labels["lora-operator.dev/pool"] == "spot"
            ran(c, pod, f"2025-01-01T{start}Z", f"2025-01-01T{end}Z", 75, reclaimed=True)
        eventually(lambda: _assert("flaky-a3" in c.pods("flaky")), 20)
        eventually(lambda: _assert(c.status("flaky").get("attempt") == 3), 10)
        pod = c.raw_pod("flaky-a3")
        assert pod["spec"]["nodeSelector"] == {"pool": "on-demand"}
        assert [t["key"] for t in pod["spec"]["tolerations"] if t["key"] in ("spot", "on-demand")] == ["on-demand"]
        assert pod["metadata"]["labels"]["lora-operator.dev/pool"] == "on-demand"
        st = c.status("flaky")
        assert (st["placement"]["pool"], st["placement"]["reason"]) == ("OnDemand", "SpotPreemptions")
        assert (st["preemptions"], st["failures"]) == (2, 0)

        ran(c, "flaky-a3", "2025-01-01T02:00:00Z", "2025-01-01T02:15:00Z", 0)
        eventually(lambda: _assert(c.status("flaky").get("phase") == "Succeeded"), 20)
        st = c.status("flaky")
        # 2 spot attempts × 600 s × 2 GPUs; 1 on-demand attempt × 900 s × 2 GPUs.
        assert (st["usage"]["spotGpuSeconds"], st["usage"]["onDemandGpuSeconds"]) == (2400.0, 1800.0)
        assert st["cost"] == {"currency": "USD", "spot": 0.6667, "onDemand": 1.5, "total": 2.1667,
                              "allOnDemand": 3.5, "saved": 1.3333}
        with kube_api.api_client() as client:
            row = table_row(client, c.ns, "flaky")
        assert (row["Pool"], row["Spot-GPU-s"], row["OnDemand-GPU-s"]) == ("OnDemand", 2400, 1800)
        assert (row["Cost"], row["Saved"]) == (2.1667, 1.3333)


def test_unschedulable_spot_pod_falls_back_without_counting(kube_api: KubeTarget, cluster: Cluster) -> None:  # noqa: F811 (the imported fixture)
    c = cluster
    with operator(kube_api, c.ns, pending_deadline=600.0):
        c.create_job("dry", job_spec(resources=SPOT, spot={"fallback": {**FALLBACK, "unschedulableSeconds": 1}}))
        eventually(lambda: _assert(c.pods("dry") == ["dry-a1"]), 20)
        since = c.pod("dry-a1").metadata.creation_timestamp.strftime("%Y-%m-%dT%H:%M:%SZ")
        c.set_status("dry-a1", {"phase": "Pending", "conditions": [
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "lastTransitionTime": since,
             "message": "0/3 nodes are available: 3 node(s) didn't match Pod's node affinity/selector."}]})
        eventually(lambda: _assert(c.pods("dry") == ["dry-a2"]), 20)
        eventually(lambda: _assert(c.status("dry").get("attempt") == 2), 10)
        assert c.pod("dry-a2").spec.node_selector == {"pool": "on-demand"}
        st = c.status("dry")
        assert (st["preemptions"], st["failures"]) == (0, 0)
        assert (st["lastAttempt"]["result"], st["lastAttempt"]["reason"]) == ("Rescheduled", "SpotUnschedulable")
        assert "unschedulable" in st["lastAttempt"]["message"]
        assert st["placement"]["pool"] == "OnDemand"
