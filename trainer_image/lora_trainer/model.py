"""Family-agnostic model helpers: device and precision, and attaching peft LoRA adapters.

The families (tasks/) load their components and call these; only safetensors weights are
loaded anywhere (`use_safetensors=True`): a pickled checkpoint is refused.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model

from lora_trainer.config import TrainConfig
from lora_trainer.errors import ConfigError, InputMissing

LORA_ADAPTER = "default"


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


def load_failed(model_dir: Path, exc: Exception) -> InputMissing:
    """The one-line error for a component that does not load."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return InputMissing(f"base_model: cannot load {model_dir}: {first}")


def freeze(modules: list[torch.nn.Module], device: torch.device, dtype: torch.dtype) -> None:
    """No gradients, on the device in the frozen-weight precision (train/eval mode left to the family)."""
    for module in modules:
        module.requires_grad_(False)
        module.to(device, dtype=dtype)


def lora_config(config: TrainConfig, targets: list[str]) -> LoraConfig:
    """The peft config of one adapter (gaussian init, the run's rank, alpha and dropout)."""
    return LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.alpha,
        lora_dropout=config.lora_dropout,
        init_lora_weights="gaussian",
        target_modules=list(targets),
    )


def add_denoiser_lora(denoiser: torch.nn.Module, config: TrainConfig, what: str = "UNet") -> None:
    """LoRA on a diffusers model (UNet or transformer) through its own `add_adapter`."""
    try:
        denoiser.add_adapter(lora_config(config, config.target_modules), adapter_name=LORA_ADAPTER)
    except ValueError as exc:
        raise ConfigError(
            f"target_modules: {config.target_modules} match no {what} module ({exc}); "
            "use attention projections such as to_q, to_k, to_v, to_out.0"
        ) from None


def add_text_encoder_lora(encoder: torch.nn.Module, config: TrainConfig) -> None:
    """LoRA on a transformers text encoder (peft directly: transformers' add_adapter gates on a newer peft)."""
    te_cfg = lora_config(config, config.text_encoder_target_modules)
    try:
        inject_adapter_in_model(te_cfg, encoder, adapter_name=LORA_ADAPTER)
        encoder.peft_config = {LORA_ADAPTER: te_cfg}
    except ValueError as exc:
        raise ConfigError(
            f"text_encoder_target_modules: {config.text_encoder_target_modules} match no module ({exc})"
        ) from None


def checkpoint_text_encoder(encoder: torch.nn.Module) -> None:
    """Gradient checkpointing on a trained transformers text encoder. Non-reentrant: the frozen embeddings
    feed the layers no input that needs grad, and reentrant checkpointing would then drop the LoRA grads
    inside. Train mode: transformers checkpoints a layer only while `training` (CLIP's dropout is 0, so
    the math is unchanged; the diffusers example trains its text encoder in train mode too)."""
    encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    encoder.train()


def trainable_params(modules: list[torch.nn.Module]) -> list[torch.nn.Parameter]:
    """The trainable (LoRA) parameters, made fp32 even when the frozen base runs in half precision."""
    params: list[torch.nn.Parameter] = []
    for module in modules:
        for p in module.parameters():
            if p.requires_grad:
                p.data = p.data.float()
                params.append(p)
    return params


def trainable_named(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters by name, for state snapshots."""
    return {n: p for n, p in module.named_parameters() if p.requires_grad}
