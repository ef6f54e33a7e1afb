"""Put a job's inputs into the dev cluster and take its outputs out (thin: S3 and one Secret).

What a user does by hand before `kubectl apply` (examples/README.md): buckets, the base model and
dataset folders uploaded under their URIs, and the credentials Secret the job names. The dev S3
(moto) accepts any keys, so the Secret holds `TEST_CREDENTIALS` (dev only).
"""

from __future__ import annotations

import base64
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lora_operator.devcluster.s3 import TEST_CREDENTIALS
from lora_operator.spec import StorageSpec


def split_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix/` → ("bucket", "some/prefix"); ValueError for anything else."""
    if not uri.startswith("s3://") or not uri[len("s3://"):].split("/", 1)[0]:
        raise ValueError(f"{uri!r} is not an s3://bucket/prefix URI")
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    return bucket, prefix.strip("/")


def s3_client(endpoint: str) -> Any:
    """A boto3 S3 client for the dev S3 server with the dev credentials (no environment involved)."""
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name=TEST_CREDENTIALS["AWS_DEFAULT_REGION"],
                        aws_access_key_id=TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"])


def ensure_buckets(s3: Any, uris: Iterable[str]) -> None:
    """Create the bucket of each URI unless it exists."""
    existing = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
    for uri in uris:
        bucket, _ = split_s3_uri(uri)
        if bucket not in existing:
            s3.create_bucket(Bucket=bucket)
            existing.add(bucket)


def upload_folder(s3: Any, folder: Path, uri: str) -> int:
    """Upload every file under `folder` to the same relative keys under `uri`; the number of files."""
    bucket, prefix = split_s3_uri(uri)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    for path in files:
        s3.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(folder).as_posix()}")
    return len(files)


def objects(s3: Any, uri: str) -> list[str]:
    """Keys under `uri`, relative to it."""
    bucket, prefix = split_s3_uri(uri)
    keys: list[str] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/"):
        keys += [obj["Key"][len(prefix) + 1:] for obj in page.get("Contents", [])]
    return keys


def clear_prefix(s3: Any, uri: str) -> None:
    """Delete every object under `uri`."""
    bucket, prefix = split_s3_uri(uri)
    keys = [{"Key": f"{prefix}/{rel}"} for rel in objects(s3, uri)]
    for start in range(0, len(keys), 1000):  # DeleteObjects takes 1000 keys at most
        s3.delete_objects(Bucket=bucket, Delete={"Objects": keys[start:start + 1000]})


def download_prefix(s3: Any, uri: str, dest: Path, skip: tuple[str, ...] = ()) -> list[Path]:
    """Copy the objects under `uri` to `dest` (keys starting with one of `skip` left out)."""
    bucket, prefix = split_s3_uri(uri)
    out = []
    for rel in objects(s3, uri):
        if rel.startswith(skip):
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        s3.download_file(bucket, f"{prefix}/{rel}", str(target))
        out.append(target)
    return out


def credentials_secret(storage: StorageSpec) -> dict[str, Any] | None:
    """The Secret body the job's spec.storage refers to, holding the dev keys; None if it names none."""
    if not storage.credentials_secret:
        return None
    values = {storage.access_key_id_key: TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"],
              storage.secret_access_key_key: TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"]}
    # `data` (base64), not stringData: the emulator does not convert stringData as an API server does.
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": storage.credentials_secret},
            "type": "Opaque", "data": {k: base64.b64encode(v.encode()).decode() for k, v in values.items()}}
