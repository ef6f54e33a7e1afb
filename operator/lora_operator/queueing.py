"""Kueue admission (pure): the labels that put a job's pods in a queue, and whether a pod is queued.

Kueue admits workloads by quota. With its pod integration a pod labelled
`kueue.x-k8s.io/queue-name: <LocalQueue>` is created with the scheduling gate
`kueue.x-k8s.io/admission` (Kueue's webhook adds it); Kueue removes the gate once the pod's
Workload fits its ClusterQueue's quota, and the scheduler places it. A JobSet (spec.nodes > 1)
goes through Kueue's JobSet integration instead: the label sits on the JobSet, which Kueue keeps
suspended until admitted, and its pods carry no queue label (Kueue would otherwise queue them twice).

While any scheduling gate holds the pod, the job is `Pending` with reason `Queued`, never
`Stalled`, and the pending deadline (--pending-deadline) does not run: it starts when the last
gate is removed, which the operator records in status.admission (see `deadline_start`).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KUEUE_GATE = "kueue.x-k8s.io/admission"
QUEUED = "Queued"
ADMITTED = "Admitted"
GATED = "SchedulingGated"  # the scheduler's PodScheduled reason for a gated pod


def queue_labels(queue_name: str) -> dict[str, str]:
    """Labels that put an object in Kueue's `queue_name` LocalQueue; none for an empty name."""
    return {QUEUE_LABEL: queue_name} if queue_name else {}


def pod_labels(queue_name: str, in_jobset: bool = False) -> dict[str, str]:
    """Queue labels of one trainer pod: a JobSet's pods carry none (the JobSet is queued instead)."""
    return {} if in_jobset else queue_labels(queue_name)


def jobset_labels(queue_name: str) -> dict[str, str]:
    """Queue labels of the JobSet of a multi-node job (Kueue's JobSet integration)."""
    return queue_labels(queue_name)


def scheduling_gates(pod: Mapping[str, Any]) -> list[str]:
    """Names of the scheduling gates still holding the pod."""
    gates = (pod.get("spec") or {}).get("schedulingGates") or []
    return [str(g.get("name") or "?") for g in gates if isinstance(g, Mapping)]


def is_queued(pod: Mapping[str, Any]) -> bool:
    """Whether a not-yet-running pod is held by a scheduling gate (Kueue's or any other)."""
    status = pod.get("status") or {}
    if (status.get("phase") or "Pending") != "Pending" or (pod.get("metadata") or {}).get("deletionTimestamp"):
        return False
    if scheduling_gates(pod):
        return True
    return any(c.get("type") == "PodScheduled" and c.get("status") == "False" and c.get("reason") == GATED
               for c in status.get("conditions") or [])


def jobset_queued(jobset: Mapping[str, Any]) -> bool:
    """Whether Kueue holds a JobSet: queue-labelled and suspended (Kueue's webhook suspends it at
    creation and resumes it on admission), so it has no pods yet and is Queued, not vanished."""
    labels = (jobset.get("metadata") or {}).get("labels") or {}
    return bool(labels.get(QUEUE_LABEL)) and bool((jobset.get("spec") or {}).get("suspend"))


def queued_message(pod: Mapping[str, Any], queue_name: str) -> str:
    """Why the pod waits, in words: Kueue's queue, or the gates that hold it."""
    gates = scheduling_gates(pod) or [GATED]
    where = f" in LocalQueue {queue_name}" if queue_name and KUEUE_GATE in gates else ""
    return (f"pod {(pod.get('metadata') or {}).get('name', '?')} waits for admission{where} "
            f"(scheduling gates: {', '.join(gates)}); the pending deadline starts once admitted")


def admission(old: Mapping[str, Any] | None, attempt: int, queued: bool, now: str) -> dict[str, Any] | None:
    """status.admission after one look at the attempt's pod: when it was first seen queued and
    when first seen admitted (gates gone). None when this attempt was never seen queued."""
    record = dict(old) if old and old.get("attempt") == attempt else None
    if queued:
        return record if record and "admittedAt" not in record else {"attempt": attempt, "queuedAt": now}
    if record is not None and "admittedAt" not in record:
        record["admittedAt"] = now
    return record


def deadline_start(record: Mapping[str, Any] | None, attempt: int, created: datetime | None,
                   parse: Any) -> datetime | None:
    """When the pending deadline of the attempt's pod started: its admission if it was queued,
    else its creation."""
    if record and record.get("attempt") == attempt and record.get("admittedAt"):
        return parse(record["admittedAt"])
    return created
