"""Resumable training state, written as safetensors + JSON (no pickle) into one folder.

The folder is what `checkpoint.commit` uploads under `checkpoints/step-<9 digits>/`:

    lora_<module>.safetensors                                 trainable LoRA weights, by parameter name, one
                                                              file per module the family trains (lora_unet,
                                                              lora_text_encoder, lora_text_encoder_2, ...)
    optimizer.safetensors + optimizer.json                    AdamW moments and param groups
    scheduler.json, scaler.json                               LR scheduler and grad-scaler state
    rng.safetensors + rng.json                                torch CPU/CUDA, Python and NumPy RNG states
    rng-rank<r>.safetensors + .json                           the same for rank r of several processes
    trainer_state.json                                        step, data position, attempt, config hash,
                                                              determinism mode, device type, library versions
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, Field
from safetensors.torch import load_file, save_file

from lora_trainer.errors import ResumeRefused
from lora_trainer.paths import shorten

OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_META = "optimizer.json"
SCHEDULER_STATE = "scheduler.json"
SCALER_STATE = "scaler.json"
RNG_TENSORS = "rng.safetensors"
RNG_META = "rng.json"
TRAINER_STATE = "trainer_state.json"


class StateInvalid(Exception):
    """A checkpoint's state verified against its manifest but cannot be loaded (or makes no sense)."""


class TrainerState(BaseModel):
    """Where training stands: the optimizer step and the data position after it."""

    step: int = Field(0, ge=0, lt=10**9)
    epoch: int = Field(0, ge=0)
    index: int = Field(0, ge=0)
    attempt: int = Field(0, ge=0)
    config_hash: str = ""
    # How these bits were made (determinism mode, device type, library versions; determinism.py):
    # a resume compares it and warns naming what changed. Empty in checkpoints made before it.
    reproducibility: dict[str, str] = Field(default_factory=dict)


def state_problem(state: TrainerState, folder_step: int, total_steps: int) -> str | None:
    """Why a loaded trainer state cannot be resumed from (its step is impossible), or None."""
    if state.step != folder_step:
        return f"trainer_state.json says step {state.step}, the folder is step {folder_step}"
    if state.step > total_steps:
        return f"step {state.step} is beyond this run's {total_steps} steps"
    return None


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, sort_keys=True, indent=1))


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def save_weights(module: torch.nn.Module, path: Path) -> None:
    """Trainable parameters of a module, by name."""
    save_file(_contiguous({n: p for n, p in module.named_parameters() if p.requires_grad}), str(path))


def load_weights(module: torch.nn.Module, path: Path) -> None:
    """Copy saved trainable parameters back in place; names must match exactly."""
    saved = load_file(str(path))
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    if set(saved) != set(params):
        missing, extra = sorted(set(params) - set(saved))[:3], sorted(set(saved) - set(params))[:3]
        raise ResumeRefused(
            f"{path.name}: LoRA layout differs from this config (missing {missing}, unexpected {extra}); "
            "the checkpoint was made with other target modules or rank"
        )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name].to(p.device, p.dtype))


def save_optimizer(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Moments as tensors, param groups and scalar state as JSON."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in sd["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    save_file(_contiguous(tensors), str(folder / OPTIMIZER_TENSORS))
    _write_json(folder / OPTIMIZER_META, {"param_groups": sd["param_groups"], "scalars": scalars})


def load_optimizer(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Rebuild the optimizer state dict from safetensors + JSON and load it."""
    meta = _read_json(folder / OPTIMIZER_META)
    state: dict[int, dict[str, Any]] = {}
    for key, value in load_file(str(folder / OPTIMIZER_TENSORS)).items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for idx, entry in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(entry)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


RngState = tuple[dict[str, torch.Tensor], dict[str, Any]]  # tensors (torch CPU/CUDA), JSON (Python, NumPy)


def rng_state() -> RngState:
    """This process's Python, NumPy, torch CPU and CUDA RNG states."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{i}"] = s
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    meta = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_name, np_keys.tolist(), np_pos, np_has_gauss, np_gauss],
    }
    return tensors, meta


def rng_to_data(rng: RngState) -> dict[str, Any]:
    """An RNG state as plain data (to send it to rank 0)."""
    tensors, meta = rng
    return {"tensors": {k: v.tolist() for k, v in tensors.items()}, "meta": meta}


def rng_from_data(data: dict[str, Any]) -> RngState:
    """The inverse of rng_to_data."""
    return {k: torch.tensor(v, dtype=torch.uint8) for k, v in data["tensors"].items()}, data["meta"]


def rng_files(rank: int) -> tuple[str, str]:
    """Rank 0's RNG files are rng.safetensors + rng.json; rank r's rng-rank<r>.*."""
    stem = "rng" if rank == 0 else f"rng-rank{rank}"
    return f"{stem}.safetensors", f"{stem}.json"


def write_rng(folder: Path, rng: RngState, rank: int = 0) -> None:
    """One rank's RNG state into `folder`."""
    tensors_file, meta_file = rng_files(rank)
    save_file(_contiguous(rng[0]), str(folder / tensors_file))
    _write_json(folder / meta_file, rng[1])


def save_rng(folder: Path) -> None:
    """Python, NumPy, torch CPU and CUDA RNG states."""
    write_rng(folder, rng_state())


def load_rng(folder: Path, rank: int = 0) -> None:
    """Restore the RNG states saved for `rank` (rank 0's when the checkpoint has none for it:
    it was made by fewer processes)."""
    if not (folder / rng_files(rank)[0]).is_file():
        rank = 0
    tensors_file, meta_file = rng_files(rank)
    tensors = load_file(str(folder / tensors_file))
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda_"))]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    meta = _read_json(folder / meta_file)
    py_version, py_state, py_gauss = meta["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    name, keys, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))


def weights_file(module_name: str) -> str:
    """The state file of one trained module (`unet` -> lora_unet.safetensors)."""
    return f"lora_{module_name}.safetensors"


def save_state(
    folder: Path,
    state: TrainerState,
    modules: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    scaler: torch.amp.GradScaler | None,
    other_ranks: dict[int, RngState] | None = None,
) -> Path:
    """Write every piece of resumable state into `folder` (created fresh); `modules` are the
    family's trained modules by name (Family.trainable); `other_ranks` the RNG states of ranks > 0."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, module in modules.items():
        save_weights(module, folder / weights_file(name))
    save_optimizer(optimizer, folder)
    _write_json(folder / SCHEDULER_STATE, lr_scheduler.state_dict())
    _write_json(folder / SCALER_STATE, scaler.state_dict() if scaler is not None else {})
    save_rng(folder)
    for rank, rng in sorted((other_ranks or {}).items()):
        write_rng(folder, rng, rank)
    _write_json(folder / TRAINER_STATE, state.model_dump())
    return folder


def load_state(
    folder: Path,
    modules: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    scaler: torch.amp.GradScaler | None,
    rank: int = 0,
) -> TrainerState:
    """Restore what `save_state` wrote (the RNG states of `rank`); returns the trainer state (step, data position).

    Any failure (a missing or malformed file, shapes that do not fit) raises StateInvalid with a
    one-line reason; the state is then partly loaded, and the caller loads another one over it."""
    try:
        return _load_state(folder, modules, optimizer, lr_scheduler, scaler, rank)
    except ResumeRefused as exc:
        raise StateInvalid(exc.message) from exc
    except Exception as exc:  # corrupt content that matched its manifest: safetensors, JSON, torch errors
        raise StateInvalid(shorten(f"{type(exc).__name__}: {exc}", 300)) from exc


def _load_state(
    folder: Path,
    modules: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer,
    lr_scheduler: Any,
    scaler: torch.amp.GradScaler | None,
    rank: int = 0,
) -> TrainerState:
    trainer_state = TrainerState.model_validate(_read_json(folder / TRAINER_STATE))  # cheapest check first
    for name, module in modules.items():
        if not (folder / weights_file(name)).is_file():
            raise ResumeRefused(f"checkpoint has no {name} LoRA ({weights_file(name)}) but this config trains one")
        load_weights(module, folder / weights_file(name))
    load_optimizer(optimizer, folder)
    lr_scheduler.load_state_dict(_read_json(folder / SCHEDULER_STATE))
    scaler_state = _read_json(folder / SCALER_STATE)
    if scaler is not None and scaler_state:
        scaler.load_state_dict(scaler_state)
    load_rng(folder, rank)
    return trainer_state
