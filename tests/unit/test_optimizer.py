"""The optimizer choice: torch AdamW by default, bitsandbytes' AdamW8bit on request.

Behaviours tested:
- adamw builds torch's AdamW with the config's betas, decay and epsilon;
- adamw8bit builds bitsandbytes.optim.AdamW8bit with the same settings (a stand-in module here);
- adamw8bit without bitsandbytes: `lora-train` exits 78 naming the field, the package and the fix,
  before the model loads or the output is touched;
- a checkpoint made before the optimizer field existed still resumes with the default.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch

from lora_trainer import contract
from lora_trainer.cli import main
from lora_trainer.config import changed_fields, parse_config, training_fields
from lora_trainer.errors import EXIT_CONFIG, ConfigError
from lora_trainer.steps import make_optimizer, optimizer_class


def config(tmp_path: Path, **extra: object):
    base = {"base_model": str(tmp_path / "model"), "train_data_dir": str(tmp_path / "data"),
            "output_dir": str(tmp_path / "out"), "max_train_steps": 2, "adam_beta1": 0.8, "adam_epsilon": 1e-6}
    return parse_config({**base, **extra})


def test_adamw_is_the_default(tmp_path: Path) -> None:
    opt = make_optimizer([torch.nn.Parameter(torch.zeros(2))], config(tmp_path))
    assert type(opt) is torch.optim.AdamW
    assert opt.param_groups[0]["betas"] == (0.8, 0.999) and opt.param_groups[0]["eps"] == 1e-6


def test_adamw8bit_uses_bitsandbytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class AdamW8bit(torch.optim.AdamW):
        pass

    optim = types.ModuleType("bitsandbytes.optim")
    optim.AdamW8bit = AdamW8bit
    monkeypatch.setitem(sys.modules, "bitsandbytes", types.ModuleType("bitsandbytes"))
    monkeypatch.setitem(sys.modules, "bitsandbytes.optim", optim)
    opt = make_optimizer([torch.nn.Parameter(torch.zeros(2))], config(tmp_path, optimizer="adamw8bit"))
    assert type(opt) is AdamW8bit
    assert opt.param_groups[0]["betas"] == (0.8, 0.999) and opt.param_groups[0]["lr"] == 1e-4


def test_adamw8bit_without_bitsandbytes_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # absent, even where it is installed
    with pytest.raises(ConfigError) as info:
        optimizer_class(config(tmp_path, optimizer="adamw8bit"))
    assert info.value.exit_code == EXIT_CONFIG
    for needle in ("optimizer: 'adamw8bit'", "bitsandbytes", "pip install bitsandbytes", "optimizer: adamw"):
        assert needle in info.value.message


def test_lora_train_exits_78_before_touching_anything(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    for name in ("model", "data"):
        (tmp_path / name).mkdir()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"base_model": "model", "train_data_dir": "data", "output_dir": "out",
                               "max_train_steps": 2, "optimizer": "adamw8bit", "cache_dir": "cache"}))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(contract.ENV_TERMINATION_LOG, str(tmp_path / "termination.json"))
    assert main(["--config", str(cfg)]) == EXIT_CONFIG
    message = json.loads((tmp_path / "termination.json").read_text())
    assert "pip install bitsandbytes" in message["message"]
    assert not (tmp_path / "out").exists()


def test_checkpoints_from_before_the_field_resume_with_the_default(tmp_path: Path) -> None:
    now = training_fields(config(tmp_path))
    old = {k: v for k, v in now.items() if k != "optimizer"}
    assert changed_fields(old, now) == []
    assert changed_fields(old, training_fields(config(tmp_path, optimizer="adamw8bit"))) == ["optimizer"]
