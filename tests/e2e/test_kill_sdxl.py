"""SIGKILL, SIGTERM and resume of a real `lora-train` process training the tiny SDXL.

Behaviours tested:
- a run killed with SIGKILL once its first checkpoint is committed (the log's commit line) resumes
  in a second process from a committed step, and ends with final weights sha256-equal, and per-step
  losses equal, to an uninterrupted run's;
- a run sent SIGTERM mid-run (between checkpoints) commits a checkpoint at the step it stopped on,
  exits 75 with a termination message naming that step, and the next process resumes from exactly
  that step (no step lost) and ends sha256-equal to the uninterrupted run.

Short on purpose (10 steps at 32 px, a checkpoint every 3, output in a local folder). Deadlines are
multiples of the uninterrupted reference run measured first (tests/e2e/deadlines.py).
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from lora_trainer import contract
from lora_trainer.config import S3Config
from lora_trainer.errors import EXIT_PREEMPTED
from lora_trainer.storage import open_store
from lora_trainer.tiny_sdxl import build_tiny_sdxl
from tests.e2e.chaos import (
    KillPlan,
    Reference,
    base_env,
    kill_after_first_commit_and_resume,
    manifests,
    read_result,
    reference_run,
    run_attempt,
)
from tests.e2e.deadlines import FUNC_ONLY, set_deadline

pytestmark = FUNC_ONLY
LOCAL = S3Config()  # the outputs are local folders


def xl_run(model: Path, data: Path, out: Path, cache: Path) -> dict:
    return {
        "base_model": str(model), "train_data_dir": str(data), "output_dir": str(out), "resolution": 32,
        "lora_rank": 4, "batch_size": 2, "max_train_steps": 10, "learning_rate": 1e-3, "save_steps": 3,
        "keep_last": 0, "seed": 5, "log_every": 1, "cache_dir": str(cache), "train_text_encoder": True,
        "random_flip": True, "center_crop": False,
    }


@pytest.fixture(scope="module")
def inputs(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl") / "model"), tiny_data


@pytest.fixture(scope="module")
def reference(inputs: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Reference:
    root = tmp_path_factory.mktemp("xl-ref")
    return reference_run(xl_run(*inputs, root / "out", root / "cache"), base_env(), root, LOCAL)


@pytest.fixture(autouse=True)
def deadline(request: pytest.FixtureRequest, reference: Reference) -> float:
    return set_deadline(request, reference.deadline(2))


def test_sigkill_after_first_commit_resumes_exactly(inputs, reference: Reference, tmp_path: Path) -> None:
    config = xl_run(*inputs, tmp_path / "out", tmp_path / "cache")
    kill_after_first_commit_and_resume(config, base_env(), tmp_path, LOCAL, reference)


@pytest.mark.slow  # `make chaos`: SIGTERM takes the same path in every family (test_resume runs it on SD by default)
def test_sigterm_mid_run_commits_and_resumes_exactly(inputs, reference: Reference, tmp_path: Path) -> None:
    config = xl_run(*inputs, tmp_path / "out", tmp_path / "cache")
    # The grace budget (finish the step, then commit) scales with this machine's pace, as a pod's grace period
    # is sized for its node; a budget that runs out is test_resume's grace case, not this one.
    config["preemption_grace_seconds"] = min(3600.0, reference.deadline(1))
    plan = KillPlan("step", signal.SIGTERM, step=4)  # past the step-3 checkpoint, before step 6's
    first = run_attempt(config, base_env(), tmp_path / "a1", plan=plan, draw=lambda plan, watch: None,
                        timeout=reference.deadline(1))
    assert first.killed and first.code == EXIT_PREEMPTED, (first.code, first.timed_out)
    message = contract.TerminationMessage.model_validate_json((tmp_path / "a1/termination.json").read_text())
    assert message.reason == "Preempted" and message.step is not None and 4 <= message.step < config["max_train_steps"]
    store = open_store(config["output_dir"], LOCAL)
    assert message.step in manifests(store)  # the checkpoint the message names is committed
    second = run_attempt(config, base_env(), tmp_path / "a2", timeout=reference.deadline(1))
    assert second.code == 0 and not second.timed_out
    assert second.log.resumed and second.log.start_step == message.step  # a SIGTERM loses no step
    assert read_result(store) == (reference.weights_sha256, reference.losses)
