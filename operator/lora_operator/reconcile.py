"""The decision (pure): job + its pods + now + progress → actions and the new status.

`reconcile` reads like a checklist: finished → clean up; bad spec → fail; the current attempt
ended → spend the right budget; a stray pod → delete; suspended → stop; nothing running → start
the next attempt; then mirror progress. Status is computed once and written by the caller after
the actions succeeded, so a crash in between repeats the decision instead of losing it: the pod
name is deterministic (409 = done) and a pod one attempt ahead of the status is adopted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from lora_operator import status as st
from lora_operator.classify import (
    Outcome,
    Reason,
    Result,
    attempt_of,
    classify_finished,
    force_deleted,
    is_live,
    is_owned_by,
    is_terminating,
    next_backoff,
    parse_time,
    phase,
    stuck,
    stuck_terminating,
    vanished,
)
from lora_operator.endpoints import ENDPOINT_NOT_ALLOWED
from lora_operator.jobset import NOT_INSTALLED, build_jobset, group_of, group_state, not_installed_message
from lora_operator.outputs import OUTPUT_IN_USE, OutputUse, in_use_message, output_holder, output_use
from lora_operator.pods import build_pod, check_job_name, pod_name
from lora_operator.queueing import deadline_start
from lora_operator.scheduling import SchedulingSteps
from lora_operator.settings import Settings, endpoint_refusal
from lora_operator.spec import JobSpec, SpecError, parse_spec, to_train_config
from lora_operator.ttl import TTL_EXPIRED, ttl_decision
from lora_trainer.contract import LatestPointer, Progress


def copy_json(value: Any) -> Any:
    """A deep copy of JSON-shaped data (dicts, lists, scalars): what copy.deepcopy does for a status,
    several times faster (no memo, no dispatch); every pass of every job copies its status."""
    if isinstance(value, dict):
        return {key: copy_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [copy_json(item) for item in value]
    return value


KEEP_FINISHED_PODS = 2  # finished pods of the last attempts stay for `kubectl logs`


@dataclass(frozen=True)
class Observed:
    """Everything one reconcile looks at."""

    job: Mapping[str, Any]
    pods: Sequence[Mapping[str, Any]]
    now: datetime
    progress: Progress | None = None
    latest: LatestPointer | None = None
    nodes_ready: Mapping[str, bool] = field(default_factory=dict)
    # Other live jobs' outputs (the operator's cache), for the OutputInUse check.
    output_users: Sequence[OutputUse] = ()
    # spec.nodes > 1: the JobSet as read (None: absent) of the running attempt, or else of the next one;
    # and whether the API serves JobSets.
    jobset: Mapping[str, Any] | None = None
    jobsets_served: bool = True


@dataclass(frozen=True)
class CreatePod:
    pod: dict[str, Any]


@dataclass(frozen=True)
class DeletePod:
    name: str
    grace_seconds: int | None = None  # None: the pod's own grace period; 0: force
    reason: str = ""


@dataclass(frozen=True)
class CreateJobSet:
    jobset: dict[str, Any]


@dataclass(frozen=True)
class DeleteJobSet:
    """Delete a group attempt's JobSet; its pods go with it, each with its own grace period."""

    name: str
    reason: str = ""


@dataclass(frozen=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


@dataclass(frozen=True)
class DeleteJob:
    """Delete the job itself (its TTL after finishing has passed); its pods go by owner references."""

    reason: str = TTL_EXPIRED


Action = CreatePod | DeletePod | DeleteJob | CreateJobSet | DeleteJobSet


@dataclass
class Decision:
    """What to do, in order, and the status to write once it is done."""

    status: dict[str, Any]
    actions: list[Action] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    requeue_after: float | None = None

    def requeue(self, seconds: float) -> None:
        """Ask to be called again within `seconds`."""
        seconds = max(0.0, seconds)
        self.requeue_after = seconds if self.requeue_after is None else min(self.requeue_after, seconds)


class _Run(SchedulingSteps):
    """One reconcile's working state; methods are the checklist's steps."""

    def __init__(self, obs: Observed, settings: Settings) -> None:
        self.obs, self.settings, self.now = obs, settings, obs.now
        self.meta = obs.job.get("metadata") or {}
        self.name = self.meta.get("name", "")
        self.generation = self.meta.get("generation")
        self.old = obs.job.get("status") or {}
        uid = self.meta.get("uid")
        self.pods = [p for p in obs.pods if is_owned_by(p, uid)]
        self.foreign_pods = [p for p in obs.pods if not is_owned_by(p, uid)]
        self.foreign = {p["metadata"]["name"] for p in self.foreign_pods}
        self.d = Decision(status=copy_json(dict(self.old)))
        self.s = self.d.status
        self.s.setdefault("attempt", 0)
        self.s.setdefault("preemptions", 0)
        self.s.setdefault("failures", 0)
        self.stalled: tuple[str, str] | None = None
        self.deleting: set[str] = set()

    # --- helpers ------------------------------------------------------------------------------
    def event(self, type_: str, reason: str, message: str) -> None:
        self.d.events.append(Event(type_, st.clean_reason(reason), st.clean_message(message, st.MAX_REJECTED_MESSAGE)))

    def set_phase(self, phase_: str, reason: str, message: str, announce: bool = True) -> None:
        if self.s.get("phase") != phase_ and announce:
            # The message often names the reason already ("attempt 1: OOMKilled: ..."): say it once.
            text = message if reason in message else f"{reason}: {message}"
            self.event("Warning" if phase_ == "Failed" else "Normal", phase_, text)
        self.s.update(phase=phase_, reason=reason, message=message)
        if phase_ in st.TERMINAL_PHASES:
            self.s.setdefault("completionTime", st.rfc3339(self.now))

    def condition(self, ctype: str, value: bool, reason: str, message: str) -> None:
        self.s["conditions"] = st.set_condition(
            self.s.get("conditions") or [], ctype, value, reason, message, self.now, self.generation
        )

    def pod(self, attempt: int) -> Mapping[str, Any] | None:
        wanted = pod_name(self.name, attempt)
        return next((p for p in self.pods if p["metadata"]["name"] == wanted), None)

    def delete(self, pod: Mapping[str, Any], grace: int | None, reason: str) -> None:
        name, group = pod["metadata"]["name"], group_of(pod)
        if group and group not in self.deleting:  # its Job would replace a pod deleted alone
            self.deleting.add(group)
            self.d.actions.append(DeleteJobSet(group, reason))
        if group and grace != 0:
            return
        if name not in self.deleting:
            self.deleting.add(name)
            self.d.actions.append(DeletePod(name, grace, reason))

    def classified(self) -> bool:
        last = self.s.get("lastAttempt") or {}
        return self.s["attempt"] == 0 or last.get("attempt") == self.s["attempt"]

    def live_pods(self) -> list[Mapping[str, Any]]:
        return [p for p in self.pods if is_live(p)]

    # --- the checklist ------------------------------------------------------------------------
    def run(self) -> Decision:
        if self.s.get("phase") in st.TERMINAL_PHASES:
            self.clean_up()
            return self.finish()
        try:
            check_job_name(self.name)
            spec = parse_spec(self.obs.job.get("spec") or {})
            to_train_config(spec)
        except SpecError as exc:
            self.fail(Reason.INVALID_SPEC, str(exc))
            return self.finish()
        refusal = endpoint_refusal(spec.storage, self.settings)
        if refusal:  # before any pod: neither the trainer nor the operator may reach it
            self.fail(ENDPOINT_NOT_ALLOWED, refusal)
            return self.finish()
        self.s["outputs"] = st.outputs(spec.output.uri, spec.task, spec.output.merge)
        self.s["determinism"] = st.determinism_status(spec.training.determinism, spec.resources.gpus)
        self.check_current(spec)
        if self.s.get("phase") not in st.TERMINAL_PHASES:
            if self.adopt_next():
                self.d.requeue(0)
                return self.finish()
            self.delete_strays(spec)
            if spec.suspend:
                self.suspend(spec)
            else:
                self.start_next(spec)
        self.mirror_progress(spec)
        self.report_usage(spec)
        self.clean_up()
        return self.finish()

    def clean_up(self) -> None:
        """Finished jobs keep no live pods; old finished pods go, the last ones stay for logs."""
        terminal = self.s.get("phase") in st.TERMINAL_PHASES
        for p in self.pods:
            old = attempt_of(p) <= self.s["attempt"] - KEEP_FINISHED_PODS
            if (terminal and is_live(p) and not is_terminating(p)) or (old and not is_live(p)):
                self.delete(p, None, "cleanup")

    def fail(self, reason: str, message: str) -> None:
        for p in self.live_pods():
            self.delete(p, None, reason)
        self.set_phase("Failed", reason, message)

    def check_current(self, spec: JobSpec) -> None:
        """Classify the current attempt once it ended; otherwise say how it is doing."""
        attempt = self.s["attempt"]
        if self.classified():
            return
        if spec.nodes > 1:
            return self.check_group(spec)
        pod = self.pod(attempt)
        if pod is None:
            return self.spend(vanished(spec.suspend), spec)
        outcome = classify_finished(pod)
        if outcome is not None:
            return self.spend(outcome, spec)
        node = (pod.get("spec") or {}).get("nodeName") or ""
        if is_terminating(pod):
            if stuck_terminating(pod, self.now, self.settings.terminating_grace, self.obs.nodes_ready.get(node)):
                self.delete(pod, 0, Reason.NODE_LOST)
                return self.spend(force_deleted(pod, node), spec)
            self.d.requeue(self.settings.progress_interval)
            return None
        if self.queued(pod, spec) or self.rescheduled(pod, spec):
            return None
        if phase(pod) == "Running":
            self.s["podName"] = pod["metadata"]["name"]
            self.set_phase("Running", Reason.RUNNING, f"attempt {attempt} is training on node {node or '?'}")
            if (st.get_condition(self.s.get("conditions") or [], st.PREEMPTED) or {}).get("status") == "True":
                self.condition(st.PREEMPTED, False, Reason.RESUMED, f"attempt {attempt} resumed training")
            return None
        since = deadline_start(self.s.get("admission"), attempt, parse_time(pod["metadata"].get("creationTimestamp")),
                               parse_time)
        found = stuck(pod, self.now, self.settings.pending_deadline, since)
        if found and found.fatal:
            self.delete(pod, 0, found.reason)
            self.set_phase("Failed", found.reason, found.message)
        elif found and not self.will_reschedule(pod, spec, found.reason):
            self.stalled = (found.reason, found.message)
        else:
            age = (self.now - (since or self.now)).total_seconds()
            self.d.requeue(max(1.0, self.settings.pending_deadline - age))
        return None

    def check_group(self, spec: JobSpec) -> None:
        """The current attempt is a JobSet: its pods end, run or wait as one (lora_operator.jobset)."""
        attempt = self.s["attempt"]
        pods = [p for p in self.pods if attempt_of(p) == attempt]
        if self.queued_group(pods, self.obs.jobset, spec):
            return None
        since = deadline_start(self.s.get("admission"), attempt, None, parse_time)
        group = group_state(pods, spec.nodes, self.obs.jobset, self.now, self.settings.pending_deadline, since)
        if group.leader:
            self.s["podName"] = group.leader
        if group.outcome is not None:
            return self.spend(group.outcome, spec)
        if group.running:
            self.set_phase("Running", Reason.RUNNING, f"attempt {attempt} is training on {spec.nodes} nodes "
                           f"(leader on {group.node})")
            if (st.get_condition(self.s.get("conditions") or [], st.PREEMPTED) or {}).get("status") == "True":
                self.condition(st.PREEMPTED, False, Reason.RESUMED, f"attempt {attempt} resumed training")
        elif group.stuck is not None and group.stuck.fatal:
            self.fail(group.stuck.reason, group.stuck.message)
        elif group.stuck is not None:
            self.stalled = (group.stuck.reason, group.stuck.message)
        self.d.requeue(group.wait if group.wait is not None else self.settings.progress_interval)
        return None

    def spend(self, outcome: Outcome, spec: JobSpec) -> None:
        """Record how the attempt ended and charge the budget its result belongs to."""
        attempt = self.s["attempt"]
        self.account(outcome, spec)
        self.s["lastAttempt"] = {
            "attempt": attempt, "result": outcome.result.value, "reason": outcome.reason,
            "message": outcome.message, "finishedAt": st.rfc3339(self.now),
            **({"exitCode": outcome.exit_code} if outcome.exit_code is not None else {}),
        }
        words = f"attempt {attempt}: {outcome.reason}: {outcome.message}"
        if outcome.result is Result.SUCCEEDED:
            self.set_phase("Succeeded", Reason.COMPLETED, f"the LoRA is at {self.s['outputs']['weights']}")
        elif outcome.result is Result.PERMANENT:
            self.fail(outcome.reason, words)
        elif outcome.result is Result.RESCHEDULED:
            self.event("Normal", outcome.reason, words)
            self.set_phase("Recovering", outcome.reason, words, announce=False)
        elif outcome.result is Result.PREEMPTED and spec.suspend:
            self.event("Normal", Reason.SUSPENDED, f"attempt {attempt} stopped for suspension")
        elif outcome.result is Result.PREEMPTED:
            self.s["preemptions"] += 1
            self.event("Warning", Reason.PREEMPTED, words)
            self.condition(st.PREEMPTED, True, outcome.reason, words)
            if self.s["preemptions"] > spec.spot.max_preemptions:
                self.fail(Reason.PREEMPTION_LIMIT,
                          f"{self.s['preemptions']} preemptions exceed spec.spot.maxPreemptions "
                          f"({spec.spot.max_preemptions}); raise it or use on-demand nodes")
            else:
                self.set_phase("Recovering", outcome.reason, f"{words}; resuming from the latest checkpoint")
        else:
            self.s["failures"] += 1
            self.event("Warning", Reason.FAILED, words)
            if self.s["failures"] > spec.failure_policy.backoff_limit:
                self.fail(Reason.BACKOFF_LIMIT,
                          f"{words}; {self.s['failures']} failures exceed spec.failurePolicy.backoffLimit "
                          f"({spec.failure_policy.backoff_limit})")
            else:
                delay = next_backoff(self.s["failures"], self.settings.backoff_base, self.settings.backoff_max)
                self.s["nextAttemptTime"] = st.rfc3339(self.now + timedelta(seconds=delay))
                self.set_phase("Recovering", outcome.reason, f"{words}; retrying in {delay:g}s")

    def adopt_next(self) -> bool:
        """A pod one attempt ahead means its creation was done but the status write was lost."""
        if not self.classified():
            return False
        ahead = self.pod(self.s["attempt"] + 1) or next(
            (p for p in self.pods if attempt_of(p) == self.s["attempt"] + 1), None)  # a group's pod
        if ahead is None:
            return False
        self.s["attempt"] += 1
        self.s["podName"] = ahead["metadata"]["name"]
        self.s.pop("nextAttemptTime", None)
        return True

    def delete_strays(self, spec: JobSpec) -> None:
        """Live pods of other attempts must never run beside the current one (fencing)."""
        for p in self.live_pods():
            if attempt_of(p) == self.s["attempt"] and (not self.classified() or not group_of(p)):
                continue
            node = (p.get("spec") or {}).get("nodeName") or ""
            if attempt_of(p) == self.s["attempt"] and not is_terminating(p):
                # The group's attempt ended with one pod: stop the others (the leader commits on SIGTERM).
                self.delete(p, spec.spot.termination_grace_period_seconds, Reason.GROUP_ENDED)
            elif not is_terminating(p):
                self.delete(p, spec.spot.termination_grace_period_seconds, Reason.STALE_POD)
                self.event("Warning", Reason.STALE_POD, f"deleted {p['metadata']['name']}: not the current attempt")
            elif stuck_terminating(p, self.now, self.settings.terminating_grace, self.obs.nodes_ready.get(node)):
                # Its node is gone: it would block the next attempt (never two live pods) forever.
                self.delete(p, 0, Reason.NODE_LOST)

    def suspend(self, spec: JobSpec) -> None:
        live = self.live_pods()
        for p in live:
            if not is_terminating(p):
                self.delete(p, spec.spot.termination_grace_period_seconds, Reason.SUSPENDING)
        self.set_phase("Suspended", Reason.SUSPENDED,
                       "stopping the pod (it commits a checkpoint first)" if live else "no pod runs; set spec.suspend: false to resume")
        self.stalled = None
        if live:
            self.d.requeue(self.settings.progress_interval)

    def start_next(self, spec: JobSpec) -> None:
        """Nothing may run: start the next attempt once the backoff has passed."""
        if not self.classified() or self.live_pods():
            return
        due = parse_time(self.s.get("nextAttemptTime"))
        if due is not None and due > self.now:
            self.d.requeue((due - self.now).total_seconds())
            return
        if self.output_in_use():
            return
        first = self.s["attempt"] == 0
        if first and self.previous_run_stopping():
            return
        attempt = self.s["attempt"] + 1
        if pod_name(self.name, attempt) in self.foreign:
            # A deleted job's pod still holds the name until the garbage collector removes it.
            self.wait_for_cluster(f"waiting for pod {pod_name(self.name, attempt)} of a deleted job with the same "
                                 "name to be garbage-collected")
            return
        if spec.nodes > 1 and not self.create_group(spec, attempt):
            return
        if self.s.get("phase") == "Suspended":
            self.event("Normal", Reason.RESUMED, "spec.suspend is false: starting the next attempt")
        if spec.nodes == 1:
            # With this pass's status: a preemption counted just now belongs in the rate the pod is told.
            self.d.actions.append(CreatePod(build_pod({**self.obs.job, "status": self.s}, attempt, self.settings, spec,
                                                      self.next_pool(spec))))
        self.s.update(attempt=attempt, podName=pod_name(self.name, attempt))
        self.s.pop("nextAttemptTime", None)
        self.s.setdefault("startTime", st.rfc3339(self.now))
        what = f"JobSet of {spec.nodes} pods" if spec.nodes > 1 else "pod"
        self.event("Normal", Reason.STARTING, f"created {what} {pod_name(self.name, attempt)} (attempt {attempt})")
        if first:  # the AttemptStarted event says it: one Event per new job, not two (API writes at scale)
            self.set_phase("Pending", Reason.WAITING, "waiting for the trainer pod to start", announce=False)
        else:
            self.set_phase("Recovering", self.s.get("reason") or Reason.WAITING,
                           f"attempt {attempt} started; it resumes from the latest checkpoint")

    def create_group(self, spec: JobSpec, attempt: int) -> bool:
        """Add the attempt's JobSet to the actions; False (and the job Failed) if it cannot be made."""
        if not self.obs.jobsets_served:
            self.fail(NOT_INSTALLED, not_installed_message())
            return False
        if self.obs.jobset is not None and not is_owned_by(self.obs.jobset, self.meta.get("uid")):
            self.wait_for_cluster(f"waiting for JobSet {pod_name(self.name, attempt)} of a deleted job with the "
                                  "same name to be garbage-collected")
            return False
        try:
            self.d.actions.append(CreateJobSet(build_jobset({**self.obs.job, "status": self.s}, attempt, self.settings, spec,
                                                            self.next_pool(spec))))
        except SpecError as exc:
            self.fail(Reason.INVALID_SPEC, str(exc))
            return False
        return True

    def output_in_use(self) -> bool:
        """Another live job holds an overlapping output: start nothing (Stalled, OutputInUse)."""
        me = output_use(self.obs.job)
        holder = output_holder(me, self.obs.output_users) if me is not None else None
        if me is None or holder is None:
            return False
        message = in_use_message(me, holder)
        if self.s["attempt"] == 0:
            self.set_phase("Pending", OUTPUT_IN_USE, message)
        self.stalled = (OUTPUT_IN_USE, message)
        self.d.requeue(self.settings.progress_interval)
        return True

    def previous_run_stopping(self) -> bool:
        """Before the first pod: a live pod of a deleted job with the same name (a re-apply) gets time
        to commit its SIGTERM checkpoint and exit, so the new run resumes from it. Bounded by
        --terminating-grace from the job's creation (an orphaned pod would block forever); past it,
        the trainers' fence keeps the older run from writing (see lora_trainer.checkpoint)."""
        created = parse_time(self.meta.get("creationTimestamp")) or self.now
        old = [p for p in self.foreign_pods if is_live(p)]
        if not old or (self.now - created).total_seconds() >= self.settings.terminating_grace:
            return False
        self.wait_for_cluster(f"waiting for pod {old[0]['metadata']['name']} of a deleted job with the same name "
                              "to stop (it commits a checkpoint first) and be garbage-collected")
        return True

    def wait_for_cluster(self, message: str) -> None:
        """Nothing to do but wait a little for the cluster (not a user error: no Stalled)."""
        if not self.s.get("phase"):
            self.set_phase("Pending", Reason.WAITING, message)
        self.d.requeue(min(2.0, self.settings.progress_interval))

    def mirror_progress(self, spec: JobSpec) -> None:
        if self.obs.progress is not None:
            self.s["progress"] = st.progress_status(self.obs.progress)
        if self.obs.latest is not None:
            new = st.checkpoint_status(self.obs.latest, spec.output.uri)
            if (self.s.get("latestCheckpoint") or {}).get("step") != new["step"]:
                self.event("Normal", Reason.CHECKPOINT, f"checkpoint of step {new['step']} committed at {new['uri']}")
            self.s["latestCheckpoint"] = new
            self.condition(st.CHECKPOINTED, True, Reason.CHECKPOINT, f"step {new['step']} at {new['uri']}")

    def expire(self) -> None:
        """A finished job past spec.ttlSecondsAfterFinished is deleted; until then, look again at expiry."""
        ttl = (self.obs.job.get("spec") or {}).get("ttlSecondsAfterFinished")
        if not isinstance(ttl, int) or isinstance(ttl, bool) or ttl < 0:
            return  # unset (or a value the schema would refuse): keep the job
        due = ttl_decision(parse_time(self.s.get("completionTime")), ttl, self.now)
        if due.delete and not any(isinstance(a, DeleteJob) for a in self.d.actions):
            self.d.actions.append(DeleteJob())
            self.event("Normal", TTL_EXPIRED, f"deleting the job {ttl}s after it finished "
                       "(spec.ttlSecondsAfterFinished); its outputs stay in S3")
        elif due.wait is not None:
            self.d.requeue(due.wait)

    def finish(self) -> Decision:
        """Conditions from the phase, then observedGeneration: the status is complete."""
        ph = self.s.get("phase") or "Pending"
        if ph in st.TERMINAL_PHASES:
            self.expire()
        reason, message = self.s.get("reason") or Reason.WAITING, self.s.get("message") or ""
        if ph == "Succeeded":
            self.condition(st.READY, True, Reason.COMPLETED, message)
        else:
            self.condition(st.READY, False, reason, message)
        self.condition(st.RECONCILING, ph in ("Pending", "Running", "Recovering") or
                       (ph == "Suspended" and bool(self.live_pods())), reason, message)
        if ph == "Failed":
            self.condition(st.STALLED, True, reason, message)
        elif self.stalled:
            old = st.get_condition(self.old.get("conditions") or [], st.STALLED) or {}
            if old.get("status") != "True" or old.get("reason") != self.stalled[0]:
                self.event("Warning", self.stalled[0], self.stalled[1])
            self.condition(st.STALLED, True, *self.stalled)
        else:
            self.condition(st.STALLED, False, reason, message)
        if ph == "Suspended" or st.get_condition(self.s.get("conditions") or [], st.SUSPENDED):
            self.condition(st.SUSPENDED, ph == "Suspended", reason, message)
        if (st.get_condition(self.s.get("conditions") or [], st.STATUS_REJECTED) or {}).get("status") == "True":
            # Written only if the API accepts this status; if not, the controller writes the short one.
            self.condition(st.STATUS_REJECTED, False, Reason.STATUS_ACCEPTED, "the job's status fits its schema again")
        if self.generation is not None:
            self.s["observedGeneration"] = self.generation
        self.d.status = st.bound_status(self.s)
        return self.d


def reconcile(obs: Observed, settings: Settings) -> Decision:
    """Decide what to do for one job; pure, so the same inputs always give the same decision."""
    return _Run(obs, settings).run()


def pod_rejected(obs: Observed, settings: Settings, message: str) -> Decision:
    """The decision when the API server refuses the attempt's pod (422): retrying cannot help."""
    run = _Run(obs, settings)
    run.fail(Reason.POD_REJECTED, f"the pod was rejected: {message}; fix spec.resources or spec.image")
    return run.finish()
