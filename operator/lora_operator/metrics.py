"""Prometheus metrics of the operator, served on /metrics (prometheus_client, its own registry).

Series (names and labels are the contract that docs/metrics.md's alerts use):

- lora_operator_jobs{phase}: jobs by status.phase (no phase yet counts as Pending), from the
  operator's cache of the jobs it watches, computed when scraped;
- lora_operator_preemptions_total{reason}: attempts ended by preemption (reason as in
  status.lastAttempt.reason, e.g. PreemptionByScheduler, TerminationByKubelet, Preempted);
- lora_operator_attempt_failures_total{reason}: attempts that failed against failurePolicy.backoffLimit;
- lora_operator_job_failures_total{reason}: jobs that turned Failed (status.reason);
- lora_operator_reconcile_duration_seconds: one reconcile pass of one job (histogram);
- lora_operator_resume_seconds: from a preemption (the operator classifying the ended attempt)
  to the first step the next attempt reports in progress.json (histogram);
- lora_operator_checkpoint_age_seconds{namespace,job}: now minus the newest committed checkpoint's
  time (status.latestCheckpoint.time; the job's startTime before its first one), per Running job;
- lora_operator_checkpoint_interval_seconds{namespace,job}: spec.checkpoint.everySteps at the
  trainer's reported speed, per Running job that reported one (alert when the age passes 3x it).

Counters and histograms count what this operator process saw (they restart at 0 with it, as
Prometheus' rate() expects); the gauges are rebuilt from the cache on every scrape, so a deleted
job's series disappear with it. Transitions are decided by pure functions (`transitions`,
`resume_seconds`) from the status before and after a pass.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from lora_operator.classify import parse_time
from lora_trainer.contract import Progress

log = logging.getLogger(__name__)

PHASES = ("Pending", "Running", "Recovering", "Suspended", "Succeeded", "Failed")
RESUME_BUCKETS = (5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600, float("inf"))
RECONCILE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, float("inf"))

PREEMPTION, ATTEMPT_FAILURE, JOB_FAILURE = "preemption", "attempt_failure", "job_failure"


def transitions(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, str]]:
    """What one pass changed, as (kind, reason) counter increments (pure)."""
    out: list[tuple[str, str]] = []
    last = new.get("lastAttempt") or {}
    reason = str(last.get("reason") or "Unknown")
    for key, kind in (("preemptions", PREEMPTION), ("failures", ATTEMPT_FAILURE)):
        grown = int(new.get(key) or 0) - int(old.get(key) or 0)
        out.extend([(kind, reason)] * max(0, grown))
    if new.get("phase") == "Failed" and old.get("phase") != "Failed":
        out.append((JOB_FAILURE, str(new.get("reason") or "Unknown")))
    return out


def resume_seconds(status: Mapping[str, Any], progress: Progress | None) -> float | None:
    """Seconds from the last preemption to the first step the current attempt reported; None when
    the current attempt does not follow a preemption or has not reported a step yet (pure)."""
    last = status.get("lastAttempt") or {}
    if progress is None or progress.state != "running" or last.get("result") != "Preempted":
        return None
    if last.get("attempt") != (status.get("attempt") or 0) - 1:
        return None  # the current attempt is not the one that followed the preemption
    preempted, stepped = parse_time(last.get("finishedAt")), parse_time(progress.updated)
    if preempted is None or stepped is None or stepped <= preempted:
        return None  # the heartbeat is the preempted attempt's own
    return (stepped - preempted).total_seconds()


def job_gauges(jobs: Iterable[Mapping[str, Any]], intervals: Mapping[tuple[str, str], float],
               now: datetime) -> tuple[dict[str, int], list[tuple[str, str, float]], list[tuple[str, str, float]]]:
    """(jobs by phase, checkpoint age per Running job, checkpoint interval per Running job) (pure)."""
    phases = dict.fromkeys(PHASES, 0)
    ages: list[tuple[str, str, float]] = []
    every: list[tuple[str, str, float]] = []
    for job in jobs:
        meta, status = job.get("metadata") or {}, job.get("status") or {}
        phase = str(status.get("phase") or "Pending")
        phases[phase] = phases.get(phase, 0) + 1
        if phase != "Running":
            continue
        key = (str(meta.get("namespace") or ""), str(meta.get("name") or ""))
        since = parse_time((status.get("latestCheckpoint") or {}).get("time")) or parse_time(status.get("startTime"))
        if since is not None:
            ages.append((*key, max(0.0, (now - since).total_seconds())))
        if key in intervals:
            every.append((*key, intervals[key]))
    return phases, ages, every


class _JobCollector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[GaugeMetricFamily]:
        phases, ages, every = self.metrics.gauges()
        by_phase = GaugeMetricFamily("lora_operator_jobs", "LoRATrainingJobs by status.phase.", labels=["phase"])
        for phase, count in sorted(phases.items()):
            by_phase.add_metric([phase], count)
        yield by_phase
        age = GaugeMetricFamily("lora_operator_checkpoint_age_seconds",
                                "Seconds since the newest committed checkpoint of a Running job.",
                                labels=["namespace", "job"])
        for ns, name, value in ages:
            age.add_metric([ns, name], value)
        yield age
        interval = GaugeMetricFamily("lora_operator_checkpoint_interval_seconds",
                                     "spec.checkpoint.everySteps at the trainer's reported speed, per Running job.",
                                     labels=["namespace", "job"])
        for ns, name, value in every:
            interval.add_metric([ns, name], value)
        yield interval


class Metrics:
    """The operator's metrics; `jobs` lists the cached job objects when scraped."""

    def __init__(self, jobs: Callable[[], Iterable[Mapping[str, Any]]], now: Callable[[], datetime]) -> None:
        self.jobs, self.now = jobs, now
        self.registry = CollectorRegistry()
        self.started = now()
        self.counters = {
            PREEMPTION: Counter("lora_operator_preemptions_total", "Attempts ended by preemption.",
                                ["reason"], registry=self.registry),
            ATTEMPT_FAILURE: Counter("lora_operator_attempt_failures_total",
                                     "Attempts that failed (failurePolicy.backoffLimit budget).",
                                     ["reason"], registry=self.registry),
            JOB_FAILURE: Counter("lora_operator_job_failures_total", "Jobs that turned Failed.",
                                 ["reason"], registry=self.registry),
        }
        self.reconcile = Histogram("lora_operator_reconcile_duration_seconds", "One reconcile pass of one job.",
                                   buckets=RECONCILE_BUCKETS, registry=self.registry)
        self.resume = Histogram("lora_operator_resume_seconds",
                                "From a preemption to the first step the next attempt reports.",
                                buckets=RESUME_BUCKETS, registry=self.registry)
        self.registry.register(_JobCollector(self))
        self._resumed: dict[tuple[str, str], int] = {}  # job → attempt whose resume was observed
        self._intervals: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()  # scrapes run in the HTTP server's thread
        self._server: Any = None

    def gauges(self) -> tuple[dict[str, int], list[tuple[str, str, float]], list[tuple[str, str, float]]]:
        with self._lock:
            intervals = dict(self._intervals)
        return job_gauges(list(self.jobs()), intervals, self.now())

    def observe_pass(self, key: tuple[str, str], old: Mapping[str, Any], new: Mapping[str, Any],
                     progress: Progress | None, every_steps: Any) -> None:
        """Record one stored pass: the counters it moved, a resume it saw, the checkpoint interval."""
        for kind, reason in transitions(old, new):
            self.counters[kind].labels(reason=reason).inc()
        took = resume_seconds(new, progress)
        attempt = int(new.get("attempt") or 0)
        if took is not None and self._resumed.get(key) != attempt:
            self._resumed[key] = attempt
            stepped = parse_time(progress.updated) if progress else None
            if stepped is not None and stepped >= self.started:  # not one a previous operator process saw
                self.resume.observe(took)
        with self._lock:
            if progress is not None and progress.steps_per_second and isinstance(every_steps, int) and every_steps > 0:
                self._intervals[key] = every_steps / progress.steps_per_second
            elif new.get("phase") != "Running":
                self._intervals.pop(key, None)

    def forget(self, key: tuple[str, str]) -> None:
        """The job is gone: drop what is kept about it."""
        self._resumed.pop(key, None)
        with self._lock:
            self._intervals.pop(key, None)

    def serve(self, port: int, address: str) -> None:
        """Serve /metrics on address:port (port 0: not at all). A port in use is logged, not fatal:
        reconciling jobs matters more than their metrics."""
        if not port:
            return
        try:
            self._server, _ = start_http_server(port, address, registry=self.registry)
        except OSError as exc:
            log.error("metrics: cannot listen on %s:%d (%s); /metrics is off, set --metrics-port", address, port, exc)
            return
        log.info("metrics: serving /metrics on %s:%d", address, port)

    def close(self) -> None:
        """Stop serving /metrics."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
