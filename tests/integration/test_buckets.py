"""Aspect-ratio buckets in a real run on the tiny SDXL (images of several shapes, batches per bucket).

Behaviour tested: a bucketed run stopped as on SIGTERM (checkpoint committed, exit 75) and resumed
ends with final weights sha256-equal, and per-step losses equal, to an uninterrupted bucketed run's;
the config backup records the bucket settings.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from PIL import Image

from lora_trainer import contract
from lora_trainer.config import parse_config
from lora_trainer.errors import Preempted
from lora_trainer.signals import StopFlag
from lora_trainer.tiny_sdxl import build_tiny_sdxl
from lora_trainer.train import Trainer, read_losses

SHAPES = [(64, 32), (32, 64), (48, 48), (80, 40), (40, 80), (64, 64), (96, 32)]


class StopAfter(StopFlag):
    """As if SIGTERM arrived once `steps` optimizer steps were done (the loop asks before each step)."""

    def __init__(self, steps: int) -> None:
        super().__init__()
        self.asked, self.steps = 0, steps

    @property
    def requested(self) -> bool:
        self.asked += 1
        if self.asked > self.steps:
            self.request()
        return super().requested


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("shapes")
    for i, (w, h) in enumerate(SHAPES):
        im = Image.new("RGB", (w, h), (i * 30, 200 - i * 20, 90))
        im.paste((250, 250, 250), (w // 4, h // 4, w // 2, h // 2))
        im.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a shape number {i}")
    return folder


def run_config(model: Path, data: Path, out: Path):
    return parse_config({
        "base_model": str(model), "train_data_dir": str(data), "output_dir": str(out), "resolution": 32,
        "enable_bucket": True, "min_bucket_reso": 16, "max_bucket_reso": 64, "bucket_reso_steps": 16,
        "lora_rank": 4, "batch_size": 2, "max_train_steps": 6, "learning_rate": 5e-3, "save_steps": 3,
        "keep_last": 1, "seed": 9, "cache_dir": str(out.parent / "cache"), "log_every": 1,
        "center_crop": False, "random_flip": True,
    })


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_bucketed_run_resumes_exactly(shapes: Path, tmp_path: Path) -> None:
    model = build_tiny_sdxl(tmp_path / "model")
    whole = tmp_path / "whole" / "out"
    Trainer(run_config(model, shapes, whole)).run()
    assert "enable_bucket: true" in (whole / contract.CONFIG_BACKUP).read_text()

    out = tmp_path / "split" / "out"
    config = run_config(model, shapes, out)
    with pytest.raises(Preempted):
        Trainer(config, stop=StopAfter(2)).run()
    assert Trainer(config).run().resumed_from == 2
    for name in (contract.FINAL_WEIGHTS, contract.FINAL_WEIGHTS_KOHYA):
        assert sha(out / name) == sha(whole / name), name
    losses = [read_losses((d / "logs/metrics.jsonl").read_text()) for d in (whole, out)]
    assert losses[0] == losses[1] and sorted(losses[0]) == list(range(1, 7))
