"""The dev pod runner plays scheduler + kubelet against the API (emulator, or LORA_TEST_KUBECONFIG).

Behaviours:
- an unbound pod is bound to the runner's node, its `python -c` command runs with the pod's env
  (fieldRef, HOME=/scratch rewritten to a local emptyDir folder), and it ends Succeeded with the
  exit code and the termination-log contents in `state.terminated`;
- a failing command ends Failed with its exit code (message from the log tail: FallbackToLogsOnError);
- `secretKeyRef` is resolved through the API; a missing Secret is `CreateContainerConfigError`
  until the Secret appears, then the pod runs;
- a graceful delete sends SIGTERM (the child traps it and exits 75), the final status is written,
  then the pod is removed;
- reclaim (method or annotation): DisruptionTarget condition, SIGTERM, Failed with exit code 75
  and reason Terminated; a child that ignores SIGTERM is SIGKILLed after the grace period (137);
- stopping the runner kills every pod's process group (no process left behind).
"""

from __future__ import annotations

import base64
import json
import os
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
from kubernetes.client.rest import ApiException
from kubernetes.watch.watch import iter_resp_lines

from lora_operator.devcluster.podrunner import RECLAIM_ANNOTATION, PodRunner
from tests.support.kube import KubeTarget, eventually

NODE = "dev-node"

TRAP_TERM = textwrap.dedent("""
    import os, signal, sys, time
    def on_term(*_):
        open(os.environ["MARK"] + ".term", "w").write("TERM")
        sys.exit(75)
    signal.signal(signal.SIGTERM, on_term)
    open(os.environ["MARK"] + ".ready", "w").write(str(os.getpid()))
    time.sleep(60)
""")

IGNORE_TERM = textwrap.dedent("""
    import os, signal, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    open(os.environ["MARK"] + ".ready", "w").write(str(os.getpid()))
    time.sleep(60)
""")


def make_pod(name: str, code: str, env: list[dict[str, Any]] | None = None, grace: int = 5) -> dict[str, Any]:
    """A one-container pod running `python -c code` with an emptyDir at /scratch."""
    container = {"name": "main", "image": "local", "command": ["python", "-c", code], "env": env or [],
                 "terminationMessagePolicy": "FallbackToLogsOnError",
                 "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}]}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": grace, "containers": [container],
                     "volumes": [{"name": "scratch", "emptyDir": {}}]}}


@pytest.fixture()
def core(kube_api: KubeTarget) -> Iterator[kubernetes.client.CoreV1Api]:
    with kube_api.api_client() as client:
        yield kubernetes.client.CoreV1Api(client)


@pytest.fixture()
def runner(kube_api: KubeTarget, kube_namespace: str, tmp_path: Path) -> Iterator[PodRunner]:
    runner = PodRunner(kube_api.kubeconfig, node_name=NODE, workdir=tmp_path / "pods", namespace=kube_namespace,
                       resync_seconds=0.3).start()
    try:
        yield runner
    finally:
        runner.stop(grace=1)  # kills every pod process group


def read(core: kubernetes.client.CoreV1Api, ns: str, name: str) -> dict[str, Any]:
    return json.loads(core.read_namespaced_pod(name, ns, _preload_content=False).data)


def wait_phase(core: kubernetes.client.CoreV1Api, ns: str, name: str, *phases: str, timeout: float = 20) -> dict[str, Any]:
    def check() -> dict[str, Any]:
        pod = read(core, ns, name)
        assert pod.get("status", {}).get("phase") in phases, pod.get("status")
        return pod
    return eventually(check, timeout)


def terminated(pod: dict[str, Any]) -> dict[str, Any]:
    return pod["status"]["containerStatuses"][0]["state"]["terminated"]


def condition(pod: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(c for c in pod["status"].get("conditions", []) if c["type"] == kind)


def wait_file(path: Path, timeout: float = 20) -> str:
    def check() -> str:
        assert path.exists() and path.read_text(), path  # written in one go, but maybe not yet
        return path.read_text()
    return eventually(check, timeout)


def test_pod_runs_and_succeeds(runner: PodRunner, core: kubernetes.client.CoreV1Api, kube_namespace: str) -> None:
    code = textwrap.dedent("""
        import json, os, sys
        assert os.environ["POD_NAME"] == "ok", os.environ["POD_NAME"]
        assert os.environ["HOME"].endswith("/volumes/scratch") and os.path.isdir(os.environ["HOME"]), os.environ["HOME"]
        assert os.environ["LORA_CACHE_DIR"] == os.environ["HOME"] + "/cache"
        assert "SECRET_OF_THE_RUNNER" not in os.environ
        open(os.environ["LORA_TERMINATION_LOG"], "w").write(json.dumps({"reason": "done", "step": 7}))
    """)
    env = [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
           {"name": "HOME", "value": "/scratch"}, {"name": "LORA_CACHE_DIR", "value": "/scratch/cache"}]
    os.environ["SECRET_OF_THE_RUNNER"] = "x"  # the child must not inherit the runner's environment
    try:
        core.create_namespaced_pod(kube_namespace, make_pod("ok", code, env))
        pod = wait_phase(core, kube_namespace, "ok", "Succeeded", "Failed")
    finally:
        del os.environ["SECRET_OF_THE_RUNNER"]
    assert pod["spec"]["nodeName"] == NODE
    state = terminated(pod)
    assert pod["status"]["phase"] == "Succeeded", state
    assert (state["exitCode"], state["reason"]) == (0, "Completed")
    assert json.loads(state["message"]) == {"reason": "done", "step": 7}
    assert state["startedAt"] and state["finishedAt"] and pod["status"]["startTime"]
    assert condition(pod, "Ready")["status"] == "False" and condition(pod, "PodScheduled")["status"] == "True"


def test_failing_pod_is_failed_with_exit_code(runner: PodRunner, core: kubernetes.client.CoreV1Api,
                                              kube_namespace: str) -> None:
    code = "import sys; print('bad config: no dataset'); sys.exit(3)"
    core.create_namespaced_pod(kube_namespace, make_pod("bad", code))
    pod = wait_phase(core, kube_namespace, "bad", "Failed", "Succeeded")
    state = terminated(pod)
    assert pod["status"]["phase"] == "Failed"
    assert (state["exitCode"], state["reason"]) == (3, "Error")
    assert "bad config: no dataset" in state["message"]  # FallbackToLogsOnError: the log tail


def test_secret_key_ref(runner: PodRunner, core: kubernetes.client.CoreV1Api, kube_namespace: str) -> None:
    code = "import os, sys; sys.exit(0 if os.environ['AWS_SECRET_ACCESS_KEY'] == 's3cr3t' else 9)"
    env = [{"name": "AWS_SECRET_ACCESS_KEY", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "secret"}}}]
    core.create_namespaced_pod(kube_namespace, make_pod("creds-user", code, env))

    def config_error() -> None:
        statuses = read(core, kube_namespace, "creds-user").get("status", {}).get("containerStatuses")
        assert statuses, "no container status yet"
        assert statuses[0]["state"].get("waiting") == {"reason": "CreateContainerConfigError", "message": 'secret "creds" not found'}

    eventually(config_error, 20)
    assert read(core, kube_namespace, "creds-user")["status"]["phase"] == "Pending"
    secret = base64.b64encode(b"s3cr3t").decode()  # `data`, not stringData: the emulator does not convert it
    core.create_namespaced_secret(kube_namespace, {"metadata": {"name": "creds"}, "data": {"secret": secret}})
    pod = wait_phase(core, kube_namespace, "creds-user", "Succeeded", "Failed")
    assert terminated(pod)["exitCode"] == 0


def test_graceful_delete_sends_sigterm_then_removes(runner: PodRunner, core: kubernetes.client.CoreV1Api,
                                                    kube_namespace: str, tmp_path: Path) -> None:
    mark = tmp_path / "deleted"
    created = core.create_namespaced_pod(kube_namespace, make_pod("gone", TRAP_TERM, [{"name": "MARK", "value": str(mark)}]),
                                         _preload_content=False)
    version = json.loads(created.data)["metadata"]["resourceVersion"]
    wait_file(mark.with_suffix(".ready"))
    core.delete_namespaced_pod("gone", kube_namespace)
    # Follow the pod to its end: the kubelet's final status comes before it disappears.
    stream = core.list_namespaced_pod(kube_namespace, watch=True, resource_version=version, timeout_seconds=20,
                                      field_selector="metadata.name=gone", _preload_content=False)
    last = None
    for line in iter_resp_lines(stream):
        event = json.loads(line)
        if event["type"] == "DELETED":
            break
        last = event["object"]
    stream.release_conn()
    assert wait_file(mark.with_suffix(".term")) == "TERM"
    assert last is not None and last["status"]["phase"] == "Failed"
    assert terminated(last)["exitCode"] == 75
    with pytest.raises(ApiException) as err:
        read(core, kube_namespace, "gone")
    assert err.value.status == 404


def test_reclaim_marks_disruption_and_fails_with_75(runner: PodRunner, core: kubernetes.client.CoreV1Api,
                                                    kube_namespace: str, tmp_path: Path) -> None:
    mark = tmp_path / "reclaimed"
    core.create_namespaced_pod(kube_namespace, make_pod("spot", TRAP_TERM, [{"name": "MARK", "value": str(mark)}]))
    wait_file(mark.with_suffix(".ready"))
    runner.reclaim(kube_namespace, "spot")
    pod = wait_phase(core, kube_namespace, "spot", "Failed", "Succeeded")
    disruption = condition(pod, "DisruptionTarget")
    assert (disruption["status"], disruption["reason"]) == ("True", "TerminationByKubelet")
    assert pod["status"]["reason"] == "Terminated" and "node shutdown" in pod["status"]["message"]
    assert terminated(pod)["exitCode"] == 75
    assert mark.with_suffix(".term").read_text() == "TERM"
    assert pod["metadata"].get("deletionTimestamp") is None  # the pod stays, as after a node shutdown


def test_reclaim_by_annotation_kills_a_child_that_ignores_sigterm(
        runner: PodRunner, core: kubernetes.client.CoreV1Api, kube_namespace: str, tmp_path: Path) -> None:
    mark = tmp_path / "stubborn"
    core.create_namespaced_pod(kube_namespace, make_pod("stubborn", IGNORE_TERM, [{"name": "MARK", "value": str(mark)}],
                                                        grace=1))
    wait_file(mark.with_suffix(".ready"))
    started = time.monotonic()
    core.patch_namespaced_pod("stubborn", kube_namespace, {"metadata": {"annotations": {RECLAIM_ANNOTATION: "true"}}})
    pod = wait_phase(core, kube_namespace, "stubborn", "Failed")
    assert time.monotonic() - started >= 1.0  # the grace period was given
    assert condition(pod, "DisruptionTarget")["status"] == "True"
    assert (terminated(pod)["exitCode"], terminated(pod)["reason"]) == (137, "Error")  # SIGKILL, not an OOM


def test_stop_kills_every_process_group(kube_api: KubeTarget, core: kubernetes.client.CoreV1Api,
                                        kube_namespace: str, tmp_path: Path) -> None:
    mark = tmp_path / "orphan"
    code = textwrap.dedent("""
        import os, subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        open(os.environ["MARK"] + ".ready", "w").write(f"{os.getpid()} {child.pid}")
        time.sleep(60)
    """)
    with PodRunner(kube_api.kubeconfig, node_name=NODE, workdir=tmp_path / "pods", namespace=kube_namespace):
        core.create_namespaced_pod(kube_namespace, make_pod("family", code, [{"name": "MARK", "value": str(mark)}]))
        pids = [int(p) for p in wait_file(mark.with_suffix(".ready")).split()]
    for pid in pids:
        def gone(pid: int = pid) -> None:
            assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
        eventually(gone, 5)
