"""The Kopf wiring: one daemon per LoRATrainingJob runs the level-based reconcile loop.

Each loop pass looks at the job and its pods, asks the pure `reconcile.reconcile` what to do,
does it, then writes the status. Pod events (and spec changes) wake the job's loop early; the
loop also runs every --progress-interval seconds.

Where a pass reads from: like controller-runtime's informer cache, Kopf's watch streams of the
jobs and of their pods (label `lora-operator.dev/job`) keep the latest objects in memory
(`ObjectCache`), together with what our own writes returned, so most passes make no API
request. The cache is a copy, never the truth: a job's loop reads fresh (GET job, LIST pods) on
its first pass after a start, every RESYNC_SECONDS, after an error, and before any decision that
cannot be taken back (deleting a pod, charging a budget, a terminal phase, any attempt but the
first), so a restart or a missed event changes nothing. All state lives in the job's status.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import kopf

from lora_operator import kube as k
from lora_operator.classify import JOB_LABEL, is_terminating, parse_time
from lora_operator.jobset import jobset_name
from lora_operator.metrics import Metrics
from lora_operator.outputs import OutputIndex, OutputUse, output_use
from lora_operator.progress import ProgressUnavailable, check_endpoint, credentials_from_secret, read_progress
from lora_operator.reconcile import (
    CreateJobSet,
    CreatePod,
    Decision,
    DeleteJob,
    DeleteJobSet,
    DeletePod,
    Observed,
    pod_rejected,
    reconcile,
)
from lora_operator.settings import Settings, peering_priority
from lora_operator.spec import GROUP, PLURAL, VERSION, SpecError, parse_spec
from lora_operator.status import TERMINAL_PHASES, bound_status, merge_patch, rejected_status

ERROR_DELAY = 5.0  # seconds before a loop retries after the API or the store failed
RESYNC_SECONDS = 300.0  # a job's loop reads the job and its pods fresh at least this often
SECRET_TTL = 30.0  # seconds a Secret read is reused (we may only `get` Secrets, not watch them)
# How long "JobSet is installed" is believed. "Not installed" is never cached: it fails the job, so it is
# asked fresh each time (only jobs with spec.nodes > 1 ask, when they are about to start an attempt).
JOBSET_SEEN_TTL = RESYNC_SECONDS
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


def _rv(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion") or "")


def _older(rv: str, than: str) -> bool:
    """Whether resourceVersion `rv` is strictly older than `than`. Versions are compared as numbers
    (etcd revisions, as every API server we know hands out); anything else counts as not older."""
    try:
        return int(rv) < int(than)
    except ValueError:
        return False


@dataclass
class ObjectCache:
    """The latest jobs and job pods seen in watch events and in our own writes' answers.

    An object only replaces the cached one if it is not older (resourceVersion), so a watch
    event that lags behind our own write does not roll the copy back; a deleted pod leaves a
    tombstone, so a LIST answered before the deletion does not bring it back."""

    jobs: dict[tuple[str, str], Mapping[str, Any]] = field(default_factory=dict)
    pods: dict[tuple[str, str], dict[str, Mapping[str, Any]]] = field(default_factory=dict)
    gone: dict[tuple[str, str], dict[str, str]] = field(default_factory=dict)
    # The output each live job uses, kept with the job and indexed by folder: a job about to start
    # needs the live jobs whose outputs overlap its own (OutputInUse), and comparing with all was quadratic.
    outputs: OutputIndex = field(default_factory=OutputIndex)

    def put_job(self, job: Mapping[str, Any]) -> bool:
        """Keep the job unless an older version; whether it is news (a version not cached yet)."""
        meta = job.get("metadata") or {}
        key = (meta.get("namespace", ""), meta.get("name", ""))
        old = self.jobs.get(key)
        if old is None or not _older(_rv(job), _rv(old)):
            self.jobs[key] = job
            self.outputs.put(key, output_use(job))
            return old is None or _rv(job) != _rv(old)
        return False

    def drop_job(self, namespace: str, name: str) -> None:
        # Its pods stay until their own DELETED events: a job re-applied under the same name must
        # see the old run's pods (still stopping) on its first, cached, pass.
        self.jobs.pop((namespace, name), None)
        self.outputs.put((namespace, name), None)
        if not self.pods.get((namespace, name)):
            self.pods.pop((namespace, name), None)
            self.gone.pop((namespace, name), None)

    def put_pod(self, pod: Mapping[str, Any]) -> bool:
        """Keep the pod unless an older version; whether it is news (a version not cached yet)."""
        meta = pod.get("metadata") or {}
        key, name = (meta.get("namespace", ""), (meta.get("labels") or {}).get(JOB_LABEL, "")), meta.get("name", "")
        if _older(_rv(pod), self.gone.get(key, {}).get(name, "")):
            return False  # a version from before its deletion
        pods = self.pods.setdefault(key, {})
        old = pods.get(name)
        if old is None or not _older(_rv(pod), _rv(old)):
            pods[name] = pod
            return old is None or _rv(pod) != _rv(old)
        return False

    def delete_pod(self, pod: Mapping[str, Any]) -> None:
        meta = pod.get("metadata") or {}
        key, name = (meta.get("namespace", ""), (meta.get("labels") or {}).get(JOB_LABEL, "")), meta.get("name", "")
        self.pods.get(key, {}).pop(name, None)
        self.gone.setdefault(key, {})[name] = _rv(pod)

    def replace_pods(self, namespace: str, job: str, listed: list[dict[str, Any]]) -> None:
        """A fresh LIST of the job's pods: the truth as of its answer, except versions we know are newer."""
        key = (namespace, job)
        old, gone = self.pods.get(key, {}), self.gone.get(key, {})
        fresh: dict[str, Mapping[str, Any]] = {}
        for pod in listed:
            name = pod["metadata"]["name"]
            if _older(_rv(pod), gone.get(name, "")):
                continue
            cached = old.get(name)
            fresh[name] = cached if cached is not None and _older(_rv(pod), _rv(cached)) else pod
        self.pods[key] = fresh

    def view(self, namespace: str, name: str) -> tuple[Mapping[str, Any], list[Mapping[str, Any]]] | None:
        job = self.jobs.get((namespace, name))
        return None if job is None else (job, list(self.pods.get((namespace, name), {}).values()))


@dataclass
class Memo:
    """What every handler of one operator shares (kopf passes it as `memo`)."""

    settings: Settings
    kube: k.Kube
    wakeups: dict[tuple[str, str], asyncio.Event] = field(default_factory=dict)
    events: Callable[[Mapping[str, Any], str, str, str], None] = post_event
    cache: ObjectCache = field(default_factory=ObjectCache)
    secrets: dict[tuple[str, str], tuple[float, dict[str, str] | None]] = field(default_factory=dict)
    metrics: Metrics | None = None
    gone: set[str] = field(default_factory=set)  # uids of jobs deleted while their loop runs
    jobset_api: float | None = None  # time.monotonic() until which JobSet is believed installed

    async def jobsets_served(self) -> bool:
        """Whether the API serves JobSets (discovery; a yes is reused for JOBSET_SEEN_TTL seconds)."""
        now = time.monotonic()
        if self.jobset_api is not None and self.jobset_api > now:
            return True
        served = await self.kube.jobsets_served()
        self.jobset_api = now + JOBSET_SEEN_TTL if served else None
        return served

    async def read_secret(self, namespace: str, name: str) -> dict[str, str] | None:
        """The Secret's data, reused for SECRET_TTL seconds (a rotated key is seen within that)."""
        now = time.monotonic()
        hit = self.secrets.get((namespace, name))
        if hit is not None and hit[0] > now:
            return hit[1]
        data = await self.kube.read_secret(namespace, name)
        if len(self.secrets) > 4096:
            self.secrets = {key: v for key, v in self.secrets.items() if v[0] > now}
        self.secrets[(namespace, name)] = (now + SECRET_TTL, data)
        return data

    def wake(self, namespace: str, name: str) -> None:
        """Make the job's loop run now rather than at its next tick."""
        event = self.wakeups.get((namespace, name))
        if event is not None:
            event.set()


class LeanDiffBaseStorage(kopf.AnnotationsDiffBaseStorage):
    """Kopf's "essence" of a job, reduced to its generation.

    Kopf builds the essence (spec, labels, annotations) of every object on every watch event, deep
    copies it twice, and diffs it with the last handled one: the input of change-detecting handlers
    (on.create/update/delete). This operator has none (tests/unit/test_controller.py pins that); the
    only other reader is the daemons' idle timer, which it does not use. At 500 jobs those copies of
    the defaulted spec were a fifth of the operator's CPU; the generation says as much here."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        if extra_fields:  # a handler that watches a status field needs the whole body
            return super().build(body=body, extra_fields=extra_fields)
        generation = (body.get("metadata") or {}).get("generation")
        return kopf.BodyEssence(metadata={"generation": generation})  # type: ignore[typeddict-unknown-key]


def _configure(kopf_settings: kopf.OperatorSettings) -> None:
    # Kopf's own bookkeeping goes to annotations: the structural schema would prune status.kopf.
    kopf_settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    kopf_settings.persistence.diffbase_storage = LeanDiffBaseStorage(
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


async def _observe(memo: Memo, job: Mapping[str, Any], pods: list[Mapping[str, Any]]) -> tuple[Observed, str]:
    """Everything `reconcile` looks at: the job and its pods as given, node health (read fresh,
    for a pod stuck terminating), the trainer's progress (and why it could not be read, if so)."""
    meta = job["metadata"]
    ns = meta["namespace"]
    now = _now()
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
            check_endpoint(spec.storage, memo.settings)  # a job started before the allow-list tightened
            secret = spec.storage.credentials_secret
            data = await memo.read_secret(ns, secret) if secret else None
            creds = credentials_from_secret(data, spec.storage)
            if secret and creds is None:
                problem = f"secret {secret} or its keys {spec.storage.access_key_id_key}/" \
                          f"{spec.storage.secret_access_key_key} are missing"
            else:
                progress, latest = await asyncio.to_thread(read_progress, spec.output.uri, spec.storage, creds)
        except (SpecError, ProgressUnavailable) as exc:
            problem = str(exc)
    return Observed(job=job, pods=pods, now=now, progress=progress, latest=latest, nodes_ready=nodes,
                    output_users=_output_users(memo, job, status), **await _observe_group(memo, job)), problem


async def _observe_group(memo: Memo, job: Mapping[str, Any]) -> dict[str, Any]:
    """spec.nodes > 1: the JobSet the pass is about (the running attempt's, else the next one's) and,
    before a new attempt, whether JobSets are served."""
    nodes, status = (job.get("spec") or {}).get("nodes"), job.get("status") or {}
    if not isinstance(nodes, int) or nodes <= 1 or status.get("phase") in TERMINAL_PHASES:
        return {}
    attempt, meta = status.get("attempt") or 0, job["metadata"]
    if attempt and (status.get("lastAttempt") or {}).get("attempt") != attempt:  # the attempt runs
        return {"jobset": await memo.kube.get_jobset(meta["namespace"], jobset_name(meta["name"], attempt))}
    if not await memo.jobsets_served():
        return {"jobsets_served": False}
    # The next attempt's name may still be held by a deleted job's JobSet (a re-apply): reconcile waits.
    return {"jobset": await memo.kube.get_jobset(meta["namespace"], jobset_name(meta["name"], attempt + 1))}


def _output_users(memo: Memo, job: Mapping[str, Any], status: Mapping[str, Any]) -> list[OutputUse]:
    """The live jobs whose outputs overlap this job's (from the cache), when this pass may start an
    attempt: OutputInUse."""
    idle = not status.get("attempt") or (status.get("lastAttempt") or {}).get("attempt") == status.get("attempt")
    if status.get("phase") in TERMINAL_PHASES or not idle or (me := output_use(job)) is None:
        return []
    return memo.cache.outputs.near(me)


class StatusRefused(k.KubeError):
    """The API refused both the job's status and the short one written in its place."""


def _refused(exc: k.KubeError) -> bool:
    # 422/400: a field the schema refuses; 413: the object grew past the API server's limit.
    return isinstance(exc, k.Invalid) or exc.status == 413


class _Stale(Exception):
    """A decision taken on cached objects met a world that differs (409 on create): read fresh."""


@dataclass
class _LoopState:
    """Per-loop log de-duplication and when the loop last read fresh; losing it on restart
    costs one repeated log line and one fresh read."""

    progress_problem: str = ""
    status_problem: str = ""
    fresh_at: float | None = None  # time.monotonic() of the last fresh read; None: not yet


async def _write_status(memo: Memo, job: Mapping[str, Any], decision: Decision, now: datetime,
                        logger: logging.Logger | kopf.Logger, loop: _LoopState) -> None:
    """Write the decision's status; if the API refuses it, write the short `rejected_status`
    (condition StatusRejected) instead, logging the refusal once. StatusRefused if both fail."""
    meta, old = job["metadata"], job.get("status") or {}
    ns, name = meta["namespace"], meta["name"]
    patch = merge_patch(old, decision.status)
    if not patch:
        return
    try:
        memo.cache.put_job(await memo.kube.patch_job_status(ns, name, patch))
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
        memo.cache.put_job(await memo.kube.patch_job_status(ns, name, patch))
    except k.KubeError as exc:
        if not _refused(exc):
            raise
        raise StatusRefused(f"the API server refused the short status too: {str(exc)[:2000]}", exc.status) from exc


async def _apply(memo: Memo, job: Mapping[str, Any], obs: Observed, decision: Decision,
                 logger: logging.Logger | kopf.Logger, loop: _LoopState | None = None, cached: bool = False) -> Decision:
    """Do the actions in order, write the status (only if it changed), then post the events.

    Events go last, once the status that records their transition is stored: a pass whose
    status write fails posts none, so the next pass (which decides the same again) does not
    post them twice."""
    loop = loop or _LoopState()
    ns = job["metadata"]["namespace"]
    for action in decision.actions:
        if isinstance(action, CreatePod):
            try:
                memo.cache.put_pod(await memo.kube.create_pod(action.pod))
            except k.AlreadyExists:
                if cached:
                    raise _Stale(f"pod {action.pod['metadata']['name']} exists already") from None
                pass  # a pass before us created it (deterministic name): done
            except k.Invalid as exc:
                decision = pod_rejected(obs, memo.settings, str(exc))
                break
        elif isinstance(action, DeletePod):
            await memo.kube.delete_pod(ns, action.name, action.grace_seconds)
        elif isinstance(action, CreateJobSet):
            try:
                await memo.kube.create_jobset(action.jobset)
            except k.AlreadyExists:
                if cached:
                    raise _Stale(f"JobSet {action.jobset['metadata']['name']} exists already") from None
            except k.NotFound:
                memo.jobset_api = None  # uninstalled since discovery: the next pass asks again
                raise
            except k.Invalid as exc:
                decision = pod_rejected(obs, memo.settings, str(exc))
                break
        elif isinstance(action, DeleteJobSet):
            await memo.kube.delete_jobset(ns, action.name)
        elif isinstance(action, DeleteJob):
            await memo.kube.delete_job(ns, job["metadata"]["name"])
    decision.status = bound_status(decision.status)
    if not any(isinstance(action, DeleteJob) for action in decision.actions):  # a deleted job keeps no status
        await _write_status(memo, job, decision, obs.now, logger, loop)
    if memo.metrics is not None:
        meta = job["metadata"]
        every = ((job.get("spec") or {}).get("checkpoint") or {}).get("everySteps")
        memo.metrics.observe_pass((ns, meta["name"]), job.get("status") or {}, decision.status, obs.progress, every)
    attempt = decision.status.get("attempt")
    for ev in decision.events:
        memo.events(job, ev.type, ev.reason, ev.message)
        log = logger.warning if ev.type == "Warning" else logger.info
        log("attempt %s: %s: %s", attempt, ev.reason, ev.message)
    return decision


def _needs_fresh_look(old: Mapping[str, Any], decision: Decision) -> bool:
    """Whether a decision taken on cached objects must be taken again on fresh reads before it is
    done: anything that cannot be taken back. Creating the first attempt's pod can (its name is
    deterministic: a 409 sends the pass back for a fresh look), and so can mirroring progress or
    the pod's phase (the next pass corrects a status written from a lagging copy)."""
    first_pod = (old.get("attempt") or 0) == 0 and decision.status.get("attempt") == 1
    for action in decision.actions:
        if isinstance(action, DeletePod | DeleteJobSet) or not first_pod:
            return True
    new = decision.status
    if (new.get("attempt") or 0) != (old.get("attempt") or 0) and not first_pod:
        return True
    if new.get("lastAttempt") != old.get("lastAttempt"):
        return True
    if any((new.get(key) or 0) != (old.get(key) or 0) for key in ("preemptions", "failures")):
        return True
    return new.get("phase") in TERMINAL_PHASES and new.get("phase") != old.get("phase")


async def _read_fresh(memo: Memo, namespace: str, name: str) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
    """GET the job and LIST its pods, and put what came back into the cache."""
    job = await memo.kube.get_job(namespace, name)
    if job is None:
        return None
    pods = await memo.kube.list_pods(namespace, name)
    memo.cache.put_job(job)
    memo.cache.replace_pods(namespace, name, pods)
    return job, pods


async def reconcile_job(memo: Memo, namespace: str, name: str, logger: logging.Logger | kopf.Logger,
                        loop: _LoopState | None = None, cached: bool = False) -> float | None:
    """One level-based pass over a job; returns seconds until it wants another (None: job gone).

    `cached`: decide on the cached job and pods when the cache has the job (see the module's
    docstring for when the pass reads fresh anyway)."""
    loop = loop or _LoopState()
    seen = memo.cache.view(namespace, name) if cached else None
    if seen is None:
        cached = False
        seen = await _read_fresh(memo, namespace, name)
        loop.fresh_at = time.monotonic()
    if seen is None:
        return None
    job, pods = seen
    if job["metadata"].get("deletionTimestamp"):
        return None  # deleting a job deletes its pods by owner references, its data stays in S3
    obs, problem = await _observe(memo, job, pods)
    if problem and problem != loop.progress_problem:
        logger.warning("attempt %s: progress not read: %s", (job.get("status") or {}).get("attempt"), problem)
    loop.progress_problem = problem
    decision = reconcile(obs, memo.settings)
    if cached and _needs_fresh_look(job.get("status") or {}, decision):
        return await reconcile_job(memo, namespace, name, logger, loop, cached=False)
    try:
        decision = await _apply(memo, job, obs, decision, logger, loop, cached=cached)
    except _Stale:
        return await reconcile_job(memo, namespace, name, logger, loop, cached=False)
    if any(isinstance(action, DeleteJob) for action in decision.actions):
        return None
    if decision.status.get("phase") in TERMINAL_PHASES:
        return decision.requeue_after  # None, or when spec.ttlSecondsAfterFinished runs out
    interval = memo.settings.progress_interval
    return interval if decision.requeue_after is None else min(interval, decision.requeue_after)


def _may_use_cache(memo: Memo, namespace: str, name: str, loop: _LoopState) -> bool:
    """A loop's first pass reads fresh, unless the job is new (no attempt yet, no pod seen): its
    first pod must not wait for a LIST. Later passes read fresh every RESYNC_SECONDS."""
    if loop.fresh_at is not None:
        return time.monotonic() - loop.fresh_at < RESYNC_SECONDS
    seen = memo.cache.view(namespace, name)
    if seen is None or seen[1] or (seen[0].get("status") or {}).get("attempt"):
        return False
    loop.fresh_at = time.monotonic()  # a new job: what the watches showed since its creation is all there is
    return True


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
                   logger: logging.Logger | kopf.Logger, uid: str = "") -> None:
    """Reconcile a job until the daemon is stopped or the job is deleted; a failing pass is logged and retried."""
    key = (namespace, name)
    wake = memo.wakeups.setdefault(key, asyncio.Event())
    state = _LoopState()
    try:
        while not stopped and uid not in memo.gone:
            wake.clear()
            started = time.monotonic()
            try:
                delay = await reconcile_job(memo, namespace, name, logger, state,
                                            cached=_may_use_cache(memo, namespace, name, state))
                if memo.metrics is not None:
                    memo.metrics.reconcile.observe(time.monotonic() - started)
            except StatusRefused as exc:  # logged once in _write_status; no events were posted
                logger.debug("status refused, retrying in %ss: %s", ERROR_DELAY, exc)
                delay, state.fresh_at = ERROR_DELAY, None
            except k.KubeError as exc:
                logger.warning("reconcile failed, retrying in %ss: %s", ERROR_DELAY, exc)
                delay, state.fresh_at = ERROR_DELAY, None
            except Exception as exc:  # never crash-loop: log it and try again later
                logger.exception("unexpected error, retrying in %ss: %s", ERROR_DELAY, type(exc).__name__)
                delay, state.fresh_at = ERROR_DELAY, None
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
    async def job_daemon(namespace: str, name: str, body: kopf.Body, stopped: kopf.DaemonStopped,
                         logger: kopf.Logger, **_: Any) -> None:
        memo.cache.put_job(dict(body))  # the object that spawned the daemon: a new job's first pass needs no GET
        uid = str(body.get("metadata", {}).get("uid") or "")
        try:
            await job_loop(memo, namespace, name, stopped, logger, uid)
        finally:
            gone = uid in memo.gone
            memo.gone.discard(uid)
            if stopped or gone:  # the job is gone (or the operator stops): forget its objects
                memo.cache.drop_job(namespace, name)
                if memo.metrics is not None:
                    memo.metrics.forget((namespace, name))

    # Event handlers are async on purpose: Kopf runs sync handlers in a worker thread, and
    # asyncio.Event.set() from another thread is not thread-safe (the loop may not wake up).
    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
    async def job_event(body: Mapping[str, Any], event: Mapping[str, Any], **_: Any) -> None:
        meta, status = body.get("metadata") or {}, body.get("status") or {}
        raw = event.get("object")
        if event.get("type") == "DELETED":
            memo.cache.drop_job(meta.get("namespace", ""), meta.get("name", ""))
            if meta.get("uid") and (meta.get("namespace", ""), meta.get("name", "")) in memo.wakeups:
                memo.gone.add(meta["uid"])  # its loop ends (Kopf stops daemons only of objects it finalizes)
                memo.wake(meta.get("namespace", ""), meta.get("name", ""))
        elif isinstance(raw, dict) and not memo.cache.put_job(raw):
            return  # the echo of our own write (its answer is cached): the loop knows it already
        if meta.get("generation") != status.get("observedGeneration"):  # a spec edit, not our status write
            memo.wake(meta.get("namespace", ""), meta.get("name", ""))

    @kopf.on.event("v1", "pods", labels={JOB_LABEL: kopf.PRESENT}, registry=registry)
    async def pod_event(namespace: str, labels: Mapping[str, str], event: Mapping[str, Any], **_: Any) -> None:
        raw = event.get("object")
        if isinstance(raw, dict):
            if event.get("type") == "DELETED":
                memo.cache.delete_pod(raw)
            elif not memo.cache.put_pod(raw):
                return  # the echo of our own create (its answer is cached): nothing new for the loop
        memo.wake(namespace, labels[JOB_LABEL])

    _no_finalizer_for_daemons(registry)
    return registry


def _no_finalizer_for_daemons(registry: kopf.OperatorRegistry) -> None:
    """Kopf puts a finalizer on every object a daemon serves, to stop the daemon before the object goes.

    A job needs no clean-up of its own (pods go by owner references, outputs stay in S3); the finalizer
    cost a PATCH and one more watch event per job (a third of Kopf's work per job at 500 jobs) and kept
    `kubectl delete` waiting while no operator ran. job_event ends a deleted job's loop instead. Kopf
    removes the finalizer an older operator put on a job at the job's next event. `@kopf.daemon` has no
    switch for this, so the registered handler is replaced (tests/unit/test_controller.py pins it)."""
    spawning = registry._spawning  # noqa: SLF001 - no public way; Kopf is pinned in requirements/
    spawning._handlers = [  # noqa: SLF001
        dataclasses.replace(h, requires_finalizer=False) for h in spawning.get_all_handlers()
    ]


async def run_operator(settings: Settings, *, kubeconfig: str | None = None, stop_flag: Any = None,
                       ready_flag: Any = None) -> None:
    """Run the operator until `stop_flag` is set (or forever): `lora-operator run` and the tests."""
    memo = Memo(settings=settings, kube=k.Kube(k.load_configuration(kubeconfig)))
    memo.metrics = Metrics(lambda: list(memo.cache.jobs.values()), _now)
    memo.metrics.serve(settings.metrics_port, settings.metrics_address)
    objects_logger = logging.getLogger("kopf.objects")
    if not any(isinstance(f, QuietWakeups) for f in objects_logger.filters):
        objects_logger.addFilter(QuietWakeups())
    try:
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
    finally:
        memo.metrics.close()
