"""Pytest plugin: an S3 server (moto) on loopback, a fresh bucket per test, and a faulty proxy.

Fixtures:
    s3_server   session: endpoint URL of a moto server on 127.0.0.1 (a free port)
    s3_env      per test: a fresh bucket, the AWS_* env (also applied with monkeypatch), an S3Config
    s3_faults   per test: like s3_env, but the S3Config points at a FaultyProxy (`.proxy`) in front
                of the server, with short timeouts and few retries so faults show up fast
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import boto3
import pytest

from lora_operator.devcluster.s3 import TEST_CREDENTIALS, start_s3_server
from lora_trainer.config import S3Config
from tests.support.faults import FaultyProxy

_bucket_numbers = itertools.count(1)

# Keep a developer's own AWS config out of the tests: no profile, no IMDS lookups.
ISOLATION_ENV = {
    "AWS_CONFIG_FILE": "/nonexistent/aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@dataclass
class S3Env:
    """One test's bucket on the S3 server, and how to reach it."""

    endpoint: str
    bucket: str
    s3: S3Config
    env: dict[str, str] = field(default_factory=dict)
    proxy: FaultyProxy | None = None

    def uri(self, prefix: str = "") -> str:
        return f"s3://{self.bucket}/{prefix}".rstrip("/")

    def client(self) -> Any:
        """A plain boto3 client straight to the server (bypassing any proxy), for arranging tests."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=TEST_CREDENTIALS["AWS_DEFAULT_REGION"],
            aws_access_key_id=TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        )


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    server, url = start_s3_server("127.0.0.1", 0)
    yield url
    server.stop()


def _make_env(endpoint: str, monkeypatch: pytest.MonkeyPatch, s3: S3Config) -> S3Env:
    env = {**TEST_CREDENTIALS, **ISOLATION_ENV}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    bucket = f"test-{next(_bucket_numbers)}"
    s3_env = S3Env(endpoint=endpoint, bucket=bucket, s3=s3, env=env)
    s3_env.client().create_bucket(Bucket=bucket)
    return s3_env


@pytest.fixture
def s3_env(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> S3Env:
    s3 = S3Config(endpoint_url=s3_server, region="us-east-1", path_style=True)
    return _make_env(s3_server, monkeypatch, s3)


@pytest.fixture
def s3_faults(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Env]:
    proxy = FaultyProxy(s3_server).start()
    s3 = S3Config(
        endpoint_url=proxy.url, region="us-east-1", path_style=True,
        max_attempts=4, connect_timeout=1.0, read_timeout=1.0,
    )
    s3_env = _make_env(s3_server, monkeypatch, s3)
    s3_env.proxy = proxy
    yield s3_env
    proxy.stop()
