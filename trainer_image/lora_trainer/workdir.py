"""The work_dir: local scratch the trainer empties at start, so it must be sure the folder is its own.

A folder is the trainer's once it holds the marker file `.lora-train-workdir`, written when the
trainer creates the folder or finds it empty. A non-empty folder without the marker is refused
(ConfigError, exit 78) and left untouched. Cleaning removes everything but the marker, so a
clean interrupted half-way leaves a marked folder the next attempt can clean again.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from lora_trainer.errors import ConfigError
from lora_trainer.paths import shorten

MARKER = ".lora-train-workdir"
MARKER_TEXT = "lora-train scratch: everything in this folder is deleted when a run starts\n"


def prepare_work_dir(path: Path, field: str = "work_dir") -> Path:
    """Create or clean `path` as the trainer's scratch; refuse a folder that is not ours."""
    shown = shorten(str(path))
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{field}: {shown} is a file, not a folder; point {field} at a new or empty folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        marker = path / MARKER
        if not marker.is_file():
            if any(path.iterdir()):
                raise ConfigError(
                    f"{field}: {shown} is not empty and has no {MARKER} marker; lora-train empties its "
                    f"{field} at start, so it only uses a new or empty folder (or one it made): point "
                    f"{field} at one, or unset it"
                )
            marker.write_text(MARKER_TEXT)
            return path
        for child in path.iterdir():
            if child.name == MARKER:
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    except OSError as exc:
        raise ConfigError(f"{field}: cannot use {shown} ({exc.strerror}); check its permissions") from None
    return path
