"""docs/argocd-health.lua, run in a real Lua interpreter (lupa) against a table of job statuses.

Behaviours tested:
- Succeeded → Healthy; Failed → Degraded; Stalled=True → Degraded (whatever the phase);
  Suspended → Suspended; Pending/Running/Recovering → Progressing;
- a status not yet observed (absent, or observedGeneration < generation) → Progressing;
- the message comes from the deciding condition, else status.message, else the Ready condition;
- docs/argocd.md embeds exactly this script.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lupa  # Lua in Python, from the dev extra
import pytest

DOCS = Path(__file__).resolve().parents[2] / "docs"
SCRIPT = (DOCS / "argocd-health.lua").read_text()


def health(obj: dict[str, Any]) -> tuple[str, str]:
    """Run the health script as Argo CD does: `obj` global in, `hs` table out."""
    lua = lupa.LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = lua.table_from(obj, recursive=True)
    hs = lua.execute(SCRIPT)
    return hs["status"], hs["message"]


def job(
    phase: str | None = None,
    *,
    generation: int = 2,
    observed: int | None = 2,
    conditions: list[dict[str, str]] | None = None,
    message: str | None = None,
) -> dict[str, Any]:
    """A LoRATrainingJob with the given status (no status at all when phase is None)."""
    obj: dict[str, Any] = {
        "apiVersion": "lora-operator.dev/v1alpha1",
        "kind": "LoRATrainingJob",
        "metadata": {"name": "portrait", "namespace": "ml", "generation": generation},
    }
    if phase is not None:
        status: dict[str, Any] = {"phase": phase, "conditions": conditions or []}
        if observed is not None:
            status["observedGeneration"] = observed
        if message is not None:
            status["message"] = message
        obj["status"] = status
    return obj


def cond(kind: str, status: str, message: str = "", reason: str = "Test") -> dict[str, str]:
    """A status condition."""
    return {
        "type": kind,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": "2024-01-01T00:00:00Z",
    }


CASES = [
    ("no status yet", job(), "Progressing", "Waiting for the operator to observe the job"),
    (
        "stale generation",
        job("Succeeded", generation=3, observed=2),
        "Progressing",
        "Waiting for the operator to observe generation 3",
    ),
    (
        "no observedGeneration",
        job("Running", observed=None),
        "Progressing",
        "Waiting for the operator to observe generation 2",
    ),
    (
        "succeeded",
        job("Succeeded", conditions=[cond("Ready", "True", "Final weights committed")]),
        "Healthy",
        "Final weights committed",
    ),
    (
        "failed",
        job("Failed", message="backoffLimit 3 reached: exit code 1"),
        "Degraded",
        "backoffLimit 3 reached: exit code 1",
    ),
    (
        "failed and stalled",
        job("Failed", conditions=[cond("Stalled", "True", "bad config: rank 0")]),
        "Degraded",
        "bad config: rank 0",
    ),
    (
        "stalled while pending",
        job("Pending", conditions=[cond("Stalled", "True", "image pull failed")]),
        "Degraded",
        "image pull failed",
    ),
    (
        "stalled false is ignored",
        job("Running", conditions=[cond("Stalled", "False", "old")], message="step 400/1500"),
        "Progressing",
        "step 400/1500",
    ),
    ("suspended", job("Suspended", message="spec.suspend is true"), "Suspended", "spec.suspend is true"),
    ("pending", job("Pending"), "Progressing", "Phase: Pending"),
    (
        "running, reconciling",
        job(
            "Running",
            conditions=[cond("Reconciling", "True", "attempt 2 running"), cond("Ready", "False", "training")],
        ),
        "Progressing",
        "attempt 2 running",
    ),
    (
        "recovering",
        job("Recovering", conditions=[cond("Ready", "False", "preempted; resuming from step 500")]),
        "Progressing",
        "preempted; resuming from step 500",
    ),
    ("unknown phase", job(""), "Progressing", "Waiting for the operator"),
]


@pytest.mark.parametrize(("obj", "status", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_health(obj: dict[str, Any], status: str, message: str) -> None:
    assert health(obj) == (status, message)


def test_argocd_md_embeds_the_script() -> None:
    text = (DOCS / "argocd.md").read_text()
    assert "resource.customizations.health.lora-operator.dev_LoRATrainingJob: |" in text
    indented = "\n".join(("    " + line) if line else "" for line in SCRIPT.rstrip("\n").splitlines())
    assert indented in text, "docs/argocd.md is out of date with docs/argocd-health.lua"
