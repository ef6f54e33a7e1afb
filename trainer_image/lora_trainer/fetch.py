"""Base model and dataset into a local cache: downloaded once per node, re-fetched only when changed.

A cache slot per source URI holds `tree/` and `complete.json`, the marker written only after
every file is down: the listing's keys with size and ETag. The next call lists the source again;
an equal listing reuses the slot, a changed one re-fetches just the changed objects.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

from lora_trainer.config import S3Config
from lora_trainer.errors import InputMissing
from lora_trainer.storage import FILE_CONCURRENCY, MIB, S3Store, parse_uri

log = logging.getLogger(__name__)

FETCH_MARKER = "complete.json"


def _cache_slot(cache_dir: Path, uri: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", uri.split("://", 1)[-1]).strip("_")[-60:]
    return cache_dir / f"{slug}-{hashlib.sha256(uri.encode()).hexdigest()[:12]}"


def fetch_tree(uri: str, cache_dir: Path | str, s3: S3Config) -> Path:
    """A local folder holding the tree at `uri`: local paths as they are, s3:// downloaded once.

    The cache slot's marker (written only after every file is down) records each object's size and
    ETag; a later call lists the source and re-fetches only what changed, or nothing.
    """
    loc = parse_uri(uri)
    if loc.path is not None:
        if not loc.path.exists():
            raise InputMissing(f"{uri}: no such file or folder; check the path")
        return loc.path
    store = S3Store(loc.bucket, loc.prefix, s3)
    infos = [i for i in store.list_info("") if not i.key.endswith("/")]  # skip console "folder" objects
    if not infos:
        raise InputMissing(f"{uri}: no objects under this prefix; check the URI and that the upload finished")
    listing = {i.key: {"size": i.size, "etag": i.etag} for i in infos}
    slot = _cache_slot(Path(cache_dir), uri)
    slot.mkdir(parents=True, exist_ok=True)
    tree, marker = slot / "tree", slot / FETCH_MARKER
    with open(slot / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two trainers on one node fetch one at a time
        old = _read_marker(marker)
        if old == listing and all((tree / k).is_file() for k in listing):
            log.info("reusing cached %s (%d files) at %s", uri, len(listing), tree)
            return tree
        marker.unlink(missing_ok=True)
        todo = [k for k in listing if old.get(k) != listing[k] or not (tree / k).is_file()]
        for stale in set(old) - set(listing):
            (tree / stale).unlink(missing_ok=True)
        started = time.monotonic()
        store.get_files([(k, tree / k) for k in todo], workers=FILE_CONCURRENCY * 2)
        marker.write_text(json.dumps(listing, sort_keys=True))
        size = sum(listing[k]["size"] for k in todo) / MIB
        log.info(
            "fetched %s: %d of %d files (%.1f MiB) in %.1fs into %s",
            uri, len(todo), len(listing), size, time.monotonic() - started, tree,
        )
    return tree


def _read_marker(marker: Path) -> dict[str, Any]:
    try:
        data = json.loads(marker.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
