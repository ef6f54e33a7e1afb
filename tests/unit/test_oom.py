"""Out-of-memory advice (lora_trainer.oom), pure.

Behaviours tested:
- CUDA's OutOfMemoryError, MemoryError and torch's CPU allocator failures are OOM; other errors are not;
- the message names the four remedies (batch size, resolution, rank, gradient accumulation) with the
  values the run used and an example each, keeps the effective batch, and adds gradient checkpointing
  only when it is off;
- the context manager turns an OOM inside a step into OutOfMemory (exit 71, reason OutOfMemory)
  and lets every other error through unchanged.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from lora_trainer.errors import EXIT_OOM, OutOfMemory
from lora_trainer.oom import is_oom, oom_advice, oom_message


class OutOfMemoryError(RuntimeError):
    """Named like torch.cuda.OutOfMemoryError (matched by class name, so the check stays torch-free)."""


@pytest.mark.parametrize(("exc", "oom"), [
    (OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (MemoryError(), True),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory: you tried to "
                  "allocate 1073741824 bytes."), True),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes. Error code 12 "
                  "(Cannot allocate memory)"), True),
    (RuntimeError("CUDA error: an illegal memory access was encountered"), False),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), False),
    (ValueError("out of memory"), False),  # only allocation errors count
])
def test_is_oom(exc: BaseException, oom: bool) -> None:
    assert is_oom(exc) is oom


BASE = {"batch_size": 4, "resolution": 1024, "lora_rank": 32, "gradient_accumulation_steps": 1,
        "gradient_checkpointing": False}


@pytest.mark.parametrize(("change", "says", "not_says"), [
    ({}, ["out of memory on cuda during step 12:",
          "lower batch_size (now 4, e.g. 2) and raise gradient_accumulation_steps (now 1, e.g. 2) "
          "to keep the effective batch of 4",
          "lower resolution (now 1024, e.g. 768)", "lower lora_rank (now 32, e.g. 16)",
          "set gradient_checkpointing: true", "allow_config_change"], []),
    ({"batch_size": 6, "gradient_accumulation_steps": 2},
     ["batch_size (now 6, e.g. 3)", "gradient_accumulation_steps (now 2, e.g. 4)", "effective batch of 12"], []),
    ({"batch_size": 1, "gradient_accumulation_steps": 8}, ["batch_size is already 1"], ["lower batch_size"]),
    ({"gradient_checkpointing": True}, ["lora_rank (now 32"], ["gradient_checkpointing"]),
    ({"resolution": None}, ["lora_rank (now 32"], ["resolution"]),  # a task without a resolution
    ({"lora_rank": 1, "resolution": 64}, ["resolution (now 64, e.g. 48)"], ["lora_rank"]),
])
def test_message_names_the_remedies_with_the_values_used(change: dict, says: list[str], not_says: list[str]) -> None:
    text = oom_message({**BASE, **change}, 12, "cuda")
    assert "\n" not in text
    for needle in says:
        assert needle in text, text
    for needle in not_says:
        assert needle not in text, text


def test_advice_turns_an_oom_into_exit_71_and_lets_others_through() -> None:
    config = SimpleNamespace(**BASE)
    with pytest.raises(OutOfMemory) as err, oom_advice(config, 5, "cpu"):
        raise MemoryError()
    assert (err.value.exit_code, err.value.reason, err.value.step) == (EXIT_OOM, "OutOfMemory", 4)
    assert "during step 5" in err.value.message and "batch_size (now 4" in err.value.message
    with pytest.raises(RuntimeError, match="shapes"), oom_advice(config, 5, "cpu"):
        raise RuntimeError("shapes cannot be multiplied")
