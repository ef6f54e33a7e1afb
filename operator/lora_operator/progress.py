"""Read the trainer's progress.json and checkpoints/latest.json from a job's output URI (thin).

Each job has its own credentials (a Secret), so this uses one boto3 client per endpoint and key
rather than `lora_trainer.storage`, which takes credentials from the process environment.

Bounded, because one job's bucket must not hurt the operator every job shares:
- time: 3 s to connect, 5 s to read, two attempts (boto3's "standard" retries), so a hanging
  endpoint costs a pass at most ~16 s per file; a slow store delays one status update, never a
  job's loop. These are the operator's own bounds, independent of spec.storage.retrySeconds
  (which is the trainer's budget: the operator only mirrors, it never waits for the store);
- where: a job's endpoint must pass the operator's allow-list (`check_endpoint`, before the
  Secret is read): reconcile fails such a job (EndpointNotAllowed) before its first pod, so
  its progress is never read;
- size: each file is fetched with a ranged GET of its first 64 KiB + 1 byte, and at most that
  much is read even from a server that ignores the range; a bigger file is refused with a
  ProgressUnavailable naming it (the trainer writes a few hundred bytes).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from pydantic import BaseModel, ValidationError

from lora_operator.settings import Settings, endpoint_refusal
from lora_operator.spec import StorageSpec
from lora_trainer.contract import LATEST_FILE, PROGRESS_FILE, LatestPointer, Progress

_MISSING = {"NoSuchKey", "404", "NotFound"}
_EMPTY = {"InvalidRange", "416"}  # a ranged GET of an empty object
_MAX_CLIENTS = 256
MAX_JSON_BYTES = 64 * 1024
CONNECT_TIMEOUT = 3.0
READ_TIMEOUT = 5.0
MAX_ATTEMPTS = 2


class ProgressUnavailable(Exception):
    """The store could not be read (down, denied, garbled); the message has no secrets."""


@dataclass(frozen=True)
class Credentials:
    """Access keys read from the job's Secret; repr hides them."""

    access_key_id: str
    secret_access_key: str

    def __repr__(self) -> str:
        return "Credentials(***)"


_clients: dict[str, Any] = {}  # a cache of connections, not state: losing it costs a reconnect
_lock = threading.Lock()


def _client(storage: StorageSpec, creds: Credentials | None) -> Any:
    ident = "|".join([storage.endpoint or "", storage.region or "", str(storage.path_style),
                      creds.access_key_id if creds else "", creds.secret_access_key if creds else ""])
    key = hashlib.sha256(ident.encode()).hexdigest()
    with _lock:
        client = _clients.get(key)
        if client is None:
            if len(_clients) >= _MAX_CLIENTS:
                _clients.clear()
            client = boto3.session.Session().client(
                "s3",
                endpoint_url=storage.endpoint or None,
                region_name=storage.region or "us-east-1",
                aws_access_key_id=creds.access_key_id if creds else None,
                aws_secret_access_key=creds.secret_access_key if creds else None,
                config=Config(
                    connect_timeout=CONNECT_TIMEOUT, read_timeout=READ_TIMEOUT,
                    retries={"total_max_attempts": MAX_ATTEMPTS, "mode": "standard"},
                    s3={"addressing_style": "path" if storage.path_style else "virtual"},
                ),
            )
            _clients[key] = client
    return client


def _split(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ProgressUnavailable(f"spec.output.uri {uri!r} is not an s3:// URI")
    return parsed.netloc, parsed.path.strip("/")


def _size(response: Mapping[str, Any], read: int) -> str:
    total = str(response.get("ContentRange") or "").rpartition("/")[2]
    return f"{int(total):,} bytes" if total.isdigit() else f"over {read - 1:,} bytes"


def _read(client: Any, bucket: str, key: str, model: type[BaseModel]) -> Any:
    try:
        response = client.get_object(Bucket=bucket, Key=key, Range=f"bytes=0-{MAX_JSON_BYTES}")
        stream = response["Body"]
        try:
            body = stream.read(MAX_JSON_BYTES + 1)
        finally:
            stream.close()
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in _MISSING:
            return None
        if code not in _EMPTY:
            raise ProgressUnavailable(f"cannot read s3://{bucket}/{key}: {code or 'error'}") from None
        body = b""
    except BotoCoreError as exc:
        raise ProgressUnavailable(f"cannot read s3://{bucket}/{key}: {type(exc).__name__}") from None
    if len(body) > MAX_JSON_BYTES:
        raise ProgressUnavailable(
            f"s3://{bucket}/{key} is {_size(response, len(body))}, over the {MAX_JSON_BYTES // 1024} KiB the "
            "operator reads (the trainer writes a few hundred bytes); delete it or find what else writes "
            "under spec.output.uri")
    try:
        return model.model_validate_json(body)
    except ValidationError:
        raise ProgressUnavailable(f"s3://{bucket}/{key} is not valid {model.__name__} JSON") from None


def check_endpoint(storage: StorageSpec, settings: Settings) -> None:
    """ProgressUnavailable when the job's endpoint is not allowed: read neither its Secret nor its store."""
    refusal = endpoint_refusal(storage, settings)
    if refusal:
        raise ProgressUnavailable(refusal)


def read_progress(
    output_uri: str, storage: StorageSpec, creds: Credentials | None
) -> tuple[Progress | None, LatestPointer | None]:
    """(progress.json, checkpoints/latest.json) under the output URI; None for each one absent."""
    bucket, prefix = _split(output_uri)
    client = _client(storage, creds)

    def key(rel: str) -> str:
        return f"{prefix}/{rel}" if prefix else rel

    return _read(client, bucket, key(PROGRESS_FILE), Progress), _read(client, bucket, key(LATEST_FILE), LatestPointer)


def credentials_from_secret(data: dict[str, str] | None, storage: StorageSpec) -> Credentials | None:
    """The access keys out of the job's Secret data, None when the Secret or a key is missing."""
    if not data:
        return None
    key_id, secret = data.get(storage.access_key_id_key), data.get(storage.secret_access_key_key)
    if not key_id or not secret:
        return None
    return Credentials(key_id, secret)
