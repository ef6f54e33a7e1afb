"""The job's status (pure): its schema as pydantic models, conditions, and what goes into it.

Conditions follow Kubernetes conventions so Argo CD, Flux and `kubectl wait` read them:
`Ready` (True once the LoRA is committed), `Reconciling` (work in progress), `Stalled` (needs a
human), plus `Preempted`, `CheckpointCommitted`, `Suspended` and `StatusRejected`.

Bounded status: strings in status come from the trainer (termination message), the bucket
(progress.json, latest.json) and the kubelet, none of which we control. The schema below gives
every string a maxLength (the ones of metav1.Condition: reason 1024, message 32768), and
`bound_status` cleans and cuts a whole status to fit it right before it is written: reasons
become CamelCase (`^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$`, as metav1.Condition requires),
messages lose control characters, URIs are normalised (no `//`, `.` or `..` segments). Lengths
are counted in UTF-8 bytes, the stricter reading of maxLength, so a cut string always fits.
If the API still refuses a status (422), `rejected_status` is the small status written instead,
with the condition `StatusRejected` saying why.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from functools import lru_cache
from typing import Annotated, Any, Literal

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
from lora_trainer.determinism import guarantee

CAUSAL_LM = "causal-lm"
# The causal-lm family's files (lora_trainer.tasks.causal_lm, which imports torch: the operator image
# has none); PEFT_ADAPTER_WEIGHTS is peft's SAFETENSORS_WEIGHTS_NAME. A unit test keeps them in step.
PEFT_ADAPTER_WEIGHTS = "adapter_model.safetensors"
MERGED_DIR = "merged"

Phase = Literal["Pending", "Running", "Recovering", "Suspended", "Succeeded", "Failed"]
TERMINAL_PHASES = ("Succeeded", "Failed")

READY = "Ready"
RECONCILING = "Reconciling"
STALLED = "Stalled"
PREEMPTED = "Preempted"
CHECKPOINTED = "CheckpointCommitted"
SUSPENDED = "Suspended"
STATUS_REJECTED = "StatusRejected"

# Limits of the status schema (metav1.Condition's for reason and message).
MAX_REASON = 1024
MAX_MESSAGE = 32768
MAX_TYPE = 316
MAX_URI = 2048  # an output URI (1024 in spec) plus the file names under it
MAX_NAME = 253
MAX_TIME = 64
MAX_REJECTED_MESSAGE = 1024  # what a refused status write keeps of the API's complaint
ELLIPSIS = "…"
UNKNOWN_REASON = "Unknown"
REASON_PATTERN = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"  # metav1.Condition's


class _Status(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


class Condition(_Status):
    """A condition in the Kubernetes style."""

    type: str = Field(max_length=MAX_TYPE, description="Condition type, e.g. Ready, Stalled, Preempted.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(
        min_length=1, max_length=MAX_REASON, pattern=REASON_PATTERN,
        description="CamelCase reason for the last transition.",
    )
    message: str = Field("", max_length=MAX_MESSAGE, description="Human-readable details.")
    last_transition_time: str = Field(max_length=MAX_TIME, description="When the status last changed (RFC 3339).")
    observed_generation: int | None = Field(None, ge=0, description="metadata.generation this condition was set for.")


class ProgressStatus(_Status):
    """The trainer's heartbeat, mirrored from progress.json under the output URI."""

    step: int = Field(0, ge=0, description="Optimizer steps done.")
    total_steps: int = Field(0, ge=0, description="Optimizer steps in the whole run.")
    percent: float = Field(0, ge=0, le=100, description="step / totalSteps in percent.")
    loss: float | None = Field(None, description="Recent training loss.")
    eta_seconds: float | None = Field(None, ge=0, description="Estimated seconds until the run ends.")
    updated: str | None = Field(None, max_length=MAX_TIME, description="When the trainer wrote the heartbeat (RFC 3339).")


class CheckpointStatus(_Status):
    """The newest committed checkpoint (checkpoints/latest.json)."""

    step: int = Field(ge=0, description="Step of the checkpoint.")
    uri: str = Field(max_length=MAX_URI, description="Where the checkpoint's state lives.")
    time: str | None = Field(None, max_length=MAX_TIME, description="When it was committed (RFC 3339).")


class OutputStatus(_Status):
    """Where the results are (or will be)."""

    weights: str = Field(
        max_length=MAX_URI, description="Final LoRA: diffusers format (text-to-image); the PEFT adapter's weights "
        "(causal-lm).",
    )
    kohya_weights: str | None = Field(None, max_length=MAX_URI, description="Final LoRA in kohya/WebUI format (text-to-image).")
    adapter: str | None = Field(
        None, max_length=MAX_URI, description="causal-lm: the PEFT adapter folder (adapter_config.json, "
        "adapter_model.safetensors) for PeftModel.from_pretrained and vLLM's LoRA support.",
    )
    merged: str | None = Field(
        None, max_length=MAX_URI, description="causal-lm with spec.output.merge: the base with the LoRA merged in "
        "(a transformers folder, safetensors).",
    )
    checkpoints: str = Field(max_length=MAX_URI, description="Folder of resumable checkpoints and intermediate LoRAs.")
    logs: str = Field(max_length=MAX_URI, description="TensorBoard events and train.log.")


class DeterminismStatus(_Status):
    """How exactly a resumed run repeats an uninterrupted one (from spec.training.determinism and the device)."""

    mode: Literal["exact", "fast"] = Field(description="spec.training.determinism.")
    bitwise: bool = Field(description="Whether a resumed run is bitwise equal to an uninterrupted one.")
    message: str = Field("", max_length=MAX_MESSAGE, description="The guarantee in words.")


class AttemptStatus(_Status):
    """How the last finished attempt ended."""

    attempt: int = Field(ge=0, description="Attempt number.")
    result: Literal["Succeeded", "Preempted", "Failed", "Permanent", "Rescheduled"] = Field(
        description="Which budget it spent (Rescheduled: none, the pod was moved to another pool).")
    reason: str = Field(max_length=MAX_REASON, description="Why it ended, e.g. PreemptionByScheduler, OOMKilled.")
    message: str = Field("", max_length=MAX_MESSAGE, description="The trainer's or the cluster's words.")
    exit_code: int | None = Field(None, description="The trainer's exit code, when it exited.")
    finished_at: str = Field(max_length=MAX_TIME, description="When the operator saw it end (RFC 3339).")


class AdmissionStatus(_Status):
    """When the current attempt's pod was queued and admitted (scheduling gates; lora_operator.queueing)."""

    attempt: int = Field(ge=0, description="Attempt whose pod this is about.")
    queued_at: str = Field(max_length=MAX_TIME, description="When the operator first saw the pod held by a scheduling gate.")
    admitted_at: str | None = Field(
        None, max_length=MAX_TIME, description="When it first saw the gates gone; the pending deadline starts here."
    )


class PlacementStatus(_Status):
    """Which pool the current or next attempt runs in (spec.spot.fallback; lora_operator.placement)."""

    pool: Literal["Spot", "OnDemand"] = Field(description="Spot (spec.resources) or OnDemand (spec.spot.fallback).")
    reason: str = Field(max_length=MAX_REASON, description="Why, e.g. SpotPreemptions, SpotUnschedulable, ReturnedToSpot.")
    message: str = Field("", max_length=MAX_MESSAGE, description="Why, in words.")
    recent_preemptions: list[Annotated[str, Field(max_length=MAX_TIME)]] = Field(
        default_factory=list, max_length=100, description="Times of the spot preemptions since the last switch to spot.",
    )


class SettledUsage(_Status):
    """GPU-seconds of finished attempts, settled once each."""

    attempt: int = Field(0, ge=0, description="The last attempt settled.")
    spot_gpu_seconds: float = Field(0, ge=0, description="GPU-seconds of finished attempts on spot.")
    on_demand_gpu_seconds: float = Field(0, ge=0, description="GPU-seconds of finished attempts on on-demand.")


class UsageStatus(_Status):
    """GPU time by pool: trainer run time (start to finish) times GPUs, the running attempt included."""

    spot_gpu_seconds: float = Field(0, ge=0, description="GPU-seconds on the spot pool.")
    on_demand_gpu_seconds: float = Field(0, ge=0, description="GPU-seconds on the on-demand pool.")
    settled: SettledUsage | None = Field(None, description="Finished attempts only (bookkeeping).")


class CostStatus(_Status):
    """Estimated cost from the operator's per-GPU-hour prices (chart values `prices`)."""

    currency: str = Field(max_length=8, description="Currency of the prices.")
    spot: float = Field(description="Cost of the spot GPU-seconds.")
    on_demand: float = Field(description="Cost of the on-demand GPU-seconds.")
    total: float = Field(description="spot + onDemand.")
    all_on_demand: float = Field(description="What all the GPU-seconds would have cost on on-demand.")
    saved: float = Field(description="allOnDemand - total: what running on spot saved.")


class JobStatus(_Status):
    """status of a LoRATrainingJob (written by the operator only)."""

    phase: Phase | None = Field(None, description="Pending, Running, Recovering, Suspended, Succeeded or Failed.")
    reason: str | None = Field(None, max_length=MAX_REASON, description="CamelCase reason for the phase.")
    message: str | None = Field(None, max_length=MAX_MESSAGE, description="Human-readable details of the phase.")
    observed_generation: int | None = Field(None, ge=0, description="metadata.generation the status was written for.")
    attempt: int = Field(0, ge=0, description="Current attempt (pod <job>-a<attempt>); 0 before the first.")
    pod_name: str | None = Field(None, max_length=MAX_NAME, description="Pod of the current attempt.")
    preemptions: int = Field(0, ge=0, description="Attempts ended by preemption (spot.maxPreemptions budget).")
    failures: int = Field(0, ge=0, description="Attempts that failed (failurePolicy.backoffLimit budget).")
    last_attempt: AttemptStatus | None = Field(None, description="How the last finished attempt ended.")
    next_attempt_time: str | None = Field(None, max_length=MAX_TIME, description="Earliest start of the next attempt (backoff).")
    progress: ProgressStatus | None = Field(None, description="Training progress from progress.json.")
    latest_checkpoint: CheckpointStatus | None = Field(None, description="Newest committed checkpoint.")
    outputs: OutputStatus | None = Field(None, description="Output URIs.")
    determinism: DeterminismStatus | None = Field(
        None, description="The run's determinism: exact (bitwise resume) or fast (exact only up to kernel "
        "nondeterminism on GPUs).",
    )
    admission: AdmissionStatus | None = Field(None, description="Kueue (or any scheduling gate) admission of the current pod.")
    placement: PlacementStatus | None = Field(None, description="Spot or on-demand (with spec.spot.fallback).")
    usage: UsageStatus | None = Field(None, description="GPU-seconds on spot and on-demand (with spec.spot.fallback).")
    cost: CostStatus | None = Field(None, description="Estimated cost and what spot saved (with prices configured).")
    start_time: str | None = Field(None, max_length=MAX_TIME, description="When the first attempt was started (RFC 3339).")
    completion_time: str | None = Field(None, max_length=MAX_TIME, description="When the job succeeded or failed (RFC 3339).")
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


def outputs(output_uri: str, task: str = "text-to-image", merge: bool = False) -> dict[str, str]:
    """The output URIs the job's status lists; the task decides which files the weights are."""
    folders = {"checkpoints": join_uri(output_uri, CHECKPOINTS_DIR) + "/", "logs": join_uri(output_uri, LOGS_DIR) + "/"}
    if task == CAUSAL_LM:
        out = {"weights": join_uri(output_uri, PEFT_ADAPTER_WEIGHTS), "adapter": output_uri.rstrip("/") + "/"}
        return {**out, **({"merged": join_uri(output_uri, MERGED_DIR) + "/"} if merge else {}), **folders}
    return {
        "weights": join_uri(output_uri, FINAL_WEIGHTS),
        "kohyaWeights": join_uri(output_uri, FINAL_WEIGHTS_KOHYA),
        **folders,
    }


def determinism_status(mode: str, gpus: int) -> dict[str, Any]:
    """status.determinism for a job of this mode on GPUs (gpus > 0) or the CPU (pure)."""
    text = guarantee(mode, "cuda" if gpus > 0 else "cpu")  # type: ignore[arg-type]
    return {"mode": mode, "bitwise": text.startswith("bitwise"), "message": text}


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
    return {"step": latest.step, "uri": clean_uri(join_uri(output_uri, latest.path)), "time": latest.time}


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


# --- bounding what goes into status -----------------------------------------------------------

_REASON_OK = re.compile(REASON_PATTERN)
_REASON_WORD = re.compile(r"[A-Za-z0-9]+")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)([^/]*)(.*)$", re.DOTALL)


def cut(text: str, limit: int) -> str:
    """`text` in at most `limit` UTF-8 bytes; a cut one ends with an ellipsis."""
    data = text.encode("utf-8", "replace")
    if len(data) <= limit:
        return text
    room = max(0, limit - len(ELLIPSIS.encode()))
    return data[:room].decode("utf-8", "ignore") + ELLIPSIS


def clean_reason(text: Any, fallback: str = UNKNOWN_REASON, limit: int = MAX_REASON) -> str:
    """A reason as metav1.Condition accepts it: CamelCase of the words in `text`, at most `limit`
    bytes (`OOM killed` → `OOMKilled`, `no such bucket!` → `NoSuchBucket`); `fallback` if none."""
    text = "" if text is None else str(text)
    if _REASON_OK.match(text):
        return text[:limit].rstrip(",:")
    out = "".join(w[:1].upper() + w[1:] for w in _REASON_WORD.findall(text))
    if out[:1].isdigit():
        out = "Reason" + out
    out = out[:limit].rstrip(",:")
    return out or fallback


def clean_message(text: Any, limit: int = MAX_MESSAGE) -> str:
    """A message without control characters (newlines and tabs stay), at most `limit` bytes."""
    text = "" if text is None else str(text)
    text = _CONTROL.sub(" ", text).encode("utf-8", "replace").decode("utf-8")
    return cut(text, limit)


def normalise_path(path: str) -> str:
    """A `/`-separated path without empty, `.` or `..` segments (`..` never climbs above the
    start); a trailing slash (a folder) is kept."""
    parts: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if parts:
                parts.pop()
            continue
        parts.append(part)
    out = "/".join(parts)
    if path.startswith("/"):
        out = "/" + out
    if path.endswith("/") and out and not out.endswith("/"):
        out += "/"
    return out


def clean_uri(uri: Any, limit: int = MAX_URI) -> str:
    """A URI as status shows it: `s3://b/a/./x//y/../z` → `s3://b/a/x/z`, at most `limit` bytes."""
    return _clean_uri("" if uri is None else str(uri), limit)


@lru_cache(maxsize=4096)  # every status write cleans the job's same few URIs again
def _clean_uri(uri: str, limit: int) -> str:
    text = re.sub(r"\s", " ", _CONTROL.sub(" ", uri)).strip()
    match = _URI.match(text)
    if match:
        scheme, host, path = match.groups()
        text = scheme + host + ("/" + normalise_path(path).lstrip("/") if path else "")
        if path.endswith("/") and not text.endswith("/"):
            text += "/"
    else:
        text = normalise_path(text)
    return cut(text, limit)


MAX_COUNT = 2**53  # integers JSON carries exactly; a step past it is garbage


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_COUNT


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value \
        and value not in (float("inf"), float("-inf"))


def _bound_condition(cond: Mapping[str, Any], message_limit: int = MAX_MESSAGE) -> dict[str, Any]:
    out = dict(cond)
    out["type"] = cut(str(out.get("type") or UNKNOWN_REASON), MAX_TYPE)
    out["reason"] = clean_reason(out.get("reason"))
    out["message"] = clean_message(out.get("message"), message_limit)
    if isinstance(out.get("lastTransitionTime"), str):
        out["lastTransitionTime"] = cut(out["lastTransitionTime"], MAX_TIME)
    return out


def bound_status(status: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a job's status in which every string fits the schema (pure; see module doc)."""
    s = dict(status)
    if s.get("reason") is not None:
        s["reason"] = clean_reason(s["reason"])
    if s.get("message") is not None:
        s["message"] = clean_message(s["message"])
    if isinstance(s.get("podName"), str):
        s["podName"] = cut(s["podName"], MAX_NAME)
    for key in ("nextAttemptTime", "startTime", "completionTime"):
        if isinstance(s.get(key), str):
            s[key] = cut(clean_message(s[key]), MAX_TIME)
    if isinstance(s.get("lastAttempt"), Mapping):
        last = dict(s["lastAttempt"])
        last["reason"] = clean_reason(last.get("reason"))
        last["message"] = clean_message(last.get("message"))
        if isinstance(last.get("finishedAt"), str):
            last["finishedAt"] = cut(last["finishedAt"], MAX_TIME)
        s["lastAttempt"] = last
    if isinstance(s.get("progress"), Mapping):
        prog = {k: v for k, v in s["progress"].items() if k not in ("loss", "etaSeconds") or _finite(v)}
        for key in ("step", "totalSteps"):
            if key in prog and not _count(prog[key]):
                prog[key] = 0
        if not (_finite(prog.get("percent")) and 0 <= prog["percent"] <= 100):
            prog["percent"] = 0.0
        if isinstance(prog.get("updated"), str):
            prog["updated"] = cut(clean_message(prog["updated"]), MAX_TIME)
        s["progress"] = prog
    if isinstance(s.get("latestCheckpoint"), Mapping) and not _count(s["latestCheckpoint"].get("step")):
        del s["latestCheckpoint"]  # a latest.json with a negative or absurd step says nothing
    if isinstance(s.get("latestCheckpoint"), Mapping):
        ckpt = dict(s["latestCheckpoint"])
        ckpt["uri"] = clean_uri(ckpt.get("uri") or "")
        if isinstance(ckpt.get("time"), str):
            ckpt["time"] = cut(clean_message(ckpt["time"]), MAX_TIME)
        s["latestCheckpoint"] = ckpt
    if isinstance(s.get("outputs"), Mapping):
        s["outputs"] = {k: clean_uri(v) if isinstance(v, str) else v for k, v in s["outputs"].items()}
    if isinstance(s.get("conditions"), list):
        s["conditions"] = [_bound_condition(c) for c in s["conditions"] if isinstance(c, Mapping)]
    return s


# The bookkeeping that keeps a job's state machine moving (see reconcile): what a refused status
# write still records, so the decision (and its events) is not repeated on every pass.
_KEPT_WHEN_REJECTED = ("phase", "observedGeneration", "attempt", "podName", "preemptions", "failures",
                       "nextAttemptTime", "startTime", "completionTime", "progress", "admission", "placement", "usage")


def rejected_status(
    status: Mapping[str, Any],
    stored: Mapping[str, Any],
    problem: str,
    now: datetime,
    generation: int | None,
) -> dict[str, Any]:
    """The small status written when the API refused `status`: the bookkeeping fields, short
    reasons and messages, no mirrored progress, and the condition StatusRejected naming `problem`.
    `stored` is the status on the server (it keeps StatusRejected's lastTransitionTime)."""
    out: dict[str, Any] = {k: status[k] for k in _KEPT_WHEN_REJECTED if k in status}
    out["reason"] = clean_reason(status.get("reason"), fallback=STATUS_REJECTED)
    out["message"] = clean_message(status.get("message"), MAX_REJECTED_MESSAGE)
    last = status.get("lastAttempt")
    if isinstance(last, Mapping):
        out["lastAttempt"] = {k: last[k] for k in ("attempt", "result", "reason", "finishedAt", "exitCode") if k in last}
        out["lastAttempt"]["message"] = clean_message(last.get("message"), MAX_REJECTED_MESSAGE)
    ckpt = status.get("latestCheckpoint")
    if isinstance(ckpt, Mapping):  # kept: a checkpoint event is posted when its step changes
        out["latestCheckpoint"] = {**ckpt, "uri": clean_uri(ckpt.get("uri"), MAX_REJECTED_MESSAGE)}
    before = get_condition(stored.get("conditions") or [], STATUS_REJECTED)
    conditions = [_bound_condition(c, MAX_REJECTED_MESSAGE) for c in status.get("conditions") or []
                  if isinstance(c, Mapping) and c.get("type") != STATUS_REJECTED]
    if before:
        conditions.append(dict(before))
    text = clean_message(f"the API server refused the job's status, so only this short one was written: {problem}",
                         MAX_REJECTED_MESSAGE)
    out["conditions"] = set_condition(conditions, STATUS_REJECTED, True, STATUS_REJECTED, text, now, generation)
    return bound_status(out)
