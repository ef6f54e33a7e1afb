"""spec.nodes > 1 through JobSet: the real operator, with the test as JobSet, the Job controller and the kubelet.

Behaviours tested:
- without the JobSet CRD (discovery does not list jobsets.jobset.x-k8s.io) a `nodes: 2` job is
  Failed with reason JobSetNotInstalled, says what to install, and gets no pod; once the CRD is
  installed, the same operator asks discovery again and a new `nodes: 2` job gets its JobSet;
- with the CRD, a `nodes: 2` job becomes the JobSet `<job>-a1`, owned by the job (controller),
  with one Indexed replicated job of 2 pods and maxRestarts 0; its pods (made by the test from
  the JobSet's template, with JobSet's names and labels, owned by the JobSet) carry the job's
  labels, so the operator sees them: both Running → Running;
- a reclaim of pod index 0 (DisruptionTarget + exit 75) → preemptions 1, failures 0, the
  JobSet deleted (the garbage collector stops its other pod), then JobSet `<job>-a2`; a reclaim
  of pod index 1 of attempt 2 → preemptions 2, JobSet `<job>-a3`; the leader's exit 0 → Succeeded.

The CRD: JobSet's published one when LORA_TEST_JOBSET_CRD names its file (e.g.
.cache/third_party/jobset/jobset.x-k8s.io_jobsets.yaml, never committed), else a minimal one we
author (tests/fixtures/jobset-crd.yaml: structural, preserving unknown fields), so a fresh CI
machine exercises the feature too; `kube_api` registers it at the session's start
(tests/support/jobset.py says why). No JobSet controller runs: the test plays it. Both tests run
on the emulator and on the real control plane. The not-installed test removes the CRD (it is
cluster-scoped) and puts it back when done.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from typing import Any

import kubernetes
import pytest
from kubernetes.client.rest import ApiException

from lora_operator import jobset as js
from tests.integration.test_operator import Cluster, _assert, cluster, job_spec, operator  # noqa: F401
from tests.support.jobset import jobset_crd
from tests.support.kube import KubeTarget, eventually

pytestmark = pytest.mark.timeout(240)
CRD_NAME = f"{js.PLURAL}.{js.GROUP}"


def served(client: kubernetes.client.ApiClient) -> bool:
    try:
        body = kubernetes.client.CustomObjectsApi(client).get_api_resources(js.GROUP, js.VERSION)
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise
    return any(r.name == js.PLURAL for r in body.resources or [])


def uninstall_jobset(kube_api: KubeTarget) -> None:
    with kube_api.api_client() as client:
        try:
            kubernetes.client.ApiextensionsV1Api(client).delete_custom_resource_definition(CRD_NAME)
        except ApiException as exc:
            if exc.status != 404:
                raise
        eventually(lambda: _assert(not served(client)), 60, 0.2)


class JobSetPlayer:
    """The test's hands as JobSet + the Job controller: pods from a JobSet's template."""

    def __init__(self, c: Cluster) -> None:
        self.c = c

    def get(self, name: str) -> dict[str, Any]:
        return self.c.custom.get_namespaced_custom_object(js.GROUP, js.VERSION, self.c.ns, js.PLURAL, name)

    def exists(self, name: str) -> bool:
        try:
            self.get(name)
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def create_pods(self, name: str) -> list[str]:
        """The pods JobSet's Job would create: <jobset>-<rjob>-0-<index>-<random>, index 0 first."""
        body = self.get(name)
        rjob = body["spec"]["replicatedJobs"][0]
        job = rjob["template"]["spec"]
        template, job_name = job["template"], f"{name}-{rjob['name']}-0"
        names = []
        for index in range(job["completions"]):
            pod_name = f"{job_name}-{index}-{secrets.token_hex(3)[:5]}"
            meta = template.get("metadata") or {}
            pod = {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {
                    "name": pod_name,
                    "labels": {**meta.get("labels", {}), js.JOBSET_NAME_LABEL: name,
                               js.REPLICATED_JOB_LABEL: rjob["name"], js.JOB_INDEX_LABEL: "0",
                               js.COMPLETION_INDEX: str(index), "batch.kubernetes.io/job-name": job_name},
                    "annotations": {**meta.get("annotations", {}), js.COMPLETION_INDEX: str(index)},
                    "ownerReferences": [{"apiVersion": js.API_VERSION, "kind": js.KIND, "name": name,
                                         "uid": body["metadata"]["uid"], "controller": True}],
                },
                "spec": {**template["spec"], "hostname": js.pod_hostname(name, index), "subdomain": name},
            }
            self.c.core.create_namespaced_pod(self.c.ns, pod)
            names.append(pod_name)
        return names

    def stopped_by_gc(self, pod: str) -> None:
        """As the kubelet: the pod the garbage collector is deleting stops (exit 75 after its
        SIGTERM checkpoint), then goes."""
        eventually(lambda: _assert(self.c.pod(pod).metadata.deletion_timestamp is not None), 60, 0.1)
        self.c.finish(pod, 75)
        self.c.remove(pod)


def wait_gc_sees_jobsets(c: Cluster, player: JobSetPlayer) -> float:
    """A freshly installed CRD is watched by the real garbage collector only after its next
    discovery sync: delete a probe JobSet and wait until a ConfigMap it owns is collected."""
    started = time.monotonic()
    probe = c.custom.create_namespaced_custom_object(js.GROUP, js.VERSION, c.ns, js.PLURAL, {
        "apiVersion": js.API_VERSION, "kind": js.KIND, "metadata": {"name": "gc-probe"},
        "spec": {"replicatedJobs": []}})
    c.core.create_namespaced_config_map(c.ns, {"metadata": {"name": "gc-probe", "ownerReferences": [
        {"apiVersion": js.API_VERSION, "kind": js.KIND, "name": "gc-probe", "uid": probe["metadata"]["uid"]}]}})
    c.custom.delete_namespaced_custom_object(js.GROUP, js.VERSION, c.ns, js.PLURAL, "gc-probe")

    def collected() -> None:
        try:
            c.core.read_namespaced_config_map("gc-probe", c.ns)
        except ApiException as exc:
            assert exc.status == 404
            return
        raise AssertionError("the probe's ConfigMap is still there")

    eventually(collected, 120, 0.2)
    return time.monotonic() - started


@pytest.fixture
def with_jobset(kube_api: KubeTarget) -> Iterator[None]:
    kube_api.register_crd(jobset_crd())
    with kube_api.api_client() as client:
        eventually(lambda: _assert(served(client)), 60, 0.2)
    yield


def group_spec(nodes: int = 2, **blocks: Any) -> dict[str, Any]:
    return job_spec(**blocks, nodes=nodes, spot={"maxPreemptions": 5, "terminationGracePeriodSeconds": 30})


def test_jobset_not_installed_fails_the_job(kube_api: KubeTarget, cluster: Cluster) -> None:  # noqa: F811
    c = cluster
    uninstall_jobset(kube_api)
    try:
        with operator(kube_api, c.ns):
            c.create_job("grp", group_spec())
            eventually(lambda: _assert(c.status("grp").get("phase") == "Failed"), 30)
            st = c.status("grp")
            assert st["reason"] == js.NOT_INSTALLED and "install JobSet" in st["message"]
            assert c.condition("grp", "Stalled")["reason"] == js.NOT_INSTALLED
            assert c.pods("grp") == []
            # Installed later: the operator asks discovery again (it never keeps a "no"), so a new job runs.
            kube_api.register_crd(jobset_crd())
            c.create_job("grp-later", group_spec())
            eventually(lambda: _assert(JobSetPlayer(c).exists("grp-later-a1")), 30)
            assert c.status("grp")["phase"] == "Failed"
    finally:
        kube_api.register_crd(jobset_crd())


def test_group_recovers_from_reclaims_of_either_pod(kube_api: KubeTarget, cluster: Cluster,  # noqa: F811
                                                     with_jobset: None) -> None:
    c, player = cluster, JobSetPlayer(cluster)
    gc_wait = wait_gc_sees_jobsets(c, player)
    with operator(kube_api, c.ns):
        c.create_job("grp", group_spec())
        eventually(lambda: _assert(player.exists("grp-a1")), 30)
        body = player.get("grp-a1")
        (owner,) = body["metadata"]["ownerReferences"]
        assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == \
            ("LoRATrainingJob", "grp", c.job("grp")["metadata"]["uid"], True)
        assert body["spec"]["failurePolicy"]["maxRestarts"] == 0
        (rjob,) = body["spec"]["replicatedJobs"]
        assert (rjob["template"]["spec"]["completionMode"], rjob["template"]["spec"]["completions"]) == ("Indexed", 2)
        assert c.pods("grp") == [], "no bare pod for a group job"

        # Attempt 1: a reclaim of the leader (index 0).
        pods = player.create_pods("grp-a1")
        eventually(lambda: _assert(c.pods("grp") == sorted(pods)), 10)
        env = {e.name: e for e in c.pod(pods[1]).spec.containers[0].env}
        assert env["LORA_NNODES"].value == "2" and env["LORA_MASTER_ADDR"].value == "grp-a1-node-0-0.grp-a1"
        for pod in pods:
            c.run(pod)
        eventually(lambda: _assert(c.status("grp").get("phase") == "Running"), 20)
        c.finish(pods[0], 75, disruption="PreemptionByScheduler")
        eventually(lambda: _assert(c.status("grp").get("preemptions") == 1), 20)
        eventually(lambda: _assert(not player.exists("grp-a1")), 20)
        player.stopped_by_gc(pods[1])
        eventually(lambda: _assert(player.exists("grp-a2")), 30)
        eventually(lambda: _assert(c.status("grp").get("attempt") == 2), 20)
        st = c.status("grp")
        assert (st["preemptions"], st["failures"], st["lastAttempt"]["reason"]) == (1, 0, "PreemptionByScheduler")

        # Attempt 2: a reclaim of the other pod (index 1): one more preemption, not a failure.
        pods = player.create_pods("grp-a2")
        for pod in pods:
            c.run(pod)
        eventually(lambda: _assert(c.status("grp").get("phase") == "Running"), 20)
        c.finish(pods[1], 75, disruption="PreemptionByScheduler")
        eventually(lambda: _assert(c.status("grp").get("preemptions") == 2), 20)
        player.stopped_by_gc(pods[0])
        eventually(lambda: _assert(player.exists("grp-a3")), 30)
        eventually(lambda: _assert(c.status("grp").get("attempt") == 3), 20)

        # Attempt 3: every pod finishes; the leader's exit 0 is the job's success.
        pods = player.create_pods("grp-a3")
        for pod in pods:
            c.run(pod)
        c.finish(pods[1], 0, reason="Completed")
        c.finish(pods[0], 0, reason="Completed")
        eventually(lambda: _assert(c.status("grp").get("phase") == "Succeeded"), 20)
        st = c.status("grp")
        assert (st["preemptions"], st["failures"], st["attempt"]) == (2, 0, 3)
        assert c.condition("grp", "Ready")["status"] == "True"
    print(f"garbage collector saw JobSets after {gc_wait:.1f}s")
