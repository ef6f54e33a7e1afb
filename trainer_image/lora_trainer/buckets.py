"""Aspect-ratio buckets (kohya sd-scripts' `enable_bucket`): batches of one shape, in an exact order.

With `enable_bucket: true` images are not square-cropped: each goes to the bucket (a width x height,
multiples of `bucket_reso_steps`, area at most resolution²) nearest its aspect ratio, is scaled to
cover it and cropped to it (centre or random, then maybe flipped, as in square mode). An epoch's
batches are drawn within one bucket: each bucket's samples shuffled and cut into `batch_size`
batches (a bucket's last batch may be smaller), then the batches shuffled. Every order and crop
comes from (seed, epoch, ...), and the stream's position is (epoch, batch index), so a resumed run
draws exactly the batches an uninterrupted one would. Off by default: square mode is unchanged.

With `epochs` (not max_train_steps) the run's length is still counted in batches of `batch_size`
over the dataset; partial bucket batches make a bucket epoch a few batches longer than that.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lora_trainer.config import TrainConfig
from lora_trainer.data import BatchStream, ImageBatch, Position, Sample, derive_seed
from lora_trainer.errors import ConfigError

Size = tuple[int, int]  # (width, height)


def bucket_resolutions(resolution: int, min_side: int, max_side: int, step: int = 64) -> list[Size]:
    """kohya's bucket list: (width, height) pairs, sides multiples of `step`, area at most resolution².

    The largest square always; then for every width from `min_side` to `max_side` (in steps) the
    tallest height that keeps the area, if it is at least `min_side`, in both orientations. Sorted."""
    if min_side > max_side:
        raise ConfigError(
            f"min_bucket_reso: {min_side} is over max_bucket_reso {max_side}; make min_bucket_reso the smaller"
        )
    square = resolution // step * step
    if square == 0:
        raise ConfigError(
            f"bucket_reso_steps: {step} is over resolution {resolution}; use a step no larger than the resolution"
        )
    max_area = resolution * resolution
    found = {(square, square)}
    width = -(-min_side // step) * step  # min_side rounded up to the step
    while width <= max_side:
        height = min(max_side // step * step, max_area // width // step * step)
        if height >= min_side:
            found |= {(width, height), (height, width)}
        width += step
    return sorted(found)


def nearest_bucket(size: Size, buckets: list[Size]) -> int:
    """Index of the bucket whose aspect ratio (width / height) is nearest the image's (the first on a tie)."""
    ratio = size[0] / size[1]
    return min(range(len(buckets)), key=lambda i: abs(buckets[i][0] / buckets[i][1] - ratio))


def epoch_batches(assignment: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """One epoch's batches of sample indices, each within one bucket (`assignment[i]` is sample i's
    bucket): each bucket shuffled and cut into batches, then the batches shuffled; all from (seed, epoch)."""
    members: dict[int, list[int]] = {}
    for sample, bucket in enumerate(assignment):
        members.setdefault(bucket, []).append(sample)
    batches: list[list[int]] = []
    for bucket in sorted(members):
        g = torch.Generator().manual_seed(derive_seed(seed, epoch, bucket, 0xB0C7))
        order = [members[bucket][i] for i in torch.randperm(len(members[bucket]), generator=g).tolist()]
        batches += [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    g = torch.Generator().manual_seed(derive_seed(seed, epoch, 0xBA7C))
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


def load_image_bucket(
    path: Path, bucket: Size, center_crop: bool, flip: bool, seed: int
) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """Scale the image to cover `bucket` (width, height), crop it to it, maybe flip: CHW float in [-1, 1],
    the original (height, width) and the crop's (top, left) in the scaled image (mirrored when flipped)."""
    bw, bh = bucket
    rng = np.random.default_rng(seed)
    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        scale = max(bw / w, bh / h)
        nw, nh = max(bw, round(w * scale)), max(bh, round(h * scale))
        im = im.resize((nw, nh), Image.Resampling.BICUBIC)
        if center_crop:
            left, top = (nw - bw) // 2, (nh - bh) // 2
        else:
            left, top = int(rng.integers(0, nw - bw + 1)), int(rng.integers(0, nh - bh + 1))
        im = im.crop((left, top, left + bw, top + bh))
        arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    tensor = torch.from_numpy(arr.copy()).permute(2, 0, 1)
    if flip and rng.random() < 0.5:
        tensor = tensor.flip(-1)
        left = nw - left - bw
    return tensor, (h, w), (top, left)


class BucketStream:
    """Serves bucketed micro-batches (as data.BatchStream serves square ones); position = (epoch, batch)."""

    def __init__(self, samples: list[Sample], buckets: list[Size], batch_size: int, center_crop: bool,
                 random_flip: bool, seed: int):
        self.samples = samples
        self.buckets = buckets
        self.batch_size = batch_size
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.seed = seed
        self.assignment = [nearest_bucket(image_size(s.path), buckets) for s in samples]
        self.position = Position()
        self._batches: list[list[int]] = []
        self._batches_epoch = -1

    def _batches_for(self, epoch: int) -> list[list[int]]:
        if self._batches_epoch != epoch:
            self._batches = epoch_batches(self.assignment, self.batch_size, self.seed, epoch)
            self._batches_epoch = epoch
        return self._batches

    def next_samples(self, batch_size: int) -> ImageBatch:
        """The next batch (all of one bucket; `batch_size` is the stream's); advances the position."""
        if batch_size != self.batch_size:
            raise ValueError(f"this stream serves batches of {self.batch_size}, not {batch_size}")
        epoch, index = self.position.epoch, self.position.index
        if index >= len(self._batches_for(epoch)):
            epoch, index = epoch + 1, 0
        images, captions, sizes, crops = [], [], [], []
        for k, i in enumerate(self._batches_for(epoch)[index]):
            bucket = self.buckets[self.assignment[i]]
            seed = derive_seed(self.seed, epoch, index, k, 0xB0C7)
            image, size, crop = load_image_bucket(self.samples[i].path, bucket, self.center_crop,
                                                  self.random_flip, seed)
            images.append(image)
            captions.append(self.samples[i].caption)
            sizes.append(size)
            crops.append(crop)
        self.position = Position(epoch, index + 1)
        return ImageBatch(torch.stack(images), captions, sizes, crops)

    def advance(self, batch_size: int) -> None:
        """Move past the next batch without loading it (another rank's share)."""
        epoch, index = self.position.epoch, self.position.index
        if index >= len(self._batches_for(epoch)):
            epoch, index = epoch + 1, 0
        self.position = Position(epoch, index + 1)


def image_size(path: Path) -> Size:
    """(width, height) from the image header."""
    with Image.open(path) as im:
        return im.size


def make_stream(samples: list[Sample], config: TrainConfig) -> BatchStream | BucketStream:
    """Square batches (data.BatchStream), or bucketed ones with `enable_bucket`; config with its resolution set."""
    if not config.enable_bucket:
        return BatchStream(samples, config.resolution, config.center_crop, config.random_flip, config.seed)
    buckets = bucket_resolutions(config.resolution, config.min_bucket_reso, config.max_bucket_reso,
                                 config.bucket_reso_steps)
    return BucketStream(samples, buckets, config.batch_size, config.center_crop, config.random_flip, config.seed)
