"""SIGKILL and resume of a real `lora-train` process training the tiny Llama (task: causal-lm).

Behaviour tested: a run killed with SIGKILL once its first checkpoint is committed (the log's commit
line) resumes in a second process from a committed step, and ends with a final PEFT adapter
(adapter_model.safetensors) sha256-equal, and per-step losses and eval losses equal, to an
uninterrupted run's. The run packs its samples (the data position of a packed stream is part of the
resumed state) and holds out an eval split drawn with the seed.

Short on purpose (12 steps on 48 chat records, a checkpoint every 3, output in a local folder).
Deadlines are multiples of the uninterrupted reference run measured first (tests/e2e/deadlines.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_trainer.config import S3Config
from lora_trainer.tiny_llm import build_tiny_llm, write_tiny_jsonl
from lora_trainer.train import read_metric
from tests.e2e.chaos import Reference, base_env, kill_after_first_commit_and_resume, reference_run
from tests.e2e.deadlines import FUNC_ONLY, set_deadline

pytestmark = FUNC_ONLY
LOCAL = S3Config()  # the outputs are local folders
METRICS = "logs/metrics.jsonl"


def llm_run(model: Path, data: Path, out: Path, cache: Path) -> dict:
    return {
        "task": "causal-lm", "base_model": str(model), "train_file": str(data), "output_dir": str(out),
        "max_seq_length": 64, "packing": True, "eval_fraction": 0.2, "eval_steps": 4, "lora_rank": 4,
        "batch_size": 2, "max_train_steps": 12, "learning_rate": 1e-3, "save_steps": 3, "keep_last": 0,
        "seed": 5, "log_every": 1, "cache_dir": str(cache),
    }


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tiny-llm")
    return build_tiny_llm(root / "model"), write_tiny_jsonl(root / "train.jsonl", "messages", 48, seed=1)


@pytest.fixture(scope="module")
def reference_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("llm-ref")


@pytest.fixture(scope="module")
def reference(inputs: tuple[Path, Path], reference_root: Path) -> Reference:
    root = reference_root
    return reference_run(llm_run(*inputs, root / "out", root / "cache"), base_env(), root, LOCAL)


@pytest.fixture(scope="module")
def reference_eval(reference: Reference, reference_root: Path) -> dict[int, float]:
    """The reference's eval losses by step (its metrics.jsonl, next to the per-step losses)."""
    return read_metric((reference_root / "out" / METRICS).read_text(), "eval_loss")


@pytest.fixture(autouse=True)
def deadline(request: pytest.FixtureRequest, reference: Reference) -> float:
    return set_deadline(request, reference.deadline(2))


def test_sigkill_after_first_commit_resumes_exactly(inputs, reference: Reference, reference_eval: dict[int, float],
                                                    tmp_path: Path) -> None:
    config = llm_run(*inputs, tmp_path / "out", tmp_path / "cache")
    store = kill_after_first_commit_and_resume(config, base_env(), tmp_path, LOCAL, reference)
    assert store.exists("adapter_model.safetensors")  # read_result judged the PEFT adapter, not a fallback
    assert sorted(reference_eval) == [4, 8, 12]
    assert read_metric(store.get_bytes(METRICS).decode(), "eval_loss") == reference_eval
