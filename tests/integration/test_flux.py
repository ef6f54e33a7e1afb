"""Flux behind the task seam, on a tiny Flux built from configs (lora_trainer.tiny_flux).

Behaviours tested:
- a Flux folder trains with the same config keys as SD (base_model is all that changes), with LoRA
  on the transformer and the CLIP text encoder (T5 frozen); the output folder has the same layout;
- both exports load with FluxPipeline.load_lora_weights, change the image, and give the same image;
  init_lora reads either back into fresh adapters (the diffusers file bit for bit);
  the kohya file uses lora_transformer_ / lora_te1_ keys with the run's alpha and no lora_unet_ keys;
- a run stopped as on SIGTERM (checkpoint committed, exit 75) and resumed ends with final weights
  sha256-equal to an uninterrupted run's; with latent and text caches too; with aspect-ratio buckets
  and gradient checkpointing too; with the other weighting schemes and another guidance value too;
- the sigma shift for the resolution is FluxPipeline's (calculate_shift, exponential time shift);
- a resolution (or bucket step) Flux cannot pack is exit 78 naming the field and a value that works;
  so is fp16 (Flux overflows it), naming bf16;
- a config that leaves resolution unset trains Flux at 1024.
"""

from __future__ import annotations

import hashlib
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lora_trainer import contract
from lora_trainer.config import parse_config
from lora_trainer.errors import EXIT_CONFIG, EXIT_PREEMPTED, ConfigError, Preempted
from lora_trainer.signals import StopFlag
from lora_trainer.tasks import REGISTRY, load_family
from lora_trainer.tasks.flux import check_precision, check_resolution, resolution_sigma
from lora_trainer.tiny_flux import T5_MAX_LENGTH as TINY_T5_LENGTH
from lora_trainer.tiny_flux import build_tiny_flux
from lora_trainer.train import Trainer, read_losses
from tests.integration.test_buckets import SHAPES

STEPS = 5


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_flux(tmp_path_factory.mktemp("tiny-flux") / "model")


def flux_config(model: Path, data: Path, out: Path, **extra: object):
    base = {
        "base_model": str(model), "train_data_dir": str(data), "output_dir": str(out), "resolution": 32,
        "lora_rank": 4, "lora_alpha": 2, "batch_size": 2, "max_train_steps": STEPS, "learning_rate": 5e-3,
        "save_steps": 3, "keep_last": 1, "seed": 3, "cache_dir": str(out.parent / "cache"), "log_every": 2,
        "center_crop": False, "random_flip": True, "train_text_encoder": True,
    }
    return parse_config({**base, **extra})


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def trained(tiny_flux: Path, tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("flux") / "out"
    Trainer(flux_config(tiny_flux, tiny_data, out)).run()
    return out


def test_flux_trains_with_the_sd_keys(trained: Path) -> None:
    losses = read_losses((trained / "logs/metrics.jsonl").read_text())
    assert sorted(losses) == list(range(1, STEPS + 1)) and all(math.isfinite(v) for v in losses.values())
    for name in (contract.FINAL_WEIGHTS, contract.FINAL_WEIGHTS_KOHYA, contract.CONFIG_BACKUP, contract.LATEST_FILE,
                 "checkpoints/pytorch_lora_weights_step_3.safetensors"):
        assert (trained / name).is_file(), name
    state = sorted(p.name for p in (trained / "checkpoints" / f"step-{STEPS:09d}").glob("lora_*.safetensors"))
    assert state == ["lora_text_encoder.safetensors", "lora_transformer.safetensors"]


def test_lora_reaches_both_streams_and_clip_only(trained: Path) -> None:
    """target_modules unset: the family's default, both streams' attention in both block kinds."""
    keys = load_file(str(trained / contract.FINAL_WEIGHTS)).keys()
    modules = {re.sub(r"\.lora(_[AB]|\.up|\.down)\.weight$", "", k.removeprefix("transformer."))
               for k in keys if k.startswith("transformer.")}
    double = {m.removeprefix("transformer_blocks.0.attn.") for m in modules if m.startswith("transformer_blocks.")}
    single = {m.removeprefix("single_transformer_blocks.0.attn.") for m in modules if m.startswith("single_")}
    assert double == {"to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"}
    assert single == {"to_q", "to_k", "to_v"}
    assert any(k.startswith("text_encoder.") for k in keys)
    assert not any(k.startswith("text_encoder_2.") for k in keys)  # T5 stays frozen


def test_kohya_keys_use_the_transformer_naming(trained: Path) -> None:
    state = load_file(str(trained / contract.FINAL_WEIGHTS_KOHYA))
    for prefix in ("lora_transformer_transformer_blocks_0_attn_to_q", "lora_transformer_transformer_blocks_0_attn_add_q_proj",
                   "lora_transformer_transformer_blocks_0_attn_to_add_out", "lora_transformer_single_transformer_blocks_0_",
                   "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"):
        assert any(k.startswith(prefix) and k.endswith(".lora_down.weight") for k in state), prefix
    assert not any(k.startswith("lora_unet_") for k in state)
    assert {float(v) for k, v in state.items() if k.endswith(".alpha")} == {2.0}


def render(pipe) -> np.ndarray:
    g = torch.Generator().manual_seed(0)
    return np.asarray(pipe("a red circle on a blue background", num_inference_steps=3, height=32, width=32,
                           generator=g, output_type="np", max_sequence_length=TINY_T5_LENGTH).images[0])


def test_both_exports_load_and_give_the_same_image(trained: Path, tiny_flux: Path) -> None:
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_flux)
    pipe.set_progress_bar_config(disable=True)
    plain = render(pipe)
    pipe.load_lora_weights(str(trained), weight_name=contract.FINAL_WEIGHTS, adapter_name="d")
    with_diffusers = render(pipe)
    pipe.unload_lora_weights()
    np.testing.assert_allclose(render(pipe), plain, atol=1e-6)  # unloading really removed it
    pipe.load_lora_weights(str(trained), weight_name=contract.FINAL_WEIGHTS_KOHYA, adapter_name="k")
    with_kohya = render(pipe)
    assert np.abs(with_diffusers - plain).max() > 1e-3
    np.testing.assert_allclose(with_kohya, with_diffusers, atol=1e-4)


@pytest.mark.parametrize("name", [contract.FINAL_WEIGHTS, contract.FINAL_WEIGHTS_KOHYA])
def test_init_lora_reads_both_exports_back(name: str, trained: Path, tiny_flux: Path, tiny_data: Path,
                                           tmp_path: Path) -> None:
    """init_lora from either file: fresh adapters then hold the trained weights (the diffusers file bit for bit)."""
    config = flux_config(tiny_flux, tiny_data, tmp_path / "out", init_lora=str(trained / name))
    config = config.model_copy(update={"target_modules": REGISTRY["flux"].targets(None, False)})
    family = load_family(REGISTRY["flux"])
    parts = family.load(tiny_flux, config)
    family.add_lora(parts, config)
    family.load_lora(parts, config, trained / name)
    again = family.save_lora(parts, config, tmp_path / "again.safetensors")
    if name == contract.FINAL_WEIGHTS:
        assert sha(again) == sha(trained / name)
        return
    want, got = load_file(str(trained / contract.FINAL_WEIGHTS)), load_file(str(again))
    assert want.keys() == got.keys()
    # diffusers' reader folds the named file's alpha into the down weights, lora-train scales the up
    # weights back for the run's alpha: the same update (up @ down) per module, not the same factors.
    for down in (k for k in want if ".lora_A." in k or ".lora.down." in k):
        up = down.replace(".lora_A.", ".lora_B.").replace(".lora.down.", ".lora.up.")
        torch.testing.assert_close(got[up] @ got[down], want[up] @ want[down], rtol=1e-5, atol=1e-7)


class StopAfter(StopFlag):
    """As if SIGTERM arrived once `steps` optimizer steps were done (the loop asks before each step)."""

    def __init__(self, steps: int) -> None:
        super().__init__()
        self.asked = 0
        self.steps = steps

    @property
    def requested(self) -> bool:
        self.asked += 1
        if self.asked > self.steps:
            self.request()
        return super().requested


def test_stopped_and_resumed_flux_is_bit_exact(trained: Path, tiny_flux: Path, tiny_data: Path,
                                               tmp_path: Path) -> None:
    out = tmp_path / "out"
    config = flux_config(tiny_flux, tiny_data, out)
    with pytest.raises(Preempted) as stopped:
        Trainer(config, stop=StopAfter(2)).run()
    assert stopped.value.exit_code == EXIT_PREEMPTED and stopped.value.step == 2
    result = Trainer(config).run()
    assert result.resumed_from == 2
    for name in (contract.FINAL_WEIGHTS, contract.FINAL_WEIGHTS_KOHYA):
        assert sha(out / name) == sha(trained / name), name


def test_cached_run_stopped_and_resumed_is_bit_exact(tiny_flux: Path, tiny_data: Path, tmp_path: Path) -> None:
    """Latents and T5/CLIP embeddings from the cache (frozen CLIP); resume reads the first attempt's entries."""
    cached = {"train_text_encoder": False, "cache_latents": True, "cache_text_embeddings": True}
    whole = tmp_path / "whole"
    Trainer(flux_config(tiny_flux, tiny_data, whole, **cached)).run()
    out = tmp_path / "out"
    config = flux_config(tiny_flux, tiny_data, out, **cached)
    with pytest.raises(Preempted):
        Trainer(config, stop=StopAfter(3)).run()
    assert Trainer(config).run().resumed_from == 3
    assert sha(out / contract.FINAL_WEIGHTS) == sha(whole / contract.FINAL_WEIGHTS)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Captioned images of several aspect ratios (test_buckets' sizes)."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("flux-shapes")
    for i, (w, h) in enumerate(SHAPES):
        im = Image.new("RGB", (w, h), (i * 30, 200 - i * 20, 90))
        im.paste((250, 250, 250), (w // 4, h // 4, w // 2, h // 2))
        im.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a shape number {i}")
    return folder


def test_bucketed_checkpointed_run_resumes_exactly(shapes: Path, tiny_flux: Path, tmp_path: Path) -> None:
    """Aspect-ratio buckets (non-square packed latents, image ids per bucket) with gradient checkpointing."""
    extra = {"enable_bucket": True, "min_bucket_reso": 16, "max_bucket_reso": 64, "bucket_reso_steps": 16,
             "gradient_checkpointing": True, "train_text_encoder": False, "batch_size": 2}
    whole = tmp_path / "whole" / "out"
    Trainer(flux_config(tiny_flux, shapes, whole, **extra)).run()
    out = tmp_path / "split" / "out"
    config = flux_config(tiny_flux, shapes, out, **extra)
    with pytest.raises(Preempted):
        Trainer(config, stop=StopAfter(2)).run()
    assert Trainer(config).run().resumed_from == 2
    for name in (contract.FINAL_WEIGHTS, contract.FINAL_WEIGHTS_KOHYA):
        assert sha(out / name) == sha(whole / name), name


@pytest.mark.parametrize("extra", [{"weighting_scheme": "logit_normal", "logit_mean": 0.5, "logit_std": 0.8},
                                   {"weighting_scheme": "cosmap", "guidance_scale": 1.0}])
def test_other_weighting_schemes_train_and_resume_exactly(extra: dict, trained: Path, tiny_flux: Path,
                                                          tiny_data: Path, tmp_path: Path) -> None:
    """The diffusers trainer's other schemes (density and loss weights), and another guidance: a different
    run from the default one, still bit-exact across a stop and resume."""
    whole = tmp_path / "whole"
    Trainer(flux_config(tiny_flux, tiny_data, whole, **extra)).run()
    assert sha(whole / contract.FINAL_WEIGHTS) != sha(trained / contract.FINAL_WEIGHTS)
    out = tmp_path / "out"
    config = flux_config(tiny_flux, tiny_data, out, **extra)
    with pytest.raises(Preempted):
        Trainer(config, stop=StopAfter(3)).run()
    assert Trainer(config).run().resumed_from == 3
    assert sha(out / contract.FINAL_WEIGHTS) == sha(whole / contract.FINAL_WEIGHTS)


@pytest.mark.parametrize(("seq_len", "sigma", "expected"), [
    (256, 0.5, math.exp(0.5) / (math.exp(0.5) + 1)),  # base length: mu = base_shift
    (4096, 0.5, math.exp(1.15) / (math.exp(1.15) + 1)),  # max length: mu = max_shift
    (4096, 1.0, 1.0),  # pure noise stays pure noise
])
def test_sigma_shift_for_the_resolution(seq_len: int, sigma: float, expected: float) -> None:
    config = {"use_dynamic_shifting": True, "base_image_seq_len": 256, "max_image_seq_len": 4096,
              "base_shift": 0.5, "max_shift": 1.15}
    assert float(resolution_sigma(torch.tensor([sigma]), seq_len, config)) == pytest.approx(expected)
    static = {**config, "use_dynamic_shifting": False}
    assert float(resolution_sigma(torch.tensor([sigma]), seq_len, static)) == sigma  # already shifted by the scheduler


@pytest.mark.parametrize(("extra", "needle"), [
    ({"resolution": 520}, "resolution: 520 is not a multiple of 16 (Flux packs 2x2 patches of latents 8x smaller"),
    ({"resolution": 1024, "enable_bucket": True, "bucket_reso_steps": 40}, "bucket_reso_steps: 40 is not a multiple of 16"),
    ({"resolution": 512}, None),
    ({"resolution": 1024, "enable_bucket": True, "bucket_reso_steps": 64}, None),
])
def test_unpackable_sizes_are_config_errors(extra: dict, needle: str | None, tmp_path: Path) -> None:
    """FLUX.1's VAE downsamples 8x and latents pack in 2x2 patches: sides must be multiples of 16."""
    config = parse_config({"base_model": "m", "train_data_dir": "d", "output_dir": str(tmp_path), "max_train_steps": 1,
                           **extra})
    if needle is None:
        check_resolution(config, 8)
        return
    with pytest.raises(ConfigError) as info:
        check_resolution(config, 8)
    assert info.value.exit_code == EXIT_CONFIG and needle in info.value.message


@pytest.mark.parametrize(("dtype", "refused"), [(torch.float16, True), (torch.bfloat16, False), (torch.float32, False)])
def test_fp16_is_refused_naming_the_fix(dtype: torch.dtype, refused: bool) -> None:
    """mixed_precision fp16 on a GPU (CPU runs in fp32 whatever is asked) is exit 78 pointing at bf16."""
    if not refused:
        check_precision(dtype)
        return
    with pytest.raises(ConfigError) as info:
        check_precision(dtype)
    assert info.value.exit_code == EXIT_CONFIG and info.value.message.startswith("mixed_precision: 'fp16'")
    assert "use bf16" in info.value.message


def test_unset_resolution_takes_the_flux_default(tiny_flux: Path, tiny_data: Path, tmp_path: Path) -> None:
    config = flux_config(tiny_flux, tiny_data, tmp_path / "out").model_copy(update={"resolution": None})
    trainer = Trainer(config)
    trainer._model_dir(tiny_flux, tmp_path / "cache")
    assert trainer.config.resolution == 1024 and trainer.fields["resolution"] == 1024
