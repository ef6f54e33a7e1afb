"""Datasets: scan a folder of captioned images, check it before training, and serve exact batches.

Captions come from `metadata.csv` (columns file_name,text) when present, else same-stem sidecar
files (`.txt` by default).

Hostile or broken datasets stop the run with DatasetError (exit 65) and one line naming the file:
an image, caption or CSV that is a symlink out of the dataset folder, or a metadata_path that
resolves outside it; a CSV that is not UTF-8 (a UTF-8 BOM is fine), has a field over 131072
characters, or names one file_name twice (ambiguous captions: remove the duplicate row); a sidecar
caption over 131072 characters or not UTF-8; an image over `max_image_pixels` (width x height,
default 100 MP: raise it in the config if you mean it). An image over a quarter of the cap is
used with a warning (decoding it takes about 3 bytes a pixel, several times over while resizing).
An image that does not decode is skipped with a warning, as before. Every random choice (epoch order, crop offset, flip) is derived from
(seed, epoch, index), so a resumed run sees exactly the samples an uninterrupted one would.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lora_trainer.config import DEFAULT_MAX_IMAGE_PIXELS
from lora_trainer.errors import DatasetError, InputMissing
from lora_trainer.paths import is_inside, metadata_outside, shorten

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
DEFAULT_METADATA = "metadata.csv"
MAX_CAPTION_CHARS = 131072  # csv's own field limit; a CLIP tokenizer keeps 77 tokens anyway


@dataclass(frozen=True)
class Sample:
    """One training image and its caption."""

    path: Path
    caption: str


@dataclass
class DatasetReport:
    """What a dataset check found: usable samples, warnings to show, and a fatal reason if any."""

    samples: list[Sample] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    fatal: str | None = None

    def summary(self) -> str:
        """The warnings as one block for the log."""
        head = f"dataset: {len(self.samples)} usable images, {len(self.warnings)} warnings"
        return "\n".join([head, *(f"  - {w}" for w in self.warnings)])


def _require_inside(data_dir: Path, path: Path, what: str) -> None:
    if not is_inside(data_dir, path):
        raise DatasetError(
            f"train_data_dir: {what} {shorten(path.name)} resolves to {shorten(str(path.resolve()))}, outside "
            f"the dataset folder {shorten(str(data_dir))}; copy the file into the folder instead of linking it"
        )


def list_images(data_dir: Path) -> list[Path]:
    """Image files directly in data_dir, sorted by name so every node sees the same order.

    A symlink that leads out of data_dir is a DatasetError."""
    images = sorted(p for p in data_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    for image in images:
        _require_inside(data_dir, image, "image")
    return images


def _read_csv(csv_path: Path) -> dict[str, str]:
    shown = shorten(csv_path.name)
    captions: dict[str, str] = {}
    rows: dict[str, int] = {}
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            missing = {"file_name", "text"} - set(reader.fieldnames or [])
            if missing:
                raise DatasetError(
                    f"{shown}: missing column(s) {', '.join(sorted(missing))}; the header must be file_name,text"
                )
            for row in reader:
                name = row.get("file_name")
                if not name:
                    continue
                if name in rows:
                    raise DatasetError(
                        f"{shown}: file_name {shorten(repr(name))} appears on lines {rows[name]} and "
                        f"{reader.line_num}; keep one caption per image"
                    )
                rows[name] = reader.line_num
                captions[name] = (row.get("text") or "").strip()
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{shown}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except csv.Error as exc:
        raise DatasetError(
            f"{shown}: unreadable CSV ({shorten(str(exc))}); captions may be at most {MAX_CAPTION_CHARS} characters"
        ) from None
    return captions


def _read_sidecar(data_dir: Path, sidecar: Path) -> str:
    _require_inside(data_dir, sidecar, "caption")
    with sidecar.open("rb") as fh:
        raw = fh.read(MAX_CAPTION_CHARS * 4 + 1)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{shorten(sidecar.name)}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    if len(text) > MAX_CAPTION_CHARS:
        raise DatasetError(
            f"{shorten(sidecar.name)}: caption longer than {MAX_CAPTION_CHARS} characters; shorten it"
        )
    return text.strip()


def read_captions(data_dir: Path, metadata_path: str | None, caption_extension: str) -> dict[str, str]:
    """Captions by image file name, from the metadata CSV or from sidecar files."""
    csv_path = data_dir / (metadata_path or DEFAULT_METADATA)
    if metadata_path and not is_inside(data_dir, csv_path):
        raise DatasetError(metadata_outside(metadata_path, data_dir))
    if metadata_path and not csv_path.is_file():
        raise DatasetError(f"metadata_path: {shorten(str(csv_path))} does not exist; fix the path or remove the setting")
    if csv_path.is_file():
        _require_inside(data_dir, csv_path, "captions CSV")
        return _read_csv(csv_path)
    captions = {}
    for image in list_images(data_dir):
        sidecar = image.with_suffix(caption_extension)
        if sidecar.is_file():
            captions[image.name] = _read_sidecar(data_dir, sidecar)
    return captions


def image_size(image: Path, max_pixels: int) -> tuple[int, int]:
    """Width and height of a decodable image; DatasetError if over `max_pixels`; PIL's errors else."""
    Image.MAX_IMAGE_PIXELS = max_pixels  # PIL refuses (at twice this) before reading any pixel data
    too_big = (
        f"train_data_dir: {shorten(image.name)} is over max_image_pixels ({max_pixels}); "
        "shrink it, remove it, or raise max_image_pixels"
    )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(image) as im:
                width, height = im.size
                if width * height > max_pixels:
                    raise DatasetError(too_big.replace(" is over", f" ({width}x{height}) is over"))
                im.verify()
            with Image.open(image) as im:
                im.load()
    except Image.DecompressionBombError:
        raise DatasetError(too_big) from None
    return width, height


def check_dataset(
    data_dir: Path, resolution: int, metadata_path: str | None = None, caption_extension: str = ".txt",
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> DatasetReport:
    """Check every image before training: unreadable, uncaptioned, too small or big; empty is fatal."""
    if not data_dir.is_dir():
        raise InputMissing(f"train_data_dir: {data_dir} is not a folder; point it at your images")
    report = DatasetReport()
    captions = read_captions(data_dir, metadata_path, caption_extension)
    for image in list_images(data_dir):
        try:
            width, height = image_size(image, max_image_pixels)
        except DatasetError:
            raise
        except Exception as exc:
            # Corrupt files make PIL raise nearly anything (struct.error, IndexError...): all mean unreadable.
            report.warnings.append(f"{shorten(image.name)}: unreadable image, skipped ({type(exc).__name__})")
            continue
        if width * height > max_image_pixels // 4:
            report.warnings.append(
                f"{shorten(image.name)}: {width}x{height} is large; decoding it takes about "
                f"{width * height * 3 // 2**20} MiB each time it is loaded (max_image_pixels {max_image_pixels})"
            )
        caption = captions.get(image.name, "")
        if not caption:
            report.warnings.append(f"{image.name}: no caption, skipped (add it to metadata.csv or a .txt file)")
            continue
        if min(width, height) < resolution:
            report.warnings.append(
                f"{image.name}: {width}x{height} is smaller than resolution {resolution}, will be upscaled"
            )
        report.samples.append(Sample(image, caption))
    if not report.samples:
        report.fatal = (
            f"train_data_dir: no usable captioned images in {data_dir} "
            f"({len(report.warnings)} skipped); add images with captions"
        )
    return report


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across processes and Python versions."""
    digest = hashlib.sha256(",".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled order of sample indices for one epoch."""
    g = torch.Generator().manual_seed(derive_seed(seed, epoch, 0x0DE4))
    return torch.randperm(n, generator=g).tolist()


def load_image_cropped(
    path: Path, resolution: int, center_crop: bool, flip: bool, seed: int
) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """Resize the short side to `resolution`, crop a square, maybe flip: CHW float in [-1, 1],
    the original (height, width) and the crop's (top, left) in the resized image.

    A flipped image reports the mirrored crop's left edge (as kohya and diffusers' SDXL example do)."""
    rng = np.random.default_rng(seed)
    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        scale = resolution / min(w, h)
        nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
        im = im.resize((nw, nh), Image.Resampling.BICUBIC)
        if center_crop:
            left, top = (nw - resolution) // 2, (nh - resolution) // 2
        else:
            left, top = int(rng.integers(0, nw - resolution + 1)), int(rng.integers(0, nh - resolution + 1))
        im = im.crop((left, top, left + resolution, top + resolution))
        arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    tensor = torch.from_numpy(arr.copy()).permute(2, 0, 1)
    if flip and rng.random() < 0.5:
        tensor = tensor.flip(-1)
        left = nw - left - resolution
    return tensor, (h, w), (top, left)


def load_image(path: Path, resolution: int, center_crop: bool, flip: bool, seed: int) -> torch.Tensor:
    """Resize the short side to `resolution`, crop a square, maybe flip; CHW float in [-1, 1]."""
    return load_image_cropped(path, resolution, center_crop, flip, seed)[0]


@dataclass(frozen=True)
class ImageBatch:
    """One micro-batch of samples: pixels (NCHW), captions, and each image's geometry."""

    pixels: torch.Tensor
    captions: list[str]
    original_sizes: list[tuple[int, int]]  # (height, width) before resizing
    crops: list[tuple[int, int]]  # (top, left) of the crop in the resized image
    num_tokens: int = 0  # text batches count tokens for tokens/s; images have none


@dataclass(frozen=True)
class Position:
    """Where the data stream stands: epoch and index into that epoch's shuffled order."""

    epoch: int = 0
    index: int = 0

    def advanced(self, samples: int, size: int) -> Position:
        """The position `samples` samples on, in epochs of `size` (as a stream reading them moves)."""
        epoch, index = self.epoch, self.index
        for _ in range(samples):
            if index >= size:
                epoch, index = epoch + 1, 0
            index += 1
        return Position(epoch, index)


class BatchStream:
    """Serves micro-batches in a fixed order that continues across epochs and resumes exactly."""

    def __init__(self, samples: list[Sample], resolution: int, center_crop: bool, random_flip: bool, seed: int):
        self.samples = samples
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.seed = seed
        self.position = Position()
        self._order: list[int] = []
        self._order_epoch = -1

    def _order_for(self, epoch: int) -> list[int]:
        if self._order_epoch != epoch:
            self._order = epoch_order(len(self.samples), self.seed, epoch)
            self._order_epoch = epoch
        return self._order

    def next_samples(self, batch_size: int) -> ImageBatch:
        """The next `batch_size` samples with their geometry; advances the position."""
        images, captions, sizes, crops = [], [], [], []
        epoch, index = self.position.epoch, self.position.index
        for _ in range(batch_size):
            if index >= len(self.samples):
                epoch, index = epoch + 1, 0
            sample = self.samples[self._order_for(epoch)[index]]
            seed = derive_seed(self.seed, epoch, index)
            image, size, crop = load_image_cropped(sample.path, self.resolution, self.center_crop, self.random_flip, seed)
            images.append(image)
            captions.append(sample.caption)
            sizes.append(size)
            crops.append(crop)
            index += 1
        self.position = Position(epoch, index)
        return ImageBatch(torch.stack(images), captions, sizes, crops)

    def advance(self, batch_size: int) -> None:
        """Move past the next `batch_size` samples without loading them (another rank's share)."""
        self.position = self.position.advanced(batch_size, len(self.samples))

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, list[str]]:
        """The next `batch_size` images (stacked) and captions; advances the position."""
        batch = self.next_samples(batch_size)
        return batch.pixels, batch.captions
