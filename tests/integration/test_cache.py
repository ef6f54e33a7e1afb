"""Latent and text-embedding caching on the tiny SDXL: content-hashed, in the output store, reused on resume.

Behaviours tested:
- an uninterrupted cached run encodes each distinct image and caption once (8 of each);
- a cached run stopped as on SIGTERM and resumed encodes nothing the first attempt already encoded
  (the second attempt reads those entries from cache/ in the output) and ends with final weights
  sha256-equal to the uninterrupted cached run's;
- caching text embeddings while the text encoders train is a ConfigError naming the fix.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from lora_trainer import contract
from lora_trainer.cache import cache_kinds
from lora_trainer.config import parse_config
from lora_trainer.errors import EXIT_CONFIG, ConfigError, Preempted
from lora_trainer.signals import StopFlag
from lora_trainer.tiny_sdxl import build_tiny_sdxl
from lora_trainer.train import Trainer


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


def run_config(model: Path, data: Path, out: Path):
    return parse_config({
        "base_model": str(model), "train_data_dir": str(data), "output_dir": str(out), "resolution": 32,
        "cache_latents": True, "cache_text_embeddings": True, "lora_rank": 4, "batch_size": 2,
        "max_train_steps": 6, "learning_rate": 5e-3, "save_steps": 3, "keep_last": 1, "seed": 4,
        "cache_dir": str(out.parent / "cache"), "center_crop": True, "random_flip": False,
    })


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_resumed_attempt_reuses_the_cache(tiny_data: Path, tmp_path: Path) -> None:
    model = build_tiny_sdxl(tmp_path / "model")
    whole_out = tmp_path / "whole" / "out"
    whole = Trainer(run_config(model, tiny_data, whole_out))
    whole.run()
    assert whole.cache is not None
    assert dict(whole.cache.computed) == {"latents": 8, "text": 8} and not whole.cache.loaded
    assert len(list((whole_out / "cache" / "latents").glob("*.safetensors"))) == 8

    out = tmp_path / "split" / "out"
    config = run_config(model, tiny_data, out)
    first = Trainer(config, stop=StopAfter(3))
    with pytest.raises(Preempted):
        first.run()
    second = Trainer(config)
    assert second.run().resumed_from == 3
    assert first.cache is not None and second.cache is not None
    for kind in ("latents", "text"):
        assert first.cache.computed[kind] == 6  # three steps of two distinct samples
        assert first.cache.computed[kind] + second.cache.computed[kind] == whole.cache.computed[kind]
        assert second.cache.loaded[kind] >= 1  # read back from the store, not encoded again
    for name in (contract.FINAL_WEIGHTS, contract.FINAL_WEIGHTS_KOHYA):
        assert sha(out / name) == sha(whole_out / name), name


def test_text_cache_needs_frozen_text_encoders() -> None:
    assert cache_kinds(True, True, frozenset({"latents", "text"})) == {"latents", "text"}
    assert cache_kinds(True, False, frozenset({"latents"})) == {"latents"}
    with pytest.raises(ConfigError) as info:
        cache_kinds(False, True, frozenset({"latents"}))
    assert info.value.exit_code == EXIT_CONFIG
    assert "train_text_encoder: true" in info.value.message and "cache_text_embeddings: false" in info.value.message


def test_sd_caches_through_the_same_seam(tiny_sd: Path, tiny_data: Path, tmp_path: Path) -> None:
    config = run_config(tiny_sd, tiny_data, tmp_path / "out").model_copy(update={"max_train_steps": 2})
    trainer = Trainer(config)
    trainer.run()
    assert trainer.cache is not None and dict(trainer.cache.computed) == {"latents": 4, "text": 4}
    assert (tmp_path / "out" / contract.FINAL_WEIGHTS).is_file()
