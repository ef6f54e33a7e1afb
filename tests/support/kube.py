"""A Kubernetes API for tests: the FaithfulEmulator, or a real cluster when one is configured.

Pytest plugin (``pytest_plugins = ["tests.support.kube"]``) with fixtures:

- ``kube_api`` (session): a ``KubeTarget`` with ``.url``, ``.kubeconfig``, ``.register_crd(dict)``,
  ``.api_client()``; the product CRD (``crds/loratrainingjobs.lora-operator.dev.yaml``) is
  registered when the file exists. With ``LORA_TEST_KUBECONFIG=/path/to/kubeconfig`` the tests
  target that cluster instead of starting the emulator.
- ``kube_namespace`` (function): a throwaway namespace in that API, deleted afterwards.

Helpers for modules that manage their own target: ``open_cluster``, ``throwaway_namespace``,
``eventually``.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import kubernetes
import pytest
import yaml
from kubernetes.client.rest import ApiException

from lora_operator.emulator import RunningEmulator, serve_emulator

__all__ = [
    "KubeTarget",
    "eventually",
    "kube_api",
    "kube_namespace",
    "open_cluster",
    "product_crds",
    "throwaway_namespace",
]

REPO = pathlib.Path(__file__).resolve().parents[2]
PRODUCT_CRD = REPO / "crds" / "loratrainingjobs.lora-operator.dev.yaml"
KUBECONFIG_ENV = "LORA_TEST_KUBECONFIG"

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


@contextlib.contextmanager
def open_cluster(workdir: pathlib.Path, crds: Iterable[Mapping[str, Any]] = ()) -> Iterator[KubeTarget]:
    """The real cluster from LORA_TEST_KUBECONFIG, else a fresh emulator; CRDs registered."""
    configured = os.environ.get(KUBECONFIG_ENV)
    if configured:
        config = kubernetes.client.Configuration()
        kubernetes.config.load_kube_config(config_file=configured, client_configuration=config)
        target = KubeTarget(url=config.host, kubeconfig=pathlib.Path(configured))
        for crd in crds:
            target.register_crd(crd)
        yield target
        return
    with serve_emulator() as emu:
        target = KubeTarget(url=emu.url, kubeconfig=emu.write_kubeconfig(workdir / "kubeconfig"), emulator=emu)
        for crd in crds:
            target.register_crd(crd)
        yield target


@contextlib.contextmanager
def throwaway_namespace(target: KubeTarget, prefix: str = "test") -> Iterator[str]:
    """A fresh namespace, deleted (without waiting) afterwards."""
    name = f"{prefix}-{secrets.token_hex(4)}"
    with target.api_client() as client:
        core = kubernetes.client.CoreV1Api(client)
        core.create_namespace({"metadata": {"name": name}})
        try:
            yield name
        finally:
            with contextlib.suppress(ApiException):
                core.delete_namespace(name)


@pytest.fixture(scope="session")
def kube_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeTarget]:
    """A running Kubernetes API (emulator or LORA_TEST_KUBECONFIG) with the product CRD registered."""
    with open_cluster(tmp_path_factory.mktemp("kube"), product_crds()) as target:
        yield target


@pytest.fixture()
def kube_namespace(kube_api: KubeTarget) -> Iterator[str]:
    """A throwaway namespace in ``kube_api``."""
    with throwaway_namespace(kube_api) as name:
        yield name
