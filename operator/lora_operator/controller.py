"""The Kopf wiring: one daemon per LoRATrainingJob runs the level-based reconcile loop.

Each loop pass reads the job and its pods fresh from the API server, asks the pure
`reconcile.reconcile` what to do, does it, then writes the status. Pod events (and spec
changes) only wake the job's loop early; the loop also runs every --progress-interval seconds,
so a missed event or an operator restart changes nothing. All state lives in the job's status;
the wake-up events below are hints, lost harmlessly on restart.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import kopf

from lora_operator import kube as k
from lora_operator.classify import JOB_LABEL, is_terminating, parse_time
from lora_operator.progress import ProgressUnavailable, credentials_from_secret, read_progress
from lora_operator.reconcile import CreatePod, Decision, DeletePod, Observed, pod_rejected, reconcile
from lora_operator.settings import Settings, peering_priority
from lora_operator.spec import GROUP, PLURAL, VERSION, SpecError, parse_spec
from lora_operator.status import TERMINAL_PHASES, bound_status, merge_patch, rejected_status

ERROR_DELAY = 5.0  # seconds before a loop retries after the API or the store failed
WAKE_HANDLERS = ("job_event", "pod_event")


class QuietWakeups(logging.Filter):
    """Drops Kopf's "Handler '...pod_event' succeeded." line, logged for every watch event of
    every job and pod: the wake-up handlers do nothing worth a line (reconcile logs what happens),
    and at 500 jobs those lines were most of the log and a few percent of the CPU."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Handler '") and message.endswith("' succeeded.")
                    and any(f".{name}'" in message for name in WAKE_HANDLERS))


def post_event(job: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
    """Post a Kubernetes Event about the job through Kopf (it cuts messages to 1024 characters)."""
    kopf.event(job, type=type_, reason=reason, message=message)


@dataclass
class Memo:
    """What every handler of one operator shares (kopf passes it as `memo`)."""

    settings: Settings
    kube: k.Kube
    wakeups: dict[tuple[str, str], asyncio.Event] = field(default_factory=dict)
    events: Callable[[Mapping[str, Any], str, str, str], None] = post_event

    def wake(self, namespace: str, name: str) -> None:
        """Make the job's loop run now rather than at its next tick."""
        event = self.wakeups.get((namespace, name))
        if event is not None:
            event.set()


def _configure(kopf_settings: kopf.OperatorSettings) -> None:
    # Kopf's own bookkeeping goes to annotations: the structural schema would prune status.kopf.
    kopf_settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    kopf_settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration")
    kopf_settings.persistence.finalizer = f"{GROUP}/finalizer"
    # Events are posted explicitly, one per transition; log lines must not become Events too.
    kopf_settings.posting.level = logging.CRITICAL
    kopf_settings.posting.reporting_component = "lora-operator"  # the From column of `kubectl describe`
    # No cluster-wide scan of CRDs and namespaces: it needs `list customresourcedefinitions` at the
    # cluster scope (403 under the chart's least-privilege RBAC, on a real API server). The operator
    # serves one resource kind in fixed namespaces (or all of them), found by discovery at start;
    # `_require_crd` stops start-up with a clear error when the CRD is not installed yet.
    kopf_settings.scanning.disabled = True
    kopf_settings.watching.server_timeout = 300
    kopf_settings.watching.client_timeout = 330
    kopf_settings.networking.request_timeout = 60


def _now() -> datetime:
    return datetime.now(UTC)


async def _observe(memo: Memo, job: dict[str, Any]) -> tuple[Observed, str]:
    """Everything `reconcile` looks at, read fresh: pods, node health, the trainer's progress
    (and why progress could not be read, if so)."""
    meta = job["metadata"]
    ns, name = meta["namespace"], meta["name"]
    now = _now()
    pods = await memo.kube.list_pods(ns, name)
    nodes: dict[str, bool] = {}
    for pod in pods:
        node = (pod.get("spec") or {}).get("nodeName") or ""
        deleting = parse_time(pod["metadata"].get("deletionTimestamp"))
        if is_terminating(pod) and deleting and (now - deleting).total_seconds() >= memo.settings.terminating_grace:
            ready = await memo.kube.node_ready(node)
            if ready is not None:
                nodes[node] = ready
    progress = latest = None
    problem = ""
    status = job.get("status") or {}
    if status.get("attempt") and status.get("phase") not in TERMINAL_PHASES:
        try:
            spec = parse_spec(job.get("spec") or {})
            secret = spec.storage.credentials_secret
            data = await memo.kube.read_secret(ns, secret) if secret else None
            creds = credentials_from_secret(data, spec.storage)
            if secret and creds is None:
                problem = f"secret {secret} or its keys {spec.storage.access_key_id_key}/" \
                          f"{spec.storage.secret_access_key_key} are missing"
            else:
                progress, latest = await asyncio.to_thread(read_progress, spec.output.uri, spec.storage, creds)
        except (SpecError, ProgressUnavailable) as exc:
            problem = str(exc)
    return Observed(job=job, pods=pods, now=now, progress=progress, latest=latest, nodes_ready=nodes), problem


class StatusRefused(k.KubeError):
    """The API refused both the job's status and the short one written in its place."""


def _refused(exc: k.KubeError) -> bool:
    # 422/400: a field the schema refuses; 413: the object grew past the API server's limit.
    return isinstance(exc, k.Invalid) or exc.status == 413


@dataclass
class _LoopState:
    """Per-loop log de-duplication only; losing it on restart costs one repeated log line."""

    progress_problem: str = ""
    status_problem: str = ""


async def _write_status(memo: Memo, job: dict[str, Any], decision: Decision, now: datetime,
                        logger: logging.Logger | kopf.Logger, loop: _LoopState) -> None:
    """Write the decision's status; if the API refuses it, write the short `rejected_status`
    (condition StatusRejected) instead, logging the refusal once. StatusRefused if both fail."""
    meta, old = job["metadata"], job.get("status") or {}
    ns, name = meta["namespace"], meta["name"]
    patch = merge_patch(old, decision.status)
    if not patch:
        return
    try:
        await memo.kube.patch_job_status(ns, name, patch)
        loop.status_problem = ""
        return
    except k.KubeError as exc:
        if not _refused(exc):
            raise
        problem = str(exc)
    if problem != loop.status_problem:
        logger.error("attempt %s: the API server refused the job's status; writing a short one with the "
                     "condition StatusRejected: %s", decision.status.get("attempt"), problem[:2000])
    loop.status_problem = problem
    short = rejected_status(decision.status, old, problem, now, meta.get("generation"))
    decision.status = short
    patch = merge_patch(old, short)
    if not patch:
        return  # the same short status as last pass: already stored
    try:
        await memo.kube.patch_job_status(ns, name, patch)
    except k.KubeError as exc:
        if not _refused(exc):
            raise
        raise StatusRefused(f"the API server refused the short status too: {str(exc)[:2000]}", exc.status) from exc


async def _apply(memo: Memo, job: dict[str, Any], obs: Observed, decision: Decision,
                 logger: logging.Logger | kopf.Logger, loop: _LoopState | None = None) -> Decision:
    """Do the actions in order, write the status (only if it changed), then post the events.

    Events go last, once the status that records their transition is stored: a pass whose
    status write fails posts none, so the next pass (which decides the same again) does not
    post them twice."""
    loop = loop or _LoopState()
    ns = job["metadata"]["namespace"]
    for action in decision.actions:
        if isinstance(action, CreatePod):
            try:
                await memo.kube.create_pod(action.pod)
            except k.AlreadyExists:
                pass  # a pass before us created it (deterministic name): done
            except k.Invalid as exc:
                decision = pod_rejected(obs, memo.settings, str(exc))
                break
        elif isinstance(action, DeletePod):
            await memo.kube.delete_pod(ns, action.name, action.grace_seconds)
    decision.status = bound_status(decision.status)
    await _write_status(memo, job, decision, obs.now, logger, loop)
    attempt = decision.status.get("attempt")
    for ev in decision.events:
        memo.events(job, ev.type, ev.reason, ev.message)
        log = logger.warning if ev.type == "Warning" else logger.info
        log("attempt %s: %s: %s", attempt, ev.reason, ev.message)
    return decision


async def reconcile_job(memo: Memo, namespace: str, name: str, logger: logging.Logger | kopf.Logger,
                        loop: _LoopState | None = None) -> float | None:
    """One level-based pass over a job; returns seconds until it wants another (None: job gone)."""
    job = await memo.kube.get_job(namespace, name)
    if job is None or job["metadata"].get("deletionTimestamp"):
        return None  # deleting a job deletes its pods by owner references, its data stays in S3
    obs, problem = await _observe(memo, job)
    loop = loop or _LoopState()
    if problem and problem != loop.progress_problem:
        logger.warning("attempt %s: progress not read: %s", (job.get("status") or {}).get("attempt"), problem)
    loop.progress_problem = problem
    decision = await _apply(memo, job, obs, reconcile(obs, memo.settings), logger, loop)
    if decision.status.get("phase") in TERMINAL_PHASES:
        return None
    interval = memo.settings.progress_interval
    return interval if decision.requeue_after is None else min(interval, decision.requeue_after)


async def _wait(event: asyncio.Event, stopped: kopf.DaemonStopped, timeout: float | None) -> None:
    """Until woken, stopped, or `timeout` seconds passed."""
    async def until_stopped() -> None:
        await stopped.wait()

    waiters = {asyncio.ensure_future(event.wait()), asyncio.ensure_future(until_stopped())}
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


async def job_loop(memo: Memo, namespace: str, name: str, stopped: kopf.DaemonStopped,
                   logger: logging.Logger | kopf.Logger) -> None:
    """Reconcile a job until the daemon is stopped; a failing pass is logged and retried."""
    key = (namespace, name)
    wake = memo.wakeups.setdefault(key, asyncio.Event())
    state = _LoopState()
    try:
        while not stopped:
            wake.clear()
            try:
                delay = await reconcile_job(memo, namespace, name, logger, state)
            except StatusRefused as exc:  # logged once in _write_status; no events were posted
                logger.debug("status refused, retrying in %ss: %s", ERROR_DELAY, exc)
                delay = ERROR_DELAY
            except k.KubeError as exc:
                logger.warning("reconcile failed, retrying in %ss: %s", ERROR_DELAY, exc)
                delay = ERROR_DELAY
            except Exception as exc:  # never crash-loop: log it and try again later
                logger.exception("unexpected error, retrying in %ss: %s", ERROR_DELAY, type(exc).__name__)
                delay = ERROR_DELAY
            # A finished job only wakes up for events (spec edits); no polling.
            await _wait(wake, stopped, None if delay is None else max(0.0, delay))
    finally:
        if memo.wakeups.get(key) is wake:
            del memo.wakeups[key]


async def _require_crd(memo: Memo) -> None:
    # Without scanning, Kopf serves only what discovery shows at start: a missing CRD would leave
    # a running operator that silently handles nothing.
    try:
        served = await memo.kube.job_resource_served()
    except k.KubeError as exc:
        raise kopf.TemporaryError(f"cannot discover the LoRATrainingJob API yet: {exc}", delay=ERROR_DELAY) from exc
    if not served:
        raise kopf.PermanentError(f"the CRD {PLURAL}.{GROUP} is not installed: apply crds/ "
                                  "(`kubectl apply --server-side -f crds/`; the Helm chart installs it), then restart")


def _login(memo: Memo) -> kopf.ConnectionInfo:
    config = memo.kube.configuration
    if config.refresh_api_key_hook is not None:
        config.refresh_api_key_hook(config)  # in-cluster tokens rotate
    header = config.get_api_key_with_prefix("BearerToken") or config.get_api_key_with_prefix("authorization")
    parts = header.split(" ", 1) if header else []
    scheme, token = (None, None) if not parts else (None, parts[0]) if len(parts) == 1 else (parts[0], parts[1])
    return kopf.ConnectionInfo(
        server=config.host, ca_path=config.ssl_ca_cert, insecure=not config.verify_ssl,
        username=config.username or None, password=config.password or None, scheme=scheme, token=token,
        certificate_path=config.cert_file, private_key_path=config.key_file,
    )


def build_registry(memo: Memo) -> kopf.OperatorRegistry:
    """The operator's handlers, on a registry of their own (no import-time global state)."""
    registry = kopf.OperatorRegistry()

    @kopf.on.startup(registry=registry)
    async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        _configure(settings)
        await _require_crd(memo)

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return _login(memo)

    @kopf.on.cleanup(registry=registry)
    def cleanup(**_: Any) -> None:
        memo.kube.close()

    @kopf.daemon(GROUP, VERSION, PLURAL, registry=registry, cancellation_timeout=5.0)
    async def job_daemon(namespace: str, name: str, stopped: kopf.DaemonStopped, logger: kopf.Logger, **_: Any) -> None:
        await job_loop(memo, namespace, name, stopped, logger)

    # Event handlers are async on purpose: Kopf runs sync handlers in a worker thread, and
    # asyncio.Event.set() from another thread is not thread-safe (the loop may not wake up).
    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
    async def job_event(body: Mapping[str, Any], **_: Any) -> None:
        meta, status = body.get("metadata") or {}, body.get("status") or {}
        if meta.get("generation") != status.get("observedGeneration"):  # a spec edit, not our status write
            memo.wake(meta.get("namespace", ""), meta.get("name", ""))

    @kopf.on.event("v1", "pods", labels={JOB_LABEL: kopf.PRESENT}, registry=registry)
    async def pod_event(namespace: str, labels: Mapping[str, str], **_: Any) -> None:
        memo.wake(namespace, labels[JOB_LABEL])

    return registry


async def run_operator(settings: Settings, *, kubeconfig: str | None = None, stop_flag: Any = None,
                       ready_flag: Any = None) -> None:
    """Run the operator until `stop_flag` is set (or forever): `lora-operator run` and the tests."""
    memo = Memo(settings=settings, kube=k.Kube(k.load_configuration(kubeconfig)))
    objects_logger = logging.getLogger("kopf.objects")
    if not any(isinstance(f, QuietWakeups) for f in objects_logger.filters):
        objects_logger.addFilter(QuietWakeups())
    await kopf.operator(
        registry=build_registry(memo),
        standalone=settings.standalone,
        # A peering name makes peering mandatory: without the KopfPeering CRDs the operator waits.
        peering_name=None if settings.standalone else settings.peering,
        # Equal priorities make every replica pause: each one gets its own (see settings).
        priority=None if settings.standalone else peering_priority(settings),
        clusterwide=not settings.namespaces,
        namespaces=settings.namespaces,
        liveness_endpoint=settings.liveness or None,
        stop_flag=stop_flag,
        ready_flag=ready_flag,
    )
