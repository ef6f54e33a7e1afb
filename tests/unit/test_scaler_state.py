"""Mixed precision resumes exactly: the gradient scaler's state is in the checkpoint.

The trainer runs fp16 with a GradScaler on CUDA only (CPU trains in fp32), so this drives the
same pieces on the CPU where torch allows them: bf16 autocast over fp32 master LoRA-like weights,
torch.amp.GradScaler("cpu") with an overflow that backs its scale off, and the real
state.save_state / load_state (scaler.json) between two halves of a run.

- the scaler's scale and growth tracker survive the checkpoint as JSON, exactly;
- a run stopped after step 3 and resumed into fresh objects ends with the same weights (sha256)
  and the same scale as an uninterrupted run, and differs when the scaler state is dropped;
- the master weights stay fp32 under autocast.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from lora_trainer import state
from lora_trainer.state import SCALER_STATE, TrainerState

STEPS, STOP = 6, 3
OVERFLOW_STEP = 1  # an inf gradient here makes the scaler skip the step and back off


def make(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    # growth_interval 3: the scale also grows within the run, so both directions are exercised
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
    return model, optimizer, scheduler, scaler


def step(model, optimizer, scheduler, scaler, i: int) -> None:
    g = torch.Generator().manual_seed(1000 + i)
    x, y = torch.randn(4, 8, generator=g), torch.randn(4, 4, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    loss = torch.nn.functional.mse_loss(out.float(), y)
    if i == OVERFLOW_STEP:
        loss = loss * float("inf")
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=False)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        assert p.dtype == torch.float32, name  # fp32 master weights under bf16 autocast
        h.update(name.encode() + p.numpy().tobytes())
    return h.hexdigest()


def test_scaler_state_round_trips_and_resume_is_exact(tmp_path: Path) -> None:
    ref = make()
    for i in range(STEPS):
        step(*ref, i)
    ref_scale = ref[3].get_scale()

    first = make()
    for i in range(STOP):
        step(*first, i)
    saved_scale = first[3].get_scale()
    assert saved_scale != 2.0**10  # the overflow and growth moved it: a default would not do
    folder = state.save_state(tmp_path / "ckpt", TrainerState(step=STOP), {"model": first[0]}, *first[1:])
    assert (folder / SCALER_STATE).is_file()

    resumed = make(seed=1)  # other initial weights: everything must come from the checkpoint
    assert state.load_state(folder, {"model": resumed[0]}, *resumed[1:]).step == STOP
    assert resumed[3].state_dict() == first[3].state_dict()
    for i in range(STOP, STEPS):
        step(*resumed, i)
    assert digest(resumed[0]) == digest(ref[0])
    assert resumed[3].get_scale() == ref_scale

    dropped = make(seed=1)  # the same checkpoint without the scaler state: not the same run
    state.load_state(folder, {"model": dropped[0]}, *dropped[1:3], None)
    for i in range(STOP, STEPS):
        step(*dropped, i)
    assert dropped[3].get_scale() != ref_scale  # the scale (and with it which steps overflow) went astray
