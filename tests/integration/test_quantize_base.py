"""quantize_base through the real trainer (`lora-train`), on the tiny Flux and the tiny SD models.

Behaviours tested (torchao is deliberately not installed here, so only the refusals can run):
- a Flux run asking for int8 or fp8 ends with exit 78 and one logged line naming quantize_base, the
  torchao package and the fix, before any weights are read (no checkpoint, no output written);
- an SD run asking for int8 ends with exit 78: its family does not quantize its base;
- the same Flux config with quantize_base: none trains (the key changes nothing when off).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from lora_trainer.cli import main
from lora_trainer.errors import EXIT_CONFIG
from lora_trainer.tiny_flux import build_tiny_flux


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_flux(tmp_path_factory.mktemp("tiny-flux") / "model")


def run(model: Path, data: Path, out: Path, **extra: object) -> int:
    config = {"base_model": str(model), "train_data_dir": str(data), "output_dir": str(out), "resolution": 32,
              "lora_rank": 2, "batch_size": 1, "max_train_steps": 1, "save_steps": 1, "seed": 1,
              "cache_dir": str(out.parent / "cache"), **extra}
    path = out.parent / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return main(["--config", str(path)])


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_flux_without_torchao_is_exit_78_naming_the_fix(mode: str, tiny_flux: Path, tiny_data: Path,
                                                        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR):
        code = run(tiny_flux, tiny_data, tmp_path / "out", quantize_base=mode)
    assert code == EXIT_CONFIG
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0], errors
    assert f"quantize_base: {mode!r} needs the torchao package" in errors[0]
    assert "pip install torchao" in errors[0] and "set quantize_base: none" in errors[0]
    assert not list((tmp_path / "out").rglob("*.safetensors"))


def test_sd_refuses_any_mode(tiny_sd: Path, tiny_data: Path, tmp_path: Path,
                             caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR):
        assert run(tiny_sd, tiny_data, tmp_path / "out", quantize_base="int8") == EXIT_CONFIG
    assert any("quantize_base: 'int8' is not supported for Stable Diffusion" in r.getMessage() for r in caplog.records)


def test_none_trains_flux(tiny_flux: Path, tiny_data: Path, tmp_path: Path) -> None:
    assert run(tiny_flux, tiny_data, tmp_path / "out", quantize_base="none") == 0
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()
