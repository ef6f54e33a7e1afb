"""The real operator (Kopf) against the Kubernetes API (emulator and real), with the test as the kubelet.

Behaviours tested:
- a job gets pod <job>-a1 owned by it, which (as the API server stored it) validates against the
  upstream Pod schema; Running → phase Running; progress.json and latest.json in S3 are mirrored
  into status (read with the job's Secret);
- preemption (DisruptionTarget + Failed) → pod a2 with no failure counted; OOMKilled → a retry
  after the backoff with one failure counted; OOMKilled past failurePolicy.backoffLimit → Failed;
- exit 0 → Succeeded + Ready; exit 78 with a termination message → Failed with that message;
- a pod stuck Terminating on a NotReady node is force-deleted after the grace period and the
  next attempt starts; one stuck on a Ready node is left alone;
- suspend deletes the running pod with its grace period (the kubelet finishes it) → Suspended;
  resume starts the next attempt;
- deleting a job garbage-collects its pods and leaves S3 untouched;
- a bad spec: the schema answers 422; a semantic error → Failed naming the field;
- a missing secret (CreateContainerConfigError) → Stalled after the (short) pending deadline;
- the operator restarted mid-job creates no duplicate pod;
- the liveness endpoint answers 200 while the operator runs.
- a job aimed at an endpoint the allow-list refuses (169.254.169.254; 127.0.0.2, loopback that the
  tests' allow-list does not name) is Failed with reason EndpointNotAllowed, gets no pod, and the
  operator never connects to it (a listener on 127.0.0.2 sees no connection).
- hostile trainer output never wedges a job: a termination message with a 2000-character reason
  and a latest.json with a 40 KB path are bounded in status (which a real API server validates
  against the CRD, as the emulator does), the next attempt starts, and each Event is posted once.
Every test runs on the emulator and on a real control plane (no kubelet, no scheduler: the test
binds pods and writes their status itself), see tests/support/kube.py.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import kubernetes
import kubernetes_validate
import pytest
from kubernetes.client.rest import ApiException

from lora_operator.controller import run_operator
from lora_operator.devcluster.s3 import TEST_CREDENTIALS
from lora_operator.settings import Settings
from lora_operator.spec import GROUP, PLURAL, VERSION
from tests.support.kube import KubeTarget, eventually

pytestmark = pytest.mark.timeout(120)
JOB_LABEL = "lora-operator.dev/job"
K8S_VERSION = "1.30.0"


@contextlib.contextmanager
def operator(kube_api: KubeTarget, namespace: str, **overrides: Any) -> Iterator[None]:
    """The operator in a thread, watching one namespace, with short test settings."""
    settings = Settings(**{
        "namespaces": [namespace], "standalone": True, "liveness": "", "trainer_image": "trainer:test",
        "progress_interval": 1.0, "pending_deadline": 2.0, "terminating_grace": 1.0,
        "backoff_base": 0.2, "backoff_max": 1.0,
        "allowed_endpoints": ["*", "127.0.0.1"],  # the tests' S3 listens on 127.0.0.1 (refused by default)
        "metrics_port": 0,  # tests that scrape /metrics pick a free port
        **overrides,
    })
    stop, ready = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def main() -> None:
        try:
            asyncio.run(run_operator(settings, kubeconfig=str(kube_api.kubeconfig), stop_flag=stop, ready_flag=ready))
        except BaseException as exc:  # surfaced by the test below
            errors.append(exc)

    thread = threading.Thread(target=main, name="operator", daemon=True)
    thread.start()
    assert ready.wait(30), f"operator did not start: {errors}"
    try:
        yield
    finally:
        stop.set()
        thread.join(30)
        assert not errors, errors


class Cluster:
    """The test's hands: the API as a user and as the kubelet."""

    def __init__(self, client: kubernetes.client.ApiClient, namespace: str) -> None:
        self.ns = namespace
        self.core = kubernetes.client.CoreV1Api(client)
        self.custom = kubernetes.client.CustomObjectsApi(client)

    # --- as a user
    def create_job(self, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "LoRATrainingJob", "metadata": {"name": name}, "spec": spec}
        return self.custom.create_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, body)

    def job(self, name: str) -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, name)

    def status(self, name: str) -> dict[str, Any]:
        return self.job(name).get("status") or {}

    def patch_spec(self, name: str, spec: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, name, {"spec": spec})

    def pods(self, job: str) -> list[str]:
        items = self.core.list_namespaced_pod(self.ns, label_selector=f"{JOB_LABEL}={job}").items
        return sorted(p.metadata.name for p in items)

    def pod(self, name: str) -> Any:
        return self.core.read_namespaced_pod(name, self.ns)

    def raw_pod(self, name: str) -> dict[str, Any]:
        """The pod as the API server sends it (JSON, not client models)."""
        return json.loads(self.core.read_namespaced_pod(name, self.ns, _preload_content=False).data)

    def condition(self, job: str, ctype: str) -> dict[str, Any]:
        return next((c for c in self.status(job).get("conditions") or [] if c["type"] == ctype), {})

    # --- as the kubelet
    def run(self, pod: str, node: str = "node-1") -> None:
        self.core.create_namespaced_pod_binding(
            pod, self.ns, {"metadata": {"name": pod}, "target": {"kind": "Node", "name": node}}, _preload_content=False)
        self.set_status(pod, {"phase": "Running", "containerStatuses": [
            {"name": "trainer", "ready": True, "restartCount": 0, "image": "trainer:test", "imageID": "",
             "state": {"running": {"startedAt": "2025-01-01T00:00:00Z"}}}]})

    def finish(self, pod: str, exit_code: int, reason: str = "Error", message: str = "",
               disruption: str | None = None) -> None:
        conditions = [{"type": "DisruptionTarget", "status": "True", "reason": disruption,
                       "message": "preempted by a higher-priority pod"}] if disruption else []
        terminated = {"exitCode": exit_code, "reason": reason, "message": message}
        self.set_status(pod, {"phase": "Succeeded" if exit_code == 0 else "Failed", "conditions": conditions,
                              "containerStatuses": [{"name": "trainer", "ready": False, "restartCount": 0,
                                                     "image": "trainer:test", "imageID": "",
                                                     "state": {"terminated": terminated}}]})

    def waiting(self, pod: str, reason: str, message: str) -> None:
        self.set_status(pod, {"phase": "Pending", "containerStatuses": [
            {"name": "trainer", "ready": False, "restartCount": 0, "image": "trainer:test", "imageID": "",
             "state": {"waiting": {"reason": reason, "message": message}}}]})

    def add_node(self, name: str, ready: bool) -> None:
        """A node as its kubelet registers it; a NotReady one has stopped posting status."""
        self.core.create_node({"metadata": {"name": name}})
        condition = {"type": "Ready", "status": "True" if ready else "False",
                     "reason": "KubeletReady" if ready else "NodeStatusUnknown",
                     "message": "kubelet is posting ready status" if ready else "Kubelet stopped posting node status."}
        self.core.patch_node_status(name, {"status": {"conditions": [condition]}})

    def set_status(self, pod: str, status: dict[str, Any]) -> None:
        self.core.patch_namespaced_pod_status(pod, self.ns, {"status": status})

    def remove(self, pod: str) -> None:
        """The kubelet's final grace-0 delete once the containers stopped."""
        self.core.delete_namespaced_pod(pod, self.ns, grace_period_seconds=0)


@pytest.fixture
def cluster(kube_api: KubeTarget, kube_namespace: str) -> Iterator[Cluster]:
    with kube_api.api_client() as client:
        c = Cluster(client, kube_namespace)
        c.core.create_namespaced_secret(kube_namespace, {
            "metadata": {"name": "s3-creds"},
            "data": {k: base64.b64encode(TEST_CREDENTIALS[k].encode()).decode()
                     for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}})
        yield c


def job_spec(endpoint: str = "http://127.0.0.1:1", bucket: str = "b", **blocks: Any) -> dict[str, Any]:
    spec = {
        "baseModel": {"uri": f"s3://{bucket}/models/tiny-sd/"},
        "dataset": {"uri": f"s3://{bucket}/datasets/tiny/"},
        "training": {"maxTrainSteps": 40, "resolution": 32, "batchSize": 2},
        "checkpoint": {"everySteps": 10},
        "output": {"uri": f"s3://{bucket}/outputs/job/"},
        "storage": {"endpoint": endpoint, "region": "us-east-1", "credentialsSecret": "s3-creds"},
        "resources": {"gpus": 0},
        "failurePolicy": {"backoffLimit": 2},
    }
    spec.update(blocks)
    return spec


def test_lifecycle_preemption_oom_success_and_progress(kube_api: KubeTarget, cluster: Cluster, s3_env: Any) -> None:
    c = cluster
    s3 = s3_env.client()
    with operator(kube_api, c.ns):
        c.create_job("tiny", job_spec(s3_env.endpoint, s3_env.bucket))
        eventually(lambda: _assert(c.pods("tiny") == ["tiny-a1"]), 20)
        kubernetes_validate.validate(c.raw_pod("tiny-a1"), K8S_VERSION, strict=True)
        pod = c.pod("tiny-a1")
        owner = pod.metadata.owner_references[0]
        assert (owner.kind, owner.name, owner.controller) == ("LoRATrainingJob", "tiny", True)
        assert owner.uid == c.job("tiny")["metadata"]["uid"]
        assert pod.metadata.labels[JOB_LABEL] == "tiny" and pod.metadata.labels["lora-operator.dev/attempt"] == "1"
        env = {e.name: e for e in pod.spec.containers[0].env}
        assert json.loads(env["LORA_TRAIN_CONFIG"].value)["output_dir"] == f"s3://{s3_env.bucket}/outputs/job/"
        assert env["AWS_ACCESS_KEY_ID"].value_from.secret_key_ref.name == "s3-creds"
        assert pod.spec.containers[0].security_context.read_only_root_filesystem is True

        c.run("tiny-a1")
        eventually(lambda: _assert(c.status("tiny").get("phase") == "Running"), 10)
        s3.put_object(Bucket=s3_env.bucket, Key="outputs/job/progress.json",
                      Body=json.dumps({"step": 12, "total_steps": 40, "loss": 0.25, "updated": "2025-01-01T00:00:00Z"}))
        s3.put_object(Bucket=s3_env.bucket, Key="outputs/job/checkpoints/latest.json",
                      Body=json.dumps({"step": 10, "attempt": 1, "path": "checkpoints/step-000000010"}))
        eventually(lambda: _assert((c.status("tiny").get("progress") or {}).get("step") == 12), 10)
        st = c.status("tiny")
        assert st["progress"]["percent"] == 30.0 and st["latestCheckpoint"]["step"] == 10
        assert c.condition("tiny", "CheckpointCommitted")["status"] == "True"

        c.finish("tiny-a1", 143, disruption="PreemptionByScheduler")
        eventually(lambda: _assert(c.pods("tiny") == ["tiny-a1", "tiny-a2"]), 10)
        # The pod is created before the status that records it is written: wait for both.
        eventually(lambda: _assert(c.status("tiny").get("attempt") == 2), 10)
        st = c.status("tiny")
        assert (st["preemptions"], st["failures"], st["attempt"]) == (1, 0, 2)
        assert st["lastAttempt"]["reason"] == "PreemptionByScheduler"
        assert c.pod("tiny-a2").spec.containers[0].env[1].value == "2"  # LORA_ATTEMPT

        c.run("tiny-a2")
        c.finish("tiny-a2", 137, reason="OOMKilled")
        eventually(lambda: _assert("tiny-a3" in c.pods("tiny")), 10)
        eventually(lambda: _assert(c.status("tiny").get("attempt") == 3), 10)  # written after the pod
        st = c.status("tiny")
        assert (st["preemptions"], st["failures"], st["lastAttempt"]["reason"]) == (1, 1, "OOMKilled")

        c.run("tiny-a3")
        c.finish("tiny-a3", 0, reason="Completed")
        eventually(lambda: _assert(c.status("tiny").get("phase") == "Succeeded"), 10)
        assert c.condition("tiny", "Ready")["status"] == "True"
        assert c.status("tiny")["observedGeneration"] == c.job("tiny")["metadata"]["generation"]
        events = c.core.list_namespaced_event(c.ns).items
        reasons = {e.reason for e in events if e.involved_object.name == "tiny"}
        assert {"AttemptStarted", "Preempted", "Failed", "Recovering", "Running", "Succeeded"} <= reasons


def test_permanent_error_fails_with_trainer_message(kube_api: KubeTarget, cluster: Cluster) -> None:
    c = cluster
    with operator(kube_api, c.ns):
        c.create_job("bad-data", job_spec())
        eventually(lambda: _assert(c.pods("bad-data") == ["bad-data-a1"]), 20)
        c.run("bad-data-a1")
        message = json.dumps({"reason": "InvalidConfig", "step": 0, "checkpoint": None,
                              "message": "s3://b/models/tiny-sd/ has no unet/ folder; check spec.baseModel.uri"})
        c.finish("bad-data-a1", 78, message=message)
        eventually(lambda: _assert(c.status("bad-data").get("phase") == "Failed"), 10)
        st = c.status("bad-data")
        assert st["reason"] == "InvalidConfig" and "has no unet/ folder; check spec.baseModel.uri" in st["message"]
        assert st["lastAttempt"]["exitCode"] == 78 and st["lastAttempt"]["result"] == "Permanent"
        assert c.condition("bad-data", "Stalled")["status"] == "True"
        assert c.condition("bad-data", "Ready")["status"] == "False"
        time.sleep(1.5)  # a reconcile tick: no retry for a permanent error
        assert c.pods("bad-data") == ["bad-data-a1"] and c.status("bad-data")["failures"] == 0


def test_oom_past_backoff_limit_fails(kube_api: KubeTarget, cluster: Cluster) -> None:
    c = cluster
    with operator(kube_api, c.ns):
        c.create_job("hungry", job_spec(failurePolicy={"backoffLimit": 1}))
        eventually(lambda: _assert(c.pods("hungry") == ["hungry-a1"]), 20)
        c.run("hungry-a1")
        c.finish("hungry-a1", 137, reason="OOMKilled")
        eventually(lambda: _assert(c.pods("hungry") == ["hungry-a1", "hungry-a2"]), 10)
        eventually(lambda: _assert(c.status("hungry").get("attempt") == 2), 10)
        assert (c.status("hungry")["failures"], c.status("hungry")["phase"]) == (1, "Recovering")
        c.run("hungry-a2")
        c.finish("hungry-a2", 137, reason="OOMKilled")
        eventually(lambda: _assert(c.status("hungry").get("phase") == "Failed"), 10)
        st = c.status("hungry")
        assert (st["failures"], st["preemptions"], st["reason"]) == (2, 0, "BackoffLimitExceeded")
        assert "spec.failurePolicy.backoffLimit (1)" in st["message"] and "OOMKilled" in st["message"]
        assert c.condition("hungry", "Stalled")["status"] == "True"
        time.sleep(1.5)
        assert c.pods("hungry") == ["hungry-a1", "hungry-a2"]


def test_pod_stuck_terminating_on_lost_node_is_force_deleted(kube_api: KubeTarget, cluster: Cluster) -> None:
    c = cluster
    lost, healthy = f"lost-{c.ns}", f"healthy-{c.ns}"
    c.add_node(lost, ready=False)
    c.add_node(healthy, ready=True)
    try:
        with operator(kube_api, c.ns, terminating_grace=1.0):
            c.create_job("stranded", job_spec(output={"uri": "s3://b/outputs/stranded/"}))
            c.create_job("slow-stop", job_spec(output={"uri": "s3://b/outputs/slow-stop/"}))  # one output each
            eventually(lambda: _assert(c.pods("stranded") == ["stranded-a1"] and c.pods("slow-stop") == ["slow-stop-a1"]), 20)
            c.run("stranded-a1", node=lost)
            c.run("slow-stop-a1", node=healthy)
            eventually(lambda: _assert(c.status("stranded").get("phase") == "Running"), 10)
            # The node lifecycle controller evicts both; only the healthy node's kubelet could confirm.
            c.core.delete_namespaced_pod("stranded-a1", c.ns, grace_period_seconds=1)
            c.core.delete_namespaced_pod("slow-stop-a1", c.ns, grace_period_seconds=1)
            assert c.pod("stranded-a1").metadata.deletion_timestamp is not None
            eventually(lambda: _assert(c.pods("stranded") == ["stranded-a2"]), 15)
            eventually(lambda: _assert(c.status("stranded").get("attempt") == 2), 10)
            st = c.status("stranded")
            assert (st["attempt"], st["preemptions"], st["failures"]) == (2, 1, 0)
            assert st["lastAttempt"]["reason"] == "NodeLost" and lost in st["lastAttempt"]["message"]
            # Past the same deadline, the pod on the Ready node is still waiting for its kubelet.
            assert c.pod("slow-stop-a1").metadata.deletion_timestamp is not None
            assert c.pods("slow-stop") == ["slow-stop-a1"] and c.status("slow-stop")["attempt"] == 1
    finally:
        for node in (lost, healthy):
            with contextlib.suppress(ApiException):
                c.core.delete_node(node)


def test_suspend_resume_and_delete(kube_api: KubeTarget, cluster: Cluster, s3_env: Any) -> None:
    c = cluster
    s3 = s3_env.client()
    s3.put_object(Bucket=s3_env.bucket, Key="outputs/job/keep.txt", Body=b"data")
    with operator(kube_api, c.ns):
        c.create_job("pause", job_spec(s3_env.endpoint, s3_env.bucket, spot={"terminationGracePeriodSeconds": 20}))
        eventually(lambda: _assert(c.pods("pause") == ["pause-a1"]), 20)
        c.run("pause-a1")
        eventually(lambda: _assert(c.status("pause").get("phase") == "Running"), 10)
        c.patch_spec("pause", {"suspend": True})
        eventually(lambda: _assert(c.pod("pause-a1").metadata.deletion_timestamp is not None), 10)
        assert c.pod("pause-a1").metadata.deletion_grace_period_seconds == 20
        # The status write follows the pod's deletion: on a real server it can land a moment later.
        eventually(lambda: _assert(c.status("pause")["phase"] == "Suspended"), 10)
        c.finish("pause-a1", 75, message=json.dumps({"reason": "Preempted", "step": 7, "message": "SIGTERM"}))
        c.remove("pause-a1")
        eventually(lambda: _assert(c.pods("pause") == []), 10)
        eventually(lambda: _assert(c.condition("pause", "Reconciling").get("status") == "False"), 10)
        st = c.status("pause")
        assert (st["phase"], st["preemptions"], st["failures"]) == ("Suspended", 0, 0)

        c.patch_spec("pause", {"suspend": False})
        eventually(lambda: _assert(c.pods("pause") == ["pause-a2"]), 10)
        assert not c.job("pause")["metadata"].get("finalizers")  # nothing to clean up: delete is immediate
        c.custom.delete_namespaced_custom_object(GROUP, VERSION, c.ns, PLURAL, "pause")
        eventually(lambda: _assert(c.pods("pause") == []), 15)
        eventually(lambda: _assert_gone(c, "pause"), 15)
    assert s3.get_object(Bucket=s3_env.bucket, Key="outputs/job/keep.txt")["Body"].read() == b"data"


def test_finalizer_of_an_older_operator_is_removed(kube_api: KubeTarget, cluster: Cluster) -> None:
    """Earlier operators put a finalizer on every job (Kopf's daemons ask for one); this one takes it off."""
    c = cluster
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "LoRATrainingJob",
            "metadata": {"name": "legacy", "finalizers": [f"{GROUP}/finalizer"]}, "spec": job_spec()}
    c.custom.create_namespaced_custom_object(GROUP, VERSION, c.ns, PLURAL, body)
    with operator(kube_api, c.ns):
        eventually(lambda: _assert(c.pods("legacy") == ["legacy-a1"]), 20)
        eventually(lambda: _assert(not c.job("legacy")["metadata"].get("finalizers")), 15)
        c.custom.delete_namespaced_custom_object(GROUP, VERSION, c.ns, PLURAL, "legacy")
        eventually(lambda: _assert_gone(c, "legacy"), 15)


def test_bad_specs(kube_api: KubeTarget, cluster: Cluster) -> None:
    c = cluster
    with pytest.raises(ApiException) as info:
        c.create_job("rejected", job_spec(training={"maxTrainSteps": 40, "learningRate": 0}))
    assert info.value.status == 422 and "learningRate" in info.value.body
    with operator(kube_api, c.ns):
        c.create_job("semantic", job_spec(training={"maxTrainSteps": 10, "warmupSteps": 50}))
        eventually(lambda: _assert(c.status("semantic").get("phase") == "Failed"), 20)
        st = c.status("semantic")
        assert st["reason"] == "InvalidSpec" and st["message"].startswith("spec.training.warmupSteps:")
        assert "Traceback" not in json.dumps(st)
        assert c.pods("semantic") == []


BAD_SPECS = [  # (what is wrong, spec blocks, a field the answer names); kubectl's Strict field validation
    ("rank 0", {"lora": {"rank": 0}}, "spec.lora.rank"),
    ("no baseModel", {"baseModel": None}, "spec.baseModel"),
    ("batchSize a string", {"training": {"maxTrainSteps": 40, "batchSize": "four"}}, "spec.training.batchSize"),
    ("unknown field", {"training": {"maxTrainSteps": 40, "learningRat": 0.1}}, "learningRat"),
    ("learningRate 0", {"training": {"maxTrainSteps": 40, "learningRate": 0}}, "spec.training.learningRate"),
    ("unknown task", {"task": "text-to-video"}, "spec.task"),
]


@pytest.mark.parametrize(("what", "blocks", "field"), BAD_SPECS, ids=[row[0] for row in BAD_SPECS])
def test_schema_refuses_bad_specs(cluster: Cluster, what: str, blocks: dict[str, Any], field: str) -> None:
    spec = {k: v for k, v in job_spec(**blocks).items() if v is not None}
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "LoRATrainingJob", "metadata": {"name": "bad"}, "spec": spec}
    with pytest.raises(ApiException) as info:
        cluster.custom.create_namespaced_custom_object(GROUP, VERSION, cluster.ns, PLURAL, body,
                                                       field_validation="Strict")
    assert info.value.status in (400, 422) and field in json.loads(info.value.body)["message"], what


CEL_CASES = [
    ("training fields are immutable", "patch", {"spec": {"lora": {"rank": 16}}}, "spec.lora is immutable"),
    ("name over 52 characters", "create", "j" * 53, "metadata.name must be at most 52 characters"),
    ("text caching with a trained text encoder", "spec",
     {"training": {"maxTrainSteps": 40, "cacheTextEmbeddings": True}, "lora": {"trainTextEncoder": True}},
     "spec.training.cacheTextEmbeddings needs spec.lora.trainTextEncoder false"),
    ("bucket minResolution over maxResolution", "spec",
     {"training": {"maxTrainSteps": 40, "buckets": {"minResolution": 1024, "maxResolution": 512}}},
     "spec.training.buckets.minResolution must not be over maxResolution"),
]


@pytest.mark.parametrize(("what", "how", "change", "says"), CEL_CASES, ids=[row[0] for row in CEL_CASES])
def test_cel_rules(kube_api: KubeTarget, cluster: Cluster, what: str, how: str, change: Any, says: str) -> None:
    if not kube_api.is_real:
        pytest.skip("the emulator does not evaluate CEL x-kubernetes-validations; the real target does")
    with pytest.raises(ApiException) as info:
        if how == "patch":
            cluster.create_job("frozen", job_spec())
            cluster.custom.patch_namespaced_custom_object(GROUP, VERSION, cluster.ns, PLURAL, "frozen", change)
        elif how == "spec":
            cluster.create_job("refused", job_spec(**change))
        else:
            cluster.create_job(change, job_spec())
    assert info.value.status == 422 and says in json.loads(info.value.body)["message"], what


def test_missing_secret_stalls(kube_api: KubeTarget, cluster: Cluster) -> None:
    c = cluster
    with operator(kube_api, c.ns, pending_deadline=1.0):
        c.create_job("nosecret", job_spec(storage={"credentialsSecret": "absent"}))
        eventually(lambda: _assert(c.pods("nosecret") == ["nosecret-a1"]), 20)
        c.core.create_namespaced_pod_binding(
            "nosecret-a1", c.ns, {"metadata": {"name": "nosecret-a1"}, "target": {"kind": "Node", "name": "n"}},
            _preload_content=False)
        c.waiting("nosecret-a1", "CreateContainerConfigError", 'secret "absent" not found')
        eventually(lambda: _assert(c.condition("nosecret", "Stalled").get("status") == "True"), 10)
        cond = c.condition("nosecret", "Stalled")
        assert cond["reason"] == "CreateContainerConfigError"
        assert 'secret "absent" not found' in cond["message"] and "spec.storage.credentialsSecret" in cond["message"]
        assert c.status("nosecret")["phase"] == "Pending"


def test_restart_mid_job_creates_no_duplicate(kube_api: KubeTarget, cluster: Cluster) -> None:
    c = cluster
    with operator(kube_api, c.ns):
        c.create_job("steady", job_spec())
        eventually(lambda: _assert(c.pods("steady") == ["steady-a1"]), 20)
        c.run("steady-a1")
        eventually(lambda: _assert(c.status("steady").get("phase") == "Running"), 10)
    # While the operator is down the pod is preempted; the new operator sees it once.
    c.finish("steady-a1", 143, disruption="DeletionByTaintManager")
    with operator(kube_api, c.ns):
        eventually(lambda: _assert(c.pods("steady") == ["steady-a1", "steady-a2"]), 20)
    with operator(kube_api, c.ns):
        eventually(lambda: _assert(c.status("steady").get("attempt") == 2), 10)
        time.sleep(2.5)  # a few reconcile ticks
        assert c.pods("steady") == ["steady-a1", "steady-a2"]
        assert c.status("steady")["preemptions"] == 1


def test_liveness_endpoint(kube_api: KubeTarget, cluster: Cluster) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/healthz"
    with operator(kube_api, cluster.ns, liveness=url):
        def alive() -> None:
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    assert response.status == 200
            except OSError as exc:
                raise AssertionError(str(exc)) from exc
        eventually(alive, 15)


def _assert(condition: bool) -> None:
    assert condition


def _assert_gone(c: Cluster, name: str) -> None:
    try:
        c.job(name)
    except ApiException as exc:
        assert exc.status == 404
        return
    raise AssertionError(f"{name} still exists")


def test_hostile_reason_and_checkpoint_path_do_not_wedge_the_job(kube_api: KubeTarget, cluster: Cluster,
                                                                   s3_env: Any) -> None:
    c = cluster
    s3 = s3_env.client()
    with operator(kube_api, c.ns):
        c.create_job("hostile", job_spec(s3_env.endpoint, s3_env.bucket))
        eventually(lambda: _assert(c.pods("hostile") == ["hostile-a1"]), 20)
        c.run("hostile-a1")
        eventually(lambda: _assert(c.status("hostile").get("phase") == "Running"), 10)
        s3.put_object(Bucket=s3_env.bucket, Key="outputs/job/checkpoints/latest.json",
                      Body=json.dumps({"step": 10, "attempt": 1, "path": "checkpoints/" + "p" * 40_000}))
        eventually(lambda: _assert((c.status("hostile").get("latestCheckpoint") or {}).get("step") == 10), 10)
        # Fits the kubelet's 4 KiB termination message, not a condition's reason (1024).
        message = json.dumps({"reason": "R" * 2000, "step": 10, "message": "crashed"})
        c.finish("hostile-a1", 1, message=message)
        eventually(lambda: _assert(c.pods("hostile") == ["hostile-a1", "hostile-a2"]), 15)
        eventually(lambda: _assert(c.status("hostile").get("attempt") == 2), 10)
        c.run("hostile-a2")
        eventually(lambda: _assert(c.status("hostile").get("phase") == "Running"), 10)
        time.sleep(2.5)  # a few reconcile ticks: nothing repeats
        st = c.status("hostile")
        assert (st["failures"], st["lastAttempt"]["reason"]) == (1, "R" * 1024)
        assert len(st["latestCheckpoint"]["uri"]) <= 2048
        assert all(len(cond["reason"]) <= 1024 and len(cond["message"]) <= 32768 for cond in st["conditions"])
        assert not c.condition("hostile", "StatusRejected")
        events = [e.reason for e in c.core.list_namespaced_event(c.ns).items if e.involved_object.name == "hostile"]
        assert events.count("Failed") == 1 and events.count("Recovering") == 1 and events.count("CheckpointCommitted") == 1


def test_refused_endpoints_fail_the_job_without_a_request(kube_api: KubeTarget, cluster: Cluster) -> None:
    c = cluster
    connections: list[tuple[str, int]] = []
    with socket.socket() as listener:
        listener.bind(("127.0.0.2", 0))  # loopback, but not the 127.0.0.1 the tests' operator allows
        listener.listen(8)
        listener.settimeout(0.2)
        port = listener.getsockname()[1]
        done = threading.Event()

        def accept() -> None:
            while not done.is_set():
                try:
                    conn, peer = listener.accept()
                except TimeoutError:
                    continue
                connections.append(peer)
                conn.close()

        thread = threading.Thread(target=accept, name="listener", daemon=True)
        thread.start()
        try:
            with operator(kube_api, c.ns):
                c.create_job("metadata", job_spec("http://169.254.169.254"))
                c.create_job("loopback", job_spec(f"http://127.0.0.2:{port}"))
                for name in ("metadata", "loopback"):
                    eventually(lambda name=name: _assert(c.status(name).get("phase") == "Failed"), 20)
                time.sleep(3)  # three progress intervals: a job with a pod would have been read by now
                for name, where in (("metadata", "169.254.169.254:80 is link-local"),
                                    ("loopback", f"127.0.0.2:{port} is loopback")):
                    st = c.status(name)
                    assert st["reason"] == "EndpointNotAllowed" and where in st["message"], st
                    assert st["message"].startswith("spec.storage.endpoint ")
                    assert c.condition(name, "Stalled")["reason"] == "EndpointNotAllowed"
                    assert not st.get("attempt") and c.pods(name) == []
        finally:
            done.set()
            thread.join(5)
    assert connections == [], f"the operator connected to a refused endpoint: {connections}"
