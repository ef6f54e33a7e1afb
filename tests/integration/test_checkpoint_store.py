"""Checkpoint commit, resume selection, retention and fencing against a real S3 server (moto).

- a committed checkpoint comes back byte for byte, with its manifest and latest.json
- resume falls back past a truncated file, a missing MANIFEST and a flipped byte (logged)
- folders that exist but none verify: ResumeRefused; no folders: a fresh start (None); a first upload
  cut short (a folder without MANIFEST, nothing ever committed): a fresh start too, logged, and refused
  again once latest.json or another folder's MANIFEST says something was committed
- retention deletes older folders only after a newer commit, MANIFEST first; intermediate LoRAs stay
- fencing: a stale attempt cannot claim or commit, including when a newer claim lands mid-upload
- a changed training config is refused, naming the fields, and allowed with the flag
- through a faulty proxy: transient 503s, dropped connections and read timeouts on PUT and GET
  still commit and resume; a store that stays down gives StorageUnavailable and leaves the
  previous checkpoint verifiable
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from lora_trainer import checkpoint
from lora_trainer.checkpoint import Manifest, claim_attempt, commit, find_resumable, newest_attempt
from lora_trainer.contract import LATEST_FILE, LatestPointer, intermediate_weights_name
from lora_trainer.errors import ResumeRefused, StaleAttempt, StorageUnavailable
from lora_trainer.storage import ObjectInfo, Store, open_store
from lora_trainer.uploader import BackgroundUploader
from tests.support.s3 import S3Env

FIELDS = {"lora_rank": 8, "learning_rate": 1e-4, "seed": 42}


def make_state(root: Path, step: int) -> Path:
    """A checkpoint folder like the loop writes: weights, optimizer, small JSON state."""
    d = root / f"local-{step}"
    (d / "state").mkdir(parents=True, exist_ok=True)
    (d / "lora.safetensors").write_bytes(os.urandom(2048) + step.to_bytes(4, "big"))
    (d / "state" / "optimizer.safetensors").write_bytes(os.urandom(4096))
    (d / "state" / "train_state.json").write_text(json.dumps({"step": step}))
    return d


def do_commit(store: Store, tmp: Path, step: int, attempt: int = 1, keep_last: int = 0) -> Path:
    d = make_state(tmp, step)
    commit(store, d, step, attempt, "hash", FIELDS, keep_last)
    return d


@pytest.fixture
def store(s3_env: S3Env) -> Store:
    return open_store(s3_env.uri("job"), s3_env.s3)


def step_files(store: Store, step: int) -> list[str]:
    return store.list(checkpoint.step_prefix(step) + "/")


def test_commit_then_resume_round_trips(store: Store, tmp_path: Path) -> None:
    claim_attempt(store, 3)
    local = do_commit(store, tmp_path, 500, attempt=3)
    assert LatestPointer.model_validate_json(store.get_bytes(LATEST_FILE)).step == 500
    found = find_resumable(store, tmp_path / "resume")
    assert found is not None and (found.step, found.attempt) == (500, 3)
    assert found.manifest.config_hash == "hash" and found.manifest.training_fields == FIELDS
    for name in ("lora.safetensors", "state/optimizer.safetensors", "state/train_state.json"):
        assert (found.path / name).read_bytes() == (local / name).read_bytes()
    assert Manifest.model_validate_json((found.path / "MANIFEST.json").read_bytes()) == found.manifest


def test_no_checkpoints_means_fresh_start(store: Store, tmp_path: Path) -> None:
    store.put_bytes(intermediate_weights_name(100), b"lora")  # not a resumable checkpoint
    assert find_resumable(store, tmp_path) is None


def _first_upload_cut_short(store: Store, tmp: Path, step: int) -> None:
    """The files of a first checkpoint, without its MANIFEST and latest.json (a SIGKILL mid-upload)."""
    d = make_state(tmp, step)
    for path in sorted(p for p in d.rglob("*") if p.is_file()):
        store.put_bytes(f"{checkpoint.step_prefix(step)}/{path.relative_to(d).as_posix()}", path.read_bytes())


def test_first_upload_cut_short_means_fresh_start(store: Store, tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    claim_attempt(store, 1)
    _first_upload_cut_short(store, tmp_path, 5)
    with caplog.at_level(logging.WARNING, logger="lora_trainer.checkpoint"):
        assert find_resumable(store, tmp_path / "resume") is None
    assert "step 5" in caplog.text and "never committed" in caplog.text


@pytest.mark.parametrize("committed", ["latest.json", "an older MANIFEST"])
def test_uncommitted_folder_after_a_commit_still_refuses(s3_env: S3Env, store: Store, tmp_path: Path,
                                                         committed: str) -> None:
    do_commit(store, tmp_path, 5)
    _flip_byte(s3_env, store, 5)  # the committed checkpoint no longer verifies
    # Leave only the one sign that something was committed.
    store.delete([f"{checkpoint.step_prefix(5)}/MANIFEST.json"] if committed == "latest.json" else [LATEST_FILE])
    _first_upload_cut_short(store, tmp_path / "next", 10)
    with pytest.raises(ResumeRefused, match=r"none verifies.*step 10: no MANIFEST"):
        find_resumable(store, tmp_path / "resume")


def _truncate(s3_env: S3Env, store: Store, step: int) -> None:
    key = f"job/{checkpoint.step_prefix(step)}/state/optimizer.safetensors"
    body = s3_env.client().get_object(Bucket=s3_env.bucket, Key=key)["Body"].read()
    s3_env.client().put_object(Bucket=s3_env.bucket, Key=key, Body=body[:100])


def _drop_manifest(s3_env: S3Env, store: Store, step: int) -> None:
    store.delete([f"{checkpoint.step_prefix(step)}/MANIFEST.json"])


def _flip_byte(s3_env: S3Env, store: Store, step: int) -> None:
    key = f"{checkpoint.step_prefix(step)}/lora.safetensors"
    body = bytearray(store.get_bytes(key))
    body[10] ^= 0xFF
    store.put_bytes(key, bytes(body))


@pytest.mark.parametrize(
    ("damage", "words"),
    [(_truncate, "optimizer.safetensors is 100 bytes"), (_drop_manifest, "no MANIFEST"), (_flip_byte, "sha256")],
)
def test_resume_falls_back_past_a_damaged_checkpoint(
    s3_env: S3Env, store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: Any, words: str
) -> None:
    do_commit(store, tmp_path, 100)
    do_commit(store, tmp_path, 200)
    damage(s3_env, store, 200)
    with caplog.at_level(logging.WARNING, logger="lora_trainer.checkpoint"):
        found = find_resumable(store, tmp_path / "resume")
    assert found is not None and found.step == 100
    assert "step 200" in caplog.text and words in caplog.text


def test_extra_file_in_folder_invalidates_it(store: Store, tmp_path: Path) -> None:
    do_commit(store, tmp_path, 100)
    do_commit(store, tmp_path, 200)
    store.put_bytes(f"{checkpoint.step_prefix(200)}/stray.bin", b"?")
    found = find_resumable(store, tmp_path / "resume")
    assert found is not None and found.step == 100


def test_none_verifies_refuses_to_resume(s3_env: S3Env, store: Store, tmp_path: Path) -> None:
    do_commit(store, tmp_path, 100)
    do_commit(store, tmp_path, 200)
    _flip_byte(s3_env, store, 100)
    _drop_manifest(s3_env, store, 200)
    with pytest.raises(ResumeRefused, match=r"2 checkpoint folder\(s\) but none verifies.*step 200.*step 100"):
        find_resumable(store, tmp_path / "resume")


class RecordingStore(Store):
    """Wraps a store: records deletes, and runs a one-shot hook before a method (hooks[name])."""

    def __init__(self, inner: Store) -> None:
        self.inner, self.uri = inner, inner.uri
        self.deleted: list[list[str]] = []
        self.hooks: dict[str, Any] = {}

    def _hook(self, name: str, *args: Any) -> None:
        if name in self.hooks:
            self.hooks.pop(name)(*args)

    def put_file(self, key: str, path: Path) -> None:
        self._hook("put_file", key, path)
        self.inner.put_file(key, path)

    def put_bytes(self, key: str, data: bytes) -> str:
        self._hook("put_bytes", key, data)
        return self.inner.put_bytes(key, data)

    def get_bytes(self, key: str) -> bytes:
        return self.inner.get_bytes(key)

    def get_file(self, key: str, path: Path) -> None:
        self.inner.get_file(key, path)

    def list_info(self, prefix: str = "") -> list[ObjectInfo]:
        return self.inner.list_info(prefix)

    def delete(self, keys: Iterable[str]) -> None:
        batch = list(keys)
        self.deleted.append(batch)
        self.inner.delete(batch)


def test_retention_prunes_only_after_a_newer_commit(store: Store, tmp_path: Path) -> None:
    rec = RecordingStore(store)
    store.put_bytes(intermediate_weights_name(100), b"lora 100")
    do_commit(rec, tmp_path, 100, keep_last=2)
    do_commit(rec, tmp_path, 200, keep_last=2)
    assert rec.deleted == []
    # The commit of 300 fails before its MANIFEST: nothing is pruned, 100 and 200 stay.
    rec.hooks["put_bytes"] = lambda key, data: (_ for _ in ()).throw(StorageUnavailable("down"))
    with pytest.raises(StorageUnavailable):
        do_commit(rec, tmp_path, 300, keep_last=2)
    assert rec.deleted == [] and step_files(store, 100) and step_files(store, 200)
    do_commit(rec, tmp_path, 300, keep_last=2)
    manifest_first = [f"{checkpoint.step_prefix(100)}/MANIFEST.json"]
    assert rec.deleted[0] == manifest_first and len(rec.deleted[1]) == 3
    assert step_files(store, 100) == [] and step_files(store, 200) and step_files(store, 300)
    assert store.get_bytes(intermediate_weights_name(100)) == b"lora 100"


def test_stale_attempt_cannot_claim_or_commit(store: Store, tmp_path: Path) -> None:
    claim_attempt(store, 1)
    do_commit(store, tmp_path, 100, attempt=1)
    claim_attempt(store, 2)
    with pytest.raises(StaleAttempt, match="attempt 1 is older than attempt 2"):
        claim_attempt(store, 1)
    with pytest.raises(StaleAttempt):
        do_commit(store, tmp_path, 200, attempt=1)
    assert step_files(store, 200) == []
    assert LatestPointer.model_validate_json(store.get_bytes(LATEST_FILE)).step == 100
    assert checkpoint.next_attempt(store) == 3


def test_newest_attempt_counts_manifests_and_latest(store: Store, tmp_path: Path) -> None:
    assert newest_attempt(store) == 0
    do_commit(store, tmp_path, 100, attempt=4)  # no claim: the manifest and latest.json record 4
    assert newest_attempt(store) == 4
    with pytest.raises(StaleAttempt):
        claim_attempt(store, 3)


def test_newer_claim_mid_upload_stops_the_manifest(store: Store, tmp_path: Path) -> None:
    claim_attempt(store, 1)
    do_commit(store, tmp_path, 100, attempt=1)
    rec = RecordingStore(store)
    rec.hooks["put_file"] = lambda key, path: claim_attempt(store, 2)  # the next pod starts meanwhile
    with pytest.raises(StaleAttempt, match="before writing the MANIFEST of step 200"):
        do_commit(rec, tmp_path, 200, attempt=1)
    assert "MANIFEST.json" not in [k.rsplit("/", 1)[-1] for k in step_files(store, 200)]
    found = find_resumable(store, tmp_path / "resume")
    assert found is not None and found.step == 100


def test_changed_config_is_refused_naming_fields_unless_allowed(store: Store, tmp_path: Path) -> None:
    do_commit(store, tmp_path, 100)
    found = find_resumable(store, tmp_path / "resume")
    assert found is not None
    current = {**FIELDS, "lora_rank": 16, "seed": 7}
    with pytest.raises(ResumeRefused, match="different lora_rank, seed.*allow_config_change"):
        checkpoint.check_compatible(found.manifest, current, allow=False)
    assert checkpoint.check_compatible(found.manifest, current, allow=True) == ["lora_rank", "seed"]
    assert checkpoint.check_compatible(found.manifest, dict(FIELDS), allow=False) == []


def test_transient_faults_still_commit_and_resume(s3_faults: S3Env, tmp_path: Path) -> None:
    proxy = s3_faults.proxy
    assert proxy is not None
    store = open_store(s3_faults.uri("job"), s3_faults.s3)
    proxy.fail("PUT", count=2, status=503)
    proxy.drop("PUT", count=1)
    proxy.fail("PUT", count=1, status=500)
    proxy.delay("GET", count=1, seconds=1.5)  # read_timeout is 1 s
    local = do_commit(store, tmp_path, 100)
    proxy.fail("GET", count=2, status=503)
    proxy.delay("GET", count=1, seconds=1.5)
    found = find_resumable(store, tmp_path / "resume")
    assert found is not None and found.step == 100
    assert (found.path / "lora.safetensors").read_bytes() == (local / "lora.safetensors").read_bytes()
    for outcome in ("fail-503", "fail-500", "drop", "delay"):
        assert proxy.outcomes(outcome) > 0, outcome


def test_store_down_fails_the_commit_and_keeps_the_previous_checkpoint(s3_faults: S3Env, tmp_path: Path) -> None:
    proxy = s3_faults.proxy
    assert proxy is not None
    store = open_store(s3_faults.uri("job"), s3_faults.s3)
    do_commit(store, tmp_path, 100, keep_last=1)
    # Files of step 200 reach the store, then it goes down before the MANIFEST.
    rec = RecordingStore(store)
    rec.hooks["put_bytes"] = lambda key, data: proxy.down()
    up = BackgroundUploader(retry_deadline=0.5, backoff_initial=0.1)
    local = make_state(tmp_path, 200)
    job = up.submit("checkpoint step 200", lambda: commit(rec, local, 200, 1, "hash", FIELDS, 1))
    with pytest.raises(StorageUnavailable, match="checkpoint step 200: storage still unavailable"):
        up.wait(timeout=30)
    assert job.done() and not job.ok
    proxy.up()
    assert step_files(store, 200) and "MANIFEST.json" not in str(step_files(store, 200))
    found = find_resumable(store, tmp_path / "resume")
    assert found is not None and found.step == 100
    assert LatestPointer.model_validate_json(store.get_bytes(LATEST_FILE)).step == 100
    up.close()
