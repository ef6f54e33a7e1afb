"""`lora-operator dev`: the local dev cluster as a user drives it (real background process, real servers).

Behaviours:
- `up --kube emulator|real` (each target of the run) starts a detached cluster and returns once it is ready: the API answers (CRD served,
  namespace default, node dev-node Ready), S3 answers; it prints the kubeconfig and
  `export KUBECONFIG=...`; a second `up` says it is already up (same pid); `status` says up;
- `down` stops it: both ports stop answering, state.json and the kubeconfig are gone, the process
  is gone; `status` then exits 1 and a second `down` is a clean no-op;
- `up` on a taken S3 port fails at once with one line naming the port and the fix;
- `reclaim NAMESPACE/POD` makes the pod runner reclaim a running pod like a spot node shutdown
  (DisruptionTarget, SIGTERM → the child's exit 75, phase Failed); an unknown pod or a malformed
  reference is a one-line error.
"""

from __future__ import annotations

import json
import os
import socket
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest

from lora_operator.devcluster.cli import main
from lora_operator.devcluster.cluster import answers, read_state
from lora_operator.devcluster.s3 import free_port
from tests.support.kube import eventually, target_names

pytestmark = pytest.mark.timeout(180)

TRAP_TERM = textwrap.dedent("""
    import signal, sys, time
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(75))
    print("ready", flush=True)
    time.sleep(120)
""")


@pytest.fixture(params=[name for name in target_names() if name != "cluster"])
def cluster(request: pytest.FixtureRequest, tmp_path: Path,
            capsys: pytest.CaptureFixture[str]) -> Iterator[tuple[Path, dict[str, Any], str]]:
    """A dev cluster started with `lora-operator dev up --kube <target>` (S3 on a free port); always brought down."""
    state_dir = tmp_path / "dev"
    try:
        assert main(["up", "--state-dir", str(state_dir), "--s3-port", str(free_port()), "--kube", request.param]) == 0
        out = capsys.readouterr().out
        state = read_state(state_dir)
        assert state is not None and state["kube"] == request.param
        yield state_dir, state, out
    finally:
        main(["down", "--state-dir", str(state_dir)])


def gone(pid: int) -> bool:
    try:
        return " Z " in Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True


def test_up_answers_then_down_removes_everything(cluster: tuple[Path, dict[str, Any], str],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    state_dir, state, out = cluster
    kubeconfig = state_dir / "kubeconfig"
    assert f"export KUBECONFIG={kubeconfig}" in out and state["s3Endpoint"] in out
    assert answers(state["apiUrl"] + "/version") and answers(state["s3Endpoint"])
    with kubernetes.config.new_client_from_config(config_file=str(kubeconfig)) as client:
        core = kubernetes.client.CoreV1Api(client)
        assert "default" in {ns.metadata.name for ns in core.list_namespace().items}
        node = core.read_node("dev-node")
        assert any(c.type == "Ready" and c.status == "True" for c in node.status.conditions)
        crd = kubernetes.client.ApiextensionsV1Api(client).read_custom_resource_definition(
            "loratrainingjobs.lora-operator.dev")
        assert crd.spec.names.kind == "LoRATrainingJob"

    assert main(["up", "--state-dir", str(state_dir)]) == 0
    assert f"already up (pid {state['pid']})" in capsys.readouterr().out
    assert main(["status", "--state-dir", str(state_dir)]) == 0
    assert "API answers, S3 answers" in capsys.readouterr().out

    assert main(["down", "--state-dir", str(state_dir)]) == 0
    assert not answers(state["apiUrl"] + "/version") and not answers(state["s3Endpoint"])
    assert not (state_dir / "state.json").exists() and not kubeconfig.exists()
    assert gone(state["pid"])
    capsys.readouterr()
    assert main(["status", "--state-dir", str(state_dir)]) == 1
    assert main(["down", "--state-dir", str(state_dir)]) == 0
    assert "not running" in capsys.readouterr().out


def test_up_on_a_taken_port_fails_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["up", "--foreground", "--state-dir", str(tmp_path / "dev"), "--s3-port", str(port)])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert err.count("\n") == 0 and f"127.0.0.1:{port} is already in use" in err and "--s3-port" in err


def test_reclaim_through_the_cli(cluster: tuple[Path, dict[str, Any], str], capsys: pytest.CaptureFixture[str]) -> None:
    state_dir, _, _ = cluster
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "spot-victim"},
           "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 10,
                    "containers": [{"name": "main", "image": "local", "command": ["python", "-c", TRAP_TERM]}]}}
    with kubernetes.config.new_client_from_config(config_file=str(state_dir / "kubeconfig")) as client:
        core = kubernetes.client.CoreV1Api(client)
        core.create_namespaced_pod("default", pod)

        def read() -> dict[str, Any]:
            return json.loads(core.read_namespaced_pod("spot-victim", "default", _preload_content=False).data)

        def started() -> None:
            logs = list((state_dir / "pods").glob("default_spot-victim_*/container.log"))
            assert logs and "ready" in logs[0].read_text()  # the SIGTERM handler is installed

        eventually(started, 60)
        assert main(["reclaim", "default/spot-victim", "--state-dir", str(state_dir)]) == 0
        assert "reclaimed like a spot node shutdown" in capsys.readouterr().out

        def failed() -> dict[str, Any]:
            status = read()["status"]
            assert status["phase"] == "Failed", status
            return status

        status = eventually(failed, 30)
    disruption = next(c for c in status["conditions"] if c["type"] == "DisruptionTarget")
    assert (disruption["status"], disruption["reason"]) == ("True", "TerminationByKubelet")
    assert status["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 75

    assert main(["reclaim", "default/no-such-pod", "--state-dir", str(state_dir)]) == 1
    assert "pod default/no-such-pod not found" in capsys.readouterr().err
    assert main(["reclaim", "a/b/c", "--state-dir", str(state_dir)]) == 2
    assert "expected NAMESPACE/POD" in capsys.readouterr().err
    assert os.path.isdir(state_dir / "pods")
