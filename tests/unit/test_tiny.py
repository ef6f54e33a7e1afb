"""The tiny-model builders: what tests, demo and benchmarks rely on.

- build_tiny_sd is deterministic: two builds with one seed are byte-identical; another seed differs.
- the SD folder is a normal diffusers folder that StableDiffusionPipeline loads and samples from.
- the CLIP tokenizer has one token per known word and never falls back to the unknown token.
- build_tiny_dataset writes n images and n captions, as metadata.csv or as .txt sidecars.
- build_tiny_blip is deterministic too.
- the CLI builds what it is asked for and prints the path.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from PIL import Image

from lora_trainer import tiny


@pytest.fixture(scope="module")
def sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.build_tiny_sd(tmp_path_factory.mktemp("sd") / "model", seed=0)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_sd_folder_layout(sd: Path) -> None:
    files = _files(sd)
    for name in (
        "model_index.json",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "scheduler/scheduler_config.json",
    ):
        assert name in files
    assert sum(len(b) for b in files.values()) < 10 * 2**20


def test_sd_build_is_deterministic(sd: Path, tmp_path: Path) -> None:
    again = _files(tiny.build_tiny_sd(tmp_path / "again", seed=0))
    assert again == _files(sd)
    other = _files(tiny.build_tiny_sd(tmp_path / "other", seed=1))
    assert (
        other["unet/diffusion_pytorch_model.safetensors"] != again["unet/diffusion_pytorch_model.safetensors"]
    )


def test_sd_pipeline_loads_and_samples(sd: Path) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(sd)  # no safety checker saved, none required
    pipe.set_progress_bar_config(disable=True)
    for size in (tiny.TINY_RESOLUTION, 2 * tiny.TINY_RESOLUTION):
        out = pipe(
            "a red circle on a blue background",
            num_inference_steps=2,
            height=size,
            width=size,
            generator=torch.Generator().manual_seed(0),
        )
        assert out.images[0].size == (size, size)
    # Default size comes from the configs, as with a real model.
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == tiny.TINY_RESOLUTION


def test_clip_tokenizer_knows_its_words(sd: Path) -> None:
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(sd / "tokenizer")
    ids = tok("a red circle on a blue gradient background").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert len(ids) == 2 + 8  # one token per word
    odd = tok("Zebra-42, über!").input_ids[1:-1]
    assert tok.unk_token_id not in odd  # byte-level: anything tokenizes
    assert tok.decode(odd).replace(" ", "") == "zebra-42,über!"


@pytest.mark.parametrize("captions", ["csv", "txt"])
def test_dataset(tmp_path: Path, captions: str) -> None:
    root = tiny.build_tiny_dataset(tmp_path / "data", n=5, seed=3, captions=captions)
    images = sorted(root.glob("*.png"))
    assert len(images) == 5
    for image in images:
        with Image.open(image) as im:
            assert im.size == (tiny.TINY_RESOLUTION, tiny.TINY_RESOLUTION) and im.mode == "RGB"
    if captions == "csv":
        with (root / "metadata.csv").open(newline="") as f:
            rows = list(csv.DictReader(f))
        assert [r["file_name"] for r in rows] == [p.name for p in images]
        texts = [r["text"] for r in rows]
        assert not list(root.glob("*.txt"))
    else:
        texts = [p.with_suffix(".txt").read_text().strip() for p in images]
        assert not (root / "metadata.csv").exists()
    assert all(t.startswith("a ") and " on a " in t for t in texts)
    # Same seed, same bytes.
    again = tiny.build_tiny_dataset(tmp_path / "again", n=5, seed=3, captions=captions)
    assert _files(again) == _files(root)


def test_blip_build_is_deterministic(tmp_path: Path) -> None:
    one = _files(tiny.build_tiny_blip(tmp_path / "one"))
    assert one == _files(tiny.build_tiny_blip(tmp_path / "two"))
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json"} <= one.keys()


def test_cli_prints_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert tiny.main(["dataset", str(tmp_path / "d"), "--n", "3", "--captions", "txt", "--seed", "1"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "d")
    assert len(list((tmp_path / "d").glob("*.txt"))) == 3
