"""The task seam's detection: model_index.json class or single-file key layout -> family, model_family override.

Pure and torch-free; a wrong or unknown family is a ConfigError (exit 78) naming what was found."""

from __future__ import annotations

import json
import typing
from pathlib import Path

import pytest

from lora_trainer.config import ModelFamily
from lora_trainer.errors import EXIT_CONFIG, EXIT_NOINPUT, ConfigError, InputMissing
from lora_trainer.tasks import REGISTRY, detect, family_for_checkpoint, family_for_pipeline


@pytest.mark.parametrize(
    ("class_name", "override", "family", "needle"),
    [
        ("StableDiffusionPipeline", "auto", "sd", None),
        ("StableDiffusionPipeline", "sd", "sd", None),
        ("StableDiffusionXLPipeline", "auto", "sdxl", None),
        ("StableDiffusionXLPipeline", "sdxl", "sdxl", None),
        ("FluxPipeline", "auto", "flux", None),
        ("FluxPipeline", "flux", "flux", None),
        ("FluxPipeline", "sdxl", None, "model_family: 'sdxl' but base_model ./m is a FluxPipeline"),
        ("StableDiffusion3Pipeline", "auto", None, "is a StableDiffusion3Pipeline (model_index.json _class_name)"),
        (None, "auto", None, "is a pipeline with no _class_name"),
        ("StableDiffusionXLPipeline", "sd", None, "model_family: 'sd' but base_model ./m is a StableDiffusionXLPipeline"),
        ("StableDiffusionPipeline", "sdxl", None, "model_family: 'sdxl' but base_model ./m is a StableDiffusionPipeline"),
        ("StableDiffusionPipeline", "flux", None, "model_family: 'flux' but base_model ./m is a StableDiffusionPipeline"),
        ("StableDiffusionPipeline", "sd3", None, "model_family: 'sd3' is not a family"),
    ],
)
def test_family_for_pipeline(class_name: str | None, override: str, family: str | None, needle: str | None) -> None:
    if family is not None:
        assert family_for_pipeline(class_name, override, "./m").name == family
        return
    with pytest.raises(ConfigError) as info:
        family_for_pipeline(class_name, override, "./m")
    assert info.value.exit_code == EXIT_CONFIG
    assert needle in info.value.message
    assert "\n" not in info.value.message


@pytest.mark.parametrize(
    ("kind", "override", "family", "code", "needle"),
    [
        ("sd1", "auto", "sd", None, None),
        ("sd2", "sd", "sd", None, None),
        ("sdxl", "auto", "sdxl", None, None),
        ("sdxl", "sd", None, EXIT_CONFIG, "model_family: 'sd' but base_model ./x.safetensors is a SDXL checkpoint"),
        ("flux", "auto", None, EXIT_CONFIG, "is a single-file Flux checkpoint; Flux trains from a diffusers folder only"),
        ("sd3", "auto", None, EXIT_CONFIG, "is a Stable Diffusion 3 checkpoint"),
        (None, "auto", None, EXIT_NOINPUT, "is not a checkpoint of a known family"),
    ],
)
def test_family_for_checkpoint(kind: str | None, override: str, family: str | None, code: int | None,
                               needle: str | None) -> None:
    if family is not None:
        assert family_for_checkpoint(kind, override, "./x.safetensors").name == family
        return
    with pytest.raises((ConfigError, InputMissing)) as info:
        family_for_checkpoint(kind, override, "./x.safetensors")
    assert info.value.exit_code == code and needle in info.value.message


def test_detect_reads_model_index(tmp_path: Path) -> None:
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    assert detect(tmp_path).name == "sdxl"
    with pytest.raises(InputMissing):
        detect(tmp_path / "missing")


def test_config_values_are_the_registered_families() -> None:
    assert set(typing.get_args(ModelFamily)) == {"auto", *REGISTRY}


@pytest.mark.parametrize(
    ("family", "given", "used"),
    [("sd", None, 512), ("sdxl", None, 1024), ("flux", None, 1024), ("sd", 768, 768), ("sdxl", 64, 64)],
)
def test_unset_resolution_is_the_family_default(family: str, given: int | None, used: int) -> None:
    from lora_trainer.config import config_hash, dump_config, parse_config, training_fields
    from lora_trainer.tasks import with_family_defaults

    data = {"base_model": "m", "train_data_dir": "d", "output_dir": "o", "max_train_steps": 1,
            "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]}  # resolution is the only default left
    config = parse_config({**data, **({"resolution": given} if given else {})})
    resolved = with_family_defaults(config, REGISTRY[family])
    assert resolved.resolution == used
    assert training_fields(resolved)["resolution"] == used  # what a checkpoint records and resume compares
    assert f"resolution: {used}\n" in dump_config(resolved)  # config_backup.yaml
    assert (config_hash(resolved) == config_hash(config)) == (given is not None)
