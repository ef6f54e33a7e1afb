"""The Kubernetes API for tests: the FaithfulEmulator and a real control plane, both.

Pytest plugin (``pytest_plugins = ["tests.support.kube"]``) with fixtures:

- ``kube_api`` (session, parametrized by target): a ``KubeTarget`` with ``.url``, ``.kubeconfig``,
  ``.register_crd(dict)``, ``.api_client()``; the product CRD (and JobSet's) is registered. Every test that uses
  it runs once per target, and its id says which: ``[emulator]`` (always), ``[real]`` (a
  throwaway etcd + kube-apiserver + kube-controller-manager started once per run from
  ``KUBEBUILDER_ASSETS``, envtest-style: see ``lora_operator.devcluster.controlplane``), or
  ``[cluster]`` (``LORA_TEST_KUBECONFIG=/path/to/kubeconfig``: an existing cluster, instead of both).
  ``LORA_TEST_KUBE=emulator|real`` narrows the run to one target.
- ``control_plane`` (session): the real control plane itself (admin kubeconfig, ServiceAccount
  tokens); only tests that need it beyond ``kube_api`` ask for it.
- ``kube_namespace`` (function): a throwaway namespace in that API, deleted afterwards.

In CI (``CI`` set) with ``../shared/envtest`` present, a run without ``KUBEBUILDER_ASSETS`` is an
error, never a silent fall-back to the emulator: the emulator once accepted a CRD that no real API
server takes. The run's header line says which targets the Kubernetes tier runs on.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import kubernetes
import pytest
import yaml
from kubernetes.client.rest import ApiException

from lora_operator.devcluster.controlplane import ControlPlane, assets_dir
from lora_operator.emulator import RunningEmulator, serve_emulator
from tests.support.jobset import jobset_crd

__all__ = [
    "KubeTarget",
    "control_plane",
    "eventually",
    "kube_api",
    "kube_namespace",
    "open_cluster",
    "product_crds",
    "target_names",
    "throwaway_namespace",
]

REPO = pathlib.Path(__file__).resolve().parents[2]
PRODUCT_CRD = REPO / "crds" / "loratrainingjobs.lora-operator.dev.yaml"
KUBECONFIG_ENV = "LORA_TEST_KUBECONFIG"
TARGET_ENV = "LORA_TEST_KUBE"
SHARED_ENVTEST = REPO.parent / "shared" / "envtest"

T = TypeVar("T")


def eventually(check: Callable[[], T], timeout: float = 30.0, interval: float = 0.05) -> T:
    """Retry ``check`` until it returns without AssertionError (real clusters are eventual)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return check()
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(interval)


@dataclass
class KubeTarget:
    """Where the tests' Kubernetes API lives."""

    url: str
    kubeconfig: pathlib.Path
    emulator: RunningEmulator | None = None
    plane: ControlPlane | None = None

    @property
    def is_real(self) -> bool:
        """True when the tests run against a real cluster."""
        return self.emulator is None

    def api_client(self) -> kubernetes.client.ApiClient:
        """A fresh official-client ApiClient for this target (close it, or use ``with``)."""
        return kubernetes.config.new_client_from_config(config_file=str(self.kubeconfig))

    def register_crd(self, crd: Mapping[str, Any], timeout: float = 30.0) -> None:
        """Create or replace a CRD and wait until it is Established."""
        with self.api_client() as client:
            ext = kubernetes.client.ApiextensionsV1Api(client)
            name = crd["metadata"]["name"]
            try:
                ext.create_custom_resource_definition(dict(crd))
            except ApiException as exc:
                if exc.status != 409:
                    raise
                current = ext.read_custom_resource_definition(name)
                body = {**crd, "metadata": {**crd["metadata"], "resourceVersion": current.metadata.resource_version}}
                ext.replace_custom_resource_definition(name, body)

            def established() -> None:
                conditions = ext.read_custom_resource_definition(name).status.conditions or []
                assert any(c.type == "Established" and c.status == "True" for c in conditions)

            eventually(established, timeout)


def product_crds() -> list[dict[str, Any]]:
    """The product CRD(s) from crds/, if generated yet."""
    if not PRODUCT_CRD.exists():
        return []
    return [doc for doc in yaml.safe_load_all(PRODUCT_CRD.read_text(encoding="utf-8")) if doc]


def target_names(env: Mapping[str, str] | None = None) -> list[str]:
    """The Kubernetes targets this run tests against, in order."""
    env = os.environ if env is None else env
    if env.get(KUBECONFIG_ENV):
        return ["cluster"]
    names = ["emulator"] + (["real"] if assets_dir(dict(env)) else [])
    wanted = env.get(TARGET_ENV)
    if wanted:
        if wanted not in names:
            raise pytest.UsageError(f"{TARGET_ENV}={wanted}: available targets are {', '.join(names)} "
                                    "(set KUBEBUILDER_ASSETS for 'real')")
        names = [wanted]
    return names


@contextlib.contextmanager
def open_cluster(workdir: pathlib.Path, crds: Iterable[Mapping[str, Any]] = (), *,
                 plane: ControlPlane | None = None) -> Iterator[KubeTarget]:
    """The target to test against, with ``crds`` registered: the real ``plane`` when given,
    else the cluster from LORA_TEST_KUBECONFIG, else a fresh emulator."""
    configured = os.environ.get(KUBECONFIG_ENV)
    if plane is not None or configured:
        path = plane.kubeconfig if plane is not None else pathlib.Path(configured or "")
        config = kubernetes.client.Configuration()
        kubernetes.config.load_kube_config(config_file=str(path), client_configuration=config)
        target = KubeTarget(url=config.host, kubeconfig=path, plane=plane)
        for crd in crds:
            target.register_crd(crd)
        yield target
        return
    with serve_emulator() as emu:
        target = KubeTarget(url=emu.url, kubeconfig=emu.write_kubeconfig(workdir / "kubeconfig"), emulator=emu)
        for crd in crds:
            target.register_crd(crd)
        yield target


def _assert_found(read: Callable[..., Any], *args: str) -> None:
    try:
        read(*args)
    except ApiException as exc:
        assert exc.status != 404, f"{args} not found yet"
        raise


@contextlib.contextmanager
def throwaway_namespace(target: KubeTarget, prefix: str = "test") -> Iterator[str]:
    """A fresh namespace, deleted (without waiting) afterwards."""
    name = f"{prefix}-{secrets.token_hex(4)}"
    with target.api_client() as client:
        core = kubernetes.client.CoreV1Api(client)
        core.create_namespace({"metadata": {"name": name}})
        if target.is_real:
            # The controller-manager adds the `default` ServiceAccount a moment later; until then
            # the ServiceAccount admission plugin refuses every pod in the namespace.
            eventually(lambda: _assert_found(core.read_namespaced_service_account, "default", name), 60, 0.1)
        try:
            yield name
        finally:
            with contextlib.suppress(ApiException):
                core.delete_namespace(name)


def pytest_report_header(config: pytest.Config) -> str:
    """Say which targets the Kubernetes tier runs on (and refuse a CI run that lost the real one)."""
    names = target_names()
    if os.environ.get("CI") and SHARED_ENVTEST.is_dir() and "real" not in names and "cluster" not in names:
        raise pytest.UsageError(f"CI: {SHARED_ENVTEST} exists but KUBEBUILDER_ASSETS is unset; run `make test`, "
                                "which unpacks it, so the Kubernetes tier runs on a real control plane too")
    where = {"emulator": "emulator", "real": f"real control plane ({os.environ.get('KUBEBUILDER_ASSETS')})",
             "cluster": f"cluster from {os.environ.get(KUBECONFIG_ENV)}"}
    return "kubernetes tier targets: " + ", ".join(where[n] for n in names)


_TARGET_ID = re.compile(r"\[(emulator|real|cluster)[\]-]")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """One closing line saying how many Kubernetes-tier tests ran on each target (also under -q)."""
    counts: dict[str, int] = {}
    for outcome in ("passed", "failed", "error"):
        for report in terminalreporter.stats.get(outcome, []):
            match = _TARGET_ID.search(getattr(report, "nodeid", ""))
            if match and getattr(report, "when", "call") == "call":
                counts[match.group(1)] = counts.get(match.group(1), 0) + 1
    if counts:
        terminalreporter.write_line("kubernetes tier ran on: " + ", ".join(
            f"{name} ({n} tests)" for name, n in sorted(counts.items())))


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """A real etcd + kube-apiserver + kube-controller-manager from KUBEBUILDER_ASSETS, once per run."""
    assets = assets_dir()
    if assets is None:
        pytest.skip("KUBEBUILDER_ASSETS is unset: no real control plane in this run")
    with ControlPlane(assets, tmp_path_factory.mktemp("controlplane")) as plane:
        yield plane


@pytest.fixture(scope="session", params=target_names())
def kube_api(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeTarget]:
    """A running Kubernetes API (one per target) with the product CRD registered."""
    plane = request.getfixturevalue("control_plane") if request.param == "real" else None
    # The JobSet CRD too: see tests/support/jobset.py for why at the session's start.
    with open_cluster(tmp_path_factory.mktemp("kube"), [*product_crds(), jobset_crd()], plane=plane) as target:
        yield target


@pytest.fixture()
def kube_namespace(kube_api: KubeTarget) -> Iterator[str]:
    """A throwaway namespace in ``kube_api``."""
    with throwaway_namespace(kube_api) as name:
        yield name
