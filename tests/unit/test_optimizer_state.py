"""An 8-bit optimizer's state goes through the checkpoint unchanged (state.save_optimizer / load_optimizer).

Behaviours tested: a state dict laid out as bitsandbytes' AdamW8bit keeps it (uint8 moments,
float32 quantisation maps and block maxima, an integer step, param groups with its extra keys)
reaches `load_state_dict` with the same keys, dtypes and bytes after a save and a load, so an
adamw8bit run resumes from exactly the state it saved. bitsandbytes is not installed here (no CUDA):
the layout is written out below; its own load_state_dict keeps uint8 state as uint8.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lora_trainer.state import load_optimizer, save_optimizer


class Recorder(torch.optim.Optimizer):
    """Returns a fixed AdamW8bit-shaped state dict and records what it is asked to load."""

    def __init__(self, params: list[torch.nn.Parameter], state: dict[str, Any]) -> None:
        super().__init__(params, {"lr": 1e-4})
        self.fixed, self.loaded = state, None

    def state_dict(self) -> dict[str, Any]:
        return self.fixed

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.loaded = state_dict


def eight_bit_state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    entry = {
        "step": 17,
        "state1": torch.randint(0, 256, (4, 8), generator=g, dtype=torch.uint8),
        "state2": torch.randint(0, 256, (4, 8), generator=g, dtype=torch.uint8),
        "qmap1": torch.rand(256, generator=g), "qmap2": torch.rand(256, generator=g),
        "absmax1": torch.rand(1, generator=g), "absmax2": torch.rand(1, generator=g),
    }
    groups = [{"lr": 1e-4, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01, "optim_bits": 8,
               "min_8bit_size": 4096, "percentile_clipping": 100, "block_wise": True, "max_unorm": 0.0,
               "skip_zeros": False, "is_paged": False, "params": [0, 1]}]
    return {"state": {0: entry, 1: {k: v.clone() if torch.is_tensor(v) else v for k, v in entry.items()}},
            "param_groups": groups}


def test_eight_bit_state_round_trips_exactly(tmp_path: Path) -> None:
    params = [torch.nn.Parameter(torch.zeros(4, 8)) for _ in range(2)]
    saved = eight_bit_state()
    save_optimizer(Recorder(params, saved), tmp_path)
    again = Recorder(params, {})
    load_optimizer(again, tmp_path)
    assert again.loaded is not None
    assert again.loaded["param_groups"] == saved["param_groups"]
    assert sorted(again.loaded["state"]) == [0, 1]
    for idx, entry in saved["state"].items():
        got = again.loaded["state"][idx]
        assert sorted(got) == sorted(entry)
        for key, value in entry.items():
            if torch.is_tensor(value):
                assert got[key].dtype == value.dtype and torch.equal(got[key], value), (idx, key)
            else:
                assert got[key] == value and type(got[key]) is type(value), (idx, key)
