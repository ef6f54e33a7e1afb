"""The task seam: one protocol every model family implements, the registry, and detection.

The loop (train.py), checkpointing, storage, progress and the operator know only `Family` and
`Parts`; each family (tasks/sd.py, tasks/sdxl.py, later flux, causal-lm) owns what differs:

    load(model_dir, config) -> Parts           its components, frozen, on the device
    add_lora(parts, config) -> params          adapters attached; the parameters to optimise
    trainable(parts, config) -> {name: module} modules whose LoRA weights a checkpoint holds
    cacheable(config) -> {"latents", "text"}   model inputs that do not change as training goes
    encode(parts, config, batch, g, cache)     samples -> model inputs (tokenize, encode, extras); what
                                               cacheable allows through the cache when one is given
    loss(parts, config, inputs, g) -> tensor   model inputs -> the training loss
    save_lora(parts, config, path)             the LoRA in its primary (diffusers) format
    export(parts, config, folder)              the final files, as (path, name in the output)
    load_lora(parts, config, path)             optional: init_lora, an existing LoRA file copied into the
                                               adapters add_lora made (ConfigError, exit 78, on a mismatch)
    save_intermediate(parts, config, folder, step)   optional: the LoRA users can try from step N, as
                                               (path, name) pairs; without it, save_lora's file under
                                               checkpoints/ (see `intermediate_files`)

Training data is chosen by modality, not by family: FamilyInfo.data names a source in
lora_trainer.dataset (images: a captioned folder; text: a JSONL), which checks it and serves
the batch stream whose position a checkpoint saves. A family's `encode` takes that stream's batches.

Detection is pure and torch-free (the operator and the config checks may call it): a diffusers
folder's `model_index.json` `_class_name`, or a single file's key layout (single_file.py), picks the
family; `model_family` (default auto) insists on one. An unknown or mismatched pipeline is a
ConfigError (exit 78) naming what was found. Family modules load lazily on first use.
Settings a config leaves unset that depend on the family (`resolution`: 512 for SD, 1024 for SDXL)
come from its FamilyInfo (`with_family_defaults`). A transformers folder (config.json whose
architectures name a causal LM) is the causal-lm family; a family must match the config's `task`.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from lora_trainer import contract
from lora_trainer.architectures import default_targets, is_causal_lm, read_lm_config
from lora_trainer.errors import ConfigError, InputMissing
from lora_trainer.paths import shorten
from lora_trainer.quantize import check_supported

if TYPE_CHECKING:
    import torch

    from lora_trainer.cache import EncodeCache
    from lora_trainer.config import TrainConfig
    from lora_trainer.data import ImageBatch

AUTO = "auto"
MODEL_INDEX = "model_index.json"


class Parts(Protocol):
    """A family's loaded components; the loop reads only where they run."""

    device: torch.device
    weight_dtype: torch.dtype


class Family(Protocol):
    """What one model family implements (see the module docstring)."""

    info: FamilyInfo

    def load(self, model_dir: Path, config: TrainConfig) -> Parts: ...
    def add_lora(self, parts: Any, config: TrainConfig) -> list[torch.nn.Parameter]: ...
    def trainable(self, parts: Any, config: TrainConfig) -> dict[str, torch.nn.Module]: ...
    def cacheable(self, config: TrainConfig) -> frozenset[str]: ...
    def encode(self, parts: Any, config: TrainConfig, batch: ImageBatch, g: torch.Generator,
               cache: EncodeCache | None = None) -> Any: ...
    def loss(self, parts: Any, config: TrainConfig, inputs: Any, g: torch.Generator) -> torch.Tensor: ...
    def save_lora(self, parts: Any, config: TrainConfig, path: Path) -> Path: ...
    def export(self, parts: Any, config: TrainConfig, folder: Path) -> list[tuple[Path, str]]: ...
    def load_lora(self, parts: Any, config: TrainConfig, path: Path) -> None: ...


def unet_targets() -> list[str]:
    """The image families' default target_modules: the UNet's attention projections."""
    from lora_trainer.config import DEFAULT_TARGET_MODULES  # config imports this module (single_file)

    return list(DEFAULT_TARGET_MODULES)


@dataclass(frozen=True)
class FamilyInfo:
    """How a family is recognised, and where its implementation lives."""

    name: str                        # the model_family value
    title: str                       # for messages
    pipelines: tuple[str, ...]       # model_index.json `_class_name` values it trains
    checkpoint_kinds: tuple[str, ...]  # single_file.family_from_keys values it trains
    single_file_pipeline: str        # the diffusers pipeline that converts its single files
    module: str                      # implementation, imported on first use
    default_resolution: int = 512    # `resolution` when the config leaves it unset
    task: str = "text-to-image"      # the config `task` it trains
    data: str = "images"             # its training data's source (lora_trainer.dataset.SOURCES)
    quantizable: bool = False        # its load honours quantize_base (the frozen denoiser in int8/fp8)
    # target_modules when the config leaves them unset: (model_type, lora_target_mlp) -> modules
    targets: Callable[[str | None, bool], list[str]] = field(default=lambda _type, _mlp: unet_targets())


REGISTRY: dict[str, FamilyInfo] = {
    info.name: info
    for info in (
        FamilyInfo("sd", "Stable Diffusion 1.x/2.x", ("StableDiffusionPipeline",), ("sd1", "sd2"),
                   "StableDiffusionPipeline", "lora_trainer.tasks.sd"),
        FamilyInfo("sdxl", "SDXL", ("StableDiffusionXLPipeline",), ("sdxl",),
                   "StableDiffusionXLPipeline", "lora_trainer.tasks.sdxl", default_resolution=1024),
        FamilyInfo("flux", "Flux", ("FluxPipeline",), (), "FluxPipeline", "lora_trainer.tasks.flux",
                   default_resolution=1024, quantizable=True,  # both streams' attention; the feed-forward is opt-in
                   targets=lambda _type, _mlp: ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj",
                                                "add_v_proj", "to_add_out"]),
        FamilyInfo("causal-lm", "causal language model", (), (), "", "lora_trainer.tasks.causal_lm",
                   task="causal-lm", data="text", targets=default_targets),
    )
}

# Recognised but not trainable yet: named in the refusal instead of "unknown".
KNOWN_KINDS = {"sd3": "Stable Diffusion 3"}


def _supported(registry: Mapping[str, FamilyInfo]) -> str:
    return ", ".join(f"{p} ({i.name})" for i in registry.values() for p in i.pipelines)


def _check_override(found: FamilyInfo, override: str, what: str, registry: Mapping[str, FamilyInfo]) -> FamilyInfo:
    if override in (AUTO, found.name):
        return found
    if override not in registry:
        raise ConfigError(f"model_family: {override!r} is not a family; use auto or one of {', '.join(registry)}")
    raise ConfigError(
        f"model_family: {override!r} but base_model {what} ({found.title}); "
        f"set model_family to {found.name} or auto, or point base_model at a {registry[override].title} model"
    )


def family_for_pipeline(
    class_name: str | None, override: str, where: str, registry: Mapping[str, FamilyInfo] = REGISTRY
) -> FamilyInfo:
    """The family of a diffusers folder whose model_index.json names `class_name` (pure)."""
    for info in registry.values():
        if class_name in info.pipelines:
            return _check_override(info, override, f"{shorten(where)} is a {class_name}", registry)
    raise ConfigError(
        f"base_model: {shorten(where)} is a {class_name or 'pipeline with no _class_name'} "
        f"(model_index.json _class_name); lora-train trains {_supported(registry)}; "
        "point base_model at one of those"
    )


def family_for_checkpoint(
    kind: str | None, override: str, uri: str, registry: Mapping[str, FamilyInfo] = REGISTRY
) -> FamilyInfo:
    """The family of a single-file checkpoint whose keys say `kind` (single_file.family_from_keys; pure)."""
    for info in registry.values():
        if kind in info.checkpoint_kinds:
            return _check_override(info, override, f"{shorten(uri)} is a {info.title} checkpoint", registry)
    titles = " and ".join(i.title for i in registry.values() if i.checkpoint_kinds)
    if kind in registry:  # a family that trains from diffusers folders only
        info = registry[kind]
        raise ConfigError(
            f"base_model: {shorten(uri)} is a single-file {info.title} checkpoint; {info.title} trains from a "
            f"diffusers folder only; point base_model at one (saved with {info.pipelines[0]}.save_pretrained())"
        )
    if kind is None:
        raise InputMissing(
            f"base_model: {shorten(uri)} is not a checkpoint of a known family (no model.diffusion_model.* UNet "
            "with a cond_stage_model.* or conditioner.* text encoder); point base_model at a full "
            f"{titles} checkpoint or a diffusers folder"
        )
    raise ConfigError(
        f"base_model: {shorten(uri)} is a {KNOWN_KINDS.get(kind, kind)} checkpoint; that family is not supported yet "
        f"(only {titles}); use a base model of one of those"
    )


def read_pipeline_class(model_dir: Path) -> str | None:
    """`_class_name` from a diffusers folder's model_index.json; InputMissing when it is no diffusers folder."""
    index = model_dir / MODEL_INDEX
    if not index.is_file():
        raise InputMissing(
            f"base_model: {model_dir} is not a diffusers folder ({MODEL_INDEX} expected); "
            "save one with pipeline.save_pretrained()"
        )
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputMissing(f"base_model: {index} does not read as JSON ({shorten(str(exc), 120)})") from None
    name = data.get("_class_name") if isinstance(data, dict) else None
    return name if isinstance(name, str) else None


def family_for_architectures(
    architectures: tuple[str, ...], override: str, where: str, registry: Mapping[str, FamilyInfo] = REGISTRY
) -> FamilyInfo:
    """The family of a transformers folder whose config.json names `architectures` (pure)."""
    found = next((i for i in registry.values() if i.task == "causal-lm"), None)
    if found is None or not is_causal_lm(architectures):
        shown = ", ".join(architectures) or "no architectures"
        raise ConfigError(
            f"base_model: {shorten(where)} is a transformers model ({shown} in config.json), not a causal LM "
            "(…ForCausalLM); point base_model at a causal language model or a diffusers folder"
        )
    return _check_override(found, override, f"{shorten(where)} is a {architectures[0]}", registry)


def check_task(info: FamilyInfo, task: str, where: str) -> FamilyInfo:
    """`info` when it trains `task`; else a ConfigError naming both and the fix (pure)."""
    if info.task == task:
        return info
    raise ConfigError(
        f"task: {task!r} but base_model {shorten(where)} is a {info.title} ({info.task}); "
        f"set task: {info.task}, or point base_model at a model for {task}"
    )


def detect(model_dir: Path, override: str = AUTO, task: str | None = None) -> FamilyInfo:
    """The family of a local diffusers folder (model_index.json) or transformers causal-LM folder
    (config.json), checked against `override` and, when given, the config's `task`."""
    if not (model_dir / MODEL_INDEX).is_file() and (lm := read_lm_config(model_dir)) is not None:
        info = family_for_architectures(lm.architectures, override, str(model_dir))
    else:
        info = family_for_pipeline(read_pipeline_class(model_dir), override, str(model_dir))
    return check_task(info, task, str(model_dir)) if task else info


def with_family_defaults(config: TrainConfig, info: FamilyInfo, model_type: str | None = None) -> TrainConfig:
    """The config with the settings it leaves to the family filled in (pure): `resolution`, and
    `target_modules` (per architecture: `model_type` from a transformers config.json).

    The run hashes, checks and backs up this config, so they record the values used."""
    check_supported(config.quantize_base, info.quantizable, info.title)
    update: dict[str, Any] = {}
    if config.resolution is None:
        update["resolution"] = info.default_resolution
    if config.target_modules is None:
        update["target_modules"] = info.targets(model_type, config.lora_target_mlp)
    return config.model_copy(update=update) if update else config


def intermediate_files(family: Family, parts: Any, config: TrainConfig, folder: Path, step: int
                       ) -> list[tuple[Path, str]]:
    """The LoRA users can try from `step`, as (local path, name in the output): the family's
    `save_intermediate` when it has one, else its `save_lora` file at the contract's name."""
    own = getattr(family, "save_intermediate", None)
    if own is not None:
        return own(parts, config, folder, step)
    name = contract.intermediate_weights_name(step)
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    family.save_lora(parts, config, path)
    return [(path, name)]


def load_family(info: FamilyInfo) -> Family:
    """The family's implementation (its module's `FAMILY`)."""
    return importlib.import_module(info.module).FAMILY
