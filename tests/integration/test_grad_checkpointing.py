"""gradient_checkpointing really checkpoints, changes no math, and resumes bit-exactly (CPU).

Behaviours tested:
- SD and SDXL with train_text_encoder: the UNet and every trained text encoder are checkpointed,
  seen as their blocks running forward twice per step (once more in backward) instead of once;
- one micro-step gives the same loss and LoRA gradients with and without it (tolerance 1e-5);
- a checkpointed SD run stopped as on SIGTERM and resumed ends sha256-equal to an uninterrupted
  checkpointed run, and close to the same run without checkpointing.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_trainer import contract
from lora_trainer.config import TrainConfig, parse_config
from lora_trainer.data import ImageBatch
from lora_trainer.errors import Preempted
from lora_trainer.steps import micro_step_loss
from lora_trainer.tasks import REGISTRY, load_family
from lora_trainer.tiny_sdxl import build_tiny_sdxl
from lora_trainer.train import Trainer, read_losses
from tests.integration.test_sdxl import StopAfter

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl-gc") / "model")


def config(model: Path, data: Path, out: Path, **extra: object) -> TrainConfig:
    base = {
        "base_model": str(model), "train_data_dir": str(data), "output_dir": str(out), "resolution": 32,
        "lora_rank": 4, "batch_size": 2, "max_train_steps": 4, "learning_rate": 5e-3, "save_steps": 2,
        "keep_last": 1, "seed": 5, "cache_dir": str(out.parent / "cache"), "train_text_encoder": True,
        "target_modules": TARGETS, "device": "cpu", "lora_dropout": 0.1,
    }
    return parse_config({**base, **extra})


def batch() -> ImageBatch:
    g = torch.Generator().manual_seed(1)
    return ImageBatch(pixels=torch.rand(2, 3, 32, 32, generator=g) * 2 - 1, captions=["a red circle", "a blue square"],
                      original_sizes=[(32, 32), (32, 32)], crops=[(0, 0), (0, 0)])


def checked_blocks(parts) -> dict[str, torch.nn.Module]:
    """A module inside a block that checkpointing covers, per model: hooks on it fire again when the block is
    recomputed in backward (transformers checkpoints `forward`, so hooks on the checkpointed layer itself do not)."""
    out = {"unet": next(m for n, m in parts.unet.named_modules() if n.endswith("transformer_blocks.0.attn1"))}
    for name in ("text_encoder", "text_encoder_2"):
        if hasattr(parts, name):
            out[name] = next(m for n, m in getattr(parts, name).named_modules() if n.endswith("layers.0.self_attn"))
    return out


def one_step(name: str, model: Path, cfg: TrainConfig) -> tuple[float, dict[str, torch.Tensor], dict[str, int]]:
    family = load_family(REGISTRY[name])
    torch.manual_seed(cfg.seed)
    parts = family.load(model, cfg)
    params = family.add_lora(parts, cfg)
    calls = dict.fromkeys(checked_blocks(parts), 0)
    for key, block in checked_blocks(parts).items():
        block.register_forward_hook(lambda *_, key=key: calls.__setitem__(key, calls[key] + 1))
    loss = micro_step_loss(family, parts, cfg, batch(), seed=1234)
    loss.backward()
    # SDXL reads the first text encoder's penultimate layer: its last layer's LoRA gets no gradient.
    grads = {str(i): p.grad.clone() if p.grad is not None else None for i, p in enumerate(params)}
    assert sum(g is not None for g in grads.values()) > len(grads) * 3 // 4
    return float(loss), grads, calls


@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_checkpointing_recomputes_and_changes_no_math(name: str, tiny_sd: Path, tiny_sdxl: Path, tiny_data: Path,
                                                      tmp_path: Path) -> None:
    model = tiny_sd if name == "sd" else tiny_sdxl
    loss, grads, calls = one_step(name, model, config(model, tiny_data, tmp_path / "o"))
    loss_gc, grads_gc, calls_gc = one_step(name, model, config(model, tiny_data, tmp_path / "o",
                                                               gradient_checkpointing=True))
    assert set(calls) == ({"unet", "text_encoder"} if name == "sd" else {"unet", "text_encoder", "text_encoder_2"})
    assert calls == dict.fromkeys(calls, 1)
    assert calls_gc == dict.fromkeys(calls, 2)  # forward, and again in backward
    assert loss_gc == pytest.approx(loss, rel=1e-5)
    for key, grad in grads.items():
        if grad is None:
            assert grads_gc[key] is None, key
        else:
            torch.testing.assert_close(grads_gc[key], grad, rtol=1e-5, atol=1e-7)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_checkpointed_run_resumes_bit_exactly(tiny_sd: Path, tiny_data: Path, tmp_path: Path) -> None:
    plain = config(tiny_sd, tiny_data, tmp_path / "plain")
    Trainer(plain).run()
    whole = config(tiny_sd, tiny_data, tmp_path / "whole", gradient_checkpointing=True)
    Trainer(whole).run()
    resumed = config(tiny_sd, tiny_data, tmp_path / "resumed", gradient_checkpointing=True)
    with pytest.raises(Preempted):
        Trainer(resumed, stop=StopAfter(2)).run()
    assert Trainer(resumed).run().resumed_from == 2
    for name in (contract.FINAL_WEIGHTS, contract.FINAL_WEIGHTS_KOHYA):
        assert sha(tmp_path / "resumed" / name) == sha(tmp_path / "whole" / name), name
    losses = read_losses((tmp_path / "whole/logs/metrics.jsonl").read_text())
    plain_losses = read_losses((tmp_path / "plain/logs/metrics.jsonl").read_text())
    assert losses == pytest.approx(plain_losses, rel=1e-4)
    a, b = load_file(str(tmp_path / "whole" / contract.FINAL_WEIGHTS)), load_file(str(tmp_path / "plain" / contract.FINAL_WEIGHTS))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-5)
