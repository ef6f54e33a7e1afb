"""The local dev cluster: an S3 server (moto), a Kubernetes API and a pod runner on 127.0.0.1.

    with DevCluster(".dev") as cluster:          # or: cluster = DevCluster(".dev").start(); cluster.stop()
        cluster.kubeconfig, cluster.api_url, cluster.s3_endpoint, cluster.kube   # "real" or "emulator"
        cluster.reclaim("default", "tiny-job-a1")  # what a spot node shutdown does to the pod

The API is a real control plane (etcd + kube-apiserver + kube-controller-manager from
``KUBEBUILDER_ASSETS``, see ``controlplane``) when those binaries are found, else the Kubernetes API
emulator; ``kube="real"|"emulator"`` forces one. Either way it serves the product CRD and the
namespace `default`, a Node `dev-node` is registered and marked Ready, and the pod runner (the
kubelet's part) binds pods to it and runs their commands as local processes under
`<state dir>/pods/`. S3 and the pod runner run in this process (threads), and so does the
emulator; the real control plane runs as child processes of this one.
`start()` writes `<state dir>/kubeconfig` and `<state dir>/state.json` (what `lora-operator dev
status` reads); `stop()` kills every pod process, closes both ports and removes those two files.
State (objects, buckets) lives in memory and is gone when the cluster stops.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_operator.devcluster.controlplane import ControlPlane, ControlPlaneError, assets_dir
from lora_operator.devcluster.kubelet import now_iso
from lora_operator.devcluster.podrunner import RECLAIM_ANNOTATION, RECLAIM_REASON_ANNOTATION, PodRunner
from lora_operator.devcluster.s3 import TEST_CREDENTIALS, start_s3_server

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
DEFAULT_S3_PORT = 9000  # what examples/tiny-job.yaml's spec.storage.endpoint points at
NODE_NAME = "dev-node"
STATE_FILE = "state.json"
KUBECONFIG_FILE = "kubeconfig"
PODS_DIR = "pods"
# Nothing can be downloaded on the machines this runs on: pods read their models from S3.
POD_ENV = {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


KUBE_CHOICES = ("auto", "real", "emulator")
KUBE_WORDS = {"real": "a real control plane (etcd + kube-apiserver + kube-controller-manager)",
              "emulator": "the Kubernetes API emulator"}


class DevClusterError(RuntimeError):
    """The dev cluster cannot start or be reached; the message says what to do."""


def resolve_kube(choice: str, env: Mapping[str, str] | None = None) -> tuple[str, Path | None]:
    """Which API to run for ``--kube choice``: ("real", binaries folder) or ("emulator", None)."""
    if choice not in KUBE_CHOICES:
        raise DevClusterError(f"--kube {choice}: expected one of {', '.join(KUBE_CHOICES)}")
    try:
        assets = assets_dir(dict(os.environ if env is None else env)) if choice != "emulator" else None
    except ControlPlaneError as exc:
        raise DevClusterError(str(exc)) from None
    if choice == "real" and assets is None:
        raise DevClusterError("--kube real needs KUBEBUILDER_ASSETS (a folder with etcd and kube-apiserver; "
                              "`make envtest` unpacks ../shared/envtest into .cache/envtest/bin), "
                              "or use --kube emulator")
    return ("real", assets) if assets is not None else ("emulator", None)


# ---- pure ---------------------------------------------------------------------------------------

def state_document(*, pid: int, api_url: str, s3_endpoint: str, kubeconfig: Path, pods_dir: Path,
                   node: str, started: str, log_file: Path | None = None, kube: str = "emulator") -> dict[str, Any]:
    """What state.json says about a running dev cluster (no secrets: moto's keys are dev-only)."""
    doc: dict[str, Any] = {
        "pid": pid,
        "kube": kube,
        "apiUrl": api_url,
        "s3Endpoint": s3_endpoint,
        "kubeconfig": str(kubeconfig),
        "node": node,
        "podsDir": str(pods_dir),
        "started": started,
        "s3Credentials": {
            "env": ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"],
            "note": "moto accepts any keys; examples use "
                    f"{TEST_CREDENTIALS['AWS_ACCESS_KEY_ID']}/{TEST_CREDENTIALS['AWS_SECRET_ACCESS_KEY']} (dev only)",
        },
    }
    if log_file is not None:
        doc["log"] = str(log_file)
    return doc


def reclaim_patch(reason: str | None = None) -> dict[str, Any]:
    """The metadata patch that asks the pod runner to reclaim a pod like a spot node shutdown."""
    annotations = {RECLAIM_ANNOTATION: "true"}
    if reason:
        annotations[RECLAIM_REASON_ANNOTATION] = reason
    return {"metadata": {"annotations": annotations}}


def parse_pod_ref(ref: str, default_namespace: str = "default") -> tuple[str, str]:
    """`NAMESPACE/POD` or `POD` → (namespace, pod); ValueError names the expected form."""
    namespace, _, name = ref.rpartition("/")
    if not name or "/" in namespace:
        raise ValueError(f"pod {ref!r}: expected NAMESPACE/POD, e.g. default/tiny-job-a1")
    return namespace or default_namespace, name


# ---- small I/O helpers --------------------------------------------------------------------------

def port_in_use(host: str, port: int) -> bool:
    """True when something listens on host:port (port 0 is never in use)."""
    if port == 0:
        return False
    with socket.socket() as sock:
        # SO_REUSEADDR as the servers set it: a port held only by TIME_WAIT sockets counts as free.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def answers(url: str, timeout: float = 2.0) -> bool:
    """True when an HTTP server answers at `url` (any status code counts)."""
    # Only "is it up?": the real control plane's certificate is the dev cluster's own throwaway CA.
    context = ssl._create_unverified_context() if url.startswith("https:") else None  # noqa: S323
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context):
            return True
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False


def read_state(state_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """state.json of the dev cluster in `state_dir`, or None when there is none (or it is garbled)."""
    try:
        data = json.loads((Path(state_dir) / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_state(state_dir: Path, doc: Mapping[str, Any]) -> Path:
    """Write state.json atomically (a reader never sees half a file)."""
    path = state_dir / STATE_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def annotate_reclaim(kubeconfig: str | os.PathLike[str], namespace: str, name: str, reason: str | None = None) -> None:
    """Mark a pod for reclaim through the API (the pod runner watching it does the rest).

    Raises DevClusterError when the pod does not exist or the API cannot be reached.
    """
    import kubernetes
    from kubernetes.client.rest import ApiException

    try:
        with kubernetes.config.new_client_from_config(config_file=str(kubeconfig)) as client:
            kubernetes.client.CoreV1Api(client).patch_namespaced_pod(
                name, namespace, reclaim_patch(reason), _preload_content=False, _request_timeout=(5, 10))
    except ApiException as exc:
        if exc.status == 404:
            raise DevClusterError(f"pod {namespace}/{name} not found; list pods with "
                                  f"`kubectl -n {namespace} get pods`") from None
        raise DevClusterError(f"reclaim of pod {namespace}/{name} failed: {exc.status} {exc.reason}") from None
    except OSError as exc:  # urllib3 connection errors are OSErrors
        raise DevClusterError(f"the dev cluster's API does not answer ({exc}); is it up? `lora-operator dev status`") from None
    log.info("pod %s/%s: marked for reclaim (%s)", namespace, name, reason or "TerminationByKubelet")


# ---- the cluster --------------------------------------------------------------------------------

@dataclass
class _Running:
    """The started parts, in start order (stopped in reverse)."""

    s3_server: Any = None
    api_ctx: contextlib.ExitStack | None = None
    runner: PodRunner | None = None


def _exists(read: Any, *args: str) -> bool:
    import kubernetes

    try:
        read(*args)
        return True
    except kubernetes.client.rest.ApiException as exc:
        if exc.status != 404:
            raise
        return False


def _wait_until(check: Any, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise DevClusterError(f"gave up after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)


class DevCluster:
    """S3 + Kubernetes API + pod runner on 127.0.0.1, for `lora-operator dev up`, the demo and e2e tests."""

    def __init__(self, state_dir: str | os.PathLike[str] = ".dev", *, s3_port: int = DEFAULT_S3_PORT,
                 api_port: int = 0, node_name: str = NODE_NAME, log_file: str | os.PathLike[str] | None = None,
                 resync_seconds: float = 2.0, kube: str = "auto") -> None:
        self.kube, self._assets = resolve_kube(kube)
        self.state_dir = Path(state_dir).resolve()
        self.s3_port = s3_port
        self.api_port = api_port
        self.node_name = node_name
        self.log_file = Path(log_file).resolve() if log_file else None
        self.resync_seconds = resync_seconds
        self.api_url = ""
        self.s3_endpoint = ""
        self.started = ""  # RFC 3339, set by start()
        self._parts = _Running()

    @property
    def kubeconfig(self) -> Path:
        """The kubeconfig for this cluster's API (written by start())."""
        return self.state_dir / KUBECONFIG_FILE

    @property
    def pods_dir(self) -> Path:
        """Where each pod's folder (container.log, termination-log, volumes/) lives."""
        return self.state_dir / PODS_DIR

    @property
    def runner(self) -> PodRunner:
        """The pod runner (after start())."""
        if self._parts.runner is None:
            raise DevClusterError("the dev cluster is not started")
        return self._parts.runner

    def start(self) -> DevCluster:
        """Start S3, the API (CRD registered, namespace default, Node Ready) and the pod runner."""
        for what, port, flag in (("S3", self.s3_port, "--s3-port"), ("API", self.api_port, "--api-port")):
            if port_in_use(HOST, port):
                raise DevClusterError(f"{what} port {HOST}:{port} is already in use (another dev cluster? "
                                      f"`lora-operator dev down`), or pick another with {flag}")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.started = now_iso()
        try:
            self._parts.s3_server, self.s3_endpoint = start_s3_server(HOST, self.s3_port)
            self._parts.api_ctx = contextlib.ExitStack()
            if self.kube == "real":
                self._start_control_plane(self._parts.api_ctx)
            else:
                self._start_emulator(self._parts.api_ctx)
            self._parts.runner = PodRunner(self.kubeconfig, node_name=self.node_name, workdir=self.pods_dir,
                                           env_overrides=POD_ENV, register_node=True,
                                           resync_seconds=self.resync_seconds).start()
            write_state(self.state_dir, self.state())
        except BaseException:
            self.stop()
            raise
        log.info("dev cluster up: API %s (%s), S3 %s, kubeconfig %s", self.api_url, self.kube, self.s3_endpoint,
                 self.kubeconfig)
        return self

    def _start_emulator(self, stack: contextlib.ExitStack) -> None:
        from lora_operator.crd import build_crd
        from lora_operator.emulator import serve_emulator
        from lora_operator.emulator.server import DEFAULT_NAMESPACES

        emulator = stack.enter_context(serve_emulator(crds=[build_crd()], namespaces=DEFAULT_NAMESPACES,
                                                      host=HOST, port=self.api_port))
        self.api_url = emulator.url
        emulator.write_kubeconfig(self.kubeconfig)

    def _start_control_plane(self, stack: contextlib.ExitStack) -> None:
        import kubernetes

        from lora_operator.crd import build_crd

        assert self._assets is not None
        try:
            plane = stack.enter_context(ControlPlane(self._assets, self.state_dir / "controlplane",
                                                     port=self.api_port))
        except ControlPlaneError as exc:
            raise DevClusterError(f"the real control plane did not start: {exc}") from None
        self.api_url = plane.url
        self.kubeconfig.write_bytes(plane.kubeconfig.read_bytes())
        self.kubeconfig.chmod(0o600)
        with kubernetes.config.new_client_from_config(config_file=str(self.kubeconfig)) as client:
            ext = kubernetes.client.ApiextensionsV1Api(client)
            core = kubernetes.client.CoreV1Api(client)
            crd = build_crd()
            ext.create_custom_resource_definition(crd)
            # Served once Established; pods in `default` are admitted once its ServiceAccount exists.
            _wait_until(lambda: any(c.type == "Established" and c.status == "True" for c in
                                    ext.read_custom_resource_definition(crd["metadata"]["name"]).status.conditions
                                    or []), "the LoRATrainingJob CRD to be Established")
            _wait_until(lambda: _exists(core.read_namespaced_service_account, "default", "default"),
                        "the ServiceAccount default/default (kube-controller-manager creates it)")

    def state(self) -> dict[str, Any]:
        """What state.json holds for this cluster."""
        return state_document(pid=os.getpid(), api_url=self.api_url, s3_endpoint=self.s3_endpoint,
                              kubeconfig=self.kubeconfig, pods_dir=self.pods_dir, node=self.node_name,
                              started=self.started, log_file=self.log_file, kube=self.kube)

    def reclaim(self, namespace: str, name: str, reason: str | None = None) -> None:
        """Reclaim a pod like a spot node shutdown, through the API (what `lora-operator dev reclaim` does)."""
        annotate_reclaim(self.kubeconfig, namespace, name, reason)

    def stop(self) -> None:
        """Kill every pod process, stop the API and S3, remove state.json and the kubeconfig (idempotent)."""
        parts, self._parts = self._parts, _Running()
        if parts.runner is not None:
            parts.runner.stop()
        if parts.api_ctx is not None:
            parts.api_ctx.close()
        if parts.s3_server is not None:
            parts.s3_server.stop()
            # moto's stop() only ends serve_forever(); the listening socket stays open until closed.
            inner = getattr(parts.s3_server, "_server", None)
            if inner is not None:
                inner.server_close()
        for path in (self.state_dir / STATE_FILE, self.kubeconfig):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        if parts.runner is not None or parts.s3_server is not None:
            log.info("dev cluster stopped (state dir %s)", self.state_dir)

    def __enter__(self) -> DevCluster:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()
