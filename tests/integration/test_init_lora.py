"""init_lora: training that starts from an existing LoRA file (the seed's incremental training).

Behaviours tested, on the tiny SD and SDXL built from configs:
- run A trains; run B starts from A's kohya export: before any step B's adapters hold A's weights
  exactly (equal alphas), and with another alpha the up weights are rescaled so B renders A's image;
- B trains (its first loss differs from A's fresh start) and a B stopped as on SIGTERM and resumed ends
  sha256-equal to an uninterrupted B;
- the init file's sha256 joins the config hash: resuming B with a changed init file is refused
  (exit 65) naming init_lora, and succeeds once the file is restored;
- both families read both of their own export formats back bit for bit;
- a rank, target-module or text-encoder mismatch is exit 78 naming both sides and the fix;
- a CPU run adds no GPU columns to metrics.jsonl and no GPU text to train.log.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_trainer import contract
from lora_trainer.config import TrainConfig, parse_config
from lora_trainer.errors import EXIT_CONFIG, EXIT_DATAERR, ConfigError, Preempted, ResumeRefused
from lora_trainer.export import peft_state
from lora_trainer.tasks import REGISTRY, load_family
from lora_trainer.tiny_sdxl import build_tiny_sdxl
from lora_trainer.train import Trainer, read_losses
from tests.integration.test_sdxl import StopAfter

STEPS = 4
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl-init") / "model")


def config(model: Path, data: Path, out: Path, **extra: object) -> TrainConfig:
    base = {
        "base_model": str(model), "train_data_dir": str(data), "output_dir": str(out), "resolution": 32,
        "lora_rank": 4, "lora_alpha": 2, "batch_size": 2, "max_train_steps": STEPS, "learning_rate": 5e-3,
        "save_steps": 2, "keep_last": 1, "seed": 3, "cache_dir": str(out.parent / "cache"), "log_every": 2,
        "train_text_encoder": True, "target_modules": TARGETS, "device": "cpu",
    }
    return parse_config({**base, **extra})


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fresh_parts(name: str, model: Path, cfg: TrainConfig):
    family = load_family(REGISTRY[name])
    torch.manual_seed(cfg.seed)
    parts = family.load(model, cfg)
    family.add_lora(parts, cfg)
    return family, parts


def lora_weights(parts, cfg: TrainConfig) -> dict[str, torch.Tensor]:
    modules = {"unet": parts.unet}
    if cfg.train_text_encoder:
        modules["text_encoder"] = parts.text_encoder
        if hasattr(parts, "text_encoder_2"):
            modules["text_encoder_2"] = parts.text_encoder_2
    return {f"{c}.{k}": v.clone() for c, m in modules.items() for k, v in peft_state(m).items()}


@pytest.fixture(scope="module")
def run_a(tiny_sdxl: Path, tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run-a") / "out"
    Trainer(config(tiny_sdxl, tiny_data, out)).run()
    return out


@pytest.fixture(scope="module")
def run_b(run_a: Path, tiny_sdxl: Path, tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """B, uninterrupted, from a copy of A's kohya file."""
    root = tmp_path_factory.mktemp("run-b")
    init = shutil.copy(run_a / contract.FINAL_WEIGHTS_KOHYA, root / "a_kohya.safetensors")
    Trainer(config(tiny_sdxl, tiny_data, root / "out", init_lora=str(init))).run()
    return root / "out"


def test_b_starts_from_a_kohya_file_exactly(run_a: Path, tiny_sdxl: Path, tiny_data: Path, tmp_path: Path) -> None:
    cfg = config(tiny_sdxl, tiny_data, tmp_path / "out", init_lora=str(run_a / contract.FINAL_WEIGHTS_KOHYA))
    family, parts = fresh_parts("sdxl", tiny_sdxl, cfg)
    before = lora_weights(parts, cfg)
    family.load_lora(parts, cfg, run_a / contract.FINAL_WEIGHTS_KOHYA)
    family.save_lora(parts, cfg, tmp_path / "b0.safetensors")
    b0, a = load_file(str(tmp_path / "b0.safetensors")), load_file(str(run_a / contract.FINAL_WEIGHTS))
    assert sorted(b0) == sorted(a) and len(a) > 100
    for key in a:
        assert torch.equal(b0[key], a[key]), key
    assert any(not torch.equal(before[k], v) for k, v in lora_weights(parts, cfg).items())


def render(pipe) -> np.ndarray:
    g = torch.Generator().manual_seed(0)
    return np.asarray(pipe("a red circle on a blue background", num_inference_steps=3, height=32, width=32,
                           generator=g, output_type="np").images[0])


def test_another_alpha_rescales_to_the_same_images(run_a: Path, tiny_sdxl: Path, tiny_data: Path,
                                                   tmp_path: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    cfg = config(tiny_sdxl, tiny_data, tmp_path / "out", lora_alpha=8, init_lora=str(run_a / contract.FINAL_WEIGHTS_KOHYA))
    family, parts = fresh_parts("sdxl", tiny_sdxl, cfg)
    family.load_lora(parts, cfg, run_a / contract.FINAL_WEIGHTS_KOHYA)
    family.save_lora(parts, cfg, tmp_path / "b0.safetensors")
    b0, a = load_file(str(tmp_path / "b0.safetensors")), load_file(str(run_a / contract.FINAL_WEIGHTS))
    up = next(k for k in a if k.startswith("unet.") and ".up." in k)
    torch.testing.assert_close(b0[up], a[up] * (2 / 8))
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    pipe.set_progress_bar_config(disable=True)
    plain = render(pipe)
    pipe.load_lora_weights(str(run_a), weight_name=contract.FINAL_WEIGHTS, adapter_name="a")
    with_a = render(pipe)
    pipe.unload_lora_weights()
    pipe.load_lora_weights(str(tmp_path), weight_name="b0.safetensors", adapter_name="b")
    with_b = render(pipe)
    assert np.abs(with_a - plain).max() > 1e-3
    np.testing.assert_allclose(with_b, with_a, atol=1e-4)


def test_b_trains_and_resumes_bit_exactly_and_refuses_a_changed_init(
    run_a: Path, run_b: Path, tiny_sdxl: Path, tiny_data: Path, tmp_path: Path
) -> None:
    a_losses = read_losses((run_a / "logs/metrics.jsonl").read_text())
    b_losses = read_losses((run_b / "logs/metrics.jsonl").read_text())
    assert sorted(b_losses) == list(range(1, STEPS + 1)) and b_losses[1] != a_losses[1]
    assert sha(run_b / contract.FINAL_WEIGHTS) != sha(run_a / contract.FINAL_WEIGHTS)

    init = shutil.copy(run_a / contract.FINAL_WEIGHTS_KOHYA, tmp_path / "a_kohya.safetensors")
    cfg = config(tiny_sdxl, tiny_data, tmp_path / "out", init_lora=str(init))
    with pytest.raises(Preempted):
        Trainer(cfg, stop=StopAfter(2)).run()

    changed = load_file(str(init))
    key = next(k for k in changed if k.endswith(".lora_up.weight"))
    changed[key] = changed[key] + 0.01
    save_file(changed, str(init))
    with pytest.raises(ResumeRefused) as refused:
        Trainer(cfg).run()
    assert refused.value.exit_code == EXIT_DATAERR
    assert "init_lora (file content, sha256" in refused.value.message

    shutil.copy(run_a / contract.FINAL_WEIGHTS_KOHYA, init)
    result = Trainer(cfg).run()
    assert result.resumed_from == 2
    for name in (contract.FINAL_WEIGHTS, contract.FINAL_WEIGHTS_KOHYA):
        assert sha(tmp_path / "out" / name) == sha(run_b / name), name


@pytest.mark.parametrize("family_name", ["sd", "sdxl"])
def test_each_family_reads_its_own_exports_back(family_name: str, tiny_sd: Path, tiny_sdxl: Path,
                                                tiny_data: Path, tmp_path: Path) -> None:
    model = tiny_sd if family_name == "sd" else tiny_sdxl
    cfg = config(model, tiny_data, tmp_path / "out", lora_alpha=3)
    family, parts = fresh_parts(family_name, model, cfg)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for m in (parts.unet, parts.text_encoder, getattr(parts, "text_encoder_2", parts.text_encoder)):
            for p in m.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    trained = lora_weights(parts, cfg)
    files = dict((name, path) for path, name in family.export(parts, cfg, tmp_path))
    for name in (contract.FINAL_WEIGHTS, contract.FINAL_WEIGHTS_KOHYA):
        _, again = fresh_parts(family_name, model, cfg)
        family.load_lora(again, cfg, files[name])
        loaded = lora_weights(again, cfg)
        assert sorted(loaded) == sorted(trained)
        for key, value in trained.items():
            assert torch.equal(loaded[key], value), (name, key)


@pytest.mark.parametrize(("change", "needles"), [
    ({"lora_rank": 8}, ["has rank 4", "lora_rank is 8", "set lora_rank: 4"]),
    ({"target_modules": ["to_q", "to_v"]}, ["unet modules this run has none on", "set target_modules"]),
    ({"train_text_encoder": False}, ["text_encoder", "set train_text_encoder: true"]),
])
def test_a_mismatch_is_exit_78_naming_both(change: dict, needles: list[str], run_a: Path, tiny_sdxl: Path,
                                           tiny_data: Path, tmp_path: Path) -> None:
    cfg = config(tiny_sdxl, tiny_data, tmp_path / "out", init_lora=str(run_a / contract.FINAL_WEIGHTS_KOHYA), **change)
    family, parts = fresh_parts("sdxl", tiny_sdxl, cfg)
    with pytest.raises(ConfigError) as err:
        family.load_lora(parts, cfg, run_a / contract.FINAL_WEIGHTS_KOHYA)
    assert err.value.exit_code == EXIT_CONFIG
    assert err.value.message.startswith("init_lora: ")
    for needle in needles:
        assert needle in err.value.message, err.value.message


def test_a_cpu_run_logs_no_gpu_stats(run_a: Path) -> None:
    rows = (run_a / "logs/metrics.jsonl").read_text().splitlines()
    assert rows and not any("gpu_" in row for row in rows)
    assert " gpu " not in (run_a / "logs/train.log").read_text()
