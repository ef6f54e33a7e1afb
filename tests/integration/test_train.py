"""The trainer on the tiny model: loss goes down, the output folder is complete, both LoRA exports
load into a diffusers pipeline and agree, and bad input exits with its documented code and one line.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from lora_trainer import contract
from lora_trainer.config import parse_config
from lora_trainer.errors import EXIT_CONFIG, EXIT_DATAERR, EXIT_NOINPUT
from lora_trainer.train import Trainer, read_losses
from tests.e2e.deadlines import FUNC_ONLY
from tests.support.stall import stall_guard

# The module fixture `trained` is bounded by stall_guard; the tests' own bodies keep the default timeout.
pytestmark = FUNC_ONLY


def tiny_config(tiny_sd: Path, tiny_data: Path, out: Path, **extra: object):
    base = {
        "base_model": str(tiny_sd), "train_data_dir": str(tiny_data), "output_dir": str(out),
        "resolution": 32, "lora_rank": 4, "batch_size": 2, "max_train_steps": 60, "learning_rate": 1e-3,
        "save_steps": 25, "keep_last": 1, "seed": 7, "cache_dir": str(out.parent / "cache"), "log_every": 20,
    }
    return parse_config({**base, **extra})


@pytest.fixture(scope="module")
def trained(tiny_sd: Path, tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Bounded by its log going silent, not by pytest's fixed timeout (the module is FUNC_ONLY): 60
    # steps take about a minute on an idle machine and over ten at load 14.
    out = tmp_path_factory.mktemp("train") / "out"
    with stall_guard(out / "logs"):
        Trainer(tiny_config(tiny_sd, tiny_data, out)).run()
    return out


def test_loss_goes_down(trained: Path) -> None:
    losses = read_losses((trained / "logs/metrics.jsonl").read_text())
    assert sorted(losses) == list(range(1, 61))
    first, last = np.mean([losses[s] for s in range(1, 11)]), np.mean([losses[s] for s in range(51, 61)])
    assert last < 0.9 * first, (first, last)


def test_output_folder_layout(trained: Path) -> None:
    for name in (contract.FINAL_WEIGHTS, contract.FINAL_WEIGHTS_KOHYA, contract.CONFIG_BACKUP,
                 contract.PROGRESS_FILE, "logs/train.log", "logs/metrics.jsonl",
                 "checkpoints/pytorch_lora_weights_step_25.safetensors",
                 "checkpoints/pytorch_lora_weights_step_50.safetensors", contract.LATEST_FILE):
        assert (trained / name).is_file(), name
    assert list((trained / "logs").glob("events.out.tfevents.*"))
    # keep_last: 1 -> only the newest resumable checkpoint stays (the last step's), and it is committed.
    assert [p.name for p in (trained / "checkpoints").glob("step-*")] == ["step-000000060"]
    assert (trained / "checkpoints/step-000000060/MANIFEST.json").is_file()
    progress = contract.Progress.model_validate_json((trained / contract.PROGRESS_FILE).read_text())
    assert (progress.step, progress.total_steps, progress.state) == (60, 60, "finished")
    assert "max_train_steps: 60" in (trained / contract.CONFIG_BACKUP).read_text()


def test_tensorboard_scalars(trained: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(trained / "logs"))
    acc.Reload()
    assert {"loss/train", "learning_rate", "grad_norm"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("loss/train")] == list(range(1, 61))


def render(pipe: StableDiffusionPipeline) -> np.ndarray:
    g = torch.Generator().manual_seed(0)
    image = pipe("a red circle on a blue background", num_inference_steps=3, height=32, width=32,
                 generator=g, output_type="np").images[0]
    return np.asarray(image)


def test_exports_load_change_the_image_and_agree(trained: Path, tiny_sd: Path) -> None:
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    plain = render(pipe)
    pipe.load_lora_weights(str(trained), weight_name=contract.FINAL_WEIGHTS, adapter_name="diffusers")
    with_diffusers = render(pipe)
    pipe.unload_lora_weights()
    pipe.load_lora_weights(str(trained), weight_name=contract.FINAL_WEIGHTS_KOHYA, adapter_name="kohya")
    with_kohya = render(pipe)
    assert np.abs(with_diffusers - plain).max() > 1e-3
    np.testing.assert_allclose(with_kohya, with_diffusers, atol=1e-4)


def test_kohya_keys_and_alpha(tiny_sd: Path, tiny_data: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    out = tmp_path / "out"
    Trainer(tiny_config(tiny_sd, tiny_data, out, max_train_steps=4, save_steps=None, lora_alpha=2, learning_rate=0.05,
                        train_text_encoder=True)).run()
    state = load_file(str(out / contract.FINAL_WEIGHTS_KOHYA))
    assert any(k.startswith("lora_unet_") and k.endswith(".lora_down.weight") for k in state)
    assert any(k.startswith("lora_te_text_model_encoder_layers_") for k in state)
    assert not any(k.startswith("lora_te1_") for k in state)
    alphas = {k: float(v) for k, v in state.items() if k.endswith(".alpha")}
    assert alphas and set(alphas.values()) == {2.0}
    # With a text-encoder LoRA and alpha != rank, the kohya file must still render like the diffusers one.
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(out), weight_name=contract.FINAL_WEIGHTS, adapter_name="d")
    with_diffusers = render(pipe)
    pipe.unload_lora_weights()
    pipe.load_lora_weights(str(out), weight_name=contract.FINAL_WEIGHTS_KOHYA, adapter_name="k")
    np.testing.assert_allclose(render(pipe), with_diffusers, atol=1e-4)


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lora_trainer", *args], capture_output=True, text=True,
                          timeout=120, env=env)


def write_config(path: Path, **fields: object) -> Path:
    path.write_text(json.dumps(fields))
    return path


@pytest.mark.parametrize(
    ("case", "code", "needle"),
    [
        ("bad_field", EXIT_CONFIG, "lora_rank: Input should be greater than or equal to 1 (got 0)"),
        ("unknown_key", EXIT_CONFIG, "lora_rnak: Extra inputs are not permitted"),
        ("no_config", EXIT_CONFIG, "no config: pass --config FILE"),
        ("missing_model", EXIT_NOINPUT, "base_model:"),
        ("empty_dataset", EXIT_DATAERR, "no usable captioned images"),
        ("corrupt_only", EXIT_DATAERR, "no usable captioned images"),
    ],
)
def test_bad_input_exit_codes(case: str, code: int, needle: str, tiny_sd: Path, tiny_data: Path,
                              tmp_path: Path) -> None:
    fields: dict[str, object] = {
        "base_model": str(tiny_sd), "train_data_dir": str(tiny_data), "output_dir": str(tmp_path / "o"),
        "resolution": 32, "max_train_steps": 1, "cache_dir": str(tmp_path / "c"),
    }
    empty = tmp_path / "empty"
    empty.mkdir()
    if case == "bad_field":
        fields["lora_rank"] = 0
    elif case == "unknown_key":
        fields["lora_rnak"] = 4
    elif case == "missing_model":
        fields["base_model"] = str(tmp_path / "nowhere")
    elif case == "empty_dataset":
        fields["train_data_dir"] = str(empty)
    elif case == "corrupt_only":
        (empty / "x.png").write_bytes(b"not an image")
        (empty / "x.txt").write_text("caption")
        Image.new("RGB", (40, 40)).save(empty / "nocaption.png")
        fields["train_data_dir"] = str(empty)
    args = [] if case == "no_config" else ["--config", str(write_config(tmp_path / "c.yaml", **fields))]
    term = tmp_path / "termination"
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", contract.ENV_TERMINATION_LOG: str(term)}
    proc = run_cli(*args, env=env)
    assert proc.returncode == code, proc.stderr
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr
    message = contract.TerminationMessage.model_validate_json(term.read_text())
    assert needle in message.message and message.reason
