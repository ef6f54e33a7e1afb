"""The `make demo` scenario, end to end: dev cluster, the real operator, the real trainer, a spot reclaim.

Behaviours (one run of `run_scenario`, S3 on a free port so a running dev cluster never collides):
- the job ends Succeeded after exactly one preemption and no failure, on attempt 2;
- attempt 1 stopped at step N with a committed checkpoint of step N (termination message and
  checkpoints/latest.json), the operator's status.latestCheckpoint said N when it counted the
  preemption, and attempt 2's trainer logged "resumed from step N";
- the final pytorch_lora_weights.safetensors is byte-identical (sha256) to an uninterrupted
  in-process Trainer run of `to_train_config(parse_spec(spec))` on local paths, and the per-step
  losses in logs/metrics.jsonl equal that run's;
- the timeline tells the story in order, the loss curve is a PNG, and no pod process is left.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from lora_operator.demo import DemoResult, plot_losses, run_scenario
from lora_operator.spec import parse_spec, to_train_config
from lora_trainer.train import Trainer

pytestmark = pytest.mark.timeout(420)

STORY = ["created", "running", "checkpoint", "reclaimed", "preempted", "running", "resumed", "succeeded"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoResult:
    return run_scenario(tmp_path_factory.mktemp("demo"), s3_port=0)


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


def test_weights_and_losses_equal_an_uninterrupted_run(demo: DemoResult, tmp_path: Path) -> None:
    config = to_train_config(parse_spec(demo.spec)).model_copy(update={
        "base_model": str(demo.model_dir), "train_data_dir": str(demo.data_dir),
        "output_dir": str(tmp_path / "reference"), "cache_dir": str(tmp_path / "cache"),
        "work_dir": str(tmp_path / "work"),
    })
    reference = Trainer(config).run()
    weights = tmp_path / "reference" / "pytorch_lora_weights.safetensors"
    assert demo.weights_sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert demo.weights_sha256 == hashlib.sha256(demo.weights_path.read_bytes()).hexdigest()
    assert demo.losses == reference.losses


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
