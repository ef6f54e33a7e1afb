"""Which Kubernetes API the dev cluster and the demo run (`--kube auto|real|emulator`).

Behaviours tested: auto picks the real control plane when KUBEBUILDER_ASSETS names a folder with
etcd and kube-apiserver, else the emulator; real without binaries, a folder without them, and an
unknown choice are errors that say what to do.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_operator.devcluster.cluster import DevClusterError, resolve_kube


@pytest.fixture
def assets(tmp_path: Path) -> Path:
    for name in ("etcd", "kube-apiserver"):
        (tmp_path / name).write_text("")
    return tmp_path


@pytest.mark.parametrize(("choice", "with_assets", "expected"), [
    ("auto", True, "real"),
    ("auto", False, "emulator"),
    ("real", True, "real"),
    ("emulator", True, "emulator"),
    ("emulator", False, "emulator"),
])
def test_choice(assets: Path, choice: str, with_assets: bool, expected: str) -> None:
    env = {"KUBEBUILDER_ASSETS": str(assets)} if with_assets else {}
    kind, folder = resolve_kube(choice, env)
    assert kind == expected and (folder == assets) == (expected == "real")


@pytest.mark.parametrize(("choice", "env", "says"), [
    ("real", {}, "--kube real needs KUBEBUILDER_ASSETS"),
    ("auto", {"KUBEBUILDER_ASSETS": "/nonexistent"}, "expected etcd and kube-apiserver"),
    ("kind", {}, "expected one of auto, real, emulator"),
])
def test_errors_say_what_to_do(choice: str, env: dict[str, str], says: str) -> None:
    with pytest.raises(DevClusterError, match=says):
        resolve_kube(choice, env)
