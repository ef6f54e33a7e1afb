"""Where local paths in a config point, and which base models are single files (pure decisions).

Behaviours tested:
- an absolute path is used as is; a relative one is tried from the current directory first, then
  from the second anchor; when neither exists the current directory's is used (outputs to create);
- a relative path that exists from both anchors and differs is refused naming both; the same
  place reached twice (or through a symlink) is not ambiguous; s3:// is left alone;
- the seed's config (`./data/style_train`, `./data/style_train/metadata.csv`,
  `./models/Stable-diffusion/v1-5-pruned.safetensors`) resolves from the current directory;
  `metadata_path: metadata.csv` still resolves inside the dataset folder; a CSV in both places is 78,
  in neither 65 naming both; an s3:// dataset keeps its relative metadata_path;
- pickle checkpoints (.ckpt/.pt/.bin…) are refused at validation with why and how to convert;
- single-file URIs and model families are told apart by name and by checkpoint keys;
- a changed single-file base model is named as base_model when resume compares fields.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_trainer.config import changed_fields, parse_config, resolve_local_paths, training_fields
from lora_trainer.errors import EXIT_CONFIG, EXIT_DATAERR, ConfigError, DatasetError
from lora_trainer.paths import choose_local
from lora_trainer.single_file import family_from_keys, is_single_file, pickle_problem

SEED = {
    "train_data_dir": "./data/style_train",
    "metadata_path": "./data/style_train/metadata.csv",
    "base_model": "./models/Stable-diffusion/v1-5-pruned.safetensors",
    "output_dir": "./output/style",
    "max_train_steps": 10,
}


def seed_layout(root: Path) -> Path:
    (root / "data/style_train").mkdir(parents=True)
    (root / "data/style_train/metadata.csv").write_text("file_name,text\n")
    (root / "models/Stable-diffusion").mkdir(parents=True)
    (root / "models/Stable-diffusion/v1-5-pruned.safetensors").write_bytes(b"x")
    return root


def test_choose_local_absolute_relative_and_fallback(tmp_path: Path) -> None:
    cwd, other = tmp_path / "cwd", tmp_path / "cfg"
    (cwd / "a").mkdir(parents=True)
    (other / "b").mkdir(parents=True)
    anchors = [("the current directory", cwd), ("the config file's folder", other)]
    assert choose_local("f", "/abs/x", anchors) == (Path("/abs/x"), None)
    assert choose_local("f", "a", anchors) == (cwd / "a", None)
    assert choose_local("f", "./b", anchors) == (other / "b", None)
    assert choose_local("f", "new/out", anchors) == (cwd / "new/out", None)
    assert choose_local("f", "s3://bucket/x", anchors) == (None, None)
    assert choose_local("f", "pvc://claim/x", anchors) == (None, None)
    assert choose_local("f", "file:///abs/y", anchors) == (Path("/abs/y"), None)


def test_choose_local_refuses_two_different_places(tmp_path: Path) -> None:
    cwd, other = tmp_path / "cwd", tmp_path / "cfg"
    (cwd / "d").mkdir(parents=True)
    (other / "d").mkdir(parents=True)
    path, problem = choose_local("train_data_dir", "d", [("the current directory", cwd), ("the config file's folder", other)])
    assert path is None and problem
    assert problem.startswith("train_data_dir: 'd' exists both as ")
    assert str(cwd / "d") in problem and str(other / "d") in problem and "absolute path" in problem


def test_choose_local_same_place_twice_is_fine(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (tmp_path / "real/x").mkdir()
    anchors = [("cwd", tmp_path / "real"), ("cfg", tmp_path / "link"), ("cwd again", tmp_path / "real")]
    assert choose_local("f", "x", anchors) == (tmp_path / "real/x", None)


def test_seed_config_resolves_from_the_current_directory(tmp_path: Path) -> None:
    root = seed_layout(tmp_path / "proj")
    config = resolve_local_paths(parse_config(SEED), cwd=root, config_dir=root / "configs")
    assert config.train_data_dir == str(root / "data/style_train")
    assert config.metadata_path == str(root / "data/style_train/metadata.csv")
    assert config.base_model == str(root / "models/Stable-diffusion/v1-5-pruned.safetensors")
    assert config.output_dir == str(root / "output/style")


def test_metadata_relative_to_the_dataset_still_works(tmp_path: Path) -> None:
    root = seed_layout(tmp_path / "proj")
    config = resolve_local_paths(parse_config({**SEED, "metadata_path": "metadata.csv"}), cwd=root)
    assert config.metadata_path == str(root / "data/style_train/metadata.csv")
    # The dataset folder as the current directory: one file, found twice, is not ambiguous.
    inside = {**SEED, "train_data_dir": ".", "metadata_path": "metadata.csv", "output_dir": "../../out"}
    config = resolve_local_paths(parse_config(inside), cwd=root / "data/style_train")
    assert config.metadata_path == str(root / "data/style_train/metadata.csv")


def test_metadata_in_both_places_is_78_and_in_neither_65(tmp_path: Path) -> None:
    root = seed_layout(tmp_path / "proj")
    (root / "metadata.csv").write_text("file_name,text\n")
    with pytest.raises(ConfigError) as info:
        resolve_local_paths(parse_config({**SEED, "metadata_path": "metadata.csv"}), cwd=root)
    assert info.value.exit_code == EXIT_CONFIG
    assert str(root / "metadata.csv") in info.value.message
    assert str(root / "data/style_train/metadata.csv") in info.value.message
    with pytest.raises(DatasetError) as missing:
        resolve_local_paths(parse_config({**SEED, "metadata_path": "captions.csv"}), cwd=root)
    assert missing.value.exit_code == EXIT_DATAERR
    assert missing.value.message.startswith("metadata_path: 'captions.csv' does not exist at ")
    assert str(root / "captions.csv") in missing.value.message
    assert str(root / "data/style_train/captions.csv") in missing.value.message


def test_s3_dataset_keeps_its_relative_metadata_path(tmp_path: Path) -> None:
    config = parse_config({**SEED, "train_data_dir": "s3://b/data", "metadata_path": "captions/meta.csv",
                           "base_model": "s3://b/sd15/"})
    resolved = resolve_local_paths(config, cwd=tmp_path)
    assert resolved.metadata_path == "captions/meta.csv"
    assert resolved.train_data_dir == "s3://b/data"


@pytest.mark.parametrize("name", ["v1-5-pruned.ckpt", "model.pt", "diffusion_pytorch_model.bin", "m.PTH"])
def test_pickle_checkpoints_are_refused_at_validation(name: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({**SEED, "base_model": f"./models/{name}"})
    message = info.value.message
    assert info.value.exit_code == EXIT_CONFIG
    assert message.startswith("config: base_model: is a pickle checkpoint") and "runs any code inside" in message
    assert "weights_only=True" in message and ".safetensors" in message
    assert pickle_problem(f"s3://b/{name}") is not None


@pytest.mark.parametrize(
    ("uri", "single"),
    [("./m.safetensors", True), ("s3://b/models/x.SafeTensors", True), ("s3://b/sd15/", False),
     ("/models/sd15", False), ("file:///m/x.safetensors", True), ("s3://b/x.safetensors/", False)],
)
def test_single_file_uris(uri: str, single: bool) -> None:
    assert is_single_file(uri) is single


@pytest.mark.parametrize(
    ("keys", "family"),
    [
        (["model.diffusion_model.input_blocks.0.0.weight", "cond_stage_model.transformer.text_model.x"], "sd1"),
        (["model.diffusion_model.input_blocks.0.0.weight", "cond_stage_model.model.token_embedding.weight"], "sd2"),
        (["model.diffusion_model.input_blocks.0.0.weight", "conditioner.embedders.0.transformer.x"], "sdxl"),
        (["model.diffusion_model.double_blocks.0.img_attn.qkv.weight", "model.diffusion_model.single_blocks.0.x"],
         "flux"),
        (["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"], "flux"),
        (["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"], "sd3"),
        (["lora_unet_down_blocks_0.lora_down.weight"], None),
        (["model.diffusion_model.input_blocks.0.0.weight"], None),  # a UNet alone: no text encoder
    ],
)
def test_family_from_keys(keys: list[str], family: str | None) -> None:
    assert family_from_keys(keys) == family


def test_a_changed_base_file_is_named_as_base_model() -> None:
    config = parse_config(SEED)
    old, new = training_fields(config, "a" * 64), training_fields(config, "b" * 64)
    assert changed_fields(old, new) == ["base_model (file content, sha256 aaaaaaaaaaaa... -> bbbbbbbbbbbb...)"]
    assert changed_fields(training_fields(config), training_fields(config)) == []
