"""Pure helpers of checkpoints and storage, table-driven, no servers.

- step folder names round-trip and reject look-alikes; attempt marker keys parse
- keys group by step folder; resume tries newest first
- retention plan: keeps the newest committed, deletes below, never touches newer folders
- a folder listing is checked against its manifest (missing, extra, wrong size)
- Manifest rejects file names that escape the folder
- URIs parse into local paths or bucket + prefix; other schemes are config errors
- botocore errors translate to NotFound / StorageRejected / StorageUnavailable
"""

from __future__ import annotations

from pathlib import Path

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError, ReadTimeoutError
from pydantic import ValidationError

from lora_trainer.checkpoint import (
    FileDigest,
    Manifest,
    file_problems,
    group_step_keys,
    parse_attempt_key,
    parse_step,
    plan_prune,
    resume_order,
    step_dir_name,
)
from lora_trainer.errors import ConfigError, StorageUnavailable
from lora_trainer.storage import NotFound, ObjectInfo, StorageRejected, parse_uri, translate_error

SHA = "0" * 64


@pytest.mark.parametrize(
    ("step", "name"),
    [(0, "step-000000000"), (500, "step-000000500"), (999_999_999, "step-999999999")],
)
def test_step_dir_name_round_trips(step: int, name: str) -> None:
    assert step_dir_name(step) == name
    assert parse_step(name) == step


@pytest.mark.parametrize("step", [-1, 10**9])
def test_step_dir_name_rejects_out_of_range(step: int) -> None:
    with pytest.raises(ValueError):
        step_dir_name(step)


@pytest.mark.parametrize(
    "name",
    ["step-500", "step-0000005000", "step-00000050a", "checkpoint-000000500", "step-000000500.tmp", "", "latest.json"],
)
def test_parse_step_rejects_look_alikes(name: str) -> None:
    assert parse_step(name) is None


@pytest.mark.parametrize(
    ("key", "attempt"),
    [
        ("checkpoints/attempts/000000007.json", 7),
        ("checkpoints/attempts/000000000.json", 0),
        ("checkpoints/attempts/7.json", None),
        ("checkpoints/attempts/000000007.json.tmp", None),
        ("other/attempts/000000007.json", None),
    ],
)
def test_parse_attempt_key(key: str, attempt: int | None) -> None:
    assert parse_attempt_key(key) == attempt


def test_group_step_keys_ignores_everything_but_step_folders() -> None:
    keys = [
        "checkpoints/step-000000100/MANIFEST.json",
        "checkpoints/step-000000100/state/optimizer.safetensors",
        "checkpoints/step-000000200/lora.safetensors",
        "checkpoints/pytorch_lora_weights_step_100.safetensors",
        "checkpoints/latest.json",
        "checkpoints/attempts/000000001.json",
        "checkpoints/step-100/x",
        "logs/step-000000100/x",
    ]
    groups = group_step_keys(ObjectInfo(k, 1, "e") for k in keys)
    assert {step: sorted(files) for step, files in groups.items()} == {
        100: ["MANIFEST.json", "state/optimizer.safetensors"],
        200: ["lora.safetensors"],
    }


def test_resume_order_is_newest_first() -> None:
    assert resume_order([100, 300, 200, 300]) == [300, 200, 100]


# committed: step -> has MANIFEST
@pytest.mark.parametrize(
    ("committed", "keep_last", "anchor", "doomed"),
    [
        ({100: True, 200: True, 300: True}, 2, 300, [100]),
        ({100: True, 200: True, 300: True}, 1, 300, [100, 200]),
        ({100: True, 200: True, 300: True}, 0, 300, []),  # 0 keeps all
        ({100: True, 200: True, 300: True}, 5, 300, []),
        ({100: False, 200: True, 300: True}, 2, 300, [100]),  # partial below the kept: garbage
        ({100: True, 200: False, 300: True}, 2, 300, []),  # partial between kept ones: left for later
        ({100: True, 200: True, 300: True, 400: False}, 1, 300, [100, 200]),  # above anchor untouched
        ({100: True, 200: True, 500: True}, 1, 300, []),  # anchor not committed: delete nothing
        ({100: True, 200: True, 500: True}, 1, 200, [100]),  # 500 (other history) never touched
    ],
)
def test_plan_prune(committed: dict[int, bool], keep_last: int, anchor: int, doomed: list[int]) -> None:
    assert plan_prune(committed, keep_last, anchor) == doomed


@pytest.mark.parametrize(
    ("listed", "problems"),
    [
        ({"a": 3, "b": 4}, []),
        ({"a": 3}, ["missing b"]),
        ({"a": 3, "b": 4, "c": 1}, ["unexpected c"]),
        ({"a": 2, "b": 4}, ["a is 2 bytes, manifest says 3"]),
        ({}, ["missing a, b"]),
    ],
)
def test_file_problems(listed: dict[str, int], problems: list[str]) -> None:
    expected = {"a": FileDigest(sha256=SHA, size=3), "b": FileDigest(sha256=SHA, size=4)}
    assert file_problems(expected, listed) == problems


@pytest.mark.parametrize("name", ["../evil", "/abs", "a/../../b", "", "MANIFEST.json"])
def test_manifest_rejects_names_outside_the_folder(name: str) -> None:
    with pytest.raises(ValidationError):
        Manifest(step=1, attempt=1, config_hash="h", files={name: FileDigest(sha256=SHA, size=1)})


def test_manifest_round_trips_json() -> None:
    m = Manifest(step=5, attempt=2, config_hash="h", training_fields={"seed": 1},
                 files={"state/x.safetensors": FileDigest(sha256=SHA, size=9)})
    assert Manifest.model_validate_json(m.to_json()) == m


@pytest.mark.parametrize(
    ("uri", "path", "bucket", "prefix"),
    [
        ("/data/out", Path("/data/out"), "", ""),
        ("file:///data/out", Path("/data/out"), "", ""),
        ("file://localhost/data/out", Path("/data/out"), "", ""),
        ("s3://loras/portrait/v2/", None, "loras", "portrait/v2"),
        ("s3://loras", None, "loras", ""),
    ],
)
def test_parse_uri(uri: str, path: Path | None, bucket: str, prefix: str) -> None:
    loc = parse_uri(uri)
    assert (loc.path, loc.bucket, loc.prefix) == (path, bucket, prefix)


def test_parse_uri_relative_path_is_absolutised() -> None:
    assert parse_uri("out").path == Path.cwd() / "out"


@pytest.mark.parametrize("uri", ["gs://bucket/x", "http://h/x", "s3:///x", "file://host/x"])
def test_parse_uri_rejects(uri: str) -> None:
    with pytest.raises(ConfigError, match=uri.split("/")[0]):
        parse_uri(uri)


def _client_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


@pytest.mark.parametrize(
    ("exc", "kind", "words"),
    [
        (_client_error("NoSuchKey", 404), NotFound, "not found"),
        (_client_error("404", 404), NotFound, "not found"),
        (_client_error("NoSuchBucket", 404), StorageRejected, "create it"),
        (_client_error("AccessDenied", 403), StorageRejected, "AWS_ACCESS_KEY_ID"),
        (_client_error("SignatureDoesNotMatch", 403), StorageRejected, "AWS_SECRET_ACCESS_KEY"),
        (_client_error("SlowDown", 503), StorageUnavailable, "SlowDown"),
        (_client_error("InternalError", 500), StorageUnavailable, "try again"),
        (EndpointConnectionError(endpoint_url="http://x"), StorageUnavailable, "endpoint"),
        (ReadTimeoutError(endpoint_url="http://x"), StorageUnavailable, "ReadTimeoutError"),
        (NoCredentialsError(), StorageRejected, "AWS_SECRET_ACCESS_KEY"),
    ],
)
def test_translate_error(exc: Exception, kind: type, words: str) -> None:
    err = translate_error(exc, "s3://b/k", "download")
    assert type(err) is kind
    assert "s3://b/k" in str(err) and words in str(err)
