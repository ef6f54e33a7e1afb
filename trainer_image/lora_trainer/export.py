"""Family-agnostic LoRA writers: peft state, byte-stable safetensors, kohya/WebUI key layout.

Each family (tasks/) picks its formats and key prefixes: the diffusers file carries the peft
LoraConfig as metadata so a non-default alpha survives; kohya files use `lora_unet_*` /
`lora_te*_*` keys with a per-module `.alpha`, the layout AUTOMATIC1111/ComfyUI expect.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers.utils import convert_state_dict_to_kohya
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


def peft_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    state = get_peft_model_state_dict(module, adapter_name=LORA_ADAPTER)
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}


def adapter_metadata(module: torch.nn.Module) -> dict:
    config = module.peft_config[LORA_ADAPTER].to_dict()
    # Sets are not JSON; sorted lists keep the file bytes identical from run to run.
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}


def kohya_keys(peft: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """peft state (keys prefixed `unet.`, `text_encoder.`, `text_encoder_2.`) in kohya naming, with
    the run's alpha on every module (diffusers writes alpha = rank)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in convert_state_dict_to_kohya(peft).items():
        out[key] = torch.tensor(alpha, dtype=torch.float32) if key.endswith(".alpha") else value.contiguous()
    return out


def save_kohya_file(path: Path, state: dict[str, torch.Tensor], alpha: float) -> Path:
    """Write a kohya/WebUI LoRA file with sd-scripts' metadata."""
    metadata = {"ss_network_module": "networks.lora", "ss_network_alpha": str(alpha), "format": "pt"}
    save_file(state, str(path), metadata=metadata)
    return canonicalize_safetensors(path)
