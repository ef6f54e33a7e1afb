"""spec.training.determinism, from the CRD to the pod and the status.

- the spec field defaults to exact and maps onto the trainer config; an unknown value is refused
  naming spec.training.determinism;
- the pod of a GPU job in exact mode has CUBLAS_WORKSPACE_CONFIG=:4096:8 in its environment
  (cuBLAS reads it when it starts); a fast or CPU job has none;
- status.determinism states the mode and whether resume is bitwise, written on every reconcile.
"""

from __future__ import annotations

import json

import pytest

from lora_operator.pods import build_pod
from lora_operator.reconcile import Observed, reconcile
from lora_operator.spec import SpecError, parse_spec, to_train_config
from lora_operator.status import JobStatus, determinism_status
from tests.unit.builders import MINIMAL_SPEC, NOW, SETTINGS, make_job


def job(gpus: int, mode: str | None) -> dict:
    training = dict(MINIMAL_SPEC["training"])
    if mode is not None:
        training["determinism"] = mode
    return make_job(training=training, resources={"gpus": gpus})


def env(pod: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}


@pytest.mark.parametrize(("gpus", "mode", "config_mode", "cublas"), [
    (1, None, "exact", ":4096:8"),
    (1, "exact", "exact", ":4096:8"),
    (1, "fast", "fast", None),
    (0, None, "exact", None),
    (0, "fast", "fast", None),
])
def test_pod_env_table(gpus: int, mode: str | None, config_mode: str, cublas: str | None) -> None:
    pod = build_pod(job(gpus, mode), 1, SETTINGS)
    e = env(pod)
    assert e.get("CUBLAS_WORKSPACE_CONFIG") == cublas
    assert json.loads(e["LORA_TRAIN_CONFIG"])["determinism"] == config_mode


def test_spec_maps_and_refuses() -> None:
    spec = parse_spec(job(1, "fast")["spec"])
    assert spec.training.determinism == "fast" and to_train_config(spec).determinism == "fast"
    with pytest.raises(SpecError, match="spec.training.determinism"):
        parse_spec(job(1, "bitwise")["spec"])


@pytest.mark.parametrize(("mode", "gpus", "bitwise"), [
    ("exact", 1, True), ("fast", 1, False), ("exact", 0, True), ("fast", 0, True),
])
def test_status_table(mode: str, gpus: int, bitwise: bool) -> None:
    s = determinism_status(mode, gpus)
    assert (s["mode"], s["bitwise"]) == (mode, bitwise)
    assert ("kernel nondeterminism" in s["message"]) is not bitwise
    JobStatus.model_validate({"determinism": s})  # fits the status schema


def test_reconcile_writes_it() -> None:
    d = reconcile(Observed(job=job(1, "fast"), pods=[], now=NOW), SETTINGS)
    assert d.status["determinism"] == determinism_status("fast", 1)
    assert d.status["determinism"]["bitwise"] is False
