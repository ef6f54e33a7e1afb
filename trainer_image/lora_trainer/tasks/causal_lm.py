"""Causal language models (transformers AutoModelForCausalLM): peft LoRA on the attention (and MLP)
projections, loss on the labelled tokens of textdata's batches.

Loading reads safetensors only. On CUDA the frozen base runs in the mixed_precision dtype with the
LoRA weights in fp32 under autocast, as the image families do; `load_in_4bit` loads the base in
bitsandbytes NF4 (QLoRA) and needs CUDA and bitsandbytes (exit 78 naming the fix otherwise).
The model is in train mode while gradients are on (LoRA dropout) and in eval mode for eval loss.

Exports (the output root): `adapter_config.json` + `adapter_model.safetensors`, the PEFT layout that
`PeftModel.from_pretrained(base, out)` and vLLM's LoRA support read (`base_model_name_or_path` is
the config's base_model as written); intermediate adapters in the same layout under
`checkpoints/adapter_step_<N>/`; with `merge: true`, the base with the LoRA merged in, saved
with save_pretrained (safetensors) and the tokenizer under `merged/`.
"""

from __future__ import annotations

import contextlib
import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from lora_trainer import contract
from lora_trainer.architectures import CONFIG_JSON
from lora_trainer.config import TrainConfig
from lora_trainer.errors import ConfigError, InputMissing
from lora_trainer.export import canonicalize_safetensors
from lora_trainer.model import (
    LORA_ADAPTER,
    load_failed,
    lora_config,
    pick_device,
    trainable_params,
    weight_dtype_for,
)
from lora_trainer.tasks import REGISTRY
from lora_trainer.textdata import TextBatch, load_tokenizer

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MERGED_DIR = "merged"


def intermediate_adapter_dir(step: int) -> str:
    """Where the adapter users can try from step N lives, relative to the output root."""
    return f"{contract.CHECKPOINTS_DIR}/adapter_step_{step}"


@dataclass
class Components:
    """The LoRA-wrapped model (after add_lora) and where it runs."""

    model: Any  # PreTrainedModel, then PeftModel
    model_dir: Path
    device: torch.device
    weight_dtype: torch.dtype


def quantization(config: TrainConfig, device: torch.device, dtype: torch.dtype,
                 import_module=importlib.import_module) -> Any:
    """The BitsAndBytesConfig for load_in_4bit (NF4, double quantization), or None; ConfigError when the
    device is no GPU or bitsandbytes does not import."""
    if not config.load_in_4bit:
        return None
    if device.type != "cuda":
        raise ConfigError("load_in_4bit: 4-bit QLoRA needs a CUDA GPU and none is in use; "
                          "run on a GPU node or set load_in_4bit: false")
    try:
        import_module("bitsandbytes")
    except Exception as exc:  # ImportError, or its RuntimeError when CUDA does not suit it
        raise ConfigError(f"load_in_4bit: needs the bitsandbytes package, which does not import here "
                          f"({type(exc).__name__}); pip install bitsandbytes, or set load_in_4bit: false") from None
    from transformers import BitsAndBytesConfig

    compute = dtype if dtype != torch.float32 else torch.bfloat16
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute)


def load_model(model_dir: Path, config: TrainConfig) -> Components:
    """The frozen causal LM from a transformers folder (safetensors only), on the device."""
    from transformers import AutoModelForCausalLM

    if not (model_dir / CONFIG_JSON).is_file():
        raise InputMissing(f"base_model: {model_dir} is not a transformers model folder ({CONFIG_JSON} expected); "
                           "save one with model.save_pretrained()")
    device = pick_device(config.device)
    dtype = weight_dtype_for(config.mixed_precision, device)
    quant = quantization(config, device, dtype)
    extra: dict[str, Any] = {"quantization_config": quant, "device_map": {"": device.index or 0}} if quant else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True, dtype=dtype,
                                                     local_files_only=True, **extra)
    except (OSError, ValueError) as exc:
        raise load_failed(model_dir, exc) from None
    model.requires_grad_(False)
    if quant is None:
        model.to(device)
    return Components(model, model_dir, device, dtype)


def autocast_for(device: torch.device, dtype: torch.dtype):
    """Autocast in the frozen weights' precision, or nothing in fp32."""
    return torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()


def adapter_config_json(parts: Components, config: TrainConfig) -> bytes:
    """adapter_config.json as peft writes it, with sorted keys and base_model_name_or_path = base_model."""
    data = parts.model.peft_config[LORA_ADAPTER].to_dict()
    data = {k: sorted(v) if isinstance(v, set) else v for k, v in data.items()}
    data["base_model_name_or_path"] = config.base_model
    return (json.dumps(data, indent=2, sort_keys=True, default=str) + "\n").encode()


def save_adapter(parts: Components, config: TrainConfig, folder: Path) -> list[Path]:
    """adapter_model.safetensors (peft's key layout, fp32) and adapter_config.json into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(parts.model, adapter_name=LORA_ADAPTER)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    weights = folder / ADAPTER_WEIGHTS
    save_file(state, str(weights), metadata={"format": "pt"})
    canonicalize_safetensors(weights)
    (folder / ADAPTER_CONFIG).write_bytes(adapter_config_json(parts, config))
    return [folder / ADAPTER_CONFIG, weights]


class CausalLM:
    """The causal-LM family."""

    info = REGISTRY["causal-lm"]

    def load(self, model_dir: Path, config: TrainConfig) -> Components:
        return load_model(model_dir, config)

    def add_lora(self, parts: Components, config: TrainConfig) -> list[torch.nn.Parameter]:
        """peft LoRA on target_modules (resolved per architecture); fp32 trainable weights."""
        if config.load_in_4bit:
            from peft import prepare_model_for_kbit_training

            parts.model = prepare_model_for_kbit_training(parts.model, config.gradient_checkpointing)
        elif config.gradient_checkpointing:
            parts.model.gradient_checkpointing_enable()
            parts.model.enable_input_require_grads()
        lora = lora_config(config, config.target_modules or [])
        lora.task_type = "CAUSAL_LM"
        try:
            parts.model = get_peft_model(parts.model, lora, adapter_name=LORA_ADAPTER)
        except ValueError as exc:
            raise ConfigError(
                f"target_modules: {config.target_modules} match no module of this model ({str(exc)[:160]}); "
                "name its attention projections, e.g. q_proj, k_proj, v_proj, o_proj"
            ) from None
        return trainable_params([parts.model])

    def trainable(self, parts: Components, config: TrainConfig) -> dict[str, torch.nn.Module]:
        return {"model": parts.model}

    def cacheable(self, config: TrainConfig) -> frozenset[str]:
        """Nothing: the tokens are the inputs (tokenized once before training)."""
        return frozenset()

    def encode(self, parts: Components, config: TrainConfig, batch: TextBatch, g: torch.Generator,
               cache: Any = None) -> TextBatch:
        """The batch on the device (tokenized already by textdata)."""
        return TextBatch(batch.input_ids.to(parts.device), batch.attention_mask.to(parts.device),
                         batch.labels.to(parts.device), batch.num_tokens)

    def loss(self, parts: Components, config: TrainConfig, inputs: TextBatch, g: torch.Generator) -> torch.Tensor:
        """Mean next-token cross-entropy over the labelled tokens (transformers' shifted loss)."""
        training = torch.is_grad_enabled()  # LoRA dropout while training, none for eval loss
        if parts.model.training != training:  # a walk over every module: only when the mode changes
            parts.model.train(training)
        with autocast_for(parts.device, parts.weight_dtype):
            out = parts.model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, labels=inputs.labels)
        return out.loss.float()

    def save_lora(self, parts: Components, config: TrainConfig, path: Path) -> Path:
        """The adapter weights at `path` (peft layout); the folder's adapter_config.json beside it."""
        files = save_adapter(parts, config, path.parent)
        if files[1] != path:
            files[1].replace(path)
        return path

    def save_intermediate(self, parts: Components, config: TrainConfig, folder: Path, step: int
                          ) -> list[tuple[Path, str]]:
        """A loadable PEFT adapter folder under checkpoints/adapter_step_<N>/."""
        name = intermediate_adapter_dir(step)
        return [(path, f"{name}/{path.name}") for path in save_adapter(parts, config, folder / name)]

    def export(self, parts: Components, config: TrainConfig, folder: Path) -> list[tuple[Path, str]]:
        """The PEFT adapter at the root; with merge, the merged model and tokenizer under merged/."""
        out = [(path, path.name) for path in save_adapter(parts, config, folder)]
        if config.merge:
            merged_dir = folder / MERGED_DIR
            merged = merged_model(parts)
            merged.save_pretrained(merged_dir, safe_serialization=True)
            load_tokenizer(parts.model_dir).save_pretrained(merged_dir)
            out += [(p, f"{MERGED_DIR}/{p.relative_to(merged_dir).as_posix()}")
                    for p in sorted(merged_dir.rglob("*")) if p.is_file()]
        return out


def merged_model(parts: Components) -> Any:
    """The base with the LoRA folded into its weights (the trained model itself, unwrapped: called last)."""
    model: PeftModel = parts.model
    return model.merge_and_unload()


FAMILY = CausalLM()
