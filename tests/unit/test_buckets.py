"""Aspect-ratio buckets: the bucket list, each image's bucket, and an exact, resumable batch order.

Behaviours tested:
- bucket_resolutions gives kohya's list (table-driven): sides multiples of the step, area at most
  resolution², the largest square always; impossible settings are ConfigErrors naming the field;
- an image goes to the bucket nearest its aspect ratio;
- an epoch's batches each hold one bucket, cover every sample once, and depend only on (seed, epoch);
- the stream serves the same batches for the same seed, other ones for another seed, and a stream
  restarted at a saved position serves what an uninterrupted one would next;
- enable_bucket is off by default (square batches unchanged).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from lora_trainer.buckets import (
    BucketStream,
    bucket_resolutions,
    epoch_batches,
    make_stream,
    nearest_bucket,
)
from lora_trainer.config import parse_config
from lora_trainer.data import BatchStream, Position, Sample
from lora_trainer.errors import EXIT_CONFIG, ConfigError


@pytest.mark.parametrize(
    ("resolution", "min_side", "max_side", "step", "expected"),
    [
        (64, 32, 128, 32, [(32, 96), (32, 128), (64, 64), (96, 32), (128, 32)]),
        (64, 64, 64, 32, [(64, 64)]),
        (48, 16, 64, 16, [(16, 64), (32, 64), (48, 48), (64, 16), (64, 32)]),
        (512, 256, 1024, 64, [(256, 1024), (320, 704), (320, 768), (384, 640), (448, 576),
                              (512, 512), (576, 448), (640, 384), (704, 320), (768, 320),
                              (832, 256), (896, 256), (960, 256), (1024, 256),
                              (256, 832), (256, 896), (256, 960)]),
    ],
)
def test_bucket_resolutions(resolution: int, min_side: int, max_side: int, step: int,
                            expected: list[tuple[int, int]]) -> None:
    got = bucket_resolutions(resolution, min_side, max_side, step)
    assert got == sorted(expected)
    assert all(w % step == 0 and h % step == 0 and w * h <= resolution**2 for w, h in got)


def test_sdxl_buckets_hold_the_usual_shapes() -> None:
    got = bucket_resolutions(1024, 256, 2048, 64)
    assert {(1024, 1024), (832, 1216), (1216, 832), (896, 1152), (768, 1344), (640, 1536)} <= set(got)
    assert all(w * h <= 1024 * 1024 for w, h in got)


@pytest.mark.parametrize(
    ("args", "field"),
    [((32, 16, 64, 64), "bucket_reso_steps: 64 is over resolution 32"),
     ((64, 128, 64, 32), "min_bucket_reso: 128 is over max_bucket_reso 64")],
)
def test_impossible_buckets_name_the_field(args: tuple[int, int, int, int], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        bucket_resolutions(*args)
    assert info.value.exit_code == EXIT_CONFIG and field in info.value.message


@pytest.mark.parametrize(
    ("size", "bucket"),
    [((100, 100), (64, 64)), ((300, 100), (96, 32)), ((100, 400), (32, 128)), ((50, 160), (32, 96)),
     ((1000, 10), (128, 32))],
)
def test_nearest_bucket(size: tuple[int, int], bucket: tuple[int, int]) -> None:
    buckets = bucket_resolutions(64, 32, 128, 32)
    assert buckets[nearest_bucket(size, buckets)] == bucket


def test_epoch_batches_stay_in_one_bucket_and_cover_every_sample() -> None:
    assignment = [0, 1, 0, 2, 1, 0, 0, 2, 1]
    batches = epoch_batches(assignment, 2, seed=7, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(9))
    assert all(len({assignment[i] for i in b}) == 1 and 1 <= len(b) <= 2 for b in batches)
    assert batches == epoch_batches(assignment, 2, seed=7, epoch=0)
    others = [epoch_batches(assignment, 2, seed=8, epoch=0), epoch_batches(assignment, 2, seed=7, epoch=1)]
    assert all(o != batches for o in others)


@pytest.fixture
def shapes(tmp_path: Path) -> list[Sample]:
    out = []
    for i, (w, h) in enumerate([(64, 32), (32, 64), (48, 48), (80, 40), (40, 80), (64, 64), (96, 30)]):
        path = tmp_path / f"{i}.png"
        Image.new("RGB", (w, h), (i * 30, 255 - i * 30, 90)).save(path)
        out.append(Sample(path, f"image {i}"))
    return out


def draw(stream: BucketStream, n: int) -> list[tuple]:
    out = []
    for _ in range(n):
        b = stream.next_samples(2)
        out.append((tuple(b.pixels.shape), b.captions, b.original_sizes, b.crops, b.pixels.sum().item()))
    return out


def test_stream_is_reproducible_and_resumable(shapes: list[Sample]) -> None:
    buckets = bucket_resolutions(48, 16, 96, 16)

    def stream(seed: int) -> BucketStream:
        return BucketStream(shapes, buckets, 2, center_crop=False, random_flip=True, seed=seed)

    first = draw(stream(3), 12)  # about three epochs
    assert first == draw(stream(3), 12)
    assert first != draw(stream(4), 12)
    assert len({shape for shape, *_ in first}) > 1  # several buckets in use
    for shape, captions, *_ in first:
        assert shape[2] * shape[3] <= 48 * 48 and len(captions) in (1, 2)
    # Stop after 5 batches, keep the position as a checkpoint does, and restart a fresh stream there.
    a = stream(3)
    draw(a, 5)
    saved = Position(a.position.epoch, a.position.index)
    b = stream(3)
    b.position = saved
    assert draw(b, 7) == first[5:]


def test_bucketing_is_opt_in(shapes: list[Sample], tmp_path: Path) -> None:
    base = {"base_model": "m", "train_data_dir": "d", "output_dir": "o", "max_train_steps": 1, "resolution": 32}
    config = parse_config(base)
    assert not config.enable_bucket
    assert isinstance(make_stream(shapes, config), BatchStream)
    bucketed = make_stream(shapes, parse_config({**base, "enable_bucket": True, "min_bucket_reso": 16,
                                                 "max_bucket_reso": 64, "bucket_reso_steps": 16}))
    assert isinstance(bucketed, BucketStream)
    assert torch.is_tensor(bucketed.next_samples(1).pixels)
    with pytest.raises(ConfigError):
        parse_config({**base, "min_bucket_reso": 512, "max_bucket_reso": 256})
