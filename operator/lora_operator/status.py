"""The job's status (pure): its schema as pydantic models, conditions, and what goes into it.

Conditions follow Kubernetes conventions so Argo CD, Flux and `kubectl wait` read them:
`Ready` (True once the LoRA is committed), `Reconciling` (work in progress), `Stalled` (needs a
human), plus `Preempted`, `CheckpointCommitted` and `Suspended`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from lora_trainer.contract import (
    CHECKPOINTS_DIR,
    FINAL_WEIGHTS,
    FINAL_WEIGHTS_KOHYA,
    LOGS_DIR,
    LatestPointer,
    Progress,
)

Phase = Literal["Pending", "Running", "Recovering", "Suspended", "Succeeded", "Failed"]
TERMINAL_PHASES = ("Succeeded", "Failed")

READY = "Ready"
RECONCILING = "Reconciling"
STALLED = "Stalled"
PREEMPTED = "Preempted"
CHECKPOINTED = "CheckpointCommitted"
SUSPENDED = "Suspended"


class _Status(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


class Condition(_Status):
    """A condition in the Kubernetes style."""

    type: str = Field(max_length=316, description="Condition type, e.g. Ready, Stalled, Preempted.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field("", max_length=1024, description="CamelCase reason for the last transition.")
    message: str = Field("", max_length=32768, description="Human-readable details.")
    last_transition_time: str = Field(description="When the status last changed (RFC 3339).")
    observed_generation: int | None = Field(None, ge=0, description="metadata.generation this condition was set for.")


class ProgressStatus(_Status):
    """The trainer's heartbeat, mirrored from progress.json under the output URI."""

    step: int = Field(0, ge=0, description="Optimizer steps done.")
    total_steps: int = Field(0, ge=0, description="Optimizer steps in the whole run.")
    percent: float = Field(0, ge=0, le=100, description="step / totalSteps in percent.")
    loss: float | None = Field(None, description="Recent training loss.")
    eta_seconds: float | None = Field(None, ge=0, description="Estimated seconds until the run ends.")
    updated: str | None = Field(None, description="When the trainer wrote the heartbeat (RFC 3339).")


class CheckpointStatus(_Status):
    """The newest committed checkpoint (checkpoints/latest.json)."""

    step: int = Field(ge=0, description="Step of the checkpoint.")
    uri: str = Field(description="Where the checkpoint's state lives.")
    time: str | None = Field(None, description="When it was committed (RFC 3339).")


class OutputStatus(_Status):
    """Where the results are (or will be)."""

    weights: str = Field(description="Final LoRA in diffusers format.")
    kohya_weights: str = Field(description="Final LoRA in kohya/WebUI format.")
    checkpoints: str = Field(description="Folder of resumable checkpoints and intermediate LoRAs.")
    logs: str = Field(description="TensorBoard events and train.log.")


class AttemptStatus(_Status):
    """How the last finished attempt ended."""

    attempt: int = Field(ge=0, description="Attempt number.")
    result: Literal["Succeeded", "Preempted", "Failed", "Permanent"] = Field(description="Which budget it spent.")
    reason: str = Field(description="Why it ended, e.g. PreemptionByScheduler, OOMKilled.")
    message: str = Field("", description="The trainer's or the cluster's words.")
    exit_code: int | None = Field(None, description="The trainer's exit code, when it exited.")
    finished_at: str = Field(description="When the operator saw it end (RFC 3339).")


class JobStatus(_Status):
    """status of a LoRATrainingJob (written by the operator only)."""

    phase: Phase | None = Field(None, description="Pending, Running, Recovering, Suspended, Succeeded or Failed.")
    reason: str | None = Field(None, description="CamelCase reason for the phase.")
    message: str | None = Field(None, description="Human-readable details of the phase.")
    observed_generation: int | None = Field(None, ge=0, description="metadata.generation the status was written for.")
    attempt: int = Field(0, ge=0, description="Current attempt (pod <job>-a<attempt>); 0 before the first.")
    pod_name: str | None = Field(None, description="Pod of the current attempt.")
    preemptions: int = Field(0, ge=0, description="Attempts ended by preemption (spot.maxPreemptions budget).")
    failures: int = Field(0, ge=0, description="Attempts that failed (failurePolicy.backoffLimit budget).")
    last_attempt: AttemptStatus | None = Field(None, description="How the last finished attempt ended.")
    next_attempt_time: str | None = Field(None, description="Earliest start of the next attempt (backoff).")
    progress: ProgressStatus | None = Field(None, description="Training progress from progress.json.")
    latest_checkpoint: CheckpointStatus | None = Field(None, description="Newest committed checkpoint.")
    outputs: OutputStatus | None = Field(None, description="Output URIs.")
    start_time: str | None = Field(None, description="When the first attempt was started (RFC 3339).")
    completion_time: str | None = Field(None, description="When the job succeeded or failed (RFC 3339).")
    conditions: list[Condition] = Field(default_factory=list, description="Ready, Reconciling, Stalled and domain conditions.")


def rfc3339(when: datetime) -> str:
    """A datetime as Kubernetes writes timestamps (UTC, seconds)."""
    return when.astimezone(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def get_condition(conditions: Sequence[Mapping[str, Any]], ctype: str) -> Mapping[str, Any] | None:
    """The condition of this type, or None."""
    return next((c for c in conditions if c.get("type") == ctype), None)


def set_condition(
    conditions: Sequence[Mapping[str, Any]],
    ctype: str,
    status: bool | str,
    reason: str,
    message: str,
    now: datetime,
    generation: int | None,
) -> list[dict[str, Any]]:
    """A new conditions list with `ctype` set; lastTransitionTime changes only when status does."""
    value = ("True" if status else "False") if isinstance(status, bool) else status
    old = get_condition(conditions, ctype)
    since = old.get("lastTransitionTime") if old and old.get("status") == value else None
    new = {
        "type": ctype,
        "status": value,
        "reason": reason,
        "message": message,
        "lastTransitionTime": since or rfc3339(now),
        "observedGeneration": generation,
    }
    if generation is None:
        del new["observedGeneration"]
    out = [dict(c) for c in conditions if c.get("type") != ctype]
    out.append(new)
    order = {t: i for i, t in enumerate((READY, RECONCILING, STALLED, PREEMPTED, CHECKPOINTED, SUSPENDED))}
    return sorted(out, key=lambda c: order.get(c["type"], len(order)))


def join_uri(root: str, rel: str) -> str:
    """`rel` under the output URI, with exactly one slash between them."""
    return root.rstrip("/") + "/" + rel.lstrip("/")


def outputs(output_uri: str) -> dict[str, str]:
    """The output URIs the job's status lists."""
    return {
        "weights": join_uri(output_uri, FINAL_WEIGHTS),
        "kohyaWeights": join_uri(output_uri, FINAL_WEIGHTS_KOHYA),
        "checkpoints": join_uri(output_uri, CHECKPOINTS_DIR) + "/",
        "logs": join_uri(output_uri, LOGS_DIR) + "/",
    }


def progress_status(progress: Progress) -> dict[str, Any]:
    """status.progress from a progress.json heartbeat."""
    total = progress.total_steps
    out: dict[str, Any] = {
        "step": progress.step,
        "totalSteps": total,
        "percent": round(min(100.0, 100.0 * progress.step / total), 1) if total else 0.0,
        "updated": progress.updated,
    }
    if progress.loss is not None:
        out["loss"] = round(float(progress.loss), 6)
    if progress.eta_seconds is not None:
        out["etaSeconds"] = round(max(0.0, float(progress.eta_seconds)), 1)
    return out


def checkpoint_status(latest: LatestPointer, output_uri: str) -> dict[str, Any]:
    """status.latestCheckpoint from checkpoints/latest.json."""
    return {"step": latest.step, "uri": join_uri(output_uri, latest.path), "time": latest.time}


def merge_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """An RFC 7386 merge patch turning `old` into `new` (None deletes; lists are replaced)."""
    patch: dict[str, Any] = {}
    for key in old.keys() - new.keys():
        patch[key] = None
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, Mapping) and isinstance(before, Mapping):
            sub = merge_patch(before, value)
            if sub:
                patch[key] = sub
        elif value != before or key not in old:
            patch[key] = value
    return patch
