"""The seed's own config, run as written from a folder laid out like the seed.

    train_data_dir: "./data/style_train"
    metadata_path: "./data/style_train/metadata.csv"
    base_model: "./models/Stable-diffusion/v1-5-pruned.safetensors"

Behaviours tested (real `lora-train --config configs/style.yaml` processes, current directory the
project folder, HF_HUB_OFFLINE=1):
- the paths resolve from the current directory (the config file sits in configs/, where none of
  them exists), the single file trains with `base_model_config` holding only configs;
- SIGTERM after the first committed checkpoint → exit 75; the next attempt resumes, reuses the
  converted base model (no second conversion) and ends with the same final LoRA sha256 and
  per-step losses as an uninterrupted run of the same config in another folder.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lora_trainer import contract
from lora_trainer.config import S3Config
from lora_trainer.errors import EXIT_PREEMPTED
from lora_trainer.storage import open_store
from lora_trainer.tiny import build_tiny_dataset, build_tiny_sd_single_file
from tests.e2e.chaos import read_result
from tests.integration.test_single_file import copy_configs

pytestmark = pytest.mark.timeout(600)

SEED_CONFIG = {
    "train_data_dir": "./data/style_train",
    "metadata_path": "./data/style_train/metadata.csv",
    "base_model": "./models/Stable-diffusion/v1-5-pruned.safetensors",
    # Offline there is no hub to take SD 1.5's configs from: the configs (no weights) sit beside it.
    "base_model_config": "./models/Stable-diffusion/v1-5-configs",
    "output_dir": "./output/style",
    "cache_dir": "./cache",
    "resolution": 32, "lora_rank": 4, "batch_size": 2, "max_train_steps": 8, "learning_rate": 1e-3,
    "save_steps": 2, "keep_last": 0, "seed": 3, "log_every": 1,
}


def seed_folder(root: Path, tiny_sd: Path) -> Path:
    """A project folder as the seed lays it out, with the config in configs/."""
    build_tiny_dataset(root / "data/style_train", n=8)
    models = root / "models/Stable-diffusion"
    build_tiny_sd_single_file(models / "v1-5-pruned.safetensors", tiny_sd)
    copy_configs(tiny_sd, models / "v1-5-configs")
    (root / "configs").mkdir()
    (root / "configs/style.yaml").write_text(yaml.safe_dump(SEED_CONFIG, sort_keys=False))
    return root


def start(root: Path, log_name: str) -> subprocess.Popen:
    env = {"PATH": os.environ["PATH"], "HF_HUB_OFFLINE": "1", "HF_HOME": str(root / "hf-empty"),
           contract.ENV_TERMINATION_LOG: str(root / f"{log_name}.termination.json")}
    log = (root / f"{log_name}.log").open("wb")
    return subprocess.Popen([sys.executable, "-m", "lora_trainer", "--config", "configs/style.yaml"], cwd=root,
                            env=env, stdout=log, stderr=subprocess.STDOUT)


def test_seed_config_trains_and_resumes_exactly(tiny_sd: Path, tmp_path: Path) -> None:
    reference = seed_folder(tmp_path / "reference", tiny_sd)
    assert start(reference, "run").wait(timeout=300) == 0
    ref = read_result(open_store(str(reference / "output/style"), S3Config()))
    assert sorted(ref[1]) == list(range(1, 9))

    project = seed_folder(tmp_path / "project", tiny_sd)
    latest = project / "output/style" / contract.LATEST_FILE
    proc = start(project, "attempt-1")
    deadline = time.monotonic() + 240
    while not latest.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == EXIT_PREEMPTED, (project / "attempt-1.log").read_text()[-3000:]
    first = (project / "attempt-1.log").read_text()
    assert "converting single-file base model" in first

    assert start(project, "attempt-2").wait(timeout=300) == 0
    second = (project / "attempt-2.log").read_text()
    assert "resumed from step" in second
    assert "reusing converted base model" in second and "converting single-file" not in second
    assert read_result(open_store(str(project / "output/style"), S3Config())) == ref
    backup = yaml.safe_load((project / "output/style" / contract.CONFIG_BACKUP).read_text())
    assert backup["metadata_path"] == str(project / "data/style_train/metadata.csv")
    assert backup["base_model"] == str(project / "models/Stable-diffusion/v1-5-pruned.safetensors")
