"""SDXL behind the task seam, on a tiny SDXL built from configs (lora_trainer.tiny_sdxl).

Behaviours tested:
- an SDXL folder trains with the same config keys as SD (base_model is all that changes), with
  LoRA on the UNet and both text encoders; the output folder has the same layout;
- both exports load with StableDiffusionXLPipeline.load_lora_weights, change the image, and give
  the same image; the kohya file uses lora_unet_ / lora_te1_ / lora_te2_ keys with the run's alpha;
- a run stopped as on SIGTERM (checkpoint committed, exit 75) and resumed ends with final weights
  sha256-equal to an uninterrupted run's;
- time ids come from the real image sizes and crops;
- a config that leaves resolution unset trains SDXL at 1024 and SD at 512, and the run's training
  fields and hash record the value used.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lora_trainer import contract
from lora_trainer.config import parse_config
from lora_trainer.errors import EXIT_PREEMPTED, Preempted
from lora_trainer.signals import StopFlag
from lora_trainer.tasks.sdxl import time_ids
from lora_trainer.tiny_sdxl import build_tiny_sdxl
from lora_trainer.train import Trainer, read_losses

STEPS = 6


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl") / "model")


def xl_config(model: Path, data: Path, out: Path, **extra: object):
    base = {
        "base_model": str(model), "train_data_dir": str(data), "output_dir": str(out), "resolution": 32,
        "lora_rank": 4, "lora_alpha": 2, "batch_size": 2, "max_train_steps": STEPS, "learning_rate": 5e-3,
        "save_steps": 4, "keep_last": 1, "seed": 3, "cache_dir": str(out.parent / "cache"), "log_every": 2,
        "center_crop": False, "random_flip": True, "train_text_encoder": True,
    }
    return parse_config({**base, **extra})


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def trained(tiny_sdxl: Path, tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("xl") / "out"
    Trainer(xl_config(tiny_sdxl, tiny_data, out)).run()
    return out


def test_sdxl_trains_with_the_sd_keys(trained: Path) -> None:
    assert sorted(read_losses((trained / "logs/metrics.jsonl").read_text())) == list(range(1, STEPS + 1))
    for name in (contract.FINAL_WEIGHTS, contract.FINAL_WEIGHTS_KOHYA, contract.CONFIG_BACKUP, contract.LATEST_FILE,
                 "checkpoints/pytorch_lora_weights_step_4.safetensors"):
        assert (trained / name).is_file(), name
    state = sorted(p.name for p in (trained / "checkpoints" / f"step-{STEPS:09d}").glob("lora_*.safetensors"))
    assert state == ["lora_text_encoder.safetensors", "lora_text_encoder_2.safetensors", "lora_unet.safetensors"]


def test_kohya_keys_name_both_text_encoders(trained: Path) -> None:
    state = load_file(str(trained / contract.FINAL_WEIGHTS_KOHYA))
    for prefix in ("lora_unet_", "lora_te1_text_model_encoder_layers_", "lora_te2_text_model_encoder_layers_"):
        assert any(k.startswith(prefix) and k.endswith(".lora_down.weight") for k in state), prefix
    alphas = {float(v) for k, v in state.items() if k.endswith(".alpha")}
    assert alphas == {2.0}


def render(pipe) -> np.ndarray:
    g = torch.Generator().manual_seed(0)
    return np.asarray(pipe("a red circle on a blue background", num_inference_steps=3, height=32, width=32,
                           generator=g, output_type="np").images[0])


def test_both_exports_load_and_give_the_same_image(trained: Path, tiny_sdxl: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    pipe.set_progress_bar_config(disable=True)
    plain = render(pipe)
    pipe.load_lora_weights(str(trained), weight_name=contract.FINAL_WEIGHTS, adapter_name="d")
    with_diffusers = render(pipe)
    pipe.unload_lora_weights()
    np.testing.assert_allclose(render(pipe), plain, atol=1e-6)  # unloading really removed it
    pipe.load_lora_weights(str(trained), weight_name=contract.FINAL_WEIGHTS_KOHYA, adapter_name="k")
    with_kohya = render(pipe)
    assert np.abs(with_diffusers - plain).max() > 1e-3
    np.testing.assert_allclose(with_kohya, with_diffusers, atol=1e-4)


class StopAfter(StopFlag):
    """As if SIGTERM arrived once `steps` optimizer steps were done (the loop asks before each step)."""

    def __init__(self, steps: int) -> None:
        super().__init__()
        self.asked = 0
        self.steps = steps

    @property
    def requested(self) -> bool:
        self.asked += 1
        if self.asked > self.steps:
            self.request()
        return super().requested


def test_stopped_and_resumed_sdxl_is_bit_exact(trained: Path, tiny_sdxl: Path, tiny_data: Path,
                                               tmp_path: Path) -> None:
    out = tmp_path / "out"
    config = xl_config(tiny_sdxl, tiny_data, out)
    with pytest.raises(Preempted) as stopped:
        Trainer(config, stop=StopAfter(3)).run()
    assert stopped.value.exit_code == EXIT_PREEMPTED and stopped.value.step == 3
    result = Trainer(config).run()
    assert result.resumed_from == 3
    for name in (contract.FINAL_WEIGHTS, contract.FINAL_WEIGHTS_KOHYA):
        assert sha(out / name) == sha(trained / name), name


def test_time_ids_carry_sizes_and_crops() -> None:
    ids = time_ids([(48, 64), (32, 32)], [(0, 11), (0, 0)], (32, 48))
    assert ids.tolist() == [[48, 64, 0, 11, 32, 48], [32, 32, 0, 0, 32, 48]]


@pytest.mark.parametrize(("model", "used"), [("tiny_sdxl", 1024), ("tiny_sd", 512)])
def test_unset_resolution_takes_the_family_default(model: str, used: int, request: pytest.FixtureRequest,
                                                   tiny_data: Path, tmp_path: Path) -> None:
    from lora_trainer.config import config_hash, training_fields

    folder = request.getfixturevalue(model)
    config = xl_config(folder, tiny_data, tmp_path / "out").model_copy(update={"resolution": None})
    trainer = Trainer(config)
    trainer._model_dir(folder, tmp_path / "cache")
    assert trainer.config.resolution == used
    assert trainer.fields == training_fields(trainer.config) and trainer.fields["resolution"] == used
    assert trainer.hash == config_hash(trainer.config)
