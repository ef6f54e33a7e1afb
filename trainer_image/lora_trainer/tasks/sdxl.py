"""SDXL: UNet with added conditioning, VAE, two CLIP text encoders (as diffusers' train_text_to_image_lora_sdxl.py).

Samples -> model inputs: both encoders' penultimate hidden states concatenated, the second
encoder's pooled (projected) embedding, and `add_time_ids` per sample = original size (h, w),
crop top-left (top, left) and target size, from the real image sizes and crops (data.ImageBatch).
LoRA on the UNet, and on both text encoders with train_text_encoder.

Crop top-left of a flipped image: the corner of the crop in the resized image the model sees, i.e.
mirrored: a crop at `left` in a resized image `W` wide reports `W - left - crop_width` once flipped
(data.load_image_cropped, buckets.load_image_bucket). diffusers' train_text_to_image_lora_sdxl.py
flips the resized image before it crops, so its `x1` is the same number. Not followed: diffusers'
train_lcm_distill_lora_sdxl.py sets `x1 = image.width - x1` after cropping, where `image.width` is
already the crop's width, so the result is no corner of the resized image.

Exports: `pytorch_lora_weights.safetensors` (StableDiffusionXLPipeline.load_lora_weights) and
`pytorch_lora_weights_kohya.safetensors` (`lora_unet_*`, `lora_te1_text_model_*`,
`lora_te2_text_model_*`, with alpha) as A1111/Forge/ComfyUI read SDXL LoRAs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from lora_trainer import contract
from lora_trainer.cache import EncodeCache, content_key, module_key
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
from lora_trainer.tasks.sd import autocast_for, cached_latents, denoising_loss, vae_latents

SUBFOLDERS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


@dataclass
class Components:
    """The parts of an SDXL pipeline that training touches."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    text_encoder_2: CLIPTextModelWithProjection
    tokenizer: CLIPTokenizer
    tokenizer_2: CLIPTokenizer
    scheduler: DDPMScheduler
    device: torch.device
    weight_dtype: torch.dtype


@dataclass
class Inputs:
    """One micro-batch as the SDXL UNet takes it."""

    latents: torch.Tensor
    hidden: torch.Tensor  # (B, 77, dim1 + dim2)
    pooled: torch.Tensor  # (B, projection_dim)
    time_ids: torch.Tensor  # (B, 6)


def time_ids(
    original_sizes: list[tuple[int, int]], crops: list[tuple[int, int]], target: tuple[int, int]
) -> torch.Tensor:
    """SDXL's micro-conditioning per sample: (orig h, orig w, crop top, crop left, target h, target w)."""
    rows = [[*size, *crop, *target] for size, crop in zip(original_sizes, crops, strict=True)]
    return torch.tensor(rows, dtype=torch.float32)


def load_components(model_dir: Path, config: TrainConfig) -> Components:
    """Load the UNet, VAE, both text encoders and tokenizers, and the noise scheduler."""
    missing = [sub for sub in SUBFOLDERS if not (model_dir / sub).is_dir()]
    if missing:
        raise InputMissing(
            f"base_model: {model_dir} is an SDXL folder without {', '.join(missing)}/; "
            "save the whole pipeline with StableDiffusionXLPipeline.save_pretrained()"
        )
    device = pick_device(config.device)
    dtype = weight_dtype_for(config.mixed_precision, device)
    try:
        unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", use_safetensors=True)
        vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae", use_safetensors=True)
        te1 = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder", use_safetensors=True)
        te2 = CLIPTextModelWithProjection.from_pretrained(model_dir, subfolder="text_encoder_2", use_safetensors=True)
        tok1 = CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer")
        tok2 = CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer_2")
        scheduler = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")
    except (OSError, ValueError) as exc:
        raise load_failed(model_dir, exc) from None
    freeze([unet, te1, te2], device, dtype)
    # SDXL's VAE overflows in fp16 (diffusers' example keeps it in fp32 too); bf16 is fine.
    freeze([vae], device, torch.float32 if dtype == torch.float16 else dtype)
    for module in (vae, te1, te2):
        module.eval()
    return Components(unet, vae, te1, te2, tok1, tok2, scheduler, device, dtype)


def encode_prompts(parts: Components, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Both encoders' penultimate hidden states, concatenated, and the second encoder's pooled embedding."""
    hidden, pooled = [], None
    for tokenizer, encoder in ((parts.tokenizer, parts.text_encoder), (parts.tokenizer_2, parts.text_encoder_2)):
        ids = tokenizer(
            captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
            return_tensors="pt",
        ).input_ids.to(parts.device)
        out = encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out.text_embeds if isinstance(encoder, CLIPTextModelWithProjection) else out.pooler_output
    return torch.cat(hidden, dim=-1), pooled


class StableDiffusionXL:
    """The SDXL family."""

    info = REGISTRY["sdxl"]

    def load(self, model_dir: Path, config: TrainConfig) -> Components:
        return load_components(model_dir, config)

    def add_lora(self, parts: Components, config: TrainConfig) -> list[torch.nn.Parameter]:
        """LoRA on the UNet (and both text encoders when train_text_encoder); fp32 trainable weights."""
        add_denoiser_lora(parts.unet, config)
        modules: list[torch.nn.Module] = [parts.unet]
        if config.train_text_encoder:
            for encoder in (parts.text_encoder, parts.text_encoder_2):
                add_text_encoder_lora(encoder, config)
                modules.append(encoder)
        params = trainable_params(modules)
        if config.gradient_checkpointing:
            parts.unet.enable_gradient_checkpointing()
            if config.train_text_encoder:
                checkpoint_text_encoder(parts.text_encoder)
                checkpoint_text_encoder(parts.text_encoder_2)
        return params

    def trainable(self, parts: Components, config: TrainConfig) -> dict[str, torch.nn.Module]:
        out: dict[str, torch.nn.Module] = {"unet": parts.unet}
        if config.train_text_encoder:
            out.update(text_encoder=parts.text_encoder, text_encoder_2=parts.text_encoder_2)
        return out

    def cacheable(self, config: TrainConfig) -> frozenset[str]:
        """Latents always; text embeddings (hidden + pooled) while both text encoders are frozen."""
        return frozenset({"latents"} if config.train_text_encoder else {"latents", "text"})

    def encode(self, parts: Components, config: TrainConfig, batch: ImageBatch, g: torch.Generator,
               cache: EncodeCache | None = None) -> Inputs:
        if cache is not None and "latents" in cache.kinds:
            latents = cached_latents(cache, parts.vae, batch.pixels, g, parts.device, parts.vae.dtype)
        else:
            latents = vae_latents(parts.vae, batch.pixels, g, parts.device, parts.vae.dtype)
        latents = latents.to(parts.weight_dtype)
        if cache is not None and "text" in cache.kinds:
            hidden, pooled = self._cached_text(parts, batch.captions, cache)
        else:
            with autocast_for(parts.device, parts.weight_dtype):
                if config.train_text_encoder:
                    hidden, pooled = encode_prompts(parts, batch.captions)
                else:
                    with torch.no_grad():
                        hidden, pooled = encode_prompts(parts, batch.captions)
        target = (batch.pixels.shape[-2], batch.pixels.shape[-1])  # the crop: a square, or the bucket
        ids = time_ids(batch.original_sizes, batch.crops, target).to(parts.device, parts.weight_dtype)
        return Inputs(latents, hidden, pooled, ids)

    def _cached_text(self, parts: Components, captions: list[str], cache: EncodeCache
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states and pooled embeddings per caption, keyed by the caption and both encoders' weights."""
        encoders = (module_key(parts.text_encoder), module_key(parts.text_encoder_2))

        def compute(caption: str) -> dict[str, torch.Tensor]:
            with torch.no_grad(), autocast_for(parts.device, parts.weight_dtype):
                hidden, pooled = encode_prompts(parts, [caption])
            return {"hidden": hidden, "pooled": pooled}

        rows = [cache.get("text", content_key("text", *encoders, c), lambda c=c: compute(c)) for c in captions]
        return (torch.cat([r["hidden"] for r in rows]).to(parts.device),
                torch.cat([r["pooled"] for r in rows]).to(parts.device))

    def loss(self, parts: Components, config: TrainConfig, inputs: Inputs, g: torch.Generator) -> torch.Tensor:
        autocast = autocast_for(parts.device, parts.weight_dtype)
        added = {"text_embeds": inputs.pooled, "time_ids": inputs.time_ids}
        return denoising_loss(
            parts.unet, parts.scheduler, config, inputs.latents, g, autocast,
            encoder_hidden_states=inputs.hidden, added_cond_kwargs=added,
        )

    def _encoders(self, parts: Components, config: TrainConfig) -> tuple[torch.nn.Module | None, torch.nn.Module | None]:
        return (parts.text_encoder, parts.text_encoder_2) if config.train_text_encoder else (None, None)

    def save_lora(self, parts: Components, config: TrainConfig, path: Path) -> Path:
        """The diffusers-format file (StableDiffusionXLPipeline.load_lora_weights)."""
        te1, te2 = self._encoders(parts, config)

        def layers(module):
            return convert_state_dict_to_diffusers(peft_state(module)) if module is not None else None

        StableDiffusionXLPipeline.save_lora_weights(
            save_directory=str(path.parent),
            unet_lora_layers=layers(parts.unet),
            text_encoder_lora_layers=layers(te1),
            text_encoder_2_lora_layers=layers(te2),
            weight_name=path.name,
            safe_serialization=True,
            unet_lora_adapter_metadata=adapter_metadata(parts.unet),
            text_encoder_lora_adapter_metadata=adapter_metadata(te1) if te1 is not None else None,
            text_encoder_2_lora_adapter_metadata=adapter_metadata(te2) if te2 is not None else None,
        )
        return canonicalize_safetensors(path)

    def load_lora(self, parts: Components, config: TrainConfig, path: Path) -> None:
        """init_lora: a diffusers or kohya (lora_unet_, lora_te1_, lora_te2_) SDXL LoRA into the run's adapters;
        kohya files named after the original UNet blocks are mapped with this UNet's config."""
        te1, te2 = self._encoders(parts, config)
        load_init_lora(path, StableDiffusionXLPipeline,
                       {"unet": parts.unet, "text_encoder": te1, "text_encoder_2": te2},
                       config.lora_rank, config.alpha, shorten(config.init_lora or str(path)),
                       unet_config=parts.unet.config)

    def export(self, parts: Components, config: TrainConfig, folder: Path) -> list[tuple[Path, str]]:
        """Final files: diffusers and kohya/WebUI formats."""
        diffusers_file = self.save_lora(parts, config, folder / contract.FINAL_WEIGHTS)
        te1, te2 = self._encoders(parts, config)
        kohya = save_kohya_file(
            folder / contract.FINAL_WEIGHTS_KOHYA, kohya_state_dict(parts.unet, te1, te2, config.alpha), config.alpha
        )
        return [(diffusers_file, contract.FINAL_WEIGHTS), (kohya, contract.FINAL_WEIGHTS_KOHYA)]


def kohya_state_dict(
    unet: torch.nn.Module, te1: torch.nn.Module | None, te2: torch.nn.Module | None, alpha: float
) -> dict[str, torch.Tensor]:
    """The kohya/WebUI key layout for SDXL (lora_unet_, lora_te1_, lora_te2_), the run's alpha on every module."""
    peft = {f"unet.{k}": v for k, v in peft_state(unet).items()}
    for prefix, module in (("text_encoder", te1), ("text_encoder_2", te2)):
        if module is not None:
            peft.update({f"{prefix}.{k}": v for k, v in peft_state(module).items()})
    out: dict[str, torch.Tensor] = {}
    for key, value in kohya_keys(peft, alpha).items():
        for te in ("lora_te1_", "lora_te2_"):
            if key.startswith(te + "encoder_"):
                # transformers 5 dropped CLIPTextModel's `text_model.` level; WebUI keys still carry it.
                key = te + "text_model_" + key.removeprefix(te)
        out[key] = value
    return out


FAMILY = StableDiffusionXL()
