"""SIGKILL and resume of a real `lora-train` process with `save_steps: auto`.

Behaviours tested:
- a run with the automatic interval (a preemption rate in LORA_PREEMPTION_RATE_PER_HOUR, as the
  operator sets it) killed with SIGKILL once its first checkpoint is committed resumes in a second
  process from a committed step and ends with final weights sha256-equal, and per-step losses equal,
  to an uninterrupted run that checkpointed at a fixed interval: the cadence changes nothing trained;
- every checkpoint the auto run committed, wherever it fell, is file-for-file (sha256) the state the
  uninterrupted run had at that step (the reference checkpoints every step), so a resume from any
  of them is exact.

Short on purpose (10 steps of the tiny SD at 32 px, output in a local folder). Deadlines are
multiples of the uninterrupted reference run measured first (tests/e2e/deadlines.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_trainer.config import S3Config
from lora_trainer.contract import ENV_PREEMPTION_RATE
from tests.e2e.chaos import (
    Reference,
    base_env,
    digests,
    kill_after_first_commit_and_resume,
    manifests,
    reference_run,
)
from tests.e2e.deadlines import FUNC_ONLY, set_deadline

pytestmark = FUNC_ONLY
LOCAL = S3Config()  # the outputs are local folders


def run(model: Path, data: Path, out: Path, cache: Path, **extra: object) -> dict:
    return {
        "base_model": str(model), "train_data_dir": str(data), "output_dir": str(out), "resolution": 32,
        "lora_rank": 4, "batch_size": 2, "max_train_steps": 10, "learning_rate": 1e-3, "keep_last": 0,
        "seed": 5, "log_every": 1, "cache_dir": str(cache), "random_flip": True, **extra,
    }


@pytest.fixture(scope="module")
def reference(tiny_sd: Path, tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Reference:
    root = tmp_path_factory.mktemp("interval-ref")
    return reference_run(run(tiny_sd, tiny_data, root / "out", root / "cache", save_steps=1), base_env(), root, LOCAL)


@pytest.fixture(autouse=True)
def deadline(request: pytest.FixtureRequest, reference: Reference) -> float:
    return set_deadline(request, reference.deadline(2))


def test_sigkill_with_auto_interval_resumes_exactly(tiny_sd: Path, tiny_data: Path, reference: Reference,
                                                    tmp_path: Path) -> None:
    config = run(tiny_sd, tiny_data, tmp_path / "out", tmp_path / "cache", save_steps="auto", min_save_steps=2,
                 max_save_steps=4)
    env = {**base_env(), ENV_PREEMPTION_RATE: "1800"}
    store = kill_after_first_commit_and_resume(config, env, tmp_path, LOCAL, reference)
    committed = manifests(store)
    assert 2 in committed and 10 in committed  # the first auto checkpoint (min steps in) and the last step
    for step, manifest in committed.items():
        assert digests(manifest) == reference.checkpoints[step], f"checkpoint step {step} differs"
    log = (tmp_path / "a2/trainer.log").read_text()
    assert "checkpoint interval auto at 1800 preemptions/h (from the operator)" in log
