"""init_lora: start training from an existing LoRA file instead of a fresh adapter.

The file is read as safetensors only (no pickle), in either format users have:
- diffusers/peft (`pytorch_lora_weights.safetensors`: `unet.…`, `text_encoder.…`, `text_encoder_2.…`
  keys; alpha from its `lora_adapter_metadata`, else alpha = rank, as diffusers loads it);
- kohya/WebUI (`lora_unet_…`, `lora_te_…` / `lora_te1_…` / `lora_te2_…`, with a per-module
  `.alpha`; no `.alpha` means alpha = rank, as sd-scripts reads it). SDXL files named after the
  original UNet blocks (`input_blocks_…`) are mapped with the UNet's config by diffusers.

diffusers' own converters (the family's pipeline class `lora_state_dict`) turn either into
per-component diffusers keys, then into peft keys; the weights are copied into the run's adapters,
which were just created with the config's rank, alpha and targets. Choices where the issue is silent:
- The file must cover exactly the run's LoRA: the same components (a text-encoder LoRA in the file
  needs train_text_encoder, and the other way round), the same modules and the config's rank;
  anything else is a ConfigError (exit 78) naming both sides and the setting to change.
- A different alpha is not a mismatch: each module's up weights are scaled by file alpha / config
  alpha, so the run starts from exactly the function the file describes (with equal alphas the
  weights are copied bit for bit).
- The file's sha256 joins the training fields, so a resume refuses a changed init file (train.py).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers.utils import (
    convert_state_dict_to_diffusers,
    convert_state_dict_to_peft,
    convert_unet_state_dict_to_peft,
)
from safetensors import SafetensorError, safe_open

from lora_trainer.errors import ConfigError, InputMissing
from lora_trainer.model import LORA_ADAPTER
from lora_trainer.paths import shorten

log = logging.getLogger(__name__)

KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
METADATA_KEY = "lora_adapter_metadata"  # diffusers' save_lora_weights writes the peft configs here
SHOWN = 3  # module names shown in a mismatch message

# The config field that chooses each component's LoRA modules, for messages.
TARGET_FIELDS = {"unet": "target_modules", "transformer": "target_modules"}
TEXT_ENCODER_TARGET_FIELD = "text_encoder_target_modules"


def is_kohya(keys: list[str]) -> bool:
    """Whether a LoRA file's keys are in kohya/WebUI naming (pure)."""
    return bool(keys) and all(k.startswith(KOHYA_PREFIXES) for k in keys)


def read_lora_file(path: Path, shown: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors LoRA file; InputMissing when it is none."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputMissing(
            f"init_lora: {shown} does not read as safetensors ({shorten(str(exc), 120)}); "
            "point init_lora at a .safetensors LoRA (diffusers or kohya format)"
        ) from None
    if not tensors:
        raise ConfigError(f"init_lora: {shown} holds no tensors; point init_lora at a LoRA file")
    return tensors, metadata


def kohya_alpha_to(tensors: Mapping[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """kohya tensors with each module's `.alpha` folded into its up weights for the run's `alpha`
    (up * file alpha / run alpha; a module without `.alpha` has alpha = its rank); no `.alpha` keys left."""
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if key.endswith(".alpha"):
            continue
        if key.endswith(".lora_up.weight"):
            module = key.removesuffix(".lora_up.weight")
            down = tensors.get(f"{module}.lora_down.weight")
            rank = down.shape[0] if down is not None else value.shape[1]
            file_alpha = float(tensors[f"{module}.alpha"]) if f"{module}.alpha" in tensors else float(rank)
            if file_alpha != alpha:
                value = value.float() * (file_alpha / alpha)
        out[key] = value
    return out


def metadata_alpha(metadata: Mapping[str, str], component: str, rank: int, shown: str) -> float:
    """A diffusers file's alpha for one component (its peft config in the metadata), else its rank."""
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return float(rank)
    try:
        data = json.loads(raw)
    except ValueError:
        raise ConfigError(f"init_lora: {shown} has unreadable {METADATA_KEY}; re-export the LoRA") from None
    if data.get(f"{component}.alpha_pattern") or data.get(f"{component}.rank_pattern"):
        raise ConfigError(
            f"init_lora: {shown} sets per-module alpha or rank patterns for {component}, which lora-train "
            "does not read; export it in kohya format (per-module .alpha) or with one alpha and rank"
        )
    alpha = data.get(f"{component}.lora_alpha")
    return float(alpha) if alpha is not None else float(rank)


def module_ranks(state: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """{module path: rank} of a peft state dict (`<module>.lora_A.weight` keys; pure)."""
    return {k.removesuffix(".lora_A.weight"): int(v.shape[0]) for k, v in state.items() if k.endswith(".lora_A.weight")}


def _names(modules: set[str] | list[str]) -> str:
    items = sorted(modules)
    more = f" and {len(items) - SHOWN} more" if len(items) > SHOWN else ""
    return ", ".join(items[:SHOWN]) + more


def _suffixes(modules: set[str]) -> list[str]:
    """The module names target_modules would list for these paths (`to_q`, `to_out.0`)."""
    out = set()
    for m in modules:
        parts = m.split(".")
        out.add(".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1])
    return sorted(out)


def mismatch(
    file_ranks: Mapping[str, Mapping[str, int]], run_modules: Mapping[str, set[str]], rank: int, shown: str
) -> str | None:
    """Why a LoRA file cannot initialise the run's adapters, or None (pure).

    `file_ranks` is {component: {module: rank}} read from the file; `run_modules` is {component:
    modules with LoRA} of the run (components without LoRA absent)."""
    for component in sorted(set(file_ranks) - set(run_modules)):
        return (f"init_lora: {shown} has LoRA weights for {component} ({len(file_ranks[component])} modules) "
                f"but this run trains no {component} LoRA; set train_text_encoder: true, or start from a "
                f"LoRA without {component} weights")
    for component in sorted(set(run_modules) - set(file_ranks)):
        return (f"init_lora: {shown} has no LoRA weights for {component} but this run trains one; "
                f"set train_text_encoder: false, or start from a LoRA that has {component} weights")
    for component in sorted(run_modules):
        ranks, ours = file_ranks[component], run_modules[component]
        field = TARGET_FIELDS.get(component, TEXT_ENCODER_TARGET_FIELD)
        extra, missing = set(ranks) - ours, ours - set(ranks)
        if extra or missing:
            parts = []
            if extra:
                parts.append(f"LoRA on {len(extra)} {component} modules this run has none on ({_names(extra)})")
            if missing:
                parts.append(f"none on {len(missing)} it has ({_names(missing)})")
            return (f"init_lora: {shown} has {' and '.join(parts)}; the file's {component} modules are "
                    f"{_suffixes(set(ranks))}, {field} gives {_suffixes(ours)}; set {field} to match the file")
        for module in sorted(ranks):
            if ranks[module] != rank:
                return (f"init_lora: {shown} has rank {ranks[module]} ({component} {module}), lora_rank is {rank}; "
                        f"set lora_rank: {ranks[module]}, or start from a rank-{rank} LoRA")
    return None


def _match_key(key: str, ours: Mapping[str, Any]) -> str:
    """The run's spelling of a file key: transformers 5 dropped CLIPTextModel's `text_model.` level
    (CLIPTextModelWithProjection keeps it), and files carry either."""
    for candidate in (key, f"text_model.{key}", key.removeprefix("text_model.")):
        if candidate in ours:
            return candidate
    return key


def to_peft(component: str, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One component's diffusers-named LoRA weights as peft keys (`<module>.lora_A.weight`)."""
    if component in TARGET_FIELDS:
        return convert_unet_state_dict_to_peft(dict(state))
    return convert_state_dict_to_peft(convert_state_dict_to_diffusers(dict(state)))


def load_init_lora(
    path: Path, pipeline_cls: Any, modules: Mapping[str, torch.nn.Module | None], rank: int, alpha: float,
    shown: str, **convert: Any,
) -> None:
    """Copy the LoRA in `path` into the run's adapters on `modules` ({component: module, or None when
    the run trains no LoRA on it}); `pipeline_cls.lora_state_dict` converts the family's formats."""
    tensors, metadata = read_lora_file(path, shown)
    kohya = is_kohya(list(tensors))
    if kohya:
        tensors = kohya_alpha_to(tensors, alpha)
    try:
        converted = pipeline_cls.lora_state_dict(tensors, **convert)[0]
    except (ValueError, KeyError, RuntimeError, IndexError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(
            f"init_lora: {shown} is not a LoRA in diffusers or kohya format ({shorten(first, 160)}); "
            "point init_lora at a pytorch_lora_weights(_kohya).safetensors file"
        ) from None
    run = {c: m for c, m in modules.items() if m is not None}
    ours = {c: {k.removesuffix(f".{LORA_ADAPTER}.weight") + ".weight": p
                for k, p in m.named_parameters() if p.requires_grad} for c, m in run.items()}
    states: dict[str, dict[str, torch.Tensor]] = {}
    for key in converted:
        component, sep, _ = key.partition(".")
        if not sep or component not in modules:
            raise ConfigError(
                f"init_lora: {shown} has weights for {shorten(component, 60)!r} ({shorten(key, 120)}), which this "
                f"model family does not have ({', '.join(modules)}); use a LoRA trained for this base model"
            )
    for component in {k.partition(".")[0] for k in converted}:
        prefix = component + "."
        peft = to_peft(component, {k[len(prefix):]: v for k, v in converted.items() if k.startswith(prefix)})
        target = ours.get(component, {})
        states[component] = {_match_key(k, target): v for k, v in peft.items()}
    file_ranks = {c: module_ranks(s) for c, s in states.items()}
    run_modules = {c: set(module_ranks({k: p for k, p in params.items()})) for c, params in ours.items()}
    if problem := mismatch(file_ranks, run_modules, rank, shown):
        raise ConfigError(problem)
    with torch.no_grad():
        for component, state in states.items():
            scale = 1.0 if kohya else metadata_alpha(metadata, component, rank, shown) / alpha
            for key, value in state.items():
                param = ours[component][key]
                if param.shape != value.shape:
                    raise ConfigError(
                        f"init_lora: {shown} has {component} {key} of shape {tuple(value.shape)}, the run's is "
                        f"{tuple(param.shape)}; use a LoRA trained for this base model"
                    )
                value = value.to(param.device, torch.float32)
                if scale != 1.0 and re.search(r"\.lora_B\.weight$", key):
                    value = value * scale
                param.copy_(value)
    log.info("init_lora: %s (%s format) loaded into %s", shown, "kohya" if kohya else "diffusers", ", ".join(states))
