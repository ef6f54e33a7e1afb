"""Out of memory during a training step: recognise it and say which settings to change.

A step that runs out of memory (torch.cuda.OutOfMemoryError on a GPU; MemoryError, or torch's
allocator RuntimeError, on the CPU) ends the run with `OutOfMemory` (exit 71, reason OutOfMemory,
not retried: the same settings on the same hardware run out again at the same step). Its message
names the four remedies kohya users know — batch size, resolution, rank, gradient accumulation —
with the values this run used, plus gradient checkpointing when it is off. The committed
checkpoints stay; these settings define training, so a resume with them changed needs
allow_config_change (or a new output).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

from lora_trainer.errors import OutOfMemory

# Phrases of allocator failures: CUDA ("CUDA out of memory"), torch's CPU allocator ("not enough
# memory", "can't allocate memory"), and the OS ("Cannot allocate memory", errno 12).
OOM_PHRASES = ("out of memory", "not enough memory", "can't allocate memory", "cannot allocate memory")


def is_oom(exc: BaseException) -> bool:
    """Whether `exc` is an allocation failure (pure: the class name and message decide)."""
    if isinstance(exc, MemoryError) or any(c.__name__ == "OutOfMemoryError" for c in type(exc).__mro__):
        return True
    return isinstance(exc, RuntimeError) and any(p in str(exc).lower() for p in OOM_PHRASES)


def oom_message(settings: Mapping[str, Any], step: int, device: str) -> str:
    """The one-line advice for an OOM at `step` (pure): `settings` holds batch_size, resolution,
    lora_rank, gradient_accumulation_steps and gradient_checkpointing as the run used them."""
    batch = int(settings["batch_size"])
    accum = int(settings["gradient_accumulation_steps"])
    rank = int(settings["lora_rank"])
    resolution = settings.get("resolution")
    remedies = []
    if batch > 1:
        half = batch // 2
        remedies.append(
            f"lower batch_size (now {batch}, e.g. {half}) and raise gradient_accumulation_steps "
            f"(now {accum}, e.g. {accum * batch // half}) to keep the effective batch of {batch * accum}"
        )
    else:
        remedies.append(f"batch_size is already 1 (gradient_accumulation_steps {accum} costs no memory)")
    if resolution:
        smaller = max(8, int(resolution) * 3 // 4 // 8 * 8)  # the trainer takes multiples of 8
        remedies.append(f"lower resolution (now {resolution}, e.g. {smaller})")
    if rank > 1:
        remedies.append(f"lower lora_rank (now {rank}, e.g. {max(1, rank // 2)})")
    if not settings.get("gradient_checkpointing"):
        remedies.append("set gradient_checkpointing: true")
    return (
        f"out of memory on {device} during step {step}: " + "; or ".join(remedies)
        + ". These settings define training: resume with them changed needs allow_config_change, "
        "or use a new output_dir"
    )


@contextlib.contextmanager
def oom_advice(config: Any, step: int, device: str) -> Iterator[None]:
    """Turn an allocation failure inside the block (one training step) into OutOfMemory (exit 71)."""
    try:
        yield
    except (MemoryError, RuntimeError) as exc:
        if not is_oom(exc):
            raise
        settings = {name: getattr(config, name, None) for name in (
            "batch_size", "resolution", "lora_rank", "gradient_accumulation_steps", "gradient_checkpointing")}
        raise OutOfMemory(oom_message(settings, step, device), step=step - 1) from None
