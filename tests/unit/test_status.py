"""Status helpers.

Behaviours tested:
- set_condition keeps lastTransitionTime when only reason/message change, moves it when the
  status flips, and stamps observedGeneration;
- progress.json and latest.json render into status.progress / status.latestCheckpoint;
- status.outputs names the task's files: diffusers + kohya weights (text-to-image), the PEFT adapter
  folder and its weights, and merged/ with output.merge (causal-lm);
- merge_patch produces the smallest RFC 7386 patch (None deletes, lists replaced);
- bounding (table-driven): reasons become metav1.Condition CamelCase of at most 1024 bytes,
  messages lose control characters and fit 32768 bytes, URIs are normalised; a status with a
  2000-character reason and a 40 KB checkpoint path fits the CRD's status schema once bounded;
- a refused status becomes a short one with StatusRejected, keeping the bookkeeping fields and
  the condition's lastTransitionTime across passes.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import pytest

from lora_operator.crd import build_crd
from lora_operator.emulator.schema import validate
from lora_operator.status import (
    MAX_MESSAGE,
    MAX_REASON,
    MERGED_DIR,
    PEFT_ADAPTER_WEIGHTS,
    REASON_PATTERN,
    STATUS_REJECTED,
    OutputStatus,
    bound_status,
    checkpoint_status,
    clean_message,
    clean_reason,
    clean_uri,
    cut,
    get_condition,
    merge_patch,
    outputs,
    progress_status,
    rejected_status,
    set_condition,
)
from lora_trainer.contract import LatestPointer, Progress
from tests.unit.builders import NOW


def test_set_condition_keeps_transition_time_on_message_change() -> None:
    first = set_condition([], "Ready", False, "Waiting", "a", NOW, 1)
    later = set_condition(first, "Ready", False, "Running", "b", NOW + timedelta(minutes=5), 2)
    cond = get_condition(later, "Ready")
    assert cond is not None
    assert cond["lastTransitionTime"] == "2025-01-01T12:00:00Z"
    assert (cond["reason"], cond["message"], cond["observedGeneration"]) == ("Running", "b", 2)


def test_set_condition_moves_transition_time_on_flip() -> None:
    first = set_condition([], "Ready", False, "Waiting", "a", NOW, 1)
    flipped = set_condition(first, "Ready", True, "Completed", "done", NOW + timedelta(minutes=5), 1)
    assert get_condition(flipped, "Ready")["lastTransitionTime"] == "2025-01-01T12:05:00Z"  # type: ignore[index]
    assert len(flipped) == 1


def test_conditions_are_ordered() -> None:
    conds = set_condition([], "Stalled", False, "r", "", NOW, 1)
    conds = set_condition(conds, "Ready", False, "r", "", NOW, 1)
    assert [c["type"] for c in conds] == ["Ready", "Stalled"]


def test_progress_and_checkpoint() -> None:
    p = Progress(step=30, total_steps=40, loss=0.1234567891, eta_seconds=12.34, updated="2025-01-01T11:59:00Z")
    assert progress_status(p) == {"step": 30, "totalSteps": 40, "percent": 75.0, "loss": 0.123457,
                                  "etaSeconds": 12.3, "updated": "2025-01-01T11:59:00Z"}
    assert progress_status(Progress(step=0, total_steps=0))["percent"] == 0.0
    latest = LatestPointer(step=20, attempt=2, path="checkpoints/step-000000020", time="2025-01-01T11:58:00Z")
    assert checkpoint_status(latest, "s3://b/out/") == {
        "step": 20, "uri": "s3://b/out/checkpoints/step-000000020", "time": "2025-01-01T11:58:00Z"}


def test_outputs() -> None:
    assert outputs("s3://b/out") == {
        "weights": "s3://b/out/pytorch_lora_weights.safetensors",
        "kohyaWeights": "s3://b/out/pytorch_lora_weights_kohya.safetensors",
        "checkpoints": "s3://b/out/checkpoints/",
        "logs": "s3://b/out/logs/",
    }


@pytest.mark.parametrize(("task", "merge", "expected"), [
    ("causal-lm", False, {"weights": "s3://b/out/adapter_model.safetensors", "adapter": "s3://b/out/",
                          "checkpoints": "s3://b/out/checkpoints/", "logs": "s3://b/out/logs/"}),
    ("causal-lm", True, {"weights": "s3://b/out/adapter_model.safetensors", "adapter": "s3://b/out/",
                         "merged": "s3://b/out/merged/", "checkpoints": "s3://b/out/checkpoints/",
                         "logs": "s3://b/out/logs/"}),
    ("text-to-image", False, {"weights": "s3://b/out/pytorch_lora_weights.safetensors",
                              "kohyaWeights": "s3://b/out/pytorch_lora_weights_kohya.safetensors",
                              "checkpoints": "s3://b/out/checkpoints/", "logs": "s3://b/out/logs/"}),
])
def test_outputs_per_task(task: str, merge: bool, expected: dict[str, str]) -> None:
    assert outputs("s3://b/out/", task, merge) == expected
    assert OutputStatus.model_validate(expected)


def test_causal_lm_file_names_are_the_trainers() -> None:
    from lora_trainer.tasks import causal_lm

    assert (PEFT_ADAPTER_WEIGHTS, MERGED_DIR) == (causal_lm.ADAPTER_WEIGHTS, causal_lm.MERGED_DIR)


def test_merge_patch() -> None:
    old = {"phase": "Running", "progress": {"step": 1, "loss": 0.5}, "conditions": [{"type": "A"}], "gone": 1}
    new = {"phase": "Running", "progress": {"step": 2}, "conditions": [{"type": "B"}]}
    assert merge_patch(old, new) == {"gone": None, "progress": {"step": 2, "loss": None}, "conditions": [{"type": "B"}]}
    assert merge_patch(new, new) == {}


@pytest.mark.parametrize(("given", "expected"), [
    ("OOMKilled", "OOMKilled"),
    ("PreemptionByScheduler", "PreemptionByScheduler"),
    ("Reason_with,colon:ok", "Reason_with,colon:ok"),
    ("OOM killed", "OOMKilled"),
    ("no such bucket!", "NoSuchBucket"),
    ("OutOfnvidia.com/gpu", "OutOfnvidiaComGpu"),
    ("65 bad", "Reason65Bad"),
    ("trailing:", "Trailing"),
    ("", "Unknown"),
    (None, "Unknown"),
    ("!!!", "Unknown"),
    ("ünïcödé", "NCD"),
    ("R" * 2000, "R" * MAX_REASON),
    ("a b " * 1000, "AB" * (MAX_REASON // 2)),
])
def test_clean_reason(given: Any, expected: str) -> None:
    assert clean_reason(given) == expected
    assert re.match(REASON_PATTERN, expected) and len(expected.encode()) <= MAX_REASON


@pytest.mark.parametrize(("given", "limit", "expected"), [
    ("fine", 100, "fine"),
    ("two\nlines\tand a tab", 100, "two\nlines\tand a tab"),
    ("bell\x07 nul\x00 esc\x1b", 100, "bell  nul  esc "),
    ("x" * 10, 5, "xx…"),
    ("é" * 10, 7, "éé…"),  # bytes, not characters: never a broken character
    (None, 10, ""),
])
def test_clean_message(given: Any, limit: int, expected: str) -> None:
    assert clean_message(given, limit) == expected
    assert len(expected.encode()) <= limit


def test_cut_fits_any_limit() -> None:
    for limit in range(0, 12):
        assert len(cut("日本語のテキスト", limit).encode()) <= max(limit, len("…".encode()))


@pytest.mark.parametrize(("given", "expected"), [
    ("s3://b/out/checkpoints/step-000000010", "s3://b/out/checkpoints/step-000000010"),
    ("s3://b/out/", "s3://b/out/"),
    ("s3://b/a/./x//y/../z", "s3://b/a/x/z"),
    ("s3://b/out/../../../etc/", "s3://b/etc/"),
    ("s3://b//x//", "s3://b/x/"),
    ("s3://b", "s3://b"),
    ("a/./b//c", "a/b/c"),
    ("/abs/../x", "/x"),
    ("s3://b/new\nline", "s3://b/new line"),
])
def test_clean_uri(given: str, expected: str) -> None:
    assert clean_uri(given) == expected


def test_clean_uri_is_bounded() -> None:
    uri = clean_uri("s3://b/out/" + "p" * 40_000)
    assert len(uri.encode()) <= 2048 and uri.startswith("s3://b/out/ppp") and uri.endswith("…")


def _status_schema() -> dict[str, Any]:
    return build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]


def hostile_status() -> dict[str, Any]:
    """A status built from a 2000-character trainer reason and a latest.json path of 40 KB."""
    reason = "X" * 2000 + " with spaces"
    conds = set_condition([], "Ready", False, reason, "m" * 40_000, NOW, 1)
    conds = set_condition(conds, "CheckpointCommitted", True, "CheckpointCommitted", "at s3://b/" + "p" * 40_000, NOW, 1)
    return {
        "phase": "Recovering", "reason": reason, "message": "\x00" + "y" * 40_000, "attempt": 2,
        "preemptions": 0, "failures": 1, "podName": "job-a2", "observedGeneration": 1,
        "lastAttempt": {"attempt": 1, "result": "Failed", "reason": reason, "message": "z" * 40_000,
                        "finishedAt": "2025-01-01T12:00:00Z", "exitCode": 1},
        "progress": {"step": 5, "totalSteps": 10, "percent": 50.0, "loss": float("nan"), "updated": "u" * 100},
        "latestCheckpoint": {"step": 3, "uri": "s3://b/out/" + "p" * 40_000, "time": "t"},
        "outputs": outputs("s3://b/out//x/../"),
        "conditions": conds,
    }


def test_hostile_status_fits_the_schema_once_bounded() -> None:
    schema = _status_schema()
    raw = hostile_status()
    assert {e.reason for e in validate(schema, raw, "status")} >= {"FieldValueTooLong", "FieldValueInvalid"}
    bounded = bound_status(raw)
    assert validate(schema, bounded, "status") == []
    assert bounded["reason"] == "X" * MAX_REASON and len(bounded["message"].encode()) <= MAX_MESSAGE
    assert "loss" not in bounded["progress"] and bounded["outputs"]["logs"] == "s3://b/out/logs/"
    assert bound_status(bounded) == bounded  # idempotent: a second pass writes nothing


@pytest.mark.parametrize("step", [-1, 2**80, "3", None])
def test_absurd_checkpoint_step_is_dropped(step: Any) -> None:
    assert "latestCheckpoint" not in bound_status({"latestCheckpoint": {"step": step, "uri": "s3://b/c"}})


def test_rejected_status_is_short_and_keeps_bookkeeping() -> None:
    schema = _status_schema()
    full = bound_status(hostile_status())
    short = rejected_status(full, {}, "x" * 50_000, NOW, 1)
    assert validate(schema, short, "status") == []
    assert {k: short[k] for k in ("phase", "attempt", "failures", "preemptions", "podName")} == {
        "phase": "Recovering", "attempt": 2, "failures": 1, "preemptions": 0, "podName": "job-a2"}
    assert short["lastAttempt"]["attempt"] == 1 and short["latestCheckpoint"]["step"] == 3
    assert len(str(short).encode()) < 20_000
    cond = get_condition(short["conditions"], STATUS_REJECTED)
    assert cond is not None and (cond["status"], cond["reason"]) == ("True", STATUS_REJECTED)
    assert len(cond["message"].encode()) <= 1024
    # The next pass keeps the condition's time (no write on every pass).
    again = rejected_status(full, short, "x" * 50_000, NOW + timedelta(minutes=1), 1)
    assert get_condition(again["conditions"], STATUS_REJECTED)["lastTransitionTime"] == cond["lastTransitionTime"]  # type: ignore[index]
    assert merge_patch(short, again) == {}
