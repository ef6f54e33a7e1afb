"""The operator's settings: LORA_OPERATOR_* environment variables, overridden by CLI flags.

The Helm chart sets the environment variables; the names here are its contract.

Peering priority: with two or more replicas, Kopf keeps the peer of the highest priority active
and pauses the others; peers of *equal* priority all pause (with a warning), so replicas must
never share one. `--priority` / LORA_OPERATOR_PRIORITY sets it; otherwise it is derived from the
pod's name (POD_NAME, which the chart sets from metadata.name; else the host name, which is the
pod's name in a Deployment) by a hash, so it is stable across restarts of the same pod and two
pods of one Deployment collide with a chance of about 1 in 2^31.

S3 endpoints: `--allowed-endpoints` / LORA_OPERATOR_ALLOWED_ENDPOINTS (comma-separated host
patterns with optional ports, see lora_operator.endpoints) lists the endpoints jobs may name; the
default `*` admits any host except loopback, link-local/metadata addresses and the API server.
A dev cluster whose S3 listens on 127.0.0.1 must allow it explicitly: `--allowed-endpoints 127.0.0.1`.
The API server's own address comes from KUBERNETES_SERVICE_HOST/PORT in a pod, and `lora-operator
run` adds the host of the kubeconfig it uses (LORA_OPERATOR_API_SERVERS adds more).

Preemption rate: `--preemption-rate-per-hour` / LORA_OPERATOR_PREEMPTION_RATE_PER_HOUR (default
0.25, about six a day) is the spot pool's rate, which pods of `checkpoint.everySteps: auto` jobs are
told until the job has history of its own; `--preemption-rate-prior-hours` (default 1) is how many
hours of history it counts as (lora_operator.preemption).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from lora_operator import endpoints
from lora_operator.endpoints import DEFAULT_ALLOWED, RuleError, parse_rule
from lora_trainer.interval import DEFAULT_RATE_PER_HOUR, MAX_RATE_PER_HOUR

if TYPE_CHECKING:
    from lora_operator.spec import StorageSpec

DEFAULT_TRAINER_IMAGE = "ghcr.io/lora-operator/trainer:0.1.0"
MAX_PRIORITY = 2**31 - 1  # Kopf stores the priority in the peering object as an integer
POD_NAME_ENV = "POD_NAME"


def in_cluster_api_servers(environ: Mapping[str, str] | None = None) -> list[str]:
    """The API server's address as a pod sees it (KUBERNETES_SERVICE_HOST/PORT); empty outside a pod."""
    env = os.environ if environ is None else environ
    host, port = env.get("KUBERNETES_SERVICE_HOST", ""), env.get("KUBERNETES_SERVICE_PORT", "443")
    if not host:
        return []
    return [f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"]


def _split_list(value: Any) -> Any:
    """A comma-separated string (env) or a list of them (repeated flags) → the items."""
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list | tuple):
        return [item.strip() for v in value for item in str(v).split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    """Everything the operator can be told; one instance per operator process."""

    model_config = SettingsConfigDict(env_prefix="LORA_OPERATOR_", extra="ignore", frozen=True)

    namespaces: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Namespaces to watch; empty watches all namespaces."
    )
    trainer_image: str = Field(DEFAULT_TRAINER_IMAGE, min_length=1, description="Image of jobs with no spec.image.")
    progress_interval: float = Field(15.0, gt=0, description="Seconds between reconciles of a running job.")
    pending_deadline: float = Field(600.0, ge=0, description="Seconds a pod may stay unscheduled or unpullable before Stalled.")
    terminating_grace: float = Field(300.0, ge=0, description="Seconds past its deletion a pod on a NotReady node is force-deleted.")
    backoff_base: float = Field(10.0, ge=0, description="Seconds before the first retry of a failed attempt.")
    backoff_max: float = Field(600.0, ge=0, description="Longest wait between retries.")
    log_format: Literal["text", "json"] = Field("text", description="Operator log format.")
    liveness: str = Field("http://0.0.0.0:8080/healthz", description="Liveness endpoint URL; empty disables it.")
    # Not 8080: Kopf's liveness endpoint listens there by default (the chart's healthPort).
    metrics_port: int = Field(8000, ge=0, le=65535, description="Port of the Prometheus /metrics endpoint; 0 disables it.")
    metrics_address: str = Field("0.0.0.0", min_length=1, description="Address the /metrics endpoint listens on.")
    peering: str = Field("lora-operator", description="Kopf peering object name (two replicas, one active).")
    standalone: bool = Field(False, description="Run without peering.")
    priority: int | None = Field(
        None, ge=0, le=MAX_PRIORITY,
        description="Kopf peering priority; unset derives a distinct one from the pod's name (POD_NAME).",
    )
    allowed_endpoints: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(DEFAULT_ALLOWED),
        description="S3 endpoints jobs may name (host patterns, optional :port); empty means the default, *.",
    )
    spot_gpu_hour_price: float = Field(0.0, ge=0, description="Price of one spot GPU-hour, for status.cost; 0: unknown.")
    on_demand_gpu_hour_price: float = Field(
        0.0, ge=0, description="Price of one on-demand GPU-hour, for status.cost; 0: unknown. With both 0, no cost is shown."
    )
    currency: str = Field("USD", min_length=1, max_length=8, description="Currency of the prices, shown in status.cost.")
    preemption_rate_per_hour: float = Field(
        DEFAULT_RATE_PER_HOUR, ge=0, le=MAX_RATE_PER_HOUR,
        description="The spot pool's preemptions per hour, for checkpoint.everySteps auto until a job has its own history.",
    )
    preemption_rate_prior_hours: float = Field(
        1.0, ge=0, le=10_000,
        description="Hours of history the pool's rate counts as beside a job's own (0: the job's own as soon as it has any).",
    )
    api_servers: Annotated[list[str], NoDecode] = Field(
        default_factory=in_cluster_api_servers,
        description="The API server's own URLs, refused as S3 endpoints; default from KUBERNETES_SERVICE_HOST.",
    )

    @field_validator("namespaces", "api_servers", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("allowed_endpoints", mode="before")
    @classmethod
    def _rules(cls, value: Any) -> Any:
        items = _split_list(value)
        if isinstance(items, list):
            for item in items:
                try:
                    parse_rule(item)
                except RuleError as exc:
                    raise ValueError(str(exc)) from None
            return items or list(DEFAULT_ALLOWED)
        return items


def endpoint_refusal(storage: StorageSpec, settings: Settings) -> str | None:
    """Why a job's spec.storage may not be used under these settings (None: it may); pure."""
    return _endpoint_refusal(storage.endpoint, storage.region, tuple(settings.allowed_endpoints),
                             tuple(settings.api_servers))


@lru_cache(maxsize=1024)  # every pass of every job asks again; the answer changes only with the spec
def _endpoint_refusal(endpoint: str | None, region: str | None, allowed: tuple[str, ...],
                      api_servers: tuple[str, ...]) -> str | None:
    return endpoints.endpoint_refusal(endpoint, region, allowed, api_servers)


def priority_from_name(name: str) -> int:
    """A stable peering priority in [1, MAX_PRIORITY] from a pod name (sha256, not Python's
    per-process salted hash(), so every restart of the pod gets the same one)."""
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return 1 + int.from_bytes(digest[:8], "big") % MAX_PRIORITY


def peering_priority(settings: Settings, environ: Mapping[str, str] | None = None, hostname: str | None = None) -> int:
    """The Kopf priority this replica runs with: the setting, else a hash of POD_NAME or the host name."""
    if settings.priority is not None:
        return settings.priority
    env = os.environ if environ is None else environ
    name = env.get(POD_NAME_ENV) or hostname or socket.gethostname()
    return priority_from_name(name)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `lora-operator run` flags; each defaults to its LORA_OPERATOR_* variable."""
    parser.add_argument("--namespace", "-n", dest="namespaces", action="append",
                        help="namespace to watch (repeatable); default LORA_OPERATOR_NAMESPACES or all")
    parser.add_argument("--trainer-image", help="default trainer image (LORA_OPERATOR_TRAINER_IMAGE)")
    parser.add_argument("--progress-interval", type=float, help="seconds between reconciles of a running job")
    parser.add_argument("--pending-deadline", type=float, help="seconds before a stuck pod marks the job Stalled")
    parser.add_argument("--terminating-grace", type=float, help="seconds before a pod stuck Terminating is force-deleted")
    parser.add_argument("--backoff-base", type=float, help="seconds before the first retry of a failed attempt")
    parser.add_argument("--backoff-max", type=float, help="longest wait between retries, seconds")
    parser.add_argument("--log-format", choices=["text", "json"], help="log format")
    parser.add_argument("--liveness", help="liveness endpoint URL, e.g. http://0.0.0.0:8080/healthz")
    parser.add_argument("--metrics-port", type=int,
                        help="port of the Prometheus /metrics endpoint (LORA_OPERATOR_METRICS_PORT, default 8000; 0 disables)")
    parser.add_argument("--metrics-address", help="address /metrics listens on (LORA_OPERATOR_METRICS_ADDRESS, default 0.0.0.0)")
    parser.add_argument("--peering", help="Kopf peering name for running two replicas safely")
    parser.add_argument("--standalone", action="store_true", default=None, help="run without peering")
    parser.add_argument("--priority", type=int,
                        help="Kopf peering priority (LORA_OPERATOR_PRIORITY); default: a hash of $POD_NAME")
    parser.add_argument("--spot-gpu-hour-price", type=float,
                        help="price of a spot GPU-hour for status.cost (LORA_OPERATOR_SPOT_GPU_HOUR_PRICE)")
    parser.add_argument("--on-demand-gpu-hour-price", type=float,
                        help="price of an on-demand GPU-hour for status.cost (LORA_OPERATOR_ON_DEMAND_GPU_HOUR_PRICE)")
    parser.add_argument("--currency", help="currency of the prices (LORA_OPERATOR_CURRENCY, default USD)")
    parser.add_argument("--preemption-rate-per-hour", type=float,
                        help="the spot pool's preemptions per hour for checkpoint.everySteps auto "
                             f"(LORA_OPERATOR_PREEMPTION_RATE_PER_HOUR, default {DEFAULT_RATE_PER_HOUR})")
    parser.add_argument("--preemption-rate-prior-hours", type=float,
                        help="hours of history the pool's rate counts as beside a job's own "
                             "(LORA_OPERATOR_PREEMPTION_RATE_PRIOR_HOURS, default 1)")
    parser.add_argument("--allowed-endpoints", action="append", metavar="PATTERNS",
                        help="S3 endpoints jobs may name, comma-separated host patterns with optional ports, "
                             "e.g. 'minio.minio.svc:9000,*.amazonaws.com' (repeatable; "
                             "LORA_OPERATOR_ALLOWED_ENDPOINTS); default * = any host except loopback, "
                             "link-local/metadata and the API server; a dev cluster adds 127.0.0.1")


def from_args(args: argparse.Namespace | None = None, **overrides: Any) -> Settings:
    """Settings from the environment, with CLI flags (those given) and keyword overrides on top."""
    given = {k: v for k, v in vars(args or argparse.Namespace()).items() if v is not None and k in Settings.model_fields}
    given.update(overrides)
    return Settings(**given)


def parse(argv: Sequence[str]) -> Settings:
    """Settings from `run`-style argv (tests and tools)."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return from_args(parser.parse_args(list(argv)))
