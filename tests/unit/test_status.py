"""Status helpers.

Behaviours tested:
- set_condition keeps lastTransitionTime when only reason/message change, moves it when the
  status flips, and stamps observedGeneration;
- progress.json and latest.json render into status.progress / status.latestCheckpoint;
- merge_patch produces the smallest RFC 7386 patch (None deletes, lists replaced).
"""

from __future__ import annotations

from datetime import timedelta

from lora_operator.status import (
    checkpoint_status,
    get_condition,
    merge_patch,
    outputs,
    progress_status,
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


def test_merge_patch() -> None:
    old = {"phase": "Running", "progress": {"step": 1, "loss": 0.5}, "conditions": [{"type": "A"}], "gone": 1}
    new = {"phase": "Running", "progress": {"step": 2}, "conditions": [{"type": "B"}]}
    assert merge_patch(old, new) == {"gone": None, "progress": {"step": 2, "loss": None}, "conditions": [{"type": "B"}]}
    assert merge_patch(new, new) == {}
