"""Training data by modality: each source checks its input before training and serves a batch stream.

    SOURCES[FamilyInfo.data](config, model_dir, fetch) -> Dataset

`images`: a folder of captioned images (data.check_dataset; square or bucketed streams);
`text`: a JSONL of prompt/completion, messages or text records (textdata.py). Both streams have a
`position` (epoch, index) that a checkpoint saves and a resumed run restores, and serve
`next_samples(batch_size)` in an order fixed by (seed, epoch). The loop knows only `Dataset`.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from lora_trainer.errors import DatasetError

if TYPE_CHECKING:
    from lora_trainer.config import TrainConfig
    from lora_trainer.data import Position

log = logging.getLogger(__name__)

# fetch(field name, uri, single file?) -> a local path; errors name the field
Fetch = Callable[[str, str, bool], Path]


class Stream(Protocol):
    """Serves micro-batches in an exact order; `position` is what a checkpoint saves."""

    position: Position

    def next_samples(self, batch_size: int) -> Any: ...


@dataclass
class Dataset:
    """A checked training set: its stream, samples per epoch, and held-out batches (or None)."""

    stream: Stream
    size: int
    eval_batches: list[Any] | None = None


def images(config: TrainConfig, model_dir: Path, fetch: Fetch) -> Dataset:
    """A folder of captioned images, checked; square batches, or aspect-ratio buckets."""
    from lora_trainer.buckets import make_stream
    from lora_trainer.data import check_dataset

    data_dir = fetch("train_data_dir", config.train_data_dir or "", False)
    report = check_dataset(data_dir, config.resolution, config.metadata_path, config.caption_extension,
                           config.max_image_pixels)
    if report.warnings:
        log.warning(report.summary())
    if report.fatal:
        raise DatasetError(report.fatal)
    return Dataset(make_stream(report.samples, config), len(report.samples))


def text(config: TrainConfig, model_dir: Path, fetch: Fetch) -> Dataset:
    """A JSONL of text records, tokenized with the base model's tokenizer (textdata.py)."""
    return importlib.import_module("lora_trainer.textdata").open_dataset(config, model_dir, fetch)


SOURCES: dict[str, Callable[[TrainConfig, Path, Fetch], Dataset]] = {"images": images, "text": text}


def open_dataset(source: str, config: TrainConfig, model_dir: Path, fetch: Fetch) -> Dataset:
    """The checked dataset of a family's data source (FamilyInfo.data)."""
    return SOURCES[source](config, model_dir, fetch)
