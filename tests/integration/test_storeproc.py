"""The child-process store that background uploads use, against a real S3 server (moto).

Behaviours:
- every Store call returns what the in-process store returns (bytes, listings, deletes, files);
- errors keep their type (NotFound) so callers and the uploader's retry policy work unchanged;
- a checkpoint commits whole in the child, and its log lines reach the trainer's log;
- a dead child is restarted; a call it cannot answer raises StorageUnavailable, the next one works;
- the child ignores SIGTERM (the trainer decides when to stop) and dies with its parent.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lora_trainer import checkpoint
from lora_trainer.errors import StorageUnavailable
from lora_trainer.storage import NotFound, open_store
from lora_trainer.storeproc import StoreProcess, commit_checkpoint, open_upload_store
from tests.support.s3 import S3Env


@pytest.fixture
def remote(s3_env: S3Env):
    store = StoreProcess(s3_env.uri("proc"), s3_env.s3)
    yield store
    store.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); its state in /proc says it is gone.
    return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] != "Z"


def test_calls_match_the_in_process_store(remote: StoreProcess, s3_env: S3Env, tmp_path: Path) -> None:
    local = open_store(s3_env.uri("proc"), s3_env.s3)
    assert remote.uri == local.uri
    remote.put_bytes("a/one.json", b"{}")
    (tmp_path / "big.bin").write_bytes(os.urandom(3 * 2**20))
    remote.put_files([(tmp_path / "big.bin", "a/big.bin")])
    assert local.get_bytes("a/one.json") == b"{}"
    assert remote.list_info("a/") == local.list_info("a/")
    remote.get_file("a/big.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == (tmp_path / "big.bin").read_bytes()
    remote.delete(["a/one.json"])
    assert local.list("a/") == ["a/big.bin"]
    with pytest.raises(NotFound):
        remote.get_bytes("a/missing")
    assert isinstance(open_upload_store(str(tmp_path / "out"), s3_env.s3), type(open_store(str(tmp_path), s3_env.s3)))


def test_commit_runs_in_the_child_and_logs_here(remote: StoreProcess, tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "step"
    folder.mkdir()
    (folder / "weights.safetensors").write_bytes(b"w" * 1000)
    checkpoint.claim_attempt(remote, 1)
    with caplog.at_level(logging.INFO):
        pointer = commit_checkpoint(remote, folder, 5, 1, "hash", {"seed": 1}, 2)
    assert (pointer.step, pointer.attempt) == (5, 1)
    assert any("checkpoint step 5 committed by attempt 1" in r.getMessage() for r in caplog.records)
    found = checkpoint.find_resumable(remote, tmp_path / "resume")
    assert found is not None and found.manifest.step == 5


def test_a_killed_child_is_restarted(remote: StoreProcess) -> None:
    assert remote._proc is not None
    first = remote._proc.pid
    remote._proc.send_signal(signal.SIGKILL)
    remote._proc.wait()
    remote.put_bytes("x", b"2")  # found dead before the call: restarted, the call goes through
    assert remote.get_bytes("x") == b"2" and remote._proc.pid != first
    # Dying during a call: that call raises StorageUnavailable (the uploader retries), then it recovers.
    remote._proc.stdout.close()
    with pytest.raises(StorageUnavailable, match="upload process stopped"):
        remote.put_bytes("x", b"3")
    remote.put_bytes("x", b"4")
    assert remote.get_bytes("x") == b"4"


def test_child_ignores_sigterm_and_dies_with_its_parent(remote: StoreProcess, s3_env: S3Env) -> None:
    assert remote._proc is not None
    remote._proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    remote.put_bytes("still", b"here")

    parent = subprocess.run(
        [sys.executable, "-c",
         "import os, sys\nfrom lora_trainer.config import S3Config\nfrom lora_trainer.storeproc import StoreProcess\n"
         f"s = StoreProcess({s3_env.uri('orphan')!r}, S3Config.model_validate_json({s3_env.s3.model_dump_json()!r}))\n"
         "s.put_bytes('k', b'v')\nprint(s._proc.pid, flush=True)\nos._exit(0)\n"],
        capture_output=True, text=True, timeout=60, check=True,
    )
    child = int(parent.stdout.strip())
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)


def test_close_stops_the_child_for_good(s3_env: S3Env) -> None:
    store = StoreProcess(s3_env.uri("closed"), s3_env.s3)
    store.put_bytes("k", b"v")
    store.close()
    with pytest.raises(RuntimeError, match="closed"):  # not StorageUnavailable: no retries
        store.put_bytes("k", b"w")

