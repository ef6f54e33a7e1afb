"""The `make demo` scenario, end to end: dev cluster, the real operator, the real trainer, a spot reclaim.

Behaviours (one run of `run_scenario`, S3 on a free port so a running dev cluster never collides):
- the job ends Succeeded after exactly one preemption and no failure, on attempt 2;
- attempt 1 stopped at step N with a committed checkpoint of step N (termination message and
  checkpoints/latest.json), the operator's status.latestCheckpoint said N when it counted the
  preemption, and attempt 2's trainer logged "resumed from step N";
- the final pytorch_lora_weights.safetensors is byte-identical (sha256) to an uninterrupted
  `lora-train` run of `to_train_config(parse_spec(spec))` on local copies of the same seeded inputs,
  and the per-step losses in logs/metrics.jsonl equal that run's;
- the timeline tells the story in order, the loss curve is a PNG, and no pod process is left.

That uninterrupted run goes first and is timed: the scenario's timeout and each test's pytest timeout
are multiples of it, so a loaded machine stretches them instead of failing (tests/e2e/deadlines.py).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from lora_operator.demo import JOB_MANIFEST, DemoResult, plot_losses, run_scenario
from lora_operator.spec import parse_spec, to_train_config
from lora_trainer.config import training_fields as trainer_fields
from lora_trainer.contract import FINAL_WEIGHTS
from lora_trainer.tiny import build_tiny_dataset, build_tiny_sd
from lora_trainer.train import read_losses
from tests.e2e.chaos import REFERENCE_STALL_SECONDS, base_env, run_attempt
from tests.e2e.deadlines import FUNC_ONLY, set_deadline

pytestmark = FUNC_ONLY
# The scenario starts a cluster and the operator and runs two trainer pods: it may take this many
# uninterrupted trainer runs (one is about a fifth of it on an idle machine).
SCENARIO_REFERENCES = 30
TEST_REFERENCES = 4  # a test body only reads what the scenario left

STORY = ["created", "running", "checkpoint", "reclaimed", "preempted", "running", "resumed", "succeeded"]


@dataclass
class Reference:
    seconds: float  # wall time of the process, start-up included
    weights_sha256: str
    losses: dict[int, float]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    """`lora-train` uninterrupted, as a process (a pod's start-up included), on the demo job's spec."""
    root = tmp_path_factory.mktemp("reference")
    spec = yaml.safe_load(JOB_MANIFEST.read_text())["spec"]
    config = to_train_config(parse_spec(spec)).model_copy(update={
        "base_model": str(build_tiny_sd(root / "sd")), "train_data_dir": str(build_tiny_dataset(root / "data")),
        "output_dir": str(root / "output"), "cache_dir": str(root / "cache"), "work_dir": str(root / "work"),
    })
    env = base_env()
    run = run_attempt(config.model_dump(mode="json"), env, root / "run", stall=REFERENCE_STALL_SECONDS)
    assert run.code == 0 and not run.timed_out, (root / "run" / "trainer.log").read_text()[-3000:]
    weights = hashlib.sha256((root / "output" / FINAL_WEIGHTS).read_bytes()).hexdigest()
    return Reference(run.seconds, weights, read_losses((root / "output/logs/metrics.jsonl").read_text()))


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory, reference: Reference) -> DemoResult:
    return run_scenario(tmp_path_factory.mktemp("demo"), s3_port=0, timeout=SCENARIO_REFERENCES * reference.seconds)


@pytest.fixture(autouse=True)
def deadline(request: pytest.FixtureRequest, reference: Reference) -> float:
    return set_deadline(request, TEST_REFERENCES * reference.seconds)


def test_job_succeeds_after_one_preemption(demo: DemoResult) -> None:
    status = demo.final_status
    assert status["phase"] == "Succeeded", status
    assert (status["preemptions"], status["failures"], status["attempt"]) == (1, 0, 2)
    assert status["progress"]["step"] == status["progress"]["totalSteps"] == demo.spec["training"]["maxTrainSteps"]
    assert status["outputs"]["weights"] == demo.weights_uri
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True"


def test_resumed_exactly_where_the_checkpoint_was_committed(demo: DemoResult) -> None:
    assert demo.committed_checkpoint_step >= demo.spec["checkpoint"]["everySteps"]  # reclaimed after one
    assert demo.preempted_step == demo.committed_checkpoint_step  # SIGTERM committed the step it stopped at
    assert demo.status_checkpoint_step == demo.committed_checkpoint_step  # what the operator reported
    assert demo.resumed_step == demo.committed_checkpoint_step  # what attempt 2 loaded
    log = demo.logs["attempt 2"].read_text()
    assert f"attempt 2: resumed from step {demo.committed_checkpoint_step}" in log


def test_weights_and_losses_equal_an_uninterrupted_run(demo: DemoResult, reference: Reference) -> None:
    assert training_fields(demo.spec) == training_fields(yaml.safe_load(JOB_MANIFEST.read_text())["spec"])
    assert demo.weights_sha256 == reference.weights_sha256
    assert demo.weights_sha256 == hashlib.sha256(demo.weights_path.read_bytes()).hexdigest()
    assert demo.losses == reference.losses


def training_fields(spec: dict) -> dict:
    """What decides the weights: the training fields of the trainer config, inputs aside."""
    fields = trainer_fields(to_train_config(parse_spec(spec)))
    return {k: v for k, v in fields.items() if k not in ("base_model", "train_data_dir")}


def test_timeline_loss_curve_and_cleanup(demo: DemoResult, tmp_path: Path) -> None:
    kinds = [e.kind for e in demo.timeline if e.kind in STORY]
    assert kinds == STORY, [(e.seconds, e.message) for e in demo.timeline]
    assert [e.seconds for e in demo.timeline] == sorted(e.seconds for e in demo.timeline)
    curve = plot_losses(demo, tmp_path / "loss.png")
    assert curve is not None and curve.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pod_dirs = sorted((demo.workdir / "cluster" / "pods").iterdir())
    assert len(pod_dirs) == 2
    for pod_dir in pod_dirs:  # the trainer's /scratch paths (in its JSON config too) were the pod's own
        assert (pod_dir / "volumes" / "scratch" / "work").is_dir()
    pids = [int((pod_dir / "pid").read_text()) for pod_dir in pod_dirs]
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}") or " Z " in Path(f"/proc/{pid}/stat").read_text()
