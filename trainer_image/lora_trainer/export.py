"""Export trained LoRA weights: diffusers format and kohya/WebUI format.

The diffusers file loads with `StableDiffusionPipeline.load_lora_weights`; it carries the peft
LoraConfig as metadata so a non-default alpha survives. The kohya file uses `lora_unet_*` and, for
SD 1.x, `lora_te_*` keys with a per-module `.alpha`, the layout AUTOMATIC1111/ComfyUI expect.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from lora_trainer.model import LORA_ADAPTER


def canonicalize_safetensors(path: Path) -> Path:
    """Rewrite the header with sorted `__metadata__` keys, in place.

    safetensors writes metadata from a hash map whose order changes from process to process, so two
    identical trainings would otherwise produce files with different sha256 sums.
    """
    with path.open("r+b") as fh:
        size = int.from_bytes(fh.read(8), "little")
        raw = fh.read(size)
        header = json.loads(raw, object_pairs_hook=dict)
        if "__metadata__" in header:
            header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
            header = {"__metadata__": header.pop("__metadata__"), **header}
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > size:
            raise ValueError(f"{path}: canonical header is longer than the original")
        fh.seek(8)
        fh.write(text + b" " * (size - len(text)))  # safetensors pads headers with spaces
    return path


def _peft_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = get_peft_model_state_dict(module, adapter_name=LORA_ADAPTER)
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}


def _adapter_metadata(module: torch.nn.Module) -> dict:
    config = module.peft_config[LORA_ADAPTER].to_dict()
    # Sets are not JSON; sorted lists keep the file bytes identical from run to run.
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}


def save_diffusers_lora(path: Path, unet: torch.nn.Module, text_encoder: torch.nn.Module | None) -> Path:
    """Write the LoRA in diffusers format (one safetensors file at `path`)."""
    te_layers = te_meta = None
    if text_encoder is not None:
        te_layers = convert_state_dict_to_diffusers(_peft_state(text_encoder))
        te_meta = _adapter_metadata(text_encoder)
    StableDiffusionPipeline.save_lora_weights(
        save_directory=str(path.parent),
        unet_lora_layers=convert_state_dict_to_diffusers(_peft_state(unet)),
        text_encoder_lora_layers=te_layers,
        weight_name=path.name,
        safe_serialization=True,
        unet_lora_adapter_metadata=_adapter_metadata(unet),
        text_encoder_lora_adapter_metadata=te_meta,
    )
    return canonicalize_safetensors(path)


def kohya_state_dict(
    unet: torch.nn.Module, text_encoder: torch.nn.Module | None, alpha: float
) -> dict[str, torch.Tensor]:
    """The kohya/WebUI key layout for SD 1.x, with the run's alpha on every module."""
    peft = {f"unet.{k}": v for k, v in _peft_state(unet).items()}
    if text_encoder is not None:
        peft.update({f"text_encoder.{k}": v for k, v in _peft_state(text_encoder).items()})
    converted = convert_state_dict_to_kohya(peft)
    out: dict[str, torch.Tensor] = {}
    for key, value in converted.items():
        # SD 1.x WebUI loaders expect lora_te_ for the single text encoder; lora_te1_ is SDXL's.
        key = key.replace("lora_te1_", "lora_te_", 1)
        if key.startswith("lora_te_encoder_"):
            # transformers 5 dropped CLIPTextModel's `text_model.` level; WebUI keys still carry it.
            key = "lora_te_text_model_" + key.removeprefix("lora_te_")
        # diffusers writes alpha = rank; the run may use another alpha, so write the real one.
        out[key] = torch.tensor(alpha, dtype=torch.float32) if key.endswith(".alpha") else value.contiguous()
    return out


def save_kohya_lora(
    path: Path, unet: torch.nn.Module, text_encoder: torch.nn.Module | None, alpha: float
) -> Path:
    """Write the LoRA in kohya/WebUI format."""
    metadata = {"ss_network_module": "networks.lora", "ss_network_alpha": str(alpha), "format": "pt"}
    save_file(kohya_state_dict(unet, text_encoder, alpha), str(path), metadata=metadata)
    return canonicalize_safetensors(path)
