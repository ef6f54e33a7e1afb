"""Reproducible kernels: what `determinism: exact | fast` sets in torch, and a missing
deterministic kernel turned into a clear error.

`exact` (the default) applies on CUDA what PyTorch's reproducibility notes document:
- `torch.use_deterministic_algorithms(True)` (an error, not a warning, for an op without a
  deterministic kernel: `missing_kernel` makes that exit 78 naming the op and `determinism: fast`);
- `CUBLAS_WORKSPACE_CONFIG=:4096:8` (or `:16:8`) in the environment before cuBLAS starts: the
  operator puts it in the pod spec; outside a pod the trainer sets it itself while CUDA is still
  uninitialised, and refuses to start (exit 78) when CUDA was initialised without it;
- cuDNN deterministic, benchmark off (autotuning may pick another algorithm per process);
- scaled-dot-product attention on the math backend only: flash and cuDNN attention use atomics
  in backward, and the memory-efficient kernel is only deterministic on some builds;
- TF32 off for float32 matmuls and cuDNN convolutions, so results do not depend on a global
  default. Set through the legacy flags (`allow_tf32`, `set_float32_matmul_precision`): torch 2.13
  keeps them consistent with the new `fp32_precision` ones, while setting only the new ones makes
  libraries that read the legacy flags raise ("a mix of the legacy and new APIs"). Autocast
  bf16/fp16 is unaffected (it is the config's).

`fast` leaves determinism off and lets torch choose: cuDNN autotuning, every attention backend,
TF32. A resumed run then matches an uninterrupted one only up to kernel nondeterminism.

On the CPU both modes change nothing (CPU kernels in our path are deterministic and CPU runs
stay byte-identical to before this setting existed). The decision (`settings_for`) is pure;
`apply` is the thin part that sets torch's globals.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib import metadata

from lora_trainer.config import Determinism
from lora_trainer.errors import ConfigError

log = logging.getLogger(__name__)

CUBLAS_ENV = "CUBLAS_WORKSPACE_CONFIG"
CUBLAS_VALUE = ":4096:8"
CUBLAS_VALUES = (":4096:8", ":16:8")  # the two values cuBLAS documents for reproducible results
SDPA_BACKENDS = ("flash", "mem_efficient", "cudnn", "math")
# Libraries whose versions can change the bits of a step: a resume across a change is warned about.
VERSIONED = ("torch", "diffusers", "peft", "transformers")


@dataclass(frozen=True)
class KernelSettings:
    """The torch globals one run sets; None leaves torch's own setting alone."""

    deterministic_algorithms: bool | None = None
    cublas_workspace: str | None = None  # required in the environment before cuBLAS starts
    cudnn_deterministic: bool | None = None
    cudnn_benchmark: bool | None = None
    sdpa_backends: tuple[str, ...] | None = None  # the enabled ones; the rest are disabled
    tf32: bool | None = None  # TF32 for float32 matmuls and cuDNN convolutions


def settings_for(device_type: str, mode: Determinism) -> KernelSettings:
    """What `mode` sets on a device of this type (pure): nothing on the CPU."""
    if device_type != "cuda":
        return KernelSettings()
    if mode == "exact":
        return KernelSettings(
            deterministic_algorithms=True, cublas_workspace=CUBLAS_VALUE, cudnn_deterministic=True,
            cudnn_benchmark=False, sdpa_backends=("math",), tf32=False,
        )
    return KernelSettings(
        deterministic_algorithms=False, cudnn_deterministic=False, cudnn_benchmark=True,
        sdpa_backends=SDPA_BACKENDS, tf32=True,
    )


def cublas_problem(settings: KernelSettings, env: Mapping[str, str], cuda_initialised: bool) -> str | None:
    """Why the cuBLAS workspace setting cannot hold for this process (pure), or None.

    Unset and CUDA not yet initialised is fine: `apply` sets it before cuBLAS starts."""
    if settings.cublas_workspace is None:
        return None
    value = env.get(CUBLAS_ENV)
    if value is not None and value not in CUBLAS_VALUES:
        return (f"determinism: exact needs {CUBLAS_ENV} to be {' or '.join(CUBLAS_VALUES)}, got {value!r}; "
                f"fix the environment, or set determinism: fast")
    if value is None and cuda_initialised:
        return (f"determinism: exact needs {CUBLAS_ENV}={CUBLAS_VALUE} before CUDA starts, and CUDA was "
                f"initialised without it; export {CUBLAS_ENV}={CUBLAS_VALUE} before starting the trainer, "
                "or set determinism: fast")
    return None


def apply(settings: KernelSettings) -> None:
    """Set torch's globals as `settings` says (thin); ConfigError (exit 78) when cuBLAS cannot comply."""
    import torch

    if problem := cublas_problem(settings, os.environ, torch.cuda.is_initialized()):
        raise ConfigError(problem)
    if settings.cublas_workspace is not None and CUBLAS_ENV not in os.environ:
        os.environ[CUBLAS_ENV] = settings.cublas_workspace  # read when cuBLAS creates its first handle
    if settings.deterministic_algorithms is not None:
        torch.use_deterministic_algorithms(settings.deterministic_algorithms, warn_only=False)
    if settings.cudnn_deterministic is not None:
        torch.backends.cudnn.deterministic = settings.cudnn_deterministic
    if settings.cudnn_benchmark is not None:
        torch.backends.cudnn.benchmark = settings.cudnn_benchmark
    if settings.sdpa_backends is not None:
        on = set(settings.sdpa_backends)
        torch.backends.cuda.enable_flash_sdp("flash" in on)
        torch.backends.cuda.enable_mem_efficient_sdp("mem_efficient" in on)
        torch.backends.cuda.enable_cudnn_sdp("cudnn" in on)
        torch.backends.cuda.enable_math_sdp("math" in on)
    if settings.tf32 is not None:
        torch.backends.cuda.matmul.allow_tf32 = settings.tf32
        torch.backends.cudnn.allow_tf32 = settings.tf32
        torch.set_float32_matmul_precision("high" if settings.tf32 else "highest")


_MISSING = re.compile(r"^(?P<op>\S+) does not have a deterministic implementation")


def missing_kernel_op(message: str) -> str | None:
    """The op named by torch's "<op> does not have a deterministic implementation" error (pure), or None."""
    match = _MISSING.search(message.strip())
    return match.group("op") if match else None


def missing_kernel_message(op: str, step: int, device: str) -> str:
    """The one-line error for an op without a deterministic kernel (pure)."""
    return (f"determinism: exact, but {op} has no deterministic implementation on {device} (step {step}); "
            "set determinism: fast to train with nondeterministic kernels (resume is then exact only up to "
            "kernel nondeterminism), or change the setting that uses this op")


@contextlib.contextmanager
def missing_kernel(step: int, device: str) -> Iterator[None]:
    """Turn torch's "no deterministic implementation" RuntimeError inside the block into ConfigError (78)."""
    try:
        yield
    except RuntimeError as exc:
        op = missing_kernel_op(str(exc))
        if op is None:
            raise
        raise ConfigError(missing_kernel_message(op, step, device), step=step - 1) from None


def library_versions(names: tuple[str, ...] = VERSIONED) -> dict[str, str]:
    """Installed versions of the libraries that can change a step's bits ("absent" when not installed)."""
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def reproducibility_record(mode: Determinism, device_type: str, versions: Mapping[str, str]) -> dict[str, str]:
    """What a checkpoint records about how its bits were made (pure): mode, device type, versions."""
    return {"determinism": mode, "device": device_type, **{k: str(v) for k, v in sorted(versions.items())}}


def record_changes(saved: Mapping[str, str], now: Mapping[str, str]) -> list[str]:
    """`name old -> new` for each recorded item that differs (pure); an old checkpoint without a record
    gives none (nothing to compare)."""
    return [f"{k} {saved[k]} -> {now.get(k, 'absent')}" for k in sorted(saved) if saved[k] != now.get(k, "absent")]


def guarantee(mode: Determinism, device_type: str) -> str:
    """What a resumed run of this mode on this device is promised (pure), for logs and status."""
    if device_type != "cuda":
        return "bitwise: the CPU kernels are deterministic, resume equals an uninterrupted run"
    if mode == "exact":
        return "bitwise: deterministic CUDA kernels, resume equals an uninterrupted run on the same GPU type"
    return "not bitwise: nondeterministic CUDA kernels, resume is exact only up to kernel nondeterminism"
