"""A 2-process (gloo) reference run of the tiny SD model, shared by the tests of several processes.

Built once per session: the uninterrupted run every resumed 2-process run must equal bit for bit.
Short on purpose (8 steps, a checkpoint every 2; batch_size 2 per process, so 4 of the 8 images a
step); outputs in local folders.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from lora_trainer import contract
from lora_trainer.config import S3Config
from tests.e2e.chaos import Reference, base_env, reference_run

LOCAL = S3Config()  # outputs are local folders


def ddp_config(model: Path, data: Path, out: Path, cache: Path) -> dict:
    """The run every 2-process test trains."""
    return {
        "base_model": str(model), "train_data_dir": str(data), "output_dir": str(out), "resolution": 32,
        "lora_rank": 4, "batch_size": 2, "max_train_steps": 8, "learning_rate": 1e-3, "lr_scheduler": "cosine",
        "save_steps": 2, "keep_last": 0, "seed": 11, "log_every": 1, "cache_dir": str(cache),
        "preemption_grace_seconds": 20,
    }


def ddp_env(processes: int = 2) -> dict[str, str]:
    """A trainer's environment asking for `processes` training processes in one pod, one thread each."""
    return {**base_env(), contract.ENV_NPROC_PER_NODE: str(processes), "OMP_NUM_THREADS": "1"}


@dataclass
class DdpReference:
    """The uninterrupted 2-process run: its yardstick and its output folder."""

    ref: Reference
    out: Path
    model: Path
    data: Path


@pytest.fixture(scope="session")
def ddp_reference(tiny_sd: Path, tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> DdpReference:
    root = tmp_path_factory.mktemp("ddp-ref")
    ref = reference_run(ddp_config(tiny_sd, tiny_data, root / "out", root / "cache"), ddp_env(), root, LOCAL)
    return DdpReference(ref, root / "out", tiny_sd, tiny_data)
