"""Object storage for the trainer: local folders and S3-compatible stores behind one small `Store`.

URIs: a local path, `file:///abs/path`, or `s3://bucket/prefix`. Keys are POSIX paths relative to
the store root (`checkpoints/step-000000500/MANIFEST.json`). S3 works with AWS, MinIO, Cloudflare
R2 and GCS's S3 interface: checksums only when the API requires them (R2 and GCS reject the newer
default CRC headers), one object per DELETE (GCS has no multi-object delete), standard retries.
Credentials come only from the standard AWS environment and are never logged.

Errors from botocore are translated here: `NotFound` (the key is absent), `StorageRejected` (the
store answered but will never accept this: bad credentials, missing bucket) and
`StorageUnavailable` (transient: timeouts, 5xx, connection refused) for everything else.
"""

from __future__ import annotations

import abc
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from lora_trainer.config import S3Config
from lora_trainer.errors import EXIT_NOPERM, ConfigError, StorageUnavailable, TrainerError, UserError
from lora_trainer.paths import is_inside, name_problem, normalise_name, s3_uri_problem, shorten, shown

log = logging.getLogger(__name__)

MIB = 1024 * 1024
MULTIPART_THRESHOLD = 8 * MIB  # parts of 8 MiB: R2 needs equal part sizes, which boto3 gives
TRANSFER_CONCURRENCY = 10  # threads per multipart transfer (boto3's default)
FILE_CONCURRENCY = 4  # files in flight at once in put_files/get_files
_TMP_SUFFIX = ".lora-tmp"


class NotFound(TrainerError):
    """The key or object does not exist in the store."""

    reason = "NotFound"


class UnsafeKey(ConfigError, ValueError):
    """A key the path policy refuses, or one that a symlink leads out of a local store's folder."""


class StorageRejected(StorageUnavailable):
    """The store answered but will refuse this request on every retry (credentials, bucket).

    Exit 77 (EX_NOPERM): a permanent error, so the operator fails the job instead of retrying."""

    exit_code = EXIT_NOPERM
    reason = "StorageRejected"


@dataclass(frozen=True)
class Location:
    """A parsed storage URI: either a local `path` or an S3 `bucket` + `prefix`."""

    uri: str
    path: Path | None = None
    bucket: str = ""
    prefix: str = ""

    @property
    def is_local(self) -> bool:
        return self.path is not None


@dataclass(frozen=True)
class ObjectInfo:
    """One listed object: key relative to the store root, size in bytes, and an ETag-like tag."""

    key: str
    size: int
    etag: str


def parse_uri(uri: str) -> Location:
    """Parse a local path, file:// or s3://bucket/prefix URI; other schemes are a ConfigError."""
    if "://" not in uri:
        return Location(uri=uri, path=Path(uri).expanduser().absolute())
    parts = urlparse(uri)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ConfigError(f"{uri}: file:// URIs need an absolute path (file:///data/x), not a host")
        return Location(uri=uri, path=Path(unquote(parts.path)))
    if parts.scheme == "s3":
        if not parts.netloc:
            raise ConfigError(f"{uri}: no bucket; write s3://bucket/prefix")
        if problem := s3_uri_problem(uri):
            raise ConfigError(problem)
        return Location(uri=uri, bucket=parts.netloc, prefix=normalise_name(parts.path))
    raise ConfigError(f"{uri}: unsupported scheme {parts.scheme!r}; use a local path, file:// or s3://bucket/prefix")


class Store(abc.ABC):
    """A flat key space under one root; every write of one key is atomic (whole object or nothing)."""

    uri: str

    @abc.abstractmethod
    def put_file(self, key: str, path: Path) -> None: ...

    @abc.abstractmethod
    def put_bytes(self, key: str, data: bytes) -> str:
        """Write `data` to `key`; returns the new object's tag (as `list_info` will report it)."""

    @abc.abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """The object's content, or NotFound."""

    @abc.abstractmethod
    def get_file(self, key: str, path: Path) -> None:
        """Download to `path` (atomically: a temporary file renamed into place), or NotFound."""

    @abc.abstractmethod
    def list_info(self, prefix: str = "") -> list[ObjectInfo]:
        """Every object whose key starts with `prefix` (string prefix, recursive), sorted by key."""

    @abc.abstractmethod
    def delete(self, keys: Iterable[str]) -> None:
        """Delete keys in order; absent keys are fine."""

    def list(self, prefix: str = "") -> list[str]:
        return [info.key for info in self.list_info(prefix)]

    def exists(self, key: str) -> bool:
        try:
            self.get_bytes(key)
        except NotFound:
            return False
        return True

    def url(self, key: str = "") -> str:
        return f"{self.uri.rstrip('/')}/{key}" if key else self.uri

    def put_files(self, items: Sequence[tuple[Path, str]], workers: int = FILE_CONCURRENCY) -> None:
        """Upload (local path, key) pairs side by side, largest first; the first error is raised
        once all have stopped.

        A file over the multipart threshold also uploads its parts concurrently, but it has only
        size/8 MiB of them and spends two round trips creating and completing the upload; running
        files side by side keeps the connections busy through those gaps."""
        ordered = sorted(items, key=lambda item: item[0].stat().st_size, reverse=True)
        _parallel([partial(self.put_file, key, path) for path, key in ordered], workers)

    def get_files(self, items: Sequence[tuple[str, Path]], workers: int = FILE_CONCURRENCY) -> None:
        """Download (key, local path) pairs in parallel; the first error is raised once all have stopped."""
        _parallel([partial(self.get_file, key, path) for key, path in items], workers)


def _parallel(calls: list[Callable[[], Any]], workers: int) -> None:
    if len(calls) <= 1:
        for call in calls:
            call()
        return
    with ThreadPoolExecutor(max_workers=min(workers, len(calls)), thread_name_prefix="store") as pool:
        futures = [pool.submit(call) for call in calls]
        _done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        for future in pending:
            future.cancel()
        for future in futures:
            if not future.cancelled() and future.exception() is not None:
                raise future.exception()  # type: ignore[misc]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _local_tag(path: Path) -> str:
    st = path.stat()  # every write is a rename of a new file: a new inode and mtime
    return f"{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}"


class LocalStore(Store):
    """A folder on disk. Writes go to a temporary file, fsync, then rename, so readers never see half."""

    def __init__(self, root: Path, uri: str | None = None) -> None:
        self.root = root
        self.uri = uri or str(root)

    def _path(self, key: str) -> Path:
        """The file for `key`; UnsafeKey if the key or a symlink on its way leads outside the root."""
        if problem := name_problem(key):
            raise UnsafeKey(f"{self.uri}: key {shown(key)} {problem}")
        path = self.root / key
        if not is_inside(self.root, path):
            raise UnsafeKey(
                f"{shorten(self.uri)}: {shown(key)} leads outside the folder through a symlink; "
                "replace the symlink with a folder"
            )
        return path

    def _write(self, key: str, write: Any) -> str:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{time.monotonic_ns()}{_TMP_SUFFIX}")
        try:
            with open(tmp, "wb") as fh:
                write(fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, dest)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise StorageUnavailable(f"{self.url(key)}: cannot write ({exc.strerror}); check disk space and permissions") from exc
        _fsync_dir(dest.parent)
        return _local_tag(dest)

    def put_file(self, key: str, path: Path) -> None:
        if self._path(key).resolve() == path.resolve():
            return
        with open(path, "rb") as src:
            self._write(key, lambda fh: shutil.copyfileobj(src, fh, MIB))

    def put_bytes(self, key: str, data: bytes) -> str:
        return self._write(key, lambda fh: fh.write(data))

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFound(f"{self.url(key)}: no such file") from None

    def get_file(self, key: str, path: Path) -> None:
        src = self._path(key)
        if not src.is_file():
            raise NotFound(f"{self.url(key)}: no such file")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}{_TMP_SUFFIX}")
        shutil.copyfile(src, tmp)
        os.replace(tmp, path)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list_info(self, prefix: str = "") -> list[ObjectInfo]:
        if not self.root.is_dir():
            return []
        out = []
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                if name.endswith(_TMP_SUFFIX):
                    continue
                full = Path(dirpath) / name
                key = full.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    out.append(ObjectInfo(key, full.stat().st_size, _local_tag(full)))
        return sorted(out, key=lambda info: info.key)

    def delete(self, keys: Iterable[str]) -> None:
        for key in keys:
            path = self._path(key)
            path.unlink(missing_ok=True)
            # Drop emptied folders so a pruned step-N/ disappears, as it does on S3.
            parent = path.parent
            while parent != self.root and parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()
                parent = parent.parent


_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
_REJECTED = {
    "NoSuchBucket": "the bucket does not exist; create it or fix the URI",
    "AccessDenied": "access denied; check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY and the bucket policy",
    "403": "access denied; check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY and the bucket policy",
    "InvalidAccessKeyId": "unknown access key; check AWS_ACCESS_KEY_ID",
    "SignatureDoesNotMatch": "signature rejected; check AWS_SECRET_ACCESS_KEY and the region",
    "InvalidBucketName": "invalid bucket name; fix the URI",
}


def translate_error(exc: BaseException, what: str, op: str) -> TrainerError:
    """Map a boto3/botocore exception to NotFound, StorageRejected or StorageUnavailable."""
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import ClientError, NoCredentialsError, PartialCredentialsError

    if isinstance(exc, S3UploadFailedError) and isinstance(exc.__context__, Exception):
        exc = exc.__context__  # boto3 wraps the ClientError without chaining it explicitly
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in _NOT_FOUND:
            return NotFound(f"{what}: not found")
        if code in _REJECTED:
            return StorageRejected(f"{what}: {op} failed: {_REJECTED[code]}")
        return StorageUnavailable(
            f"{what}: {op} failed ({code or status}) after retries; the store is unhealthy, try again later"
        )
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return StorageRejected(f"{what}: no S3 credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    return StorageUnavailable(
        f"{what}: {op} failed ({type(exc).__name__}) after retries; check the endpoint and the network"
    )


class S3Store(Store):
    """A bucket + prefix on any S3-compatible service."""

    def __init__(self, bucket: str, prefix: str, s3: S3Config, client: Any = None) -> None:
        import boto3.s3.transfer
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.uri = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.client = client or make_client(s3)
        self.transfer = boto3.s3.transfer.TransferConfig(
            multipart_threshold=MULTIPART_THRESHOLD,
            multipart_chunksize=MULTIPART_THRESHOLD,
            max_concurrency=TRANSFER_CONCURRENCY,
            use_threads=True,
            preferred_transfer_client="classic",
        )
        self._boto_errors = (ClientError, BotoCoreError, Boto3Error)

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, key: str, op: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except self._boto_errors as exc:
            raise translate_error(exc, self.url(key), op) from exc

    def put_file(self, key: str, path: Path) -> None:
        if path.stat().st_size >= MULTIPART_THRESHOLD:
            self._call(key, "upload", self.client.upload_file, str(path), self.bucket, self._key(key), Config=self.transfer)
            return
        # One PUT, as upload_file would send, without the transfer manager and thread pool it
        # builds for every call: a checkpoint is mostly small files, and that set-up cost more
        # CPU (taken from the training loop's GIL) than the request itself. A seekable body is
        # rewound and resent on retry.
        with open(path, "rb") as body:
            self._call(key, "upload", self.client.put_object, Bucket=self.bucket, Key=self._key(key), Body=body)

    def put_bytes(self, key: str, data: bytes) -> str:
        reply = self._call(key, "upload", self.client.put_object, Bucket=self.bucket, Key=self._key(key), Body=data)
        return str(reply.get("ETag", "")).strip('"')

    def get_bytes(self, key: str) -> bytes:
        def read() -> bytes:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()

        return self._call(key, "download", read)

    def get_file(self, key: str, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}{_TMP_SUFFIX}")
        self._call(key, "download", self.client.download_file, self.bucket, self._key(key), str(tmp), Config=self.transfer)
        os.replace(tmp, path)

    def list_info(self, prefix: str = "") -> list[ObjectInfo]:
        # With a store prefix, list "<prefix>/..." so s3://b/model never picks up s3://b/model-v2.
        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        cut = len(self.prefix) + 1 if self.prefix else 0

        def pages() -> list[ObjectInfo]:
            out = []
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
                for obj in page.get("Contents", []):
                    out.append(ObjectInfo(obj["Key"][cut:], int(obj["Size"]), str(obj.get("ETag", "")).strip('"')))
            return out

        return sorted(self._call(prefix, "list", pages), key=lambda info: info.key)

    def delete(self, keys: Iterable[str]) -> None:
        for key in keys:
            self._call(key, "delete", self.client.delete_object, Bucket=self.bucket, Key=self._key(key))

    def exists(self, key: str) -> bool:
        try:
            self._call(key, "head", self.client.head_object, Bucket=self.bucket, Key=self._key(key))
        except NotFound:
            return False
        return True


def make_client(s3: S3Config) -> Any:
    """A boto3 S3 client configured for S3-compatible services from an S3Config."""
    import boto3
    import botocore.session
    from botocore.config import Config

    config = Config(
        region_name=s3.region,
        signature_version="s3v4",
        s3={"addressing_style": "path" if s3.path_style else "virtual"},
        retries={"mode": "standard", "max_attempts": s3.max_attempts},
        connect_timeout=s3.connect_timeout,
        read_timeout=s3.read_timeout,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        max_pool_connections=FILE_CONCURRENCY * TRANSFER_CONCURRENCY + 4,
        tcp_keepalive=True,
    )
    session = botocore.session.Session()
    # Timestamps (LastModified of every listed object) stay strings: nothing here reads them, and
    # botocore's dateutil parse of each one cost more CPU than the LIST request itself once a
    # checkpoints/ folder holds a few dozen objects. The fencing checks list it on every commit.
    session.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=str)
    return boto3.session.Session(botocore_session=session).client("s3", endpoint_url=s3.endpoint_url, config=config)


def open_store(uri: str, s3: S3Config) -> Store:
    """The Store for a local path, file:// or s3:// URI."""
    loc = parse_uri(uri)
    if loc.path is not None:
        return LocalStore(loc.path, uri=uri)
    return S3Store(loc.bucket, loc.prefix, s3)


def fetch_tree(uri: str, cache_dir: Path | str, s3: S3Config, refuse: type[UserError] | None = None) -> Path:
    """A local folder holding the tree at `uri` (see `lora_trainer.fetch`, where it lives)."""
    from lora_trainer.fetch import fetch_tree as fetch  # deferred: fetch builds on this module

    return fetch(uri, cache_dir, s3) if refuse is None else fetch(uri, cache_dir, s3, refuse)
