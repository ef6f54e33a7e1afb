"""Base model and dataset into a local cache: downloaded once per node, re-fetched only when changed.

A cache slot per source URI holds `tree/` and `complete.json`, the marker written only after
every file is down: the listing's keys with size and ETag. The next call lists the source again;
an equal listing reuses the slot, a changed one re-fetches just the changed objects.

Object keys become file names only under the path policy (`lora_trainer.paths`): a key with a
`..` segment or a leading `/`, two keys for one file name, or `x` beside `x/y` make the whole
input unusable (the caller's error: 65 for a dataset, 66 for a model), before anything is written.
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
from lora_trainer.errors import InputMissing, UserError
from lora_trainer.paths import is_inside, name_problem, normalise_name, problems_line, shown, tree_problems
from lora_trainer.storage import FILE_CONCURRENCY, MIB, S3Store, parse_uri

log = logging.getLogger(__name__)

FETCH_MARKER = "complete.json"


def _cache_slot(cache_dir: Path, uri: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", uri.split("://", 1)[-1]).strip("_")[-60:]
    return cache_dir / f"{slug}-{hashlib.sha256(uri.encode()).hexdigest()[:12]}"


def fetch_tree(uri: str, cache_dir: Path | str, s3: S3Config, refuse: type[UserError] = InputMissing) -> Path:
    """A local folder holding the tree at `uri`: local paths as they are, s3:// downloaded once.

    The cache slot's marker (written only after every file is down) records each object's size and
    ETag; a later call lists the source and re-fetches only what changed, or nothing. Keys the
    path policy refuses raise `refuse` naming them.
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
    if problems := tree_problems(listing):
        raise refuse(f"{uri}: {problems_line(problems, 'rename or delete those objects in the bucket')}")
    slot = _cache_slot(Path(cache_dir), uri)
    slot.mkdir(parents=True, exist_ok=True)
    tree, marker = slot / "tree", slot / FETCH_MARKER
    local = {k: tree / normalise_name(k) for k in listing}
    with open(slot / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two trainers on one node fetch one at a time
        if escaped := [k for k, path in local.items() if not is_inside(tree, path)]:
            raise refuse(f"{uri}: {shown(escaped[0])} would be written outside {tree} through a symlink in the cache; "
                         "delete the cache folder")
        old = _read_marker(marker)
        if old == listing and all(path.is_file() for path in local.values()):
            log.info("reusing cached %s (%d files) at %s", uri, len(listing), tree)
            return tree
        marker.unlink(missing_ok=True)
        todo = [k for k in listing if old.get(k) != listing[k] or not local[k].is_file()]
        for stale in set(old) - set(listing):
            # A marker from an older trainer may name keys the path policy refuses: skip those.
            if name_problem(stale) is None and is_inside(tree, tree / normalise_name(stale)):
                (tree / normalise_name(stale)).unlink(missing_ok=True)
        started = time.monotonic()
        store.get_files([(k, local[k]) for k in todo], workers=FILE_CONCURRENCY * 2)
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


def fetch_file(uri: str, cache_dir: Path | str, s3: S3Config) -> Path:
    """A local copy of the one object at `uri` (a single-file base model): local paths as they are.

    Downloaded once into a cache slot whose marker records the object's size and ETag; a later
    call reuses the copy while the object is unchanged."""
    loc = parse_uri(uri)
    if loc.path is not None:
        if not loc.path.is_file():
            raise InputMissing(f"{uri}: no such file; check the path")
        return loc.path
    parent, _, name = loc.prefix.rpartition("/")
    store = S3Store(loc.bucket, parent, s3)
    info = next((i for i in store.list_info(name) if i.key == name), None)
    if info is None:
        raise InputMissing(f"{uri}: no such object; check the URI and that the upload finished")
    listing = {name: {"size": info.size, "etag": info.etag}}
    slot = _cache_slot(Path(cache_dir), uri)
    slot.mkdir(parents=True, exist_ok=True)
    local, marker = slot / "file" / name, slot / FETCH_MARKER
    with open(slot / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _read_marker(marker) == listing and local.is_file():
            log.info("reusing cached %s at %s", uri, local)
            return local
        marker.unlink(missing_ok=True)
        started = time.monotonic()
        store.get_file(name, local)
        marker.write_text(json.dumps(listing, sort_keys=True))
        log.info("fetched %s (%.1f MiB) in %.1fs into %s", uri, info.size / MIB, time.monotonic() - started, local)
    return local
