"""quantize_base: the frozen base weights of a family's denoiser in int8 or fp8, through torchao.

The maintained path diffusers offers (TorchAoConfig at from_pretrained, weight-only: activations and
the LoRA weights stay in the run's dtype, and peft puts its LoRA layers on torchao's quantized
Linear). torchao is not a dependency of the trainer image: asked for and absent, the run stops with
exit 78 naming the key, the package and the fix, before any model is read. Resume is not guaranteed
bit-exact with int8/fp8: quantized CUDA kernels need not be deterministic (README, Flux section).
A quantized run has not been run in this project (no torchao, no GPU here); only the refusals are tested.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any, Literal

from lora_trainer.errors import ConfigError

QuantizeBase = Literal["none", "int8", "fp8"]

# mode -> torchao quantization type, as diffusers' TorchAoConfig names it (weight-only).
TORCHAO_TYPES: dict[str, str] = {"int8": "int8wo", "fp8": "float8wo"}
PACKAGE = "torchao"


def quant_type(mode: str) -> str | None:
    """The TorchAoConfig quant_type for a quantize_base mode; None for `none` (pure)."""
    if mode == "none":
        return None
    if mode not in TORCHAO_TYPES:
        raise ConfigError(f"quantize_base: {mode!r} is not a mode; use one of none, {', '.join(TORCHAO_TYPES)}")
    return TORCHAO_TYPES[mode]


def check_supported(mode: str, supported: bool, title: str) -> None:
    """Refuse a quantize_base mode for a family that does not quantize its base (exit 78)."""
    if mode != "none" and not supported:
        raise ConfigError(f"quantize_base: {mode!r} is not supported for {title} base models "
                          f"(only for diffusion-transformer families); set quantize_base: none")


def require_backend(mode: str) -> None:
    """Import torchao when a mode needs it; absent, a one-line ConfigError (exit 78) naming the fix."""
    if quant_type(mode) is None:
        return
    try:
        import_module(PACKAGE)
    except ImportError as exc:
        raise ConfigError(
            f"quantize_base: {mode!r} needs the {PACKAGE} package, which does not import here "
            f"({type(exc).__name__}); pip install {PACKAGE} in the trainer's environment (a CUDA GPU; fp8 needs "
            f"compute capability 8.9+), or set quantize_base: none") from None


def quantization_config(mode: str) -> Any | None:
    """diffusers' TorchAoConfig for from_pretrained of the frozen denoiser; None for `none`."""
    qtype = quant_type(mode)
    if qtype is None:
        return None
    require_backend(mode)
    from diffusers import TorchAoConfig

    return TorchAoConfig(qtype)
