"""Stable Diffusion 1.x/2.x: UNet + VAE + one CLIP text encoder, epsilon or v-prediction.

Moved here from model.py, steps.py and export.py without changing one byte of what it computes:
every random draw of a micro-step comes from the generator the loop seeds per (seed, step, micro),
in the same order as before (VAE sample, noise, offset, timesteps), and LoRA dropout from the
global generator the loop seeds with it.

Exports: `pytorch_lora_weights.safetensors` (StableDiffusionPipeline.load_lora_weights) and
`pytorch_lora_weights_kohya.safetensors` (`lora_unet_*`, `lora_te_text_model_*`, with alpha).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.utils import convert_state_dict_to_diffusers
from transformers import CLIPTextModel, CLIPTokenizer

from lora_trainer import contract
from lora_trainer.cache import EncodeCache, content_key, module_key, tensor_bytes
from lora_trainer.config import TrainConfig
from lora_trainer.data import ImageBatch
from lora_trainer.errors import InputMissing
from lora_trainer.export import (
    adapter_metadata,
    canonicalize_safetensors,
    kohya_keys,
    peft_state,
    save_kohya_file,
)
from lora_trainer.initlora import load_init_lora
from lora_trainer.model import (
    add_denoiser_lora,
    add_text_encoder_lora,
    checkpoint_text_encoder,
    freeze,
    load_failed,
    pick_device,
    trainable_params,
    weight_dtype_for,
)
from lora_trainer.paths import shorten
from lora_trainer.tasks import REGISTRY


@dataclass
class Components:
    """The parts of a Stable Diffusion pipeline that training touches."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDPMScheduler
    device: torch.device
    weight_dtype: torch.dtype


@dataclass
class Inputs:
    """One micro-batch as the UNet takes it."""

    latents: torch.Tensor
    hidden: torch.Tensor


def load_components(model_dir: Path, config: TrainConfig) -> Components:
    """Load UNet, VAE, text encoder, tokenizer and noise scheduler from a diffusers folder."""
    if not (model_dir / "model_index.json").is_file() or not (model_dir / "unet").is_dir():
        raise InputMissing(
            f"base_model: {model_dir} is not a diffusers Stable Diffusion folder "
            "(model_index.json and unet/ expected); save one with pipeline.save_pretrained()"
        )
    device = pick_device(config.device)
    dtype = weight_dtype_for(config.mixed_precision, device)
    try:
        unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", use_safetensors=True)
        vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae", use_safetensors=True)
        text_encoder = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder", use_safetensors=True)
        tokenizer = CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer")
        scheduler = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")
    except (OSError, ValueError) as exc:
        raise load_failed(model_dir, exc) from None
    freeze([unet, vae, text_encoder], device, dtype)
    vae.eval()
    text_encoder.eval()
    return Components(unet, vae, text_encoder, tokenizer, scheduler, device, dtype)


def autocast_for(device: torch.device, dtype: torch.dtype):
    """Autocast in the frozen weights' precision, or nothing in fp32."""
    return torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()


def vae_latents(vae: AutoencoderKL, pixels: torch.Tensor, g: torch.Generator, device, dtype) -> torch.Tensor:
    """Scaled latents, sampled from the VAE's posterior with `g`."""
    with torch.no_grad():
        latents = vae.encode(pixels.to(device, dtype)).latent_dist.sample(generator=g)
        return latents * vae.config.scaling_factor


def cached_latents(
    cache: EncodeCache, vae: AutoencoderKL, pixels: torch.Tensor, g: torch.Generator, device, dtype
) -> torch.Tensor:
    """`vae_latents` through the cache: each image's posterior (keyed by its exact pixels and the VAE)
    encoded alone or read back, then sampled with `g` as the uncached path samples it."""
    vae_id = module_key(vae)
    moments = []
    for i in range(pixels.shape[0]):
        px = pixels[i:i + 1]

        def compute(px: torch.Tensor = px) -> dict[str, torch.Tensor]:
            with torch.no_grad():
                return {"moments": vae.encode(px.to(device, dtype)).latent_dist.parameters}

        moments.append(cache.get("latents", content_key("latents", vae_id, tensor_bytes(px)), compute)["moments"])
    with torch.no_grad():
        dist = DiagonalGaussianDistribution(torch.cat(moments).to(device, dtype))
        return dist.sample(generator=g) * vae.config.scaling_factor


def denoising_loss(
    unet: torch.nn.Module, scheduler: DDPMScheduler, config: TrainConfig, latents: torch.Tensor,
    g: torch.Generator, autocast, **conditioning,
) -> torch.Tensor:
    """Noise (and offset), timesteps, the UNet's prediction and the MSE against its target."""
    device = latents.device
    noise = torch.randn(latents.shape, generator=g, device=device, dtype=latents.dtype)
    if config.noise_offset:
        offset = torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=g, device=device)
        noise = noise + config.noise_offset * offset.to(latents.dtype)
    n_timesteps = scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, n_timesteps, (latents.shape[0],), generator=g, device=device).long()
    noisy = scheduler.add_noise(latents, noise, timesteps)
    with autocast:
        pred = unet(noisy, timesteps, return_dict=False, **conditioning)[0]
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    return F.mse_loss(pred.float(), target.float(), reduction="mean")


def encode_prompts(parts: Components, captions: list[str]) -> torch.Tensor:
    """CLIP hidden states for the captions (max-length padded, truncated)."""
    ids = parts.tokenizer(
        captions,
        padding="max_length",
        max_length=parts.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(parts.device)
    return parts.text_encoder(ids, return_dict=False)[0]


class StableDiffusion:
    """The SD 1.x/2.x family."""

    info = REGISTRY["sd"]

    def load(self, model_dir: Path, config: TrainConfig) -> Components:
        return load_components(model_dir, config)

    def add_lora(self, parts: Components, config: TrainConfig) -> list[torch.nn.Parameter]:
        """LoRA on the UNet (and the text encoder when train_text_encoder); fp32 trainable weights."""
        add_denoiser_lora(parts.unet, config)
        modules: list[torch.nn.Module] = [parts.unet]
        if config.train_text_encoder:
            add_text_encoder_lora(parts.text_encoder, config)
            modules.append(parts.text_encoder)
        params = trainable_params(modules)
        if config.gradient_checkpointing:
            parts.unet.enable_gradient_checkpointing()
            if config.train_text_encoder:
                checkpoint_text_encoder(parts.text_encoder)
        return params

    def trainable(self, parts: Components, config: TrainConfig) -> dict[str, torch.nn.Module]:
        out: dict[str, torch.nn.Module] = {"unet": parts.unet}
        if config.train_text_encoder:
            out["text_encoder"] = parts.text_encoder
        return out

    def cacheable(self, config: TrainConfig) -> frozenset[str]:
        """Latents (the VAE's posterior) always; text embeddings while the text encoder is frozen."""
        return frozenset({"latents"} if config.train_text_encoder else {"latents", "text"})

    def encode(self, parts: Components, config: TrainConfig, batch: ImageBatch, g: torch.Generator,
               cache: EncodeCache | None = None) -> Inputs:
        if cache is not None and "latents" in cache.kinds:
            latents = cached_latents(cache, parts.vae, batch.pixels, g, parts.device, parts.weight_dtype)
        else:
            latents = vae_latents(parts.vae, batch.pixels, g, parts.device, parts.weight_dtype)
        if cache is not None and "text" in cache.kinds:
            te_id = module_key(parts.text_encoder)

            def compute(caption: str) -> dict[str, torch.Tensor]:
                with torch.no_grad(), autocast_for(parts.device, parts.weight_dtype):
                    return {"hidden": encode_prompts(parts, [caption])}

            rows = [cache.get("text", content_key("text", te_id, c), lambda c=c: compute(c))["hidden"]
                    for c in batch.captions]
            return Inputs(latents, torch.cat(rows).to(parts.device))
        with autocast_for(parts.device, parts.weight_dtype):
            if config.train_text_encoder:
                hidden = encode_prompts(parts, batch.captions)
            else:
                with torch.no_grad():
                    hidden = encode_prompts(parts, batch.captions)
        return Inputs(latents, hidden)

    def loss(self, parts: Components, config: TrainConfig, inputs: Inputs, g: torch.Generator) -> torch.Tensor:
        autocast = autocast_for(parts.device, parts.weight_dtype)
        return denoising_loss(
            parts.unet, parts.scheduler, config, inputs.latents, g, autocast, encoder_hidden_states=inputs.hidden
        )

    def save_lora(self, parts: Components, config: TrainConfig, path: Path) -> Path:
        """The diffusers-format file (StableDiffusionPipeline.load_lora_weights)."""
        te = parts.text_encoder if config.train_text_encoder else None
        StableDiffusionPipeline.save_lora_weights(
            save_directory=str(path.parent),
            unet_lora_layers=convert_state_dict_to_diffusers(peft_state(parts.unet)),
            text_encoder_lora_layers=convert_state_dict_to_diffusers(peft_state(te)) if te is not None else None,
            weight_name=path.name,
            safe_serialization=True,
            unet_lora_adapter_metadata=adapter_metadata(parts.unet),
            text_encoder_lora_adapter_metadata=adapter_metadata(te) if te is not None else None,
        )
        return canonicalize_safetensors(path)

    def load_lora(self, parts: Components, config: TrainConfig, path: Path) -> None:
        """init_lora: a diffusers or kohya (lora_unet_, lora_te_) SD LoRA into the run's adapters."""
        te = parts.text_encoder if config.train_text_encoder else None
        load_init_lora(path, StableDiffusionPipeline, {"unet": parts.unet, "text_encoder": te},
                       config.lora_rank, config.alpha, shorten(config.init_lora or str(path)))

    def export(self, parts: Components, config: TrainConfig, folder: Path) -> list[tuple[Path, str]]:
        """Final files: diffusers and kohya/WebUI formats."""
        diffusers_file = self.save_lora(parts, config, folder / contract.FINAL_WEIGHTS)
        te = parts.text_encoder if config.train_text_encoder else None
        kohya = save_kohya_file(folder / contract.FINAL_WEIGHTS_KOHYA, kohya_state_dict(parts.unet, te, config.alpha),
                                config.alpha)
        return [(diffusers_file, contract.FINAL_WEIGHTS), (kohya, contract.FINAL_WEIGHTS_KOHYA)]


def kohya_state_dict(
    unet: torch.nn.Module, text_encoder: torch.nn.Module | None, alpha: float
) -> dict[str, torch.Tensor]:
    """The kohya/WebUI key layout for SD 1.x, with the run's alpha on every module."""
    peft = {f"unet.{k}": v for k, v in peft_state(unet).items()}
    if text_encoder is not None:
        peft.update({f"text_encoder.{k}": v for k, v in peft_state(text_encoder).items()})
    out: dict[str, torch.Tensor] = {}
    for key, value in kohya_keys(peft, alpha).items():
        # SD 1.x WebUI loaders expect lora_te_ for the single text encoder; lora_te1_ is SDXL's.
        key = key.replace("lora_te1_", "lora_te_", 1)
        if key.startswith("lora_te_encoder_"):
            # transformers 5 dropped CLIPTextModel's `text_model.` level; WebUI keys still carry it.
            key = "lora_te_text_model_" + key.removeprefix("lora_te_")
        out[key] = value
    return out


FAMILY = StableDiffusion()
