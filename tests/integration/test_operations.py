"""Operations (issue 14): re-apply, OutputInUse, ttlSecondsAfterFinished and /metrics, on the real
operator against the Kubernetes API (emulator and real control plane), the S3 server and the
trainer's own fencing code, with the test as the kubelet.

Behaviours tested:
- re-apply: a job's pod carries LORA_RUN_ID = the job's uid; the job is preempted once (the
  scraped lora_operator_preemptions_total and jobs{phase} move, and the next attempt's first step
  lands in lora_operator_resume_seconds), then deleted mid-run and applied again: the new job (new
  uid) waits for the old pod to go, starts <job>-a1 with the new uid, and the trainer's fence for
  it continues after the old run's attempts, so the old run's pod is the stale one (StaleAttempt);
- OutputInUse: a second live job aimed at the same output gets no pod and Stalled/OutputInUse
  naming the first; once the first is deleted, it starts;
- ttlSecondsAfterFinished: a finished job is deleted after its TTL, its pods with it, and every
  object under its output stays in S3.
"""

from __future__ import annotations

import contextlib
import socket
import time
import urllib.request
from typing import Any

import pytest
from kubernetes.client.rest import ApiException
from prometheus_client.parser import text_string_to_metric_families

from lora_operator.spec import GROUP, PLURAL, VERSION
from lora_trainer.checkpoint import check_not_stale, claim_attempt, run_fence
from lora_trainer.contract import PROGRESS_FILE, Progress, utcnow
from lora_trainer.errors import StaleAttempt
from lora_trainer.storage import open_store
from tests.integration.test_operator import Cluster, _assert, _assert_gone, cluster, job_spec, operator
from tests.support.kube import KubeTarget, eventually

__all__ = ["cluster"]  # the fixture, shared with test_operator
pytestmark = pytest.mark.timeout(180)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The operator's /metrics over HTTP: (sample name, sorted labels) → value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def owner(pod: Any) -> str:
    return pod.metadata.owner_references[0].uid


def env_of(c: Cluster, pod: str) -> dict[str, str]:
    return {e.name: e.value for e in c.pod(pod).spec.containers[0].env if e.value is not None}


def test_reapply_continues_the_fence_and_metrics_count_it(kube_api: KubeTarget, cluster: Cluster, s3_env: Any) -> None:
    c, port = cluster, free_port()
    spec = job_spec(s3_env.endpoint, s3_env.bucket, output={"uri": f"s3://{s3_env.bucket}/outputs/again/"})
    store = open_store(spec["output"]["uri"], s3_env.s3)
    s3 = s3_env.client()
    with operator(kube_api, c.ns, metrics_port=port, terminating_grace=30.0):
        c.create_job("again", spec)
        eventually(lambda: _assert(c.pods("again") == ["again-a1"]), 20)
        old_uid = c.job("again")["metadata"]["uid"]
        env = env_of(c, "again-a1")
        assert (env["LORA_RUN_ID"], env["LORA_ATTEMPT"]) == (old_uid, "1")
        claim_attempt(store, run_fence(store, old_uid, 1), old_uid, 1)  # what the trainer does at start
        c.run("again-a1")
        eventually(lambda: _assert(c.status("again").get("phase") == "Running"), 10)
        before = scrape(port)
        assert before[("lora_operator_jobs", (("phase", "Running"),))] >= 1

        # A spot reclaim: the next attempt is fenced 2 and reports its first step.
        c.finish("again-a1", 143, disruption="TerminationByKubelet")
        eventually(lambda: _assert(c.pods("again") == ["again-a1", "again-a2"]), 20)
        assert run_fence(store, old_uid, 2) == 2
        claim_attempt(store, 2, old_uid, 2)
        c.run("again-a2")
        time.sleep(1.1)  # the first step comes after the preemption was seen (second-resolution stamps)
        step = Progress(step=11, total_steps=40, attempt=2, state="running", updated=utcnow())
        s3.put_object(Bucket=s3_env.bucket, Key=f"outputs/again/{PROGRESS_FILE}", Body=step.model_dump_json().encode())

        def counted() -> dict[Any, float]:
            now = scrape(port)
            assert now.get(("lora_operator_preemptions_total", (("reason", "TerminationByKubelet"),)), 0) == 1
            assert now.get(("lora_operator_resume_seconds_count", ()), 0) == 1
            return now

        after = eventually(counted, 20)
        assert 0 < after[("lora_operator_resume_seconds_sum", ())] < 120
        assert after[("lora_operator_reconcile_duration_seconds_count", ())] > \
            before[("lora_operator_reconcile_duration_seconds_count", ())]

        # Deleted mid-run (Argo CD "replace", kubectl delete/apply): the kubelet stops the pod.
        c.custom.delete_namespaced_custom_object(GROUP, VERSION, c.ns, PLURAL, "again")
        eventually(lambda: _assert_gone(c, "again"), 15)
        c.create_job("again", spec)
        new_uid = c.job("again")["metadata"]["uid"]
        assert new_uid != old_uid
        time.sleep(1.5)  # a few passes: the new job starts nothing while the old run's pod lives
        pods = c.core.list_namespaced_pod(c.ns).items
        if any(owner(p) == old_uid and p.status.phase == "Running" for p in pods):  # the emulator may be quicker
            assert {owner(p) for p in pods} == {old_uid}

        def kubelet_stops_old_pods() -> None:
            for pod in c.core.list_namespaced_pod(c.ns).items:
                if owner(pod) != old_uid:
                    continue
                assert pod.metadata.deletion_timestamp is not None, "the garbage collector has not got to it yet"
                with contextlib.suppress(ApiException):
                    if pod.metadata.name == "again-a2":  # SIGTERM: commits a checkpoint, exits 75
                        c.finish("again-a2", 75)
                    c.remove(pod.metadata.name)
            assert not [p for p in c.core.list_namespaced_pod(c.ns).items if owner(p) == old_uid]

        eventually(kubelet_stops_old_pods, 20)

        def new_pod() -> None:
            pods = c.pods("again")
            assert pods == ["again-a1"] and c.pod("again-a1").metadata.owner_references[0].uid == new_uid

        eventually(new_pod, 20)
        env = env_of(c, "again-a1")
        assert (env["LORA_RUN_ID"], env["LORA_ATTEMPT"]) == (new_uid, "1")
        fence = run_fence(store, new_uid, 1)
        assert fence == 3  # after the old run's attempts 1 and 2: never fenced out by them
        claim_attempt(store, fence, new_uid, 1)
        with pytest.raises(StaleAttempt):
            check_not_stale(store, 2, "the old run's pod, still committing")
        assert c.status("again").get("phase") in ("Pending", "Running")


def test_second_live_job_on_one_output_is_refused(kube_api: KubeTarget, cluster: Cluster, s3_env: Any) -> None:
    c = cluster
    spec = job_spec(s3_env.endpoint, s3_env.bucket, output={"uri": f"s3://{s3_env.bucket}/outputs/shared/"})
    inner = job_spec(s3_env.endpoint, s3_env.bucket, output={"uri": f"s3://{s3_env.bucket}/outputs/shared/inner/"})
    with operator(kube_api, c.ns):
        c.create_job("first", spec)
        eventually(lambda: _assert(c.pods("first") == ["first-a1"]), 20)
        c.create_job("second", inner)

        def refused() -> dict[str, Any]:
            cond = c.condition("second", "Stalled")
            assert (cond.get("status"), cond.get("reason")) == ("True", "OutputInUse"), cond
            return cond

        cond = eventually(refused, 20)
        assert f"{c.ns}/first" in cond["message"] and "spec.output.uri" in cond["message"]
        assert c.pods("second") == [] and c.status("second")["phase"] == "Pending"
        assert c.status("second").get("attempt", 0) == 0
        c.custom.delete_namespaced_custom_object(GROUP, VERSION, c.ns, PLURAL, "first")
        eventually(lambda: _assert(c.pods("second") == ["second-a1"]), 30)
        eventually(lambda: _assert(c.condition("second", "Stalled").get("status") == "False"), 10)


def test_finished_job_is_deleted_after_its_ttl_and_s3_is_untouched(kube_api: KubeTarget, cluster: Cluster,
                                                                  s3_env: Any) -> None:
    c = cluster
    s3 = s3_env.client()
    keys = {"outputs/ttl/pytorch_lora_weights.safetensors": b"weights",
            "outputs/ttl/checkpoints/step-000000040/MANIFEST.json": b"{}", "outputs/ttl/logs/train.log": b"log"}
    for key, body in keys.items():
        s3.put_object(Bucket=s3_env.bucket, Key=key, Body=body)
    spec = job_spec(s3_env.endpoint, s3_env.bucket, output={"uri": f"s3://{s3_env.bucket}/outputs/ttl/"},
                    ttlSecondsAfterFinished=2)
    with operator(kube_api, c.ns):
        c.create_job("brief", spec)
        c.create_job("kept", job_spec(s3_env.endpoint, s3_env.bucket, output={"uri": f"s3://{s3_env.bucket}/outputs/kept/"}))
        eventually(lambda: _assert(c.pods("brief") == ["brief-a1"] and c.pods("kept") == ["kept-a1"]), 20)
        c.finish("brief-a1", 0)  # not bound to a node: the garbage collector removes it at once
        c.finish("kept-a1", 0)
        eventually(lambda: _assert(c.status("brief").get("phase") == "Succeeded"), 15)
        finished = time.monotonic()
        eventually(lambda: _assert_gone(c, "brief"), 20)
        assert time.monotonic() - finished >= 1.0  # not before the TTL (2 s after completionTime, 1 s stamps)
        eventually(lambda: _assert(c.pods("brief") == []), 20)
        assert c.status("kept")["phase"] == "Succeeded" and c.pods("kept") == ["kept-a1"]
    for key, body in keys.items():
        assert s3.get_object(Bucket=s3_env.bucket, Key=key)["Body"].read() == body
