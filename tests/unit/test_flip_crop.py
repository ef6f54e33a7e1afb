"""SDXL's crop top-left for flipped images (the convention documented in tasks/sdxl.py).

Behaviour tested: for square crops and for buckets, centre and random crops, the (top, left) an
image reports is where its pixels sit in the resized image as the model sees it: a flipped sample's
pixels equal the crop at (top, left) of the mirrored resized image (diffusers' LoRA SDXL script
flips before it crops, so its crop_top_left is this same number); an unflipped one's, the crop of
the resized image itself; flipped and unflipped crops of one draw report mirrored lefts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lora_trainer.buckets import load_image_bucket
from lora_trainer.data import load_image_cropped

WIDTH, HEIGHT = 90, 40  # wide, so the left edge moves


@pytest.fixture(scope="module")
def picture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("flip") / "wide.png"
    Image.fromarray(rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)).save(path)
    return path


def crop_of(path: Path, size: tuple[int, int], box: tuple[int, int, int, int], mirror: bool) -> torch.Tensor:
    """The crop `box` (left, top, width, height) of the image resized to `size`, mirrored first if asked."""
    with Image.open(path) as im:
        im = im.convert("RGB").resize(size, Image.Resampling.BICUBIC)
    if mirror:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    left, top, w, h = box
    arr = np.asarray(im.crop((left, top, left + w, top + h)), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def square(path: Path, center: bool, flip: bool, seed: int):
    image, _, crop = load_image_cropped(path, 32, center, flip, seed)
    resized = (max(32, round(WIDTH * 32 / HEIGHT)), 32)
    return image, crop, resized, (32, 32)


def bucket(path: Path, center: bool, flip: bool, seed: int):
    image, _, crop = load_image_bucket(path, (48, 24), center, flip, seed)
    scale = max(48 / WIDTH, 24 / HEIGHT)
    resized = (max(48, round(WIDTH * scale)), max(24, round(HEIGHT * scale)))
    return image, crop, resized, (48, 24)


@pytest.mark.parametrize("load", [square, bucket], ids=["square", "bucket"])
@pytest.mark.parametrize("center", [True, False], ids=["centre", "random"])
def test_crop_top_left_is_where_the_pixels_sit(picture: Path, load, center: bool) -> None:
    flipped = 0
    for seed in range(12):
        plain, (top0, left0), resized, (w, h) = load(picture, center, False, seed)
        image, (top, left), _, _ = load(picture, center, True, seed)
        mirrored = not torch.equal(image, plain)
        flipped += mirrored
        assert torch.equal(image, crop_of(picture, resized, (left, top, w, h), mirror=mirrored))
        assert torch.equal(plain, crop_of(picture, resized, (left0, top0, w, h), mirror=False))
        assert top == top0 and left == (resized[0] - left0 - w if mirrored else left0)
    assert 0 < flipped < 12  # both cases were seen
