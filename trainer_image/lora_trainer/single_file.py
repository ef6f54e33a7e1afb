"""Single-file base models: one `.safetensors` checkpoint (A1111/ComfyUI/Civitai style) as base_model.

Decisions (pure, no torch): which URIs name a single file, which name a pickle checkpoint
(refused: unpickling runs code from the file, so the trainer never does it), and which kind of
model a checkpoint's keys belong to (sd1, sd2, sdxl, sd3, flux). Which kinds train is the task
registry's decision (tasks.family_for_checkpoint): SD3 is refused by name, Flux files point at a diffusers folder.

I/O: the file's sha256, and its conversion into a diffusers folder through the family's diffusers
pipeline (`StableDiffusionPipeline` / `StableDiffusionXLPipeline.from_single_file`), with the configs from `base_model_config` (a
diffusers folder) or else what diffusers resolves (offline: its Hugging Face cache). The folder
is kept in the cache under the file's sha256 (and the configs' digest), so an attempt after a
preemption on the same node loads it like any diffusers base model instead of converting again.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import struct
import time
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlparse

from lora_trainer.errors import ConfigError, InputMissing
from lora_trainer.paths import shorten
from lora_trainer.tasks import AUTO, FamilyInfo, family_for_checkpoint

log = logging.getLogger(__name__)

SINGLE_FILE_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
CONVERTED_MARKER = "converted.json"
CONVERTED_DIR = "single-file"
CONFIG_SUFFIXES = (".json", ".txt", ".model")  # what from_single_file reads from a config folder

CONVERT_HINT = (
    "python -c \"import torch,safetensors.torch as s;d=torch.load('{name}','cpu',weights_only=True);"
    "s.save_file({{k:v.contiguous() for k,v in d.get('state_dict',d).items() if torch.is_tensor(v)}},"
    "'{stem}.safetensors')\""
)


def _path_part(uri: str) -> str:
    return urlparse(uri).path if "://" in uri else uri


def is_single_file(uri: str) -> bool:
    """Whether a base_model URI names one `.safetensors` file rather than a diffusers folder."""
    path = _path_part(uri)
    return not path.endswith("/") and path.lower().endswith(SINGLE_FILE_SUFFIX)


def pickle_message(uri: str) -> str:
    """Why a pickle checkpoint is refused, and the one-liner that converts it (under 400 characters)."""
    name = shorten(Path(_path_part(uri).rstrip("/")).name or "model.ckpt", 60)
    hint = CONVERT_HINT.format(name=name, stem=Path(name).stem)
    return (
        "is a pickle checkpoint: loading it runs any code inside, so lora-train never does; "
        f"convert it once where you trust it: {hint}; use the result"
    )


def pickle_problem(uri: str) -> str | None:
    """A refusal (for a `base_model: <uri>` prefix) when `uri` names a pickle checkpoint, else None."""
    path = _path_part(uri).rstrip("/")
    if path.lower().endswith(PICKLE_SUFFIXES):
        return pickle_message(uri)
    return None


def family_from_keys(keys: Iterable[str]) -> str | None:
    """The model family of an original-layout checkpoint, from its tensor names; None if unknown.

    SD 1.x: an LDM UNet (`model.diffusion_model.`) with a CLIP text encoder
    (`cond_stage_model.transformer.`); SD 2.x: the same UNet with OpenCLIP
    (`cond_stage_model.model.`); SDXL: `conditioner.embedders.`; SD3: `joint_blocks.`;
    Flux: `double_blocks.` (with or without the `model.diffusion_model.` prefix)."""
    names = list(keys)

    def has(fragment: str, start: bool = True) -> bool:
        return any(k.startswith(fragment) if start else fragment in k for k in names)

    if has("conditioner.embedders."):
        return "sdxl"
    if has("double_blocks.", start=False) and has("single_blocks.", start=False):
        return "flux"
    if has("joint_blocks.", start=False):
        return "sd3"
    if has("model.diffusion_model.input_blocks."):
        if has("cond_stage_model.model."):
            return "sd2"
        if has("cond_stage_model.transformer."):
            return "sd1"
    return None


def sniff(path: Path) -> str:
    """"safetensors", "pickle" (a torch zip or raw pickle) or "unknown", from the first bytes."""
    try:
        with path.open("rb") as fh:
            head = fh.read(9)
    except OSError:
        return "unknown"
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        return "pickle"
    if len(head) == 9 and head[8:9] == b"{" and 0 < struct.unpack("<Q", head[:8])[0] < 100 * 1024 * 1024:
        return "safetensors"
    return "unknown"


def sha256_file(path: Path, chunk: int = 8 * 1024 * 1024) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def config_digest(config_dir: Path | None) -> str:
    """sha256 over the config files (json/txt) of a diffusers folder; "" for none."""
    if config_dir is None:
        return ""
    digest = hashlib.sha256()
    for path in sorted(p for p in config_dir.rglob("*") if p.is_file() and p.suffix in CONFIG_SUFFIXES):
        digest.update(path.relative_to(config_dir).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def checkpoint_keys(path: Path, uri: str) -> list[str]:
    """Tensor names in a safetensors file, read from its header without loading any tensor."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return list(fh.keys())
    except Exception as exc:  # safetensors raises its own error types for a damaged header
        raise InputMissing(
            f"base_model: {shorten(uri)} does not read as a safetensors file ({shorten(str(exc), 120)}); "
            "check the file is complete"
        ) from None


def check_file(path: Path, uri: str) -> None:
    """Refuse a local base_model file that is not safetensors (a pickle under another name: 78)."""
    kind = sniff(path)
    if kind == "pickle":
        raise ConfigError(f"base_model: {shorten(uri)} {pickle_message(uri)}")
    if kind != "safetensors":
        raise InputMissing(
            f"base_model: {shorten(uri)} is neither a diffusers folder nor a .safetensors checkpoint; "
            "point base_model at one of those"
        )


def _convert(path: Path, uri: str, config_dir: Path | None, dest: Path, pipeline: str) -> None:
    import diffusers
    import torch

    kwargs = {"config": str(config_dir)} if config_dir is not None else {}
    if pipeline == "StableDiffusionPipeline":
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    try:
        pipe = getattr(diffusers, pipeline).from_single_file(
            str(path), torch_dtype=torch.float32, local_files_only=config_dir is not None, **kwargs,
        )
    except Exception as exc:  # diffusers and the hub raise many types; each means "cannot convert"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if config_dir is None:
            raise InputMissing(
                f"base_model: {shorten(uri)} is a single-file checkpoint and diffusers could not find its "
                f"configs offline ({shorten(first, 160)}); set base_model_config to a diffusers folder of the "
                "same model (local or s3://; model_index.json, unet/, vae/, text_encoder/, tokenizer/, "
                "scheduler/ configs, weights not needed)"
            ) from None
        raise InputMissing(
            f"base_model: cannot convert {shorten(uri)} with base_model_config {shorten(str(config_dir))} "
            f"({shorten(first, 160)}); check that base_model_config is a diffusers folder of the same model"
        ) from None
    pipe.save_pretrained(dest, safe_serialization=True)


def convert_single_file(
    path: Path, uri: str, config_dir: Path | None, cache: Path, model_family: str = AUTO
) -> tuple[Path, str, FamilyInfo]:
    """A diffusers folder for the checkpoint at `path`, the file's sha256, and its family.

    Converted once per (file sha256, configs) into `cache/single-file/<key>/`; a later call
    (another attempt on this node) finds the folder and its marker and reuses it. Checks the
    family first, through the task registry: a family that does not train (or is not
    `model_family`) is refused before any tensor is loaded."""
    check_file(path, uri)
    info = family_for_checkpoint(family_from_keys(checkpoint_keys(path, uri)), model_family, uri)
    started = time.monotonic()
    sha = sha256_file(path)
    key = sha[:32] + (f"-{config_digest(config_dir)[:12]}" if config_dir is not None else "")
    root = cache / CONVERTED_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / key
    with open(root / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two trainers on one node convert one at a time
        if (final / CONVERTED_MARKER).is_file():
            log.info("reusing converted base model %s (sha256 %s) at %s", uri, sha[:12], final)
            return final, sha, info
        shutil.rmtree(final, ignore_errors=True)
        tmp = root / f"{key}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        log.info("converting single-file base model %s (sha256 %s) to diffusers", uri, sha[:12])
        try:
            _convert(path, uri, config_dir, tmp, info.single_file_pipeline)
            marker = {"sha256": sha, "source": uri, "config": str(config_dir) if config_dir else None}
            (tmp / CONVERTED_MARKER).write_text(json.dumps(marker, sort_keys=True))
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted %s in %.1fs into %s", uri, time.monotonic() - started, final)
    return final, sha, info
