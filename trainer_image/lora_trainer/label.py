"""Auto-labeling: caption the images of a dataset folder with a local BLIP model.

Captions that already exist (a row of ``metadata.csv`` or a same-stem ``.txt`` file) are kept unless
``overwrite``. The result is always a complete ``metadata.csv`` (``file_name,text``, plus any extra
columns it already had); where the folder already used ``.txt`` sidecars, new captions are also
written as sidecars, so the dataset reads the same in either caption mode.

Images are the files directly in the folder, as the trainer's data module reads them.

Errors, all ``LabelError`` and also the matching ``errors.UserError`` (so ``exit_code`` is set):
    ModelNotFound  InputMissing  66  the model folder is missing or does not load as a BLIP captioner
    NoImages       InputMissing  66  the data folder is missing or holds no images
    BadMetadata    DatasetError  65  metadata.csv exists but has no ``file_name`` column
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import DatasetError, InputMissing, UserError

logger = logging.getLogger(__name__)

METADATA_FILE = "metadata.csv"
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})


class LabelError(UserError):
    """Base of the labeler's errors; each subclass takes ``exit_code`` and ``reason`` from errors.py."""


class ModelNotFound(LabelError, InputMissing):
    """The captioning model folder is missing or unreadable."""


class NoImages(LabelError, InputMissing):
    """The data folder is missing or has no images."""


class BadMetadata(LabelError, DatasetError):
    """An existing metadata.csv cannot be merged with."""


@dataclass(frozen=True)
class LabelReport:
    """What a labeling run did: ``labeled`` new captions, ``kept`` existing ones, ``skipped`` failures."""

    labeled: int
    kept: int
    total: int
    skipped: int = 0


# --------------------------------------------------------------------------- pure decisions


def find_images(data_dir: Path) -> list[str]:
    """Names of the image files directly in ``data_dir``, sorted (hidden files skipped)."""
    return sorted(
        p.name
        for p in data_dir.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
    )


def to_label(images: Sequence[str], existing: Mapping[str, str], overwrite: bool) -> list[str]:
    """The images that need a caption: all of them with ``overwrite``, else those without one."""
    return list(images) if overwrite else [name for name in images if not existing.get(name, "").strip()]


def clean_caption(text: str) -> str:
    """One line, single spaces: a caption that survives a CSV cell and a .txt file alike."""
    return " ".join(text.split())


# --------------------------------------------------------------------------- files


def _read_metadata(data_dir: Path) -> tuple[list[str], list[dict[str, str]]]:
    path = data_dir / METADATA_FILE
    if not path.is_file():
        return ["file_name", "text"], []
    with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheets often add a BOM
        reader = csv.DictReader(f)
        fields = list(reader.fieldnames or [])
        if "file_name" not in fields:
            raise BadMetadata(f"{path} has no 'file_name' column (columns: {fields})")
        rows = [{k: (v or "") for k, v in row.items() if k is not None} for row in reader]
    if "text" not in fields:
        fields.append("text")
    return fields, rows


def _read_sidecars(data_dir: Path, images: Iterable[str]) -> dict[str, str]:
    captions = {}
    for name in images:
        txt = (data_dir / name).with_suffix(".txt")
        if txt.is_file():
            text = clean_caption(txt.read_text(encoding="utf-8", errors="replace"))
            if text:
                captions[name] = text
    return captions


def _write_metadata(data_dir: Path, fields: list[str], rows: list[dict[str, str]]) -> None:
    path = data_dir / METADATA_FILE
    tmp = path.with_name(f".{METADATA_FILE}.tmp")
    with tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written metadata.csv


# --------------------------------------------------------------------------- model


def _load_model(model_path: Path, device: str) -> tuple[Any, Any]:
    # transformers is imported here so that importing this module stays cheap (the CLI imports it).
    from transformers import BlipForConditionalGeneration, BlipProcessor

    try:
        processor = BlipProcessor.from_pretrained(model_path, local_files_only=True)
        model = BlipForConditionalGeneration.from_pretrained(model_path, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelNotFound(f"cannot load a BLIP captioning model from {model_path}: {exc}") from exc
    return processor, model.to(device).eval()


def _caption_batch(processor: Any, model: Any, images: list[Any], max_new_tokens: int) -> list[str]:
    import torch

    inputs = processor(images=images, return_tensors="pt").to(model.device)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens)
    return [clean_caption(t) for t in processor.batch_decode(out, skip_special_tokens=True)]


def _open_rgb(path: Path) -> Any:
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


# --------------------------------------------------------------------------- entry point


def label_dataset(
    data_dir: Path,
    model_path: Path,
    *,
    overwrite: bool = False,
    batch_size: int = 8,
    max_new_tokens: int = 30,
    device: str | None = None,
) -> LabelReport:
    """Caption every image in ``data_dir`` that has no caption yet and write a merged ``metadata.csv``."""
    data_dir, model_path = Path(data_dir), Path(model_path)
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    # Checked first, even when nothing needs a caption: a wrong --model is still a mistake.
    if not model_path.is_dir():
        raise ModelNotFound(f"captioning model folder not found: {model_path}")
    if not data_dir.is_dir():
        raise NoImages(f"data folder not found: {data_dir}")
    images = find_images(data_dir)
    if not images:
        raise NoImages(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {data_dir}")

    fields, rows = _read_metadata(data_dir)
    sidecars = _read_sidecars(data_dir, images)
    csv_captions = {r["file_name"]: clean_caption(r.get("text", "")) for r in rows}
    existing = {**sidecars, **{k: v for k, v in csv_captions.items() if v}}  # the CSV wins a tie
    todo = to_label(images, existing, overwrite)
    logger.info("labeling %d of %d images in %s (overwrite=%s)", len(todo), len(images), data_dir, overwrite)

    new: dict[str, str] = {}
    if todo:
        import torch

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        processor, model = _load_model(model_path, device)
        logger.info("loaded captioning model %s on %s", model_path, device)
        for start in range(0, len(todo), batch_size):
            batch, names = [], []
            for name in todo[start : start + batch_size]:
                try:
                    batch.append(_open_rgb(data_dir / name))
                    names.append(name)
                except OSError as exc:  # one unreadable file should not cost the whole run
                    logger.warning("skipped %s: cannot read image: %s", name, exc)
            if not batch:
                continue
            captions = _caption_batch(processor, model, batch, max_new_tokens)
            for name, text in zip(names, captions, strict=True):
                if text:
                    new[name] = text
                    logger.info("labeled %s: %s", name, text)
                else:
                    logger.warning("skipped %s: the model produced an empty caption", name)

    merged = {**existing, **new}
    by_name = {r["file_name"]: r for r in rows}
    for name in images:
        if name in merged:
            by_name.setdefault(name, {"file_name": name})["text"] = merged[name]
    # Rows of the old CSV stay in their order (even for files we did not find); new ones follow, sorted.
    _write_metadata(data_dir, fields, list(by_name.values()))

    if sidecars:  # the folder uses .txt captions: give the new ones sidecars too
        for name, text in new.items():
            (data_dir / name).with_suffix(".txt").write_text(text + "\n", encoding="utf-8")

    kept = sum(1 for name in images if name in existing and name not in new)
    report = LabelReport(labeled=len(new), kept=kept, total=len(images), skipped=len(todo) - len(new))
    logger.info(
        "wrote %s: %d labeled, %d kept, %d skipped, %d images",
        data_dir / METADATA_FILE, report.labeled, report.kept, report.skipped, report.total,
    )  # fmt: skip
    return report
