"""Load a diffusers Stable Diffusion folder and attach peft LoRA adapters.

Only safetensors weights are loaded (`use_safetensors=True`): a pickled checkpoint is refused.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from peft import LoraConfig, inject_adapter_in_model
from transformers import CLIPTextModel, CLIPTokenizer

from lora_trainer.config import TrainConfig
from lora_trainer.errors import ConfigError, InputMissing

log = logging.getLogger(__name__)

LORA_ADAPTER = "default"


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


def pick_device(requested: str) -> torch.device:
    """CUDA when asked for or available under `auto`; CPU otherwise."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' requested but no CUDA device is visible; use 'auto' or 'cpu'")
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def weight_dtype_for(mixed_precision: str, device: torch.device) -> torch.dtype:
    """Frozen weights run in bf16/fp16 on CUDA; CPU always trains in fp32."""
    if device.type != "cuda" or mixed_precision == "no":
        return torch.float32
    return torch.bfloat16 if mixed_precision == "bf16" else torch.float16


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
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputMissing(f"base_model: cannot load {model_dir}: {first}") from None
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
        module.to(device, dtype=dtype)
    vae.eval()
    text_encoder.eval()
    return Components(unet, vae, text_encoder, tokenizer, scheduler, device, dtype)


def add_lora(parts: Components, config: TrainConfig) -> list[torch.nn.Parameter]:
    """Attach LoRA adapters (fp32 trainable weights) and return the parameters to optimise."""
    unet_cfg = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.alpha,
        lora_dropout=config.lora_dropout,
        init_lora_weights="gaussian",
        target_modules=list(config.target_modules),
    )
    try:
        parts.unet.add_adapter(unet_cfg, adapter_name=LORA_ADAPTER)
    except ValueError as exc:
        raise ConfigError(
            f"target_modules: {config.target_modules} match no UNet module ({exc}); "
            "use attention projections such as to_q, to_k, to_v, to_out.0"
        ) from None
    modules = [parts.unet]
    if config.train_text_encoder:
        te_cfg = LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.alpha,
            lora_dropout=config.lora_dropout,
            init_lora_weights="gaussian",
            target_modules=list(config.text_encoder_target_modules),
        )
        try:
            # peft directly: transformers' add_adapter gates on a newer peft than we can rely on.
            inject_adapter_in_model(te_cfg, parts.text_encoder, adapter_name=LORA_ADAPTER)
            parts.text_encoder.peft_config = {LORA_ADAPTER: te_cfg}
        except ValueError as exc:
            raise ConfigError(
                f"text_encoder_target_modules: {config.text_encoder_target_modules} match no module ({exc})"
            ) from None
        modules.append(parts.text_encoder)
    params: list[torch.nn.Parameter] = []
    for module in modules:
        for p in module.parameters():
            if p.requires_grad:
                # Trainable LoRA weights stay fp32 even when the frozen base runs in half precision.
                p.data = p.data.float()
                params.append(p)
    if config.gradient_checkpointing:
        parts.unet.enable_gradient_checkpointing()
        if config.train_text_encoder:
            parts.text_encoder.gradient_checkpointing_enable()
    return params


def trainable_named(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters by name, for state snapshots."""
    return {n: p for n, p in module.named_parameters() if p.requires_grad}
