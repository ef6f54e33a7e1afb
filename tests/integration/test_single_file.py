"""Single-file base models: the tiny SD model as one original-layout `.safetensors` file.

Behaviours tested:
- the file (CompVis/A1111 key layout) reads back through diffusers' `from_single_file`, with the
  tiny folder as `config=`, to exactly the folder's weights;
- training on the file gives the same LoRA bytes (sha256) as training on the folder; a second run
  reuses the converted folder in the cache (no second conversion, folder untouched);
- the same from S3: `s3://…/x.safetensors` with `base_model_config` an s3:// prefix holding only the
  configs (no weights);
- a changed base file refuses resume (exit 65) naming base_model;
- a pickle checkpoint is refused (78): by its name at validation, and by its bytes when renamed;
- a Flux-layout file is refused (78) naming the family and pointing at a diffusers folder, an SD file under model_family sdxl too; no configs offline → 66 naming
  base_model_config (a real `lora-train` process with HF_HUB_OFFLINE=1 and an empty HF cache).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lora_trainer import contract
from lora_trainer.config import parse_config
from lora_trainer.errors import EXIT_CONFIG, EXIT_DATAERR, EXIT_NOINPUT, ConfigError, ResumeRefused
from lora_trainer.single_file import CONFIG_SUFFIXES, CONVERTED_DIR, CONVERTED_MARKER
from lora_trainer.tiny import build_tiny_sd_single_file
from lora_trainer.train import Trainer
from tests.support.s3 import S3Env

pytestmark = pytest.mark.timeout(600)


def run_config(model: str, data: Path, out: Path, cache: Path, **extra: object) -> dict:
    """Four tiny steps, a checkpoint every two."""
    return {
        "base_model": model, "train_data_dir": str(data), "output_dir": str(out), "resolution": 32,
        "lora_rank": 4, "batch_size": 2, "max_train_steps": 4, "learning_rate": 1e-3, "save_steps": 2,
        "keep_last": 1, "seed": 7, "cache_dir": str(cache), **extra,
    }


def weights_sha(out: Path) -> str:
    return hashlib.sha256((out / contract.FINAL_WEIGHTS).read_bytes()).hexdigest()


def copy_configs(model_dir: Path, dest: Path) -> Path:
    """The configs of a diffusers folder without its weights: what base_model_config needs."""
    for path in model_dir.rglob("*"):
        if path.is_file() and path.suffix in CONFIG_SUFFIXES:
            target = dest / path.relative_to(model_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
    return dest


@pytest.fixture(scope="module")
def tiny_file(tiny_sd: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sd_single_file(tmp_path_factory.mktemp("sd-file") / "v1-5-pruned.safetensors", tiny_sd)


@pytest.fixture(scope="module")
def folder_weights(tiny_sd: Path, tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("folder-run")
    Trainer(parse_config(run_config(str(tiny_sd), tiny_data, root / "out", root / "cache"))).run()
    return weights_sha(root / "out")


def test_single_file_reads_back_the_folder_weights(tiny_file: Path, tiny_sd: Path) -> None:
    from diffusers import StableDiffusionPipeline

    keys = set(json.loads(tiny_file.read_bytes()[8:8 + int.from_bytes(tiny_file.read_bytes()[:8], "little")]))
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    assert "first_stage_model.encoder.mid.attn_1.q.weight" in keys
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in keys
    loaded = StableDiffusionPipeline.from_single_file(str(tiny_file), config=str(tiny_sd), local_files_only=True)
    folder = StableDiffusionPipeline.from_pretrained(tiny_sd)
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(loaded, name).state_dict(), getattr(folder, name).state_dict()
        assert a.keys() == b.keys(), name
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_single_file_trains_like_the_folder_and_converts_once(
    tiny_file: Path, tiny_sd: Path, tiny_data: Path, folder_weights: str, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    configs = copy_configs(tiny_sd, tmp_path / "sd-configs")  # no weights: configs are enough
    cache = tmp_path / "cache"
    caplog.set_level(logging.INFO, logger="lora_trainer")
    Trainer(parse_config(run_config(str(tiny_file), tiny_data, tmp_path / "a", cache,
                                    base_model_config=str(configs)))).run()
    assert weights_sha(tmp_path / "a") == folder_weights
    assert "converting single-file base model" in caplog.text
    (converted,) = [p for p in (cache / CONVERTED_DIR).iterdir() if p.is_dir()]
    assert (converted / CONVERTED_MARKER).is_file()
    stamp = (converted / CONVERTED_MARKER).stat().st_mtime_ns
    caplog.clear()
    # A second attempt on the node (another output here, a resume in life) reuses the conversion.
    Trainer(parse_config(run_config(str(tiny_file), tiny_data, tmp_path / "b", cache,
                                    base_model_config=str(configs)))).run()
    assert "converting single-file base model" not in caplog.text
    assert "reusing converted base model" in caplog.text
    assert (converted / CONVERTED_MARKER).stat().st_mtime_ns == stamp
    assert weights_sha(tmp_path / "b") == folder_weights


def test_single_file_from_s3(s3_env: S3Env, tiny_file: Path, tiny_sd: Path, tiny_data: Path,
                             folder_weights: str, tmp_path: Path) -> None:
    client = s3_env.client()
    client.upload_file(str(tiny_file), s3_env.bucket, "models/v1-5-pruned.safetensors")
    for path in copy_configs(tiny_sd, tmp_path / "cfg").rglob("*"):
        if path.is_file():
            client.upload_file(str(path), s3_env.bucket, f"configs/sd15/{path.relative_to(tmp_path / 'cfg').as_posix()}")
    config = run_config(s3_env.uri("models/v1-5-pruned.safetensors"), tiny_data, tmp_path / "out", tmp_path / "cache",
                        base_model_config=s3_env.uri("configs/sd15/"), s3=s3_env.s3.model_dump(mode="json"))
    Trainer(parse_config(config)).run()
    assert weights_sha(tmp_path / "out") == folder_weights


def test_changed_base_file_refuses_resume(tiny_file: Path, tiny_sd: Path, tiny_data: Path, tmp_path: Path) -> None:
    model = tmp_path / "models/v1-5-pruned.safetensors"
    model.parent.mkdir()
    shutil.copyfile(tiny_file, model)
    config = run_config(str(model), tiny_data, tmp_path / "out", tmp_path / "cache", base_model_config=str(tiny_sd))
    Trainer(parse_config(config)).run()
    # The same path, other weights: resuming the committed checkpoints would mix two base models.
    other = build_tiny_sd_single_file(tmp_path / "other.safetensors", seed=1)
    shutil.copyfile(other, model)
    with pytest.raises(ResumeRefused) as info:
        Trainer(parse_config({**config, "max_train_steps": 6})).run()
    assert info.value.exit_code == EXIT_DATAERR
    assert "different base_model (file content, sha256 " in info.value.message
    assert "allow_config_change" in info.value.message


def test_pickle_checkpoints_are_refused(tiny_sd: Path, tiny_data: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "v1-5-pruned.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}}, ckpt)
    with pytest.raises(ConfigError) as by_name:
        parse_config(run_config(str(ckpt), tiny_data, tmp_path / "o", tmp_path / "c"))
    assert "is a pickle checkpoint" in by_name.value.message and "weights_only=True" in by_name.value.message
    disguised = tmp_path / "model"  # no suffix: told apart by its bytes, never unpickled
    shutil.copyfile(ckpt, disguised)
    with pytest.raises(ConfigError) as by_bytes:
        Trainer(parse_config(run_config(str(disguised), tiny_data, tmp_path / "o", tmp_path / "c"))).run()
    assert by_bytes.value.exit_code == EXIT_CONFIG
    assert by_bytes.value.message.startswith(f"base_model: {disguised} is a pickle checkpoint")


def test_flux_layout_is_refused_naming_the_family(tiny_data: Path, tmp_path: Path) -> None:
    flux = tmp_path / "flux1-dev.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(1), "single_blocks.0.linear1.weight": torch.zeros(1)},
              str(flux))
    with pytest.raises(ConfigError) as info:
        Trainer(parse_config(run_config(str(flux), tiny_data, tmp_path / "o", tmp_path / "c"))).run()
    assert "is a single-file Flux checkpoint; Flux trains from a diffusers folder only" in info.value.message
    assert info.value.message.endswith("(saved with FluxPipeline.save_pretrained())")


def test_sd_file_with_model_family_sdxl_is_refused(tiny_file: Path, tiny_data: Path, tmp_path: Path) -> None:
    config = {**run_config(str(tiny_file), tiny_data, tmp_path / "o", tmp_path / "c"), "model_family": "sdxl"}
    with pytest.raises(ConfigError) as info:
        Trainer(parse_config(config)).run()
    assert info.value.exit_code == EXIT_CONFIG
    assert "model_family: 'sdxl' but base_model" in info.value.message and "Stable Diffusion 1.x/2.x" in info.value.message


def test_no_config_offline_names_base_model_config(tiny_file: Path, tiny_data: Path, tmp_path: Path) -> None:
    config = run_config(str(tiny_file), tiny_data, tmp_path / "o", tmp_path / "c")
    term = tmp_path / "termination.json"
    env = {"PATH": os.environ["PATH"], "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty-hf"),
           contract.ENV_CONFIG: json.dumps(config), contract.ENV_TERMINATION_LOG: str(term)}
    proc = subprocess.run([sys.executable, "-m", "lora_trainer"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == EXIT_NOINPUT, proc.stderr
    assert "Traceback" not in proc.stderr
    message = contract.TerminationMessage.model_validate_json(term.read_text()).message
    assert message.startswith(f"base_model: {tiny_file} is a single-file checkpoint")
    assert "set base_model_config to a diffusers folder" in message
