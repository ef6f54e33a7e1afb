"""quantize_base decisions (lora_trainer.quantize), table-driven.

Behaviours tested:
- each mode maps to diffusers' TorchAoConfig quant type (none to no quantization);
- a family that does not quantize its base refuses any mode but none, exit 78 naming key, value and fix;
- with torchao absent (as in this venv: it is deliberately not a dependency), asking for a mode is exit 78
  naming the key, the package to install and the fix; none needs nothing;
- the key is a training field (a resume with another mode is refused) with `none` for older manifests.
"""

from __future__ import annotations

import importlib.util

import pytest

from lora_trainer.config import ADDED_FIELD_DEFAULTS, TRAINING_FIELDS, parse_config
from lora_trainer.errors import EXIT_CONFIG, ConfigError
from lora_trainer.quantize import check_supported, quant_type, quantization_config, require_backend

TORCHAO_ABSENT = importlib.util.find_spec("torchao") is None


@pytest.mark.parametrize(("mode", "expected"), [("none", None), ("int8", "int8wo"), ("fp8", "float8wo")])
def test_mode_to_torchao_type(mode: str, expected: str | None) -> None:
    assert quant_type(mode) == expected


@pytest.mark.parametrize(("mode", "supported", "refused"), [
    ("none", False, False), ("none", True, False), ("int8", True, False), ("int8", False, True), ("fp8", False, True),
])
def test_unsupported_family_refuses_a_mode(mode: str, supported: bool, refused: bool) -> None:
    if not refused:
        check_supported(mode, supported, "Stable Diffusion 1.x/2.x")
        return
    with pytest.raises(ConfigError) as info:
        check_supported(mode, supported, "Stable Diffusion 1.x/2.x")
    assert info.value.exit_code == EXIT_CONFIG
    assert info.value.message == (f"quantize_base: {mode!r} is not supported for Stable Diffusion 1.x/2.x base models "
                                  "(only for diffusion-transformer families); set quantize_base: none")


def test_torchao_is_not_in_this_venv() -> None:
    # The clear-error path below is only exercised while torchao is absent; it must stay out of .venv.
    assert TORCHAO_ABSENT


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_absent_backend_is_a_clear_config_error(mode: str) -> None:
    for call in (require_backend, quantization_config):
        with pytest.raises(ConfigError) as info:
            call(mode)
        message = info.value.message
        assert info.value.exit_code == EXIT_CONFIG and "\n" not in message
        assert message.startswith(f"quantize_base: {mode!r} needs the torchao package")
        assert "pip install torchao" in message and message.endswith("or set quantize_base: none")


def test_none_needs_no_backend() -> None:
    require_backend("none")
    assert quantization_config("none") is None


def test_it_is_a_training_field() -> None:
    assert "quantize_base" in TRAINING_FIELDS and ADDED_FIELD_DEFAULTS["quantize_base"] == "none"
    assert parse_config({"base_model": "m", "train_data_dir": "d", "output_dir": "o", "max_train_steps": 1}).quantize_base == "none"
    with pytest.raises(ConfigError, match="quantize_base"):
        parse_config({"base_model": "m", "train_data_dir": "d", "output_dir": "o", "max_train_steps": 1, "quantize_base": "int4"})
