"""Checkpoints that survive preemption: commit, verify, pick the one to resume from, prune, fence.

Layout under the output root:

    checkpoints/step-000000500/<state files>   written first, in parallel
    checkpoints/step-000000500/MANIFEST.json   written LAST: sha256 + size of every file, step,
                                               attempt, config hash, training fields
    checkpoints/latest.json                    then this pointer (LatestPointer)
    checkpoints/attempts/000000007.json        one claim per attempt (fencing)

Commit protocol and what it guarantees:
1. A checkpoint exists only once its MANIFEST exists and every file in the step folder matches
   it (same names, sizes, sha256). Every object PUT is atomic, files go up before the MANIFEST,
   so a crash or SIGTERM at any point leaves either a committed checkpoint or a folder that
   `find_resumable` rejects and skips; never a checkpoint that verifies but is incomplete.
2. Retention deletes older step folders only after a newer commit, MANIFEST first, then the
   files: a half-deleted checkpoint has no MANIFEST and never looks valid.
3. Resume never trusts latest.json: it takes the newest step folder that verifies (and whose
   state loads, checked by the caller), falls back past corrupt, partial or unloadable ones
   (logged), and refuses (ResumeRefused) when folders exist but none is usable, instead of
   silently restarting at step 0. A latest.json naming a step whose folder is gone is a warning
   when older checkpoints remain, and a refusal when none do. One exception: while nothing was
   ever committed (no latest.json, no MANIFEST.json in any folder), a folder without a MANIFEST
   is the first upload cut short (a SIGKILL mid-upload), not lost work: it is skipped (logged),
   and the run starts at step 0, as the uninterrupted run did.
4. Fencing: each attempt claims `attempts/<n>.json` at start. Before uploading, before the
   MANIFEST, before latest.json and before pruning, the committer re-reads the newest recorded
   attempt (claims, manifests, latest.json) and raises StaleAttempt if it is older.
5. Runs: the operator numbers attempts per job (LORA_ATTEMPT 1, 2, ...) and names the job's uid
   as the run (LORA_RUN_ID). A claim records both, and `fence_attempt` turns (run, attempt) into
   the fencing number <n>: a run's first claim continues from the newest attempt recorded in the
   output (so a deleted and re-applied job, a new run, fences out the old run's pods instead of
   being fenced out by them, and resumes from its checkpoints); later claims of the same run keep
   that offset, so within a run a higher attempt always fences out a lower one. Without a run
   (lora-train by hand, older operators) LORA_ATTEMPT is the fencing number itself.

The race that remains: S3 has no portable compare-and-swap (conditional writes differ between
AWS, MinIO, R2 and GCS), so between a stale pod's last check and its next PUT (one request,
milliseconds) a newer attempt may claim. The stale pod can then write at most one MANIFEST and
one latest.json (and prune older folders) before its next check stops it. That cannot corrupt
anything: the stale MANIFEST describes files the stale pod itself uploaded, so the folder either
verifies as a genuine state of the same run or is rejected; resume ignores latest.json; and
prune never touches folders at or above the step it just committed. The operator also deletes
the old pod before starting the next attempt, which makes the window rarer still.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import socket
import time
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lora_trainer.config import changed_fields
from lora_trainer.contract import CHECKPOINTS_DIR, LATEST_FILE, MANIFEST_FILE, LatestPointer, utcnow
from lora_trainer.errors import ResumeRefused, StaleAttempt
from lora_trainer.paths import is_inside, name_problem, normalise_name, shorten, shown
from lora_trainer.storage import NotFound, ObjectInfo, StorageUnavailable, Store, UnsafeKey

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
ATTEMPTS_DIR = f"{CHECKPOINTS_DIR}/attempts"
_STEP_RE = re.compile(r"^step-(\d{9})$")
_ATTEMPT_RE = re.compile(r"^(\d{9})\.json$")


# ---- pure helpers -------------------------------------------------------------------------------

def step_dir_name(step: int) -> str:
    """`step-000000500` for step 500."""
    if not 0 <= step < 10**9:
        raise ValueError(f"step {step} is outside 0..999999999")
    return f"step-{step:09d}"


def step_prefix(step: int) -> str:
    """Key of a step folder relative to the output root: `checkpoints/step-000000500`."""
    return f"{CHECKPOINTS_DIR}/{step_dir_name(step)}"


def parse_step(name: str) -> int | None:
    """500 for `step-000000500`; None for anything else."""
    match = _STEP_RE.match(name)
    return int(match.group(1)) if match else None


def attempt_key(attempt: int) -> str:
    return f"{ATTEMPTS_DIR}/{attempt:09d}.json"


def parse_attempt_key(key: str) -> int | None:
    """7 for `checkpoints/attempts/000000007.json`; None for anything else."""
    if not key.startswith(ATTEMPTS_DIR + "/"):
        return None
    match = _ATTEMPT_RE.match(key[len(ATTEMPTS_DIR) + 1:])
    return int(match.group(1)) if match else None


def group_step_keys(infos: Iterable[ObjectInfo]) -> dict[int, dict[str, ObjectInfo]]:
    """Objects under `checkpoints/step-N/`, grouped by step, keyed by path inside the folder."""
    groups: dict[int, dict[str, ObjectInfo]] = {}
    for info in infos:
        parts = info.key.split("/", 2)
        if len(parts) == 3 and parts[0] == CHECKPOINTS_DIR and (step := parse_step(parts[1])) is not None:
            groups.setdefault(step, {})[parts[2]] = info
    return groups


def resume_order(steps: Iterable[int]) -> list[int]:
    """Steps in the order resume tries them: newest first."""
    return sorted(set(steps), reverse=True)


def plan_prune(committed: Mapping[int, bool], keep_last: int, anchor: int) -> list[int]:
    """Steps to delete: keep the `keep_last` newest committed steps at or below `anchor` (the step
    just committed) and delete every folder, committed or partial, below the oldest kept one.
    `committed` maps each step folder to whether it has a MANIFEST. Folders above `anchor` are
    never touched: they may belong to a newer attempt."""
    if keep_last <= 0:
        return []
    kept = [s for s in resume_order(committed) if s <= anchor and committed[s]][:keep_last]
    if anchor not in kept:
        return []
    return sorted(s for s in committed if s < min(kept))


def file_problems(expected: Mapping[str, FileDigest], listed: Mapping[str, int]) -> list[str]:
    """What is wrong with a step folder's listing (name -> size) against its manifest; [] if fine."""
    problems = []
    if missing := sorted(set(expected) - set(listed)):
        problems.append(f"missing {', '.join(missing)}")
    if extra := sorted(set(listed) - set(expected)):
        problems.append(f"unexpected {', '.join(extra)}")
    for name in sorted(set(expected) & set(listed)):
        if expected[name].size != listed[name]:
            problems.append(f"{name} is {listed[name]} bytes, manifest says {expected[name].size}")
    return problems


# ---- manifest -----------------------------------------------------------------------------------

class FileDigest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class Manifest(BaseModel):
    """MANIFEST.json: what a committed checkpoint contains and which run made it."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    format_version: int = FORMAT_VERSION
    step: int = Field(ge=0)
    attempt: int = Field(ge=0)
    config_hash: str
    training_fields: dict[str, Any] = Field(default_factory=dict)
    world_size: int = Field(1, ge=1)  # training processes that made it (lora_trainer.distributed)
    created: str = Field(default_factory=utcnow)
    files: dict[str, FileDigest]

    @field_validator("files")
    @classmethod
    def _relative_names(cls, files: dict[str, FileDigest]) -> dict[str, FileDigest]:
        for name in files:
            if name_problem(name) or normalise_name(name) != name or name == MANIFEST_FILE:
                raise ValueError(f"file name {shown(name)} must be a plain relative path inside the step folder")
        return files

    def to_json(self) -> bytes:
        return self.model_dump_json(indent=2).encode()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def _local_files(local_dir: Path) -> list[str]:
    """Relative names of the files a checkpoint folder holds, MANIFEST.json and temporaries aside."""
    return sorted(
        name
        for p in local_dir.rglob("*")
        if p.is_file() and (name := p.relative_to(local_dir).as_posix()) != MANIFEST_FILE
        and not p.name.startswith(f".{MANIFEST_FILE}")
    )


def write_manifest(
    local_dir: Path, step: int, attempt: int, config_hash: str, training_fields: dict[str, Any], world_size: int = 1
) -> Manifest:
    """Hash every file under `local_dir` and write its MANIFEST.json there."""
    files = {
        name: FileDigest(sha256=sha256_file(local_dir / name), size=(local_dir / name).stat().st_size)
        for name in _local_files(local_dir)
    }
    if not files:
        raise ValueError(f"{local_dir}: no files to checkpoint for step {step}")
    manifest = Manifest(
        step=step, attempt=attempt, config_hash=config_hash, training_fields=training_fields, files=files,
        world_size=world_size,
    )
    tmp = local_dir / f".{MANIFEST_FILE}.tmp"
    tmp.write_bytes(manifest.to_json())
    tmp.replace(local_dir / MANIFEST_FILE)
    return manifest


def _read_manifest(store: Store, key: str) -> Manifest | None:
    try:
        return Manifest.model_validate_json(store.get_bytes(key))
    except NotFound:
        return None
    except ValidationError:
        return None


# ---- fencing ------------------------------------------------------------------------------------

# (store, key, etag) -> attempt recorded in that MANIFEST.json or latest.json. An ETag names one
# content, so a hit can never be stale; it saves a GET per object on every fencing check.
_recorded_attempts: dict[tuple[str, str, str], int] = {}


def _remember(store: Store, key: str, etag: str, attempt: int) -> None:
    if len(_recorded_attempts) > 4096:
        _recorded_attempts.clear()
    _recorded_attempts[(store.uri, key, etag)] = attempt


def _recorded_attempt(store: Store, info: ObjectInfo) -> int | None:
    cache_key = (store.uri, info.key, info.etag)
    if cache_key not in _recorded_attempts:
        try:
            data = store.get_bytes(info.key)
            model = LatestPointer if info.key == LATEST_FILE else Manifest
            attempt = model.model_validate_json(data).attempt
        except (NotFound, ValidationError):
            return None
        _remember(store, info.key, info.etag, attempt)
    return _recorded_attempts[cache_key]


def _scan(store: Store) -> tuple[int, list[ObjectInfo]]:
    """The newest recorded attempt, and the listing of checkpoints/ it was read from."""
    infos = store.list_info(f"{CHECKPOINTS_DIR}/")
    found = [a for info in infos if (a := parse_attempt_key(info.key)) is not None]
    for info in infos:
        is_manifest = info.key.endswith(f"/{MANIFEST_FILE}") and parse_step(info.key.split("/")[-2]) is not None
        if (is_manifest or info.key == LATEST_FILE) and (a := _recorded_attempt(store, info)) is not None:
            found.append(a)
    return max(found, default=0), infos


def newest_attempt(store: Store) -> int:
    """The newest attempt recorded under checkpoints/: max of claims, manifests and latest.json."""
    return _scan(store)[0]


def check_not_stale(store: Store, attempt: int, when: str) -> list[ObjectInfo]:
    """Raise StaleAttempt if a newer attempt than ours is recorded; returns the listing it read."""
    newest, infos = _scan(store)
    if attempt < newest:
        raise StaleAttempt(
            f"attempt {attempt} is older than attempt {newest} recorded under {store.url(CHECKPOINTS_DIR)} "
            f"({when}); a newer pod owns this output, so this one stops without writing"
        )
    return infos


@dataclass(frozen=True)
class Claim:
    """What attempts/<n>.json says: fencing number `attempt`, and which run's `run_attempt` it was."""

    attempt: int
    run: str = ""
    run_attempt: int = 0


def fence_attempt(claims: Iterable[Claim], newest: int, run: str, run_attempt: int) -> int:
    """The fencing number of attempt `run_attempt` of `run` (pure): the offset its run's claims
    used, else the newest attempt recorded in the output (`newest`), plus `run_attempt`."""
    ours = [c for c in claims if run and c.run == run]
    if ours:
        last = max(ours, key=lambda c: c.attempt)
        return last.attempt - last.run_attempt + run_attempt
    return newest + run_attempt


def _read_claim(store: Store, info: ObjectInfo, attempt: int) -> Claim:
    try:
        body = json.loads(store.get_bytes(info.key))
    except (NotFound, ValueError):
        return Claim(attempt)
    run, run_attempt = body.get("run"), body.get("run_attempt")
    if not isinstance(run, str) or not isinstance(run_attempt, int) or isinstance(run_attempt, bool):
        return Claim(attempt)  # a claim made without a run (by hand, or an older trainer)
    return Claim(attempt, run, run_attempt)


def run_fence(store: Store, run: str, run_attempt: int) -> int:
    """`fence_attempt` against the output: reads the claims, newest first, until one of `run`."""
    newest, infos = _scan(store)
    claims = sorted(((a, info) for info in infos if (a := parse_attempt_key(info.key)) is not None),
                    key=lambda pair: pair[0], reverse=True)
    read = []
    for attempt, info in claims:
        read.append(_read_claim(store, info, attempt))
        if read[-1].run == run:
            break  # the run's newest claim fixes its offset; older claims cannot change it
    fence = fence_attempt(read, newest, run, run_attempt)
    log.info("attempt %d of run %s fences as attempt %d (newest recorded: %d)", run_attempt, run, fence, newest)
    return fence


def claim_attempt(store: Store, attempt: int, run: str = "", run_attempt: int = 0) -> None:
    """Record that `attempt` (of `run`, if any) now owns the output; StaleAttempt if a newer one already does."""
    check_not_stale(store, attempt, "claiming the output")
    body: dict[str, Any] = {"attempt": attempt, "claimed": utcnow(), "host": socket.gethostname()}
    if run:
        body.update(run=run, run_attempt=run_attempt)
    store.put_bytes(attempt_key(attempt), json.dumps(body).encode())
    log.info("attempt %d claimed %s", attempt, store.url(CHECKPOINTS_DIR))


def next_attempt(store: Store) -> int:
    """The attempt number for a run outside Kubernetes: newest recorded + 1."""
    return newest_attempt(store) + 1


# ---- commit, prune ------------------------------------------------------------------------------

def commit(
    store: Store,
    local_dir: Path,
    step: int,
    attempt: int,
    config_hash: str,
    training_fields: dict[str, Any],
    keep_last: int,
    world_size: int = 1,
) -> LatestPointer:
    """Upload `local_dir` as checkpoint `step`: files, MANIFEST, latest.json, then prune. Idempotent."""
    started = time.monotonic()
    prefix = step_prefix(step)
    names = _local_files(local_dir)
    # Hashing is local, so it starts at once and overlaps the fencing check and the upload.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="commit-hash") as pool:
        hashing = pool.submit(write_manifest, local_dir, step, attempt, config_hash, training_fields, world_size)
        try:
            # Checked before any upload too: a stale pod must not overwrite files of a folder a
            # newer attempt already committed under the same step number.
            check_not_stale(store, attempt, f"before uploading step {step}")
            store.put_files([(local_dir / name, f"{prefix}/{name}") for name in names])
        except BaseException:
            hashing.cancel()  # if it already runs, leaving the pool waits for it; the error stands
            raise
        manifest = hashing.result()
    if sorted(manifest.files) != names:
        raise RuntimeError(f"{local_dir}: files changed while checkpoint step {step} was uploading")
    check_not_stale(store, attempt, f"before writing the MANIFEST of step {step}")
    manifest_key = f"{prefix}/{MANIFEST_FILE}"
    _remember(store, manifest_key, store.put_bytes(manifest_key, manifest.to_json()), attempt)
    infos = check_not_stale(store, attempt, f"before pointing latest.json at step {step}")
    pointer = LatestPointer(step=step, attempt=attempt, path=prefix)
    _remember(store, LATEST_FILE, store.put_bytes(LATEST_FILE, pointer.model_dump_json().encode()), attempt)
    size = sum(f.size for f in manifest.files.values()) / 2**20
    log.info(
        "checkpoint step %d committed by attempt %d: %d files, %.1f MiB in %.2fs at %s",
        step, attempt, len(manifest.files), size, time.monotonic() - started, store.url(prefix),
    )
    if keep_last > 0:
        try:
            _prune(store, keep_last, step, group_step_keys(infos), attempt)
        except StorageUnavailable as exc:  # the commit stands; the next commit prunes again
            log.warning("step %d: pruning old checkpoints failed, will retry after the next commit: %s", step, exc)
    return pointer


def prune(store: Store, keep_last: int, anchor: int | None = None) -> list[int]:
    """Delete step folders older than the `keep_last` newest committed (MANIFEST first); returns them."""
    groups = group_step_keys(store.list_info(f"{CHECKPOINTS_DIR}/"))
    if anchor is None:
        anchor = max((s for s, files in groups.items() if MANIFEST_FILE in files), default=-1)
    return _prune(store, keep_last, anchor, groups, None)


def _prune(
    store: Store, keep_last: int, anchor: int, groups: dict[int, dict[str, ObjectInfo]], attempt: int | None
) -> list[int]:
    if anchor < 0:
        return []
    committed = {step: MANIFEST_FILE in files for step, files in groups.items()}
    committed[anchor] = True  # the listing may predate our own MANIFEST
    doomed = plan_prune(committed, keep_last, anchor)
    if doomed and attempt is not None:
        # A newer attempt may be resuming from one of these folders right now.
        check_not_stale(store, attempt, f"before pruning below step {anchor}")
    for step in doomed:
        files = groups[step]
        prefix = step_prefix(step)
        if MANIFEST_FILE in files:
            store.delete([f"{prefix}/{MANIFEST_FILE}"])
        store.delete(f"{prefix}/{name}" for name in files if name != MANIFEST_FILE)
        log.info("pruned checkpoint step %d (keep_last=%d, newest step %d)", step, keep_last, anchor)
    return doomed


# ---- resume -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Resumable:
    """A verified checkpoint downloaded to `path` (a folder holding the files and MANIFEST.json)."""

    step: int
    attempt: int
    manifest: Manifest
    path: Path


class _Invalid(Exception):
    pass


def find_resumable(store: Store, dest_dir: Path) -> Resumable | None:
    """Download and verify the newest valid checkpoint into `dest_dir`; None if there are none.

    Raises ResumeRefused if step folders (or a latest.json) exist but none verifies."""
    problems: list[str] = []
    for found in resumable_checkpoints(store, dest_dir, problems):
        return found
    if problems:
        raise ResumeRefused(refusal(store, problems))
    return None


def resumable_checkpoints(store: Store, dest_dir: Path, problems: list[str]) -> Iterator[Resumable]:
    """Verified checkpoints, newest first, each downloaded into `dest_dir` when reached.

    Why each skipped one was unusable is appended to `problems` (and logged); a caller that
    finds a yielded one unusable too appends its reason and asks for the next."""
    infos = store.list_info(f"{CHECKPOINTS_DIR}/")
    groups = group_step_keys(infos)
    has_latest = any(info.key == LATEST_FILE for info in infos)
    pointed = _latest_step(store) if has_latest else None
    ever_committed = has_latest or any(MANIFEST_FILE in files for files in groups.values())
    if pointed is not None and pointed not in groups:
        gone = f"latest.json names step {pointed}, whose folder {CHECKPOINTS_DIR}/step-{pointed:09d} is gone"
        problems.append(gone)
        if groups:
            log.warning("%s; falling back to the newest checkpoint that verifies", gone)
    for step in resume_order(groups):
        try:
            found = _verify(store, step, groups[step], dest_dir)
        except _Invalid as exc:
            if not ever_committed:  # then no folder has a MANIFEST: each is an upload cut short
                log.warning("checkpoint step %d at %s was never committed (%s) and nothing else was: "
                            "skipping it", step, store.url(step_prefix(step)), exc)
                continue
            log.warning("checkpoint step %d at %s is not usable (%s); trying the previous one", step, store.url(step_prefix(step)), exc)
            problems.append(f"step {step}: {exc}")
            continue
        log.info("checkpoint step %d (attempt %d) at %s verifies", step, found.attempt, store.url(step_prefix(step)))
        yield found


def refusal(store: Store, problems: list[str]) -> str:
    """The ResumeRefused message when checkpoints exist but none is usable."""
    folders = sum(1 for p in problems if p.startswith("step "))
    what = f"holds {folders} checkpoint folder(s) but none verifies" if folders else "holds no checkpoint folder"
    return shorten(
        f"{store.url(CHECKPOINTS_DIR)} {what} ({'; '.join(problems)}); "
        "restore a good checkpoint or use a new output_dir to start over", 2000,
    )


def _latest_step(store: Store) -> int | None:
    """The step latest.json names, or None when it is absent or unreadable (logged)."""
    try:
        return LatestPointer.model_validate_json(store.get_bytes(LATEST_FILE)).step
    except NotFound:
        return None
    except ValidationError:
        log.warning("%s is unreadable; ignoring it, checkpoints are found by listing", store.url(LATEST_FILE))
        return None


def _verify(store: Store, step: int, files: dict[str, ObjectInfo], dest_dir: Path) -> Resumable:
    prefix = step_prefix(step)
    if MANIFEST_FILE not in files:
        raise _Invalid("no MANIFEST.json: the upload never finished")
    manifest = _read_manifest(store, f"{prefix}/{MANIFEST_FILE}")
    if manifest is None:
        raise _Invalid("MANIFEST.json is missing or unreadable")
    if manifest.step != step or manifest.format_version > FORMAT_VERSION:
        raise _Invalid(f"MANIFEST.json says step {manifest.step}, format {manifest.format_version}")
    listed = {name: info.size for name, info in files.items() if name != MANIFEST_FILE}
    if problems := file_problems(manifest.files, listed):
        raise _Invalid("; ".join(problems))
    local = dest_dir / step_dir_name(step)
    shutil.rmtree(local, ignore_errors=True)
    if escaped := [name for name in manifest.files if not is_inside(local, local / name)]:
        raise _Invalid(f"{shown(escaped[0])} would be written outside {local}")
    try:
        store.get_files([(f"{prefix}/{name}", local / name) for name in manifest.files])
    except NotFound as exc:
        raise _Invalid(f"a file vanished while downloading ({exc})") from exc
    except UnsafeKey as exc:
        raise _Invalid(exc.message) from exc
    for name, digest in manifest.files.items():
        if sha256_file(local / name) != digest.sha256:
            raise _Invalid(f"{name} does not match its sha256 in MANIFEST.json")
    (local / MANIFEST_FILE).write_bytes(manifest.to_json())
    return Resumable(step=step, attempt=manifest.attempt, manifest=manifest, path=local)


def check_compatible(manifest: Manifest, current_training_fields: dict[str, Any], allow: bool) -> list[str]:
    """Fields that changed since the checkpoint; ResumeRefused naming them unless `allow`."""
    changed = changed_fields(manifest.training_fields, current_training_fields)
    if changed and not allow:
        raise ResumeRefused(
            f"checkpoint step {manifest.step} was trained with different {', '.join(changed)}; "
            "restore those values, set allow_config_change: true to resume anyway, or use a new output_dir"
        )
    if changed:
        log.warning(
            "resuming checkpoint step %d although %s changed (allow_config_change is set)",
            manifest.step, ", ".join(changed),
        )
    return changed
