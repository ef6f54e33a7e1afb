"""What happened to a pod (pure): finished attempts become an Outcome, stuck ones a Stuck.

Every reason string the operator writes (status, conditions, events) is a constant in `Reason`.
Order for a finished pod: exit 0 → DisruptionTarget → node shutdown / eviction → OOMKilled →
exit code rules → deleted while running. Exit 0 goes first on purpose: the trainer committed the
final weights, so a preemption that raced with the last step must not re-run the job.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from lora_operator.queueing import is_queued
from lora_operator.status import clean_reason
from lora_trainer.errors import EXIT_NOPERM, EXIT_OK, EXIT_OOM, EXIT_PREEMPTED

ATTEMPT_LABEL = "lora-operator.dev/attempt"
JOB_LABEL = "lora-operator.dev/job"
TRAINER_CONTAINER = "trainer"
# A group's pods (spec.nodes > 1) are owned by their Job, not by the LoRATrainingJob: this annotation
# (the job's uid) says whose run they belong to (a re-applied job of the same name is another run).
RUN_ANNOTATION = "lora-operator.dev/run"
MAX_MESSAGE = 600
# The contract's exit 77 (EX_NOPERM): the store refused the trainer permanently (no such bucket,
# bad credentials). Like every 64-78 code but 75 it is not retried; it gets a reason of its own.
EXIT_STORAGE_REJECTED = EXIT_NOPERM


class Reason:
    """Every reason the operator reports, in one place (CamelCase, as Kubernetes uses them)."""

    # Disruptions that the kubelet/scheduler/controllers mark on the pod (condition DisruptionTarget).
    DISRUPTION_REASONS = frozenset({
        "PreemptionByScheduler", "PreemptionByKubeScheduler", "DeletionByTaintManager",
        "EvictionByEvictionAPI", "DeletionByPodGC", "TerminationByKubelet",
    })
    # pod.status.reason values that mean the node went away or evicted the pod.
    NODE_REASONS = frozenset({
        "Shutdown", "NodeShutdown", "Terminated", "Evicted", "NodeLost", "UnexpectedAdmissionError",
        "NodeAffinity", "OutOfcpu", "OutOfmemory", "OutOfnvidia.com/gpu", "Preempting",
    })
    # Attempt outcomes.
    SUCCEEDED = "Succeeded"
    PREEMPTED = "Preempted"  # the trainer exited 75 after a SIGTERM checkpoint
    OOM_KILLED = "OOMKilled"
    ERROR = "Error"  # exit code outside every known range
    POD_FAILED = "PodFailed"  # Failed without a container exit code
    POD_DELETED = "PodDeleted"  # finished while being deleted by someone
    POD_VANISHED = "PodVanished"
    NODE_LOST = "NodeLost"  # stuck Terminating on a NotReady node: force-deleted
    # Stuck pods.
    UNSCHEDULABLE = "Unschedulable"
    IMAGE_PULL = "ImagePullBackOff"
    ERR_IMAGE_PULL = "ErrImagePull"
    INVALID_IMAGE = "InvalidImageName"
    IMAGE_NEVER_PULL = "ErrImageNeverPull"
    CONFIG_ERROR = "CreateContainerConfigError"
    CREATE_ERROR = "CreateContainerError"
    # Job-level reasons.
    INVALID_SPEC = "InvalidSpec"
    POD_REJECTED = "PodRejected"
    BACKOFF_LIMIT = "BackoffLimitExceeded"
    PREEMPTION_LIMIT = "PreemptionLimitExceeded"
    STARTING = "AttemptStarted"
    RUNNING = "Running"
    WAITING = "Waiting"
    BACKOFF = "BackingOff"
    SUSPENDED = "Suspended"
    SUSPENDING = "Suspending"
    RESUMED = "Resumed"
    CHECKPOINT = "CheckpointCommitted"
    COMPLETED = "Completed"
    FAILED = "Failed"
    STALE_POD = "StalePod"
    GROUP_ENDED = "GroupEnded"  # a group attempt ended with one pod: its other pods are stopped
    STORAGE_REJECTED = "StorageRejected"  # exit 77
    OUT_OF_MEMORY = "OutOfMemory"  # exit 71: a training step ran out of GPU or host memory
    # The API server refused the job's status (422): a short one was written instead.
    STATUS_REJECTED = "StatusRejected"
    STATUS_ACCEPTED = "StatusAccepted"
    QUEUED = "Queued"  # held by a scheduling gate (Kueue's admission): Pending, never Stalled


# Reasons and messages of the permanent exit codes that have one of their own (others: ExitCode<n>).
PERMANENT_EXITS: dict[int, tuple[str, str]] = {
    EXIT_STORAGE_REJECTED: (
        Reason.STORAGE_REJECTED,
        "the object store refused the trainer's requests (no such bucket, or credentials it does not accept); "
        "check spec.output.uri, spec.baseModel.uri, spec.dataset.uri, spec.storage.endpoint and the keys in "
        "spec.storage.credentialsSecret",
    ),
    # Not retried: the same settings run out of memory again at the same step. The trainer's own
    # message (with the values it used) wins; this one is for a pod that left none.
    EXIT_OOM: (
        Reason.OUT_OF_MEMORY,
        "a training step ran out of memory; lower spec.training.batchSize (raising "
        "spec.training.gradientAccumulationSteps keeps the effective batch), spec.training.resolution or "
        "spec.lora.rank, or set spec.training.gradientCheckpointing",
    ),
}


class Result(StrEnum):
    """How an attempt ended, which decides which budget it spends."""

    SUCCEEDED = "Succeeded"
    PREEMPTED = "Preempted"  # next attempt, no failure counted
    FAILED = "Failed"  # retried with backoff against backoffLimit
    PERMANENT = "Permanent"  # a user error; retrying cannot help
    RESCHEDULED = "Rescheduled"  # moved to another pool before it ran (placement): no budget spent


@dataclass(frozen=True)
class Outcome:
    """A finished attempt: the result, a reason constant, and the trainer's words if it left any."""

    result: Result
    reason: str
    message: str = ""
    exit_code: int | None = None
    step: int | None = None
    checkpoint: str | None = None


@dataclass(frozen=True)
class Stuck:
    """A pod that is not making progress; `fatal` when waiting can never help."""

    reason: str
    message: str
    fatal: bool = False


# --- predicates -------------------------------------------------------------------------------

def phase(pod: Mapping[str, Any]) -> str:
    """The pod's phase, Pending when the kubelet has not said yet."""
    return (pod.get("status") or {}).get("phase") or "Pending"


def is_finished(pod: Mapping[str, Any]) -> bool:
    """Whether the pod's containers will never run again (restartPolicy Never)."""
    return phase(pod) in ("Succeeded", "Failed")


def is_live(pod: Mapping[str, Any]) -> bool:
    """Whether the pod may still run the trainer (and write to the output)."""
    return not is_finished(pod)


def is_terminating(pod: Mapping[str, Any]) -> bool:
    """Whether someone asked to delete the pod."""
    return bool((pod.get("metadata") or {}).get("deletionTimestamp"))


def is_owned_by(pod: Mapping[str, Any], uid: str | None) -> bool:
    """Whether the pod belongs to the job with this uid. A pod left by a deleted job of the same
    name (the garbage collector has not removed it yet) carries the old uid and is not ours."""
    meta = pod.get("metadata") or {}
    run = (meta.get("annotations") or {}).get(RUN_ANNOTATION)
    if uid and run:
        return bool(run == uid)
    refs = [r for r in meta.get("ownerReferences") or [] if r.get("controller")]
    return not uid or not refs or any(r.get("uid") == uid for r in refs)


def attempt_of(pod: Mapping[str, Any]) -> int:
    """The attempt number from the pod's label; 0 when it is missing or garbled."""
    value = ((pod.get("metadata") or {}).get("labels") or {}).get(ATTEMPT_LABEL, "")
    return int(value) if str(value).isdigit() else 0


def parse_time(value: str | None) -> datetime | None:
    """An RFC 3339 timestamp as an aware datetime, None when absent or garbled."""
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def _condition(pod: Mapping[str, Any], ctype: str) -> Mapping[str, Any] | None:
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if cond.get("type") == ctype:
            return cond
    return None


def _trainer_status(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    for cs in statuses:
        if cs.get("name") == TRAINER_CONTAINER:
            return cs
    return statuses[0] if statuses else {}


def _terminated(pod: Mapping[str, Any]) -> Mapping[str, Any] | None:
    cs = _trainer_status(pod)
    return (cs.get("state") or {}).get("terminated") or (cs.get("lastState") or {}).get("terminated")


def disruption_reason(pod: Mapping[str, Any]) -> str | None:
    """The DisruptionTarget reason when the cluster marked the pod for disruption."""
    cond = _condition(pod, "DisruptionTarget")
    if cond and cond.get("status") == "True":
        return cond.get("reason") or "DisruptionTarget"
    return None


def _shorten(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 1] + "…"


def termination_message(pod: Mapping[str, Any]) -> tuple[str, str | None, int | None, str | None]:
    """(message, reason, step, checkpoint) from the trainer's JSON termination message or log tail."""
    terminated = _terminated(pod) or {}
    raw = (terminated.get("message") or "").strip()
    if not raw:
        return "", None, None, None
    try:
        data = json.loads(raw)
    except ValueError:
        data = None
    if isinstance(data, dict) and "reason" in data:
        step = data.get("step")
        return (
            _shorten(str(data.get("message") or "")),
            clean_reason(data["reason"]),
            step if isinstance(step, int) else None,
            data.get("checkpoint") if isinstance(data.get("checkpoint"), str) else None,
        )
    # FallbackToLogsOnError: the log tail; its last line usually says what went wrong.
    lines = [line for line in raw.splitlines() if line.strip()]
    return _shorten(lines[-1] if lines else raw), None, None, None


# --- classification ---------------------------------------------------------------------------

def classify_finished(pod: Mapping[str, Any]) -> Outcome | None:
    """The outcome of a finished pod, None while it may still run."""
    if not is_finished(pod):
        return None
    status = pod.get("status") or {}
    terminated = _terminated(pod)
    exit_code = terminated.get("exitCode") if terminated else None
    message, trainer_reason, step, checkpoint = termination_message(pod)

    def out(result: Result, reason: str, text: str) -> Outcome:
        return Outcome(result, clean_reason(reason), _shorten(text), exit_code, step, checkpoint)

    if phase(pod) == "Succeeded" or exit_code == EXIT_OK:
        return out(Result.SUCCEEDED, Reason.SUCCEEDED, message or "training finished; final weights committed")
    disruption = disruption_reason(pod)
    if disruption:
        return out(Result.PREEMPTED, disruption, _condition(pod, "DisruptionTarget").get("message") or message
                   or f"pod disrupted ({disruption})")
    if status.get("reason") in Reason.NODE_REASONS:
        return out(Result.PREEMPTED, status["reason"], status.get("message") or f"pod {status['reason']}")
    if terminated and terminated.get("reason") == "OOMKilled":
        return out(Result.FAILED, Reason.OOM_KILLED,
                   "the trainer ran out of memory; raise spec.resources.memory or lower spec.training.batchSize")
    if exit_code == EXIT_PREEMPTED:
        return out(Result.PREEMPTED, trainer_reason or Reason.PREEMPTED,
                   message or "the trainer stopped on SIGTERM after committing a checkpoint")
    if exit_code is not None and 64 <= exit_code <= 78:
        reason, text = PERMANENT_EXITS.get(
            exit_code, (f"ExitCode{exit_code}", f"the trainer exited {exit_code} (a configuration or input error)"))
        return out(Result.PERMANENT, trainer_reason or reason, message or text)
    if is_terminating(pod):
        return out(Result.PREEMPTED, Reason.POD_DELETED, f"the pod was deleted while running (exit {exit_code})")
    if exit_code is not None:
        return out(Result.FAILED, trainer_reason or Reason.ERROR, message or f"the trainer exited {exit_code}")
    return out(Result.FAILED, status.get("reason") or Reason.POD_FAILED,
               status.get("message") or "the pod failed before the trainer ran")


def vanished(suspended: bool = False) -> Outcome:
    """The outcome of an attempt whose pod disappeared while it could still run."""
    text = "the pod was deleted" + (" (suspended)" if suspended else "; resuming from the latest checkpoint")
    return Outcome(Result.PREEMPTED, Reason.POD_VANISHED, text)


def force_deleted(pod: Mapping[str, Any], node: str) -> Outcome:
    """The outcome of a pod we force-delete because its node stopped answering."""
    reason = disruption_reason(pod) or Reason.NODE_LOST
    return Outcome(Result.PREEMPTED, reason, f"node {node} is NotReady; the pod stuck Terminating was force-deleted")


def stuck_terminating(pod: Mapping[str, Any], now: datetime, grace: float, node_ready: bool | None) -> bool:
    """Whether a Terminating pod outlived its grace period plus `grace` seconds on a NotReady node."""
    meta = pod.get("metadata") or {}
    deleting = parse_time(meta.get("deletionTimestamp"))
    if deleting is None or is_finished(pod) or node_ready is True:
        return False
    # deletionTimestamp already includes the pod's own grace period.
    return (now - deleting).total_seconds() >= grace


_WAITING_FATAL = {Reason.INVALID_IMAGE, Reason.IMAGE_NEVER_PULL}
_WAITING_STUCK = {Reason.ERR_IMAGE_PULL, Reason.IMAGE_PULL, Reason.CONFIG_ERROR, Reason.CREATE_ERROR}


def stuck(pod: Mapping[str, Any], now: datetime, deadline: float, since: datetime | None = None) -> Stuck | None:
    """Why a not-yet-running pod is stuck; None if it is fine or not past `deadline` seconds yet
    (counted from `since`, its admission by a queue, else from its creation)."""
    if phase(pod) != "Pending" or is_terminating(pod) or is_queued(pod):
        return None  # a queued pod waits for its admission, not for a fix
    waiting = (_trainer_status(pod).get("state") or {}).get("waiting") or {}
    wreason = waiting.get("reason", "")
    if wreason in _WAITING_FATAL:
        return Stuck(wreason, _shorten(waiting.get("message") or f"image cannot be pulled ({wreason}); fix spec.image"), True)
    created = since or parse_time((pod.get("metadata") or {}).get("creationTimestamp"))
    if created is not None and (now - created).total_seconds() < deadline:
        return None
    if wreason in _WAITING_STUCK:
        hint = {
            Reason.CONFIG_ERROR: "check that spec.storage.credentialsSecret exists with the configured keys",
            Reason.CREATE_ERROR: "check the pod's events",
        }.get(wreason, "check spec.image and the registry's pull secret")
        text = waiting.get("message") or wreason
        return Stuck(wreason, _shorten(f"{text}; {hint}"))
    sched = _condition(pod, "PodScheduled")
    if sched and sched.get("status") == "False" and sched.get("reason") == Reason.UNSCHEDULABLE:
        text = sched.get("message") or "no node fits the pod"
        return Stuck(Reason.UNSCHEDULABLE, _shorten(
            f"{text}; check spec.resources (gpus, memory, nodeSelector, tolerations) against the cluster's nodes"))
    return None


def next_backoff(failures: int, base: float, cap: float) -> float:
    """Seconds before retry number `failures` (1-based): base * 2^(failures-1), at most cap."""
    return float(min(cap, base * (2 ** max(0, failures - 1))))
