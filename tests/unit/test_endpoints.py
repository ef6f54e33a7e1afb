"""The S3 endpoint allow-list (pure): which spec.storage.endpoint values jobs may name.

Behaviours tested:
- the default (`*`) admits public and cluster hosts (names, private IPs, AWS when unset), and
  refuses loopback, link-local/metadata (169.254.0.0/16, fd00:ec2::254, metadata names), the
  unspecified address and the API server (its service names, and the address the operator uses),
  however the address is spelled (decimal, hex, octal, IPv4-mapped IPv6, NAT64, trailing dot, case);
- an explicit list admits only what it names; wildcards never admit a refused address, a literal
  entry does (the dev cluster's 127.0.0.1), the API server only with its exact port;
- endpoints that are not http(s) URLs with a host, or carry user@, are refused without echoing keys;
- bad entries are refused at start-up naming the entry and the forms that work;
- the setting comes from LORA_OPERATOR_ALLOWED_ENDPOINTS or --allowed-endpoints (flag wins);
- reconcile fails such a job with EndpointNotAllowed and creates no pod; progress.check_endpoint
  refuses before any read.
"""

from __future__ import annotations

import re

import pytest
from pydantic import ValidationError

from lora_operator.endpoints import ENDPOINT_NOT_ALLOWED, RuleError, endpoint_refusal, parse_rule
from lora_operator.progress import ProgressUnavailable, check_endpoint
from lora_operator.reconcile import CreatePod, Observed, reconcile
from lora_operator.settings import Settings, in_cluster_api_servers, parse
from lora_operator.spec import StorageSpec
from tests.unit.builders import NOW, SETTINGS, make_job

DEFAULT: list[str] = []
DEV = ["*", "127.0.0.1"]
API = ["https://10.96.0.1:443", "https://127.0.0.1:6443"]


@pytest.mark.parametrize(("endpoint", "allowed", "ok", "says"), [
    # the default admits public and cluster hosts
    ("http://minio.minio:9000", DEFAULT, True, ""),
    ("https://s3.eu-west-1.amazonaws.com", DEFAULT, True, ""),
    ("http://10.0.3.7:9000", DEFAULT, True, ""),
    ("http://[fd12::7]:9000", DEFAULT, True, ""),
    (None, DEFAULT, True, ""),  # AWS S3
    ("", DEFAULT, True, ""),
    # ... and refuses metadata, link-local, loopback, unspecified, the API server
    ("http://169.254.169.254", DEFAULT, False, "169.254.169.254:80 is link-local (cloud metadata)"),
    ("http://169.254.169.254/latest/meta-data/", DEFAULT, False, "link-local"),
    ("http://169.254.170.2:80", DEFAULT, False, "link-local"),
    ("http://[fd00:ec2::254]", DEFAULT, False, "[fd00:ec2::254]:80 is the EC2 metadata service"),
    ("http://[fe80::1%25eth0]:9000", DEFAULT, False, "link-local"),
    ("http://100.100.100.200", DEFAULT, False, "Alibaba"),
    ("http://metadata.google.internal", DEFAULT, False, "GCE metadata"),
    ("http://METADATA.Google.Internal.", DEFAULT, False, "GCE metadata"),
    ("http://instance-data.ec2.internal", DEFAULT, False, "EC2 metadata"),
    ("http://127.0.0.1:9000", DEFAULT, False, "127.0.0.1:9000 is loopback"),
    ("http://127.0.0.2:9000", DEFAULT, False, "loopback"),
    ("http://[::1]:9000", DEFAULT, False, "[::1]:9000 is loopback"),
    ("http://localhost:9000", DEFAULT, False, "loopback"),
    ("http://s3.localhost:9000", DEFAULT, False, "loopback"),
    ("http://0.0.0.0:9000", DEFAULT, False, "unspecified"),
    ("http://[::]:9000", DEFAULT, False, "unspecified"),
    ("https://kubernetes.default.svc", DEFAULT, False, "the Kubernetes API server"),
    ("https://kubernetes.default.svc.cluster.local:443", DEFAULT, False, "the Kubernetes API server"),
    ("https://kubernetes", DEFAULT, False, "the Kubernetes API server"),
    ("https://10.96.0.1", DEFAULT, False, "10.96.0.1:443 is the Kubernetes API server"),
    ("http://10.96.0.1:9000", DEFAULT, True, ""),  # another port of that address is another service
    # the same addresses spelled otherwise (the resolver reads these as IPv4 without DNS)
    ("http://2852039166", DEFAULT, False, "169.254.169.254:80 is link-local"),
    ("http://0xa9.0xfe.0xa9.0xfe", DEFAULT, False, "169.254.169.254:80"),
    ("http://0251.0376.0251.0376", DEFAULT, False, "169.254.169.254:80"),
    ("http://169.254.43518", DEFAULT, False, "169.254.169.254:80"),
    ("http://0x7f.1:9000", DEFAULT, False, "127.0.0.1:9000 is loopback"),
    ("http://[::ffff:169.254.169.254]", DEFAULT, False, "169.254.169.254:80 is link-local"),
    ("http://[64:ff9b::a9fe:a9fe]", DEFAULT, False, "169.254.169.254:80 is link-local"),
    ("http://169.254.169.254.", DEFAULT, False, "link-local"),
    # not an endpoint at all
    ("ftp://minio:21", DEFAULT, False, "not an http:// or https:// URL"),
    ("minio:9000", DEFAULT, False, "not an http:// or https:// URL"),
    ("http://", DEFAULT, False, "not an http:// or https:// URL"),
    ("http://minio:99999", DEFAULT, False, "not a URL"),
    ("http://minio:9000\n.evil", DEFAULT, False, "spaces or non-ASCII"),
    ("http://AKIA:secret@minio:9000", DEFAULT, False, "user information"),
    # the dev cluster: loopback admitted by naming it; other loopback addresses still refused
    ("http://127.0.0.1:41234", DEV, True, ""),
    ("http://127.0.0.1:6443", DEV, False, "the Kubernetes API server"),  # the dev API server's port
    ("http://127.0.0.2:41234", DEV, False, "127.0.0.2:41234 is loopback"),
    ("http://169.254.169.254", DEV, False, "link-local"),
    ("http://minio.minio:9000", DEV, True, ""),
    # an explicit list admits only what it names
    ("http://minio.minio.svc:9000", ["minio.minio.svc:9000"], True, ""),
    ("http://MINIO.minio.svc.:9000", ["minio.minio.svc:9000"], True, ""),
    ("http://minio.minio.svc:9001", ["minio.minio.svc:9000"], False, "matches no allowed endpoint"),
    ("http://other:9000", ["minio.minio.svc:9000"], False, "matches no allowed endpoint"),
    ("https://s3.eu-west-1.amazonaws.com", ["*.amazonaws.com"], True, ""),
    ("https://amazonaws.com", ["*.amazonaws.com"], False, "matches no allowed endpoint"),
    ("https://evilamazonaws.com", ["*.amazonaws.com"], False, "matches no allowed endpoint"),
    (None, ["*.amazonaws.com"], True, ""),  # unset: s3.<region>.amazonaws.com
    (None, ["minio:9000"], False, "unset (AWS S3 in us-east-1)"),
    ("https://10.1.2.3", ["*.amazonaws.com"], False, "matches no allowed endpoint"),  # a name pattern, not IPs
    ("http://10.1.2.3:9000", ["10.0.0.0/8:9000"], True, ""),
    ("http://10.1.2.3:9001", ["10.0.0.0/8:9000"], False, "matches no allowed endpoint"),
    ("http://[fd00::7]:9000", ["[fd00::/8]:9000"], True, ""),
    ("http://minio:9000", ["*:9000"], True, ""),
    ("http://minio:9001", ["*:9000"], False, "matches no allowed endpoint"),
    # wildcards and wide networks never admit a refused address; a literal or a network inside the range does
    ("http://169.254.169.254", ["0.0.0.0/0"], False, "link-local"),
    ("http://127.0.0.1:9000", ["*:9000"], False, "loopback"),
    ("http://localhost:9000", ["*"], False, "loopback"),
    ("http://127.0.0.9:9000", ["127.0.0.0/8"], True, ""),
    ("http://localhost:9000", ["localhost:9000"], True, ""),
    ("http://169.254.169.254", ["169.254.169.254"], True, ""),  # an administrator's explicit choice
    ("https://10.96.0.1", ["10.96.0.1"], False, "with its port"),
    ("https://10.96.0.1", ["10.96.0.1:443"], True, ""),
])
def test_endpoint_refusal(endpoint: str | None, allowed: list[str], ok: bool, says: str) -> None:
    refusal = endpoint_refusal(endpoint, "us-east-1", allowed, API)
    if ok:
        assert refusal is None
    else:
        assert refusal is not None and says in refusal, refusal
        assert refusal.startswith("spec.storage.endpoint ")
        assert "secret" not in refusal and "AKIA" not in refusal


def test_refusal_names_field_value_and_fix() -> None:
    refusal = endpoint_refusal("http://169.254.169.254", None, ["*", "127.0.0.1"])
    assert refusal == (
        "spec.storage.endpoint 'http://169.254.169.254' is not allowed: 169.254.169.254:80 is link-local (cloud "
        "metadata), which only an entry naming it admits; use an S3 endpoint the operator allows (*, 127.0.0.1), "
        "or ask its administrator to add this one (--allowed-endpoints / LORA_OPERATOR_ALLOWED_ENDPOINTS / "
        "chart value config.allowedEndpoints)")


@pytest.mark.parametrize(("entry", "says"), [
    ("", "not a host pattern"),
    ("http://minio:9000", "not a host pattern"),
    ("user@minio", "not a host pattern"),
    ("minio :9000", "not a host pattern"),
    ("minio:0", "not in 1-65535"),
    ("minio:65536", "not in 1-65535"),
    ("minio:http", "the port must be a number"),
    ("mi*io", "only a leading *."),
    ("*.*.example.com", "only a leading *."),
    ("*.", "only a leading *."),
    ("10.0.0.0/33", "not an IP network"),
    ("[fd00::7", "unclosed ["),
])
def test_bad_entries_are_refused(entry: str, says: str) -> None:
    with pytest.raises(RuleError, match=re.escape(says)):
        parse_rule(entry)
    if entry.strip():  # an empty item of a comma-separated list is skipped
        with pytest.raises(ValidationError, match=re.escape(says)):
            Settings(allowed_endpoints=[entry])


@pytest.mark.parametrize(("env", "argv", "expected"), [
    ({}, [], ["*"]),
    ({"LORA_OPERATOR_ALLOWED_ENDPOINTS": ""}, [], ["*"]),  # empty: the default
    ({"LORA_OPERATOR_ALLOWED_ENDPOINTS": "*, 127.0.0.1"}, [], ["*", "127.0.0.1"]),
    ({"LORA_OPERATOR_ALLOWED_ENDPOINTS": "*"}, ["--allowed-endpoints", "minio:9000,*.amazonaws.com"],
     ["minio:9000", "*.amazonaws.com"]),
    ({}, ["--allowed-endpoints", "a:1", "--allowed-endpoints", "b"], ["a:1", "b"]),
])
def test_setting_from_env_and_flags(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], argv: list[str],
                                    expected: list[str]) -> None:
    monkeypatch.delenv("LORA_OPERATOR_ALLOWED_ENDPOINTS", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert parse(argv).allowed_endpoints == expected


@pytest.mark.parametrize(("env", "expected"), [
    ({}, []),
    ({"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}, ["https://10.96.0.1:443"]),
    ({"KUBERNETES_SERVICE_HOST": "fd00::1"}, ["https://[fd00::1]:443"]),
])
def test_api_server_from_the_pod_environment(env: dict[str, str], expected: list[str]) -> None:
    assert in_cluster_api_servers(env) == expected
    for server in expected:
        assert endpoint_refusal(server, None, ["*"], expected) is not None


@pytest.mark.parametrize("status", [{}, {"attempt": 1, "phase": "Running", "podName": "job-a1"}])
def test_reconcile_fails_the_job_before_any_pod(status: dict[str, object]) -> None:
    job = make_job(status=status, storage={"endpoint": "http://169.254.169.254", "credentialsSecret": "s3-creds"})
    decision = reconcile(Observed(job=job, pods=[], now=NOW), SETTINGS)
    assert not [a for a in decision.actions if isinstance(a, CreatePod)]
    assert decision.status["phase"] == "Failed" and decision.status["reason"] == ENDPOINT_NOT_ALLOWED
    assert "spec.storage.endpoint 'http://169.254.169.254'" in decision.status["message"]
    stalled = next(c for c in decision.status["conditions"] if c["type"] == "Stalled")
    assert stalled["status"] == "True" and stalled["reason"] == ENDPOINT_NOT_ALLOWED


def test_reconcile_starts_an_allowed_job() -> None:
    job = make_job(storage={"endpoint": "http://127.0.0.1:9000", "credentialsSecret": "s3-creds"})
    dev = SETTINGS.model_copy(update={"allowed_endpoints": ["127.0.0.1"]})
    assert [a for a in reconcile(Observed(job=job, pods=[], now=NOW), dev).actions if isinstance(a, CreatePod)]
    refused = reconcile(Observed(job=job, pods=[], now=NOW), SETTINGS)
    assert refused.status["reason"] == ENDPOINT_NOT_ALLOWED and not refused.actions


def test_progress_check_refuses_before_reading() -> None:
    with pytest.raises(ProgressUnavailable, match="link-local"):
        check_endpoint(StorageSpec(endpoint="http://169.254.169.254"), SETTINGS)
    check_endpoint(StorageSpec(endpoint="http://minio:9000"), SETTINGS)
