"""SIGKILL and resume of a real `lora-train` process training the tiny Flux.

Behaviour tested: a run killed with SIGKILL once its first checkpoint is committed (the log's commit
line) resumes in a second process from a committed step, and ends with final weights sha256-equal,
and per-step losses equal, to an uninterrupted run's.

Short on purpose (10 steps at 32 px, CLIP trained too, a checkpoint every 3, output in a local folder). Deadlines are
multiples of the uninterrupted reference run measured first (tests/e2e/deadlines.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_trainer.config import S3Config
from lora_trainer.tiny_flux import build_tiny_flux
from tests.e2e.chaos import Reference, base_env, kill_after_first_commit_and_resume, reference_run
from tests.e2e.deadlines import FUNC_ONLY, set_deadline

pytestmark = FUNC_ONLY
LOCAL = S3Config()  # the outputs are local folders


def flux_run(model: Path, data: Path, out: Path, cache: Path) -> dict:
    return {
        "base_model": str(model), "train_data_dir": str(data), "output_dir": str(out), "resolution": 32,
        "lora_rank": 4, "batch_size": 2, "max_train_steps": 10, "learning_rate": 1e-3, "save_steps": 3,
        "keep_last": 0, "seed": 5, "log_every": 1, "cache_dir": str(cache), "train_text_encoder": True,
        "random_flip": True, "center_crop": False,
    }


@pytest.fixture(scope="module")
def inputs(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return build_tiny_flux(tmp_path_factory.mktemp("tiny-flux") / "model"), tiny_data


@pytest.fixture(scope="module")
def reference(inputs: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Reference:
    root = tmp_path_factory.mktemp("flux-ref")
    return reference_run(flux_run(*inputs, root / "out", root / "cache"), base_env(), root, LOCAL)


@pytest.fixture(autouse=True)
def deadline(request: pytest.FixtureRequest, reference: Reference) -> float:
    return set_deadline(request, reference.deadline(2))


def test_sigkill_after_first_commit_resumes_exactly(inputs, reference: Reference, tmp_path: Path) -> None:
    config = flux_run(*inputs, tmp_path / "out", tmp_path / "cache")
    kill_after_first_commit_and_resume(config, base_env(), tmp_path, LOCAL, reference)
