"""The operator's reads of progress.json and checkpoints/latest.json (moto S3 on loopback).

Behaviours tested:
- both files are read and parsed; absent ones are None;
- a file over 64 KiB is refused with a message naming it and its size, and at most 64 KiB + 1
  bytes are ever read (a ranged GET); a file of exactly 64 KiB is read; an empty one is garbled;
- a latest.json whose path is 40 KB (under the cap) is read: bounding it is status's job;
- the client has bounded timeouts and retries.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from lora_operator.devcluster.s3 import TEST_CREDENTIALS
from lora_operator.progress import (
    CONNECT_TIMEOUT,
    MAX_ATTEMPTS,
    MAX_JSON_BYTES,
    READ_TIMEOUT,
    Credentials,
    ProgressUnavailable,
    _client,
    read_progress,
)
from lora_operator.spec import StorageSpec


@pytest.fixture
def storage(s3_env: Any) -> tuple[StorageSpec, Credentials]:
    creds = Credentials(TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"], TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"])
    return StorageSpec(endpoint=s3_env.endpoint, region="us-east-1"), creds


def put(s3_env: Any, key: str, body: bytes) -> None:
    s3_env.client().put_object(Bucket=s3_env.bucket, Key=f"out/{key}", Body=body)


def test_reads_both_files_and_absent_ones_are_none(s3_env: Any, storage: tuple[StorageSpec, Credentials]) -> None:
    uri = f"s3://{s3_env.bucket}/out/"
    assert read_progress(uri, *storage) == (None, None)
    put(s3_env, "progress.json", json.dumps({"step": 3, "total_steps": 10}).encode())
    put(s3_env, "checkpoints/latest.json", json.dumps({"step": 2, "attempt": 1, "path": "p" * 40_000}).encode())
    progress, latest = read_progress(uri, *storage)
    assert progress is not None and progress.step == 3
    assert latest is not None and len(latest.path) == 40_000


@pytest.mark.parametrize(("size", "ok"), [(MAX_JSON_BYTES, True), (MAX_JSON_BYTES + 1, False), (50 * 2**20, False)])
def test_size_cap(s3_env: Any, storage: tuple[StorageSpec, Credentials], size: int, ok: bool) -> None:
    body = json.dumps({"step": 1, "total_steps": 2, "state": ""}).encode()
    body = body[:-2] + b" " * (size - len(body)) + body[-2:]  # valid JSON, padded inside
    put(s3_env, "progress.json", body)
    uri = f"s3://{s3_env.bucket}/out"
    if ok:
        assert read_progress(uri, *storage)[0] is not None
        return
    with pytest.raises(ProgressUnavailable) as info:
        read_progress(uri, *storage)
    assert "progress.json" in str(info.value) and f"{size:,} bytes" in str(info.value) and "64 KiB" in str(info.value)


def test_empty_file_is_garbled_not_a_crash(s3_env: Any, storage: tuple[StorageSpec, Credentials]) -> None:
    put(s3_env, "progress.json", b"")
    with pytest.raises(ProgressUnavailable, match="not valid Progress JSON"):
        read_progress(f"s3://{s3_env.bucket}/out", *storage)


def test_client_timeouts_and_retries_are_bounded(storage: tuple[StorageSpec, Credentials]) -> None:
    config = _client(*storage).meta.config
    assert (config.connect_timeout, config.read_timeout) == (CONNECT_TIMEOUT, READ_TIMEOUT)
    assert config.retries["total_max_attempts"] == MAX_ATTEMPTS
