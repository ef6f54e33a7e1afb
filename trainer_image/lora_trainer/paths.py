"""The path policy: which names may become local paths, and which places may overlap.

One set of rules for every place a name from outside turns into a file: S3 keys fetched into the
cache, keys of the local store, file names in a checkpoint MANIFEST, images, sidecar captions and
the metadata CSV of a dataset folder.

- A name is a relative POSIX path: not empty, no leading `/`, no `..` segment, no NUL or `\\`.
  `.` and empty segments are harmless and normalised away (`a/./b//c` is `a/b/c`).
- A path must stay inside its root after symlinks are resolved (`is_inside`).
- In S3 URIs `.` and empty segments are normalised, `..` is refused (S3 has no parent folders,
  and `s3://b/../x` is a literal key that tools show as a different place).
- `output_dir` may not equal, contain or sit inside an input (`train_data_dir`, `base_model`),
  and `work_dir` may not overlap `output_dir` or an input: the trainer cleans its work_dir.
- A relative local path in a config is looked up from the current directory first, then from a
  second anchor (the config file's folder; the dataset folder for `metadata_path`): the first
  that exists wins, and two that exist and differ are ambiguous (`choose_local`).

The functions here decide and return plain data (a problem string, a normalised name); the
callers raise the error with the exit code of their field (65 dataset, 66 model, 78 config).
`is_inside` and `place` read the filesystem only to resolve symlinks.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from urllib.parse import urlparse

SHOWN_CHARS = 200  # longest stretch of a hostile value echoed back in a message


def shorten(text: str, limit: int = SHOWN_CHARS) -> str:
    """`text` cut to `limit` characters with a marker saying how much was left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...({len(text) - limit} more chars)"


def shown(name: str) -> str:
    """A name as messages quote it: repr, shortened, so control characters stay visible."""
    return shorten(repr(name))


def name_problem(name: str) -> str | None:
    """Why `name` may not become a path under a root, or None if it may."""
    if not name or not name.strip("/."):
        return "is empty"
    if name.startswith("/"):
        return "is absolute (starts with '/')"
    if "\x00" in name or "\\" in name:
        return "holds a NUL or backslash character"
    if ".." in name.split("/"):
        return "has a '..' segment that climbs out of its folder"
    return None


def normalise_name(name: str) -> str:
    """`a/./b//c` -> `a/b/c`; call only on names `name_problem` accepts."""
    return "/".join(part for part in name.split("/") if part not in ("", "."))


def is_inside(root: Path, path: Path) -> bool:
    """True if `path`, symlinks resolved, is `root` or lies under it (also resolved)."""
    try:
        return path.resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError):  # a symlink loop
        return False


def key_conflicts(keys: Iterable[str]) -> list[tuple[str, str]]:
    """Pairs (`x`, `x/y`) where one key would have to be both a file and a folder locally."""
    names = set(keys)
    out = []
    for key in sorted(names):
        parts = key.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent in names:
                out.append((parent, key))
                break
    return out


def s3_uri_problem(uri: str) -> str | None:
    """Why an s3:// URI is refused (a `..` segment), or None."""
    path = urlparse(uri).path if uri.startswith("s3://") else ""
    if ".." in path.split("/"):
        return f"{shorten(uri)} has a '..' segment; S3 keys have no parent folders, write the full prefix"
    return None


def normalise_s3_uri(uri: str) -> str:
    """`s3://b/a/./b//c/` -> `s3://b/a/b/c/`; a clean URI is returned unchanged (trailing `/` kept)."""
    if not uri.startswith("s3://"):
        return uri
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    body, trailing = (prefix[:-1], "/") if prefix.endswith("/") else (prefix, "")
    clean = normalise_name(body)
    if clean == body:
        return uri
    return f"s3://{bucket}/{clean}{trailing if clean else ''}"


def place(uri: str, resolve: bool = False) -> tuple[str, tuple[str, ...]]:
    """Where a URI or local path points, comparable with another: (store, path segments).

    Local paths are made absolute lexically, or with symlinks resolved when `resolve` is set."""
    if uri.startswith("s3://"):
        bucket, _, prefix = uri[len("s3://"):].partition("/")
        clean = normalise_name(prefix)
        return f"s3://{bucket}", tuple(clean.split("/")) if clean else ()
    if uri.startswith("file://"):
        uri = urlparse(uri).path
    path = Path(uri).expanduser()
    return "file", (path.resolve() if resolve else Path(os.path.abspath(path))).parts


def overlap(a: str, b: str, resolve: bool = False) -> str | None:
    """How place `a` relates to place `b`: "equal", "inside" (a under b), "contains", or None."""
    store_a, parts_a = place(a, resolve)
    store_b, parts_b = place(b, resolve)
    if store_a != store_b:
        return None
    if parts_a == parts_b:
        return "equal"
    if parts_a[: len(parts_b)] == parts_b:
        return "inside"
    if parts_b[: len(parts_a)] == parts_a:
        return "contains"
    return None


def overlap_problem(field: str, value: str, other_field: str, other: str, resolve: bool = False) -> str | None:
    """A one-line ConfigError message if `field` overlaps `other_field`, else None."""
    how = overlap(value, other, resolve)
    if how is None:
        return None
    words = {"equal": "is the same place as", "inside": "lies inside", "contains": "contains"}[how]
    return (
        f"{field}: {shorten(value)} {words} {other_field} ({shorten(other)}); "
        f"use a separate folder for {field} so nothing is written into or deleted from {other_field}"
    )


def tree_problems(keys: Iterable[str]) -> list[str]:
    """Why a listing of object keys cannot be laid out as files under one folder ([] if it can).

    Each key must pass `name_problem`; no two keys may normalise to one name; no key may be both a
    file and the folder of another (`x` and `x/y`)."""
    problems, seen = [], {}
    for key in sorted(keys):
        if problem := name_problem(key):
            problems.append(f"object {shown(key)} {problem}")
            continue
        name = normalise_name(key)
        if name in seen:
            problems.append(f"objects {shown(seen[name])} and {shown(key)} are the same file name {shown(name)}")
        seen.setdefault(name, key)
    for parent, child in key_conflicts(seen):
        problems.append(
            f"objects {shown(seen[parent])} and {shown(seen[child])} need {shown(parent)} to be a file and a folder"
        )
    return problems


def problems_line(problems: list[str], fix: str) -> str:
    """The first problem, how many more there are, and the fix: one line."""
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return f"{problems[0]}{more}; {fix}"


def local_path(value: str) -> Path | None:
    """The local path a config value names (`file://` unwrapped, `~` expanded); None for s3:// and
    any other scheme (left for the storage layer to accept or refuse)."""
    if value.startswith("file://"):
        value = urlparse(value).path
    elif "://" in value:
        return None
    return Path(value).expanduser()


def choose_local(
    field: str, value: str, anchors: Sequence[tuple[str, Path]], exists: Callable[[Path], bool] = os.path.exists,
) -> tuple[Path | None, str | None]:
    """Where a local path in a config points: (absolute path, None), or (None, why it is ambiguous).

    An absolute path is used as is. A relative one is joined to each anchor (label, folder) in
    order, the current directory first: the first that exists wins; when none exists the first
    anchor's is used (the path may be an output still to create). Two that exist and differ
    (symlinks resolved) are ambiguous. s3:// values are not local: (None, None)."""
    path = local_path(value)
    if path is None:
        return None, None
    if path.is_absolute():
        return path, None
    candidates: dict[str, tuple[str, Path]] = {}
    for label, anchor in anchors:
        candidate = Path(os.path.abspath(anchor / path))
        candidates.setdefault(str(candidate), (label, candidate))
    found = [(label, c) for label, c in candidates.values() if exists(c)]
    distinct = {os.path.realpath(c): (label, c) for label, c in found}
    if len(distinct) > 1:
        (la, a), (lb, b) = list(distinct.values())[:2]
        return None, (
            f"{field}: {shorten(repr(value))} exists both as {shorten(str(a))} (from {la}) and as "
            f"{shorten(str(b))} (from {lb}); write an absolute path to say which"
        )
    if found:
        return found[0][1], None
    return next(iter(candidates.values()))[1], None


def metadata_outside(value: str, data_dir: Path | str) -> str:
    """The DatasetError message for a metadata_path that resolves outside the dataset folder."""
    return (
        f"metadata_path: {shorten(value)} resolves outside the dataset folder {shorten(str(data_dir))}; "
        "put the captions CSV in that folder and give its name"
    )
