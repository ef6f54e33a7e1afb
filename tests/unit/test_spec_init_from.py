"""spec.lora.initFrom: incremental training from an existing LoRA file, mapped onto the trainer's init_lora.

Behaviours tested:
- initFrom reaches the trainer as init_lora (s3:// normalised), and unset sends none;
- a pickle or non-safetensors file is refused naming spec.lora.initFrom;
- the output may not contain the init file (the run would overwrite what it starts from);
- a causal-lm job may not set it (its family cannot start from a LoRA file), naming the field.
"""

from __future__ import annotations

import copy

import pytest

from lora_operator.spec import SpecError, parse_spec, to_train_config
from tests.unit.builders import MINIMAL_SPEC
from tests.unit.test_spec import LLM_SPEC


def with_init(spec: dict, uri: str) -> dict:
    out = copy.deepcopy(spec)
    out["lora"] = {**out.get("lora", {}), "initFrom": uri}
    return out


def test_init_from_reaches_the_trainer() -> None:
    spec = with_init(MINIMAL_SPEC, "s3://loras/v1/./pytorch_lora_weights_kohya.safetensors")
    assert to_train_config(parse_spec(spec)).init_lora == "s3://loras/v1/pytorch_lora_weights_kohya.safetensors"
    assert to_train_config(parse_spec(MINIMAL_SPEC)).init_lora is None


@pytest.mark.parametrize("uri", ["s3://loras/v1/lora.ckpt", "s3://loras/v1/", "s3://loras/v1/lora.pt"])
def test_not_one_safetensors_file_is_refused_naming_the_field(uri: str) -> None:
    with pytest.raises(SpecError) as err:
        to_train_config(parse_spec(with_init(MINIMAL_SPEC, uri)))
    assert str(err.value).startswith("spec.lora.initFrom: ") and "safetensors" in str(err.value)


def test_output_containing_the_init_file_is_refused() -> None:
    spec = with_init(MINIMAL_SPEC, MINIMAL_SPEC["output"]["uri"].rstrip("/") + "/pytorch_lora_weights.safetensors")
    with pytest.raises(SpecError, match=r"spec.output.uri: .* spec.lora.initFrom"):
        parse_spec(spec)


def test_causal_lm_may_not_set_it() -> None:
    with pytest.raises(SpecError, match=r"spec.lora.initFrom"):
        parse_spec(with_init(LLM_SPEC, "s3://loras/v1/a.safetensors"))
