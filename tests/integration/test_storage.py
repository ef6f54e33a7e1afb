"""Storage against a real S3 server (moto on loopback) and the local filesystem.

- local and S3 stores round-trip bytes and files, list by prefix, delete, report NotFound
- local writes are atomic (no temporary files left behind)
- a file over the multipart threshold uploads in parts and comes back identical
- put_files sends big and small files side by side and every one comes back identical; listed
  objects carry size and ETag (timestamps are not parsed)
- an S3 store rooted at a prefix never sees a sibling prefix (model vs model-v2)
- fetch_tree (lora_trainer.fetch) returns local paths as they are, downloads s3:// once, reuses the cache, and
  re-fetches only what changed (and drops what was deleted) when the source changes
- errors are ours: missing bucket, unreachable endpoint, missing input; no credentials in logs
- the background uploader keeps order, coalesces, retries transient errors, and surfaces a
  persistent failure on the next submit/wait; wait(timeout) returns False while a job runs
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import pytest

from lora_operator.devcluster.s3 import free_port
from lora_trainer.config import S3Config
from lora_trainer.errors import InputMissing, StaleAttempt, StorageUnavailable
from lora_trainer.fetch import fetch_tree
from lora_trainer.storage import LocalStore, NotFound, S3Store, StorageRejected, Store, open_store
from lora_trainer.uploader import BackgroundUploader
from tests.support.s3 import S3Env


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "local":
        return open_store(str(tmp_path / "out"), S3Config())
    s3_env: S3Env = request.getfixturevalue("s3_env")
    return open_store(s3_env.uri("out"), s3_env.s3)


def test_round_trip(store: Store, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * 1000)
    store.put_file("a/one.bin", src)
    store.put_bytes("a/two.json", b'{"k": 1}')
    store.put_bytes("b/three", b"3")
    assert store.get_bytes("a/two.json") == b'{"k": 1}'
    store.get_file("a/one.bin", tmp_path / "dl" / "one.bin")
    assert (tmp_path / "dl" / "one.bin").read_bytes() == b"x" * 1000
    assert store.list() == ["a/one.bin", "a/two.json", "b/three"]
    assert store.list("a/") == ["a/one.bin", "a/two.json"]
    assert [i.size for i in store.list_info("a/")] == [1000, 8]
    assert store.exists("b/three") and not store.exists("b/nope")
    store.delete(["a/one.bin", "a/never-existed"])
    assert store.list() == ["a/two.json", "b/three"]
    with pytest.raises(NotFound, match="a/one.bin"):
        store.get_bytes("a/one.bin")
    with pytest.raises(NotFound, match="a/one.bin"):
        store.get_file("a/one.bin", tmp_path / "dl" / "again.bin")
    assert not any(p.name.endswith(".lora-tmp") for p in (tmp_path / "dl").iterdir())


def test_local_store_writes_atomically_and_prunes_empty_folders(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "root")
    store.put_bytes("checkpoints/step-000000001/x", b"1")
    assert sorted(p.name for p in (tmp_path / "root/checkpoints/step-000000001").iterdir()) == ["x"]
    store.delete(["checkpoints/step-000000001/x"])
    assert not (tmp_path / "root/checkpoints").exists()
    with pytest.raises(ValueError):
        store.put_bytes("../escape", b"")


def test_multipart_upload_round_trips(s3_env: S3Env, tmp_path: Path) -> None:
    store = open_store(s3_env.uri("big"), s3_env.s3)
    data = os.urandom(9 * 1024 * 1024 + 123)
    (tmp_path / "big.bin").write_bytes(data)
    store.put_file("big.bin", tmp_path / "big.bin")
    etag = s3_env.client().head_object(Bucket=s3_env.bucket, Key="big/big.bin")["ETag"]
    assert etag.strip('"').endswith("-2")  # two parts: it really went multipart
    store.get_file("big.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == data


def test_put_files_mixes_multipart_and_small_files(s3_env: S3Env, tmp_path: Path) -> None:
    store = open_store(s3_env.uri("many"), s3_env.s3)
    sizes = {"a.bin": 9 * 1024 * 1024 + 7, "b.bin": 8 * 1024 * 1024, "c.json": 300, "d/e.json": 0}
    items = []
    for name, size in sizes.items():
        path = tmp_path / "src" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(size))
        items.append((path, f"x/{name}"))
    store.put_files(items)
    listed = {info.key: info for info in store.list_info("x/")}
    assert {k: i.size for k, i in listed.items()} == {f"x/{n}": size for n, size in sizes.items()}
    assert listed["x/a.bin"].etag.endswith("-2") and listed["x/b.bin"].etag.endswith("-1")  # multipart
    assert "-" not in listed["x/c.json"].etag  # a single PUT
    store.get_files([(key, tmp_path / "back" / key) for _, key in items])
    for path, key in items:
        assert (tmp_path / "back" / key).read_bytes() == path.read_bytes()


def test_prefix_does_not_leak_into_sibling(s3_env: S3Env) -> None:
    open_store(s3_env.uri("model-v2"), s3_env.s3).put_bytes("x", b"2")
    model = open_store(s3_env.uri("model"), s3_env.s3)
    model.put_bytes("x", b"1")
    assert model.list() == ["x"] and model.get_bytes("x") == b"1"


def _seed(s3_env: S3Env, prefix: str, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        s3_env.client().put_object(Bucket=s3_env.bucket, Key=f"{prefix}/{name}", Body=data)


def test_fetch_tree_local_is_returned_as_is(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    assert fetch_tree(str(tmp_path / "model"), tmp_path / "cache", S3Config()) == tmp_path / "model"
    assert fetch_tree(f"file://{tmp_path}/model", tmp_path / "cache", S3Config()) == tmp_path / "model"
    with pytest.raises(InputMissing, match="nope"):
        fetch_tree(str(tmp_path / "nope"), tmp_path / "cache", S3Config())


def test_fetch_tree_downloads_once_and_refreshes_on_change(s3_faults: S3Env, tmp_path: Path) -> None:
    proxy = s3_faults.proxy
    assert proxy is not None
    _seed(s3_faults, "sd15", {"unet/config.json": b"{}", "unet/w.safetensors": b"w" * 100, "vae/x": b"v"})
    tree = fetch_tree(s3_faults.uri("sd15"), tmp_path / "cache", s3_faults.s3)
    assert (tree / "unet/w.safetensors").read_bytes() == b"w" * 100
    first_gets = proxy.outcomes("forwarded", "GET")

    again = fetch_tree(s3_faults.uri("sd15"), tmp_path / "cache", s3_faults.s3)
    assert again == tree
    assert proxy.outcomes("forwarded", "GET") == first_gets + 1  # only the listing

    _seed(s3_faults, "sd15", {"unet/w.safetensors": b"W" * 100})
    s3_faults.client().delete_object(Bucket=s3_faults.bucket, Key="sd15/vae/x")
    before = len(proxy.log)
    fetch_tree(s3_faults.uri("sd15"), tmp_path / "cache", s3_faults.s3)
    fetched = [path for method, path, _ in proxy.log[before:] if method == "GET" and "list-type" not in path]
    assert fetched == [f"/{s3_faults.bucket}/sd15/unet/w.safetensors"]
    assert (tree / "unet/w.safetensors").read_bytes() == b"W" * 100
    assert not (tree / "vae/x").exists()


def test_fetch_tree_missing_prefix_is_input_missing(s3_env: S3Env, tmp_path: Path) -> None:
    with pytest.raises(InputMissing, match=f"s3://{s3_env.bucket}/nothing-here"):
        fetch_tree(s3_env.uri("nothing-here"), tmp_path / "cache", s3_env.s3)


def test_missing_bucket_is_rejected_with_a_fix(s3_env: S3Env) -> None:
    store = open_store("s3://no-such-bucket/x", s3_env.s3)
    with pytest.raises(StorageRejected, match="no-such-bucket.*create it"):
        store.put_bytes("k", b"1")


def test_unreachable_endpoint_is_storage_unavailable(s3_env: S3Env) -> None:
    s3 = S3Config(endpoint_url=f"http://127.0.0.1:{free_port()}", region="us-east-1", max_attempts=2, connect_timeout=0.5)
    with pytest.raises(StorageUnavailable, match="s3://b/p/k.*endpoint"):
        S3Store("b", "p", s3).get_bytes("k")


def test_credentials_never_reach_logs_or_errors(
    s3_env: S3Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "sEcReT-d0-not-log-4242"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    caplog.set_level(logging.DEBUG)  # botocore's own debug logging included
    store = open_store(s3_env.uri("creds"), s3_env.s3)
    store.put_bytes("a", b"1")
    store.get_bytes("a")
    _seed(s3_env, "tree", {"f": b"1"})
    fetch_tree(s3_env.uri("tree"), tmp_path / "cache", s3_env.s3)
    errors = []
    for call in (lambda: store.get_bytes("missing"), lambda: open_store("s3://no-such-bucket", s3_env.s3).list()):
        with pytest.raises(Exception) as info:
            call()
        errors.append(str(info.value))
    assert caplog.records and secret not in caplog.text
    assert all(secret not in e for e in errors)


# ---- background uploader ------------------------------------------------------------------------

def test_uploader_keeps_order_and_coalesces() -> None:
    gate, seen = threading.Event(), []
    up = BackgroundUploader()
    up.submit("blocker", gate.wait)
    up.submit("p1", lambda: seen.append("progress 1"), coalesce_key="progress")
    up.submit("ckpt", lambda: seen.append("checkpoint"))
    job = up.submit("p2", lambda: seen.append("progress 2"), coalesce_key="progress")
    assert not up.wait(timeout=0.05)  # still blocked
    gate.set()
    assert up.wait(timeout=5) and job.ok
    assert seen == ["progress 2", "checkpoint"]  # p2 replaced p1 in its place in the queue
    up.close()


def test_uploader_retries_transient_errors() -> None:
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise StorageUnavailable("s3://b/k: upload failed (SlowDown)")
        return "done"

    up = BackgroundUploader(backoff_initial=0.01)
    job = up.submit("flaky", flaky)
    assert job.wait(5) and job.ok and job.result == "done" and job.attempts == 3
    up.close()


def test_uploader_surfaces_persistent_failure_once_and_drops_the_queue() -> None:
    def down() -> None:
        raise StorageUnavailable("s3://b/k: upload failed (ServiceUnavailable)")

    up = BackgroundUploader(retry_deadline=0.2, backoff_initial=0.05)
    failed = up.submit("checkpoint step 5", down)
    queued = up.submit("progress", lambda: None)
    assert failed.wait(5) and queued.wait(5)
    assert isinstance(failed.error, StorageUnavailable) and not queued.ok
    with pytest.raises(StorageUnavailable, match="checkpoint step 5: storage still unavailable"):
        up.submit("next", lambda: None)
    assert up.submit("after", lambda: 1).wait(5)  # raised once; the uploader goes on
    assert up.close(timeout=5)


def test_uploader_passes_other_errors_through_without_retry() -> None:
    def stale() -> None:
        raise StaleAttempt("attempt 1 is older than attempt 2")

    up = BackgroundUploader()
    job = up.submit("commit", stale)
    assert job.wait(5) and job.attempts == 1
    with pytest.raises(StaleAttempt):
        up.wait(5)
    up.close()


def test_uploader_files_job(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"a")
    store = LocalStore(tmp_path / "out")
    up = BackgroundUploader()
    up.submit_files(store, [(tmp_path / "a", "logs/a")], label="logs")
    assert up.close(timeout=5)
    assert store.get_bytes("logs/a") == b"a"
