"""Transformers causal-LM folders: what their config.json says, and LoRA targets per architecture.

Torch-free (detection and the config checks call it). Default targets are the attention
projections, as peft's and TRL's LoRA recipes use; `lora_target_mlp` adds the MLP projections.
An architecture missing from the table gets the Llama names; if they match nothing, the run stops
(exit 78) asking for `target_modules`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lora_trainer.errors import InputMissing
from lora_trainer.paths import shorten

CONFIG_JSON = "config.json"

_LLAMA = (("q_proj", "k_proj", "v_proj", "o_proj"), ("gate_proj", "up_proj", "down_proj"))
# model_type -> (attention projections, MLP projections)
TARGETS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    **{t: _LLAMA for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo",
                           "olmo2", "granite", "smollm3", "cohere", "starcoder2_llama")},
    "phi3": (("qkv_proj", "o_proj"), ("gate_up_proj", "down_proj")),
    "phi": (("q_proj", "k_proj", "v_proj", "dense"), ("fc1", "fc2")),
    "gpt2": (("attn.c_attn", "attn.c_proj"), ("mlp.c_fc", "mlp.c_proj")),
    "gpt_neox": (("query_key_value", "attention.dense"), ("dense_h_to_4h", "dense_4h_to_h")),
    "falcon": (("query_key_value", "self_attention.dense"), ("dense_h_to_4h", "dense_4h_to_h")),
    "opt": (("q_proj", "k_proj", "v_proj", "out_proj"), ("fc1", "fc2")),
    "starcoder2": (("q_proj", "k_proj", "v_proj", "o_proj"), ("c_fc", "c_proj")),
}


@dataclass(frozen=True)
class LmConfig:
    """The parts of a transformers config.json that training decides on."""

    model_type: str | None
    architectures: tuple[str, ...]


def default_targets(model_type: str | None, mlp: bool) -> list[str]:
    """LoRA target modules for an architecture (pure): attention, plus MLP when `mlp`."""
    attention, feed_forward = TARGETS.get(model_type or "", _LLAMA)
    return [*attention, *(feed_forward if mlp else ())]


def read_lm_config(model_dir: Path) -> LmConfig | None:
    """model_type and architectures from a transformers folder's config.json; None when there is none."""
    path = model_dir / CONFIG_JSON
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputMissing(f"base_model: {path} does not read as JSON ({shorten(str(exc), 120)})") from None
    if not isinstance(data, dict):
        raise InputMissing(f"base_model: {path} is not a JSON object; save the model with save_pretrained()")
    archs = data.get("architectures") or ()
    model_type = data.get("model_type")
    return LmConfig(model_type if isinstance(model_type, str) else None,
                    tuple(a for a in archs if isinstance(a, str)) if isinstance(archs, list) else ())


def is_causal_lm(architectures: tuple[str, ...]) -> bool:
    """Whether a config's architectures name a causal LM head (…ForCausalLM, GPT-2's …LMHeadModel)."""
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
