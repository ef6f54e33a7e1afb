"""Server-side printing: lists and objects as `meta.k8s.io/v1` Tables (pure), for `kubectl get`.

kubectl asks for `application/json;as=Table;v=v1;g=meta.k8s.io` and prints the columns the
server chooses. As kube-apiserver does: custom resources get Name plus their CRD's
additionalPrinterColumns (`date` columns as an age like `5m`), pods get Name, Ready, Status,
Restarts, Age (Node with -o wide), events their own columns, and everything else Name and
Created At. JSONPaths are the simple dotted kind CRDs use (`.status.progress.step`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

__all__ = ["age", "columns_for", "jsonpath", "to_table", "wants_table"]

TABLE = {"apiVersion": "meta.k8s.io/v1", "kind": "Table"}
NAME_COLUMN = {"name": "Name", "type": "string", "format": "name", "priority": 0,
               "description": "Name must be unique within a namespace."}


def wants_table(accept: str | None) -> bool:
    """Whether the client asked for server-side printing (kubectl get does)."""
    return bool(accept) and "as=Table" in accept and "g=meta.k8s.io" in accept


def age(timestamp: str | None, now: datetime) -> str:
    """kubectl's human duration (apimachinery's HumanDuration): 90s, 4m5s, 42m, 3h20m, 2d."""
    if not timestamp:
        return "<unknown>"
    try:
        then = datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    except ValueError:
        return "<invalid>"
    s = max(0, int((now - then).total_seconds()))
    m, h = s // 60, s // 3600
    if s < 120:
        return f"{s}s"
    if m < 10:
        return f"{m}m{s % 60}s" if s % 60 else f"{m}m"
    if m < 180:
        return f"{m}m"
    if h < 8:
        return f"{h}h{m % 60}m" if m % 60 else f"{h}h"
    if h < 48:
        return f"{h}h"
    if h < 192:
        return f"{h // 24}d{h % 24}h" if h % 24 else f"{h // 24}d"
    return f"{h // 24}d" if h < 24 * 365 * 2 else f"{h // (24 * 365)}y"


def jsonpath(obj: Mapping[str, Any], path: str) -> Any:
    """The value at a dotted JSONPath like `.status.phase` (None when absent)."""
    value: Any = obj
    for part in path.strip().lstrip(".").split("."):
        if not part:
            continue
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def _pod_columns() -> list[dict[str, Any]]:
    return [NAME_COLUMN,
            {"name": "Ready", "type": "string", "priority": 0, "description": "Ready containers / all."},
            {"name": "Status", "type": "string", "priority": 0, "description": "The pod's phase or reason."},
            {"name": "Restarts", "type": "string", "priority": 0, "description": "Container restarts."},
            {"name": "Age", "type": "string", "priority": 0, "description": "Since creation."},
            {"name": "Node", "type": "string", "priority": 1, "description": "Where it runs."}]


def _pod_cells(pod: Mapping[str, Any], now: datetime) -> list[Any]:
    status = pod.get("status") or {}
    containers = status.get("containerStatuses") or []
    total = len((pod.get("spec") or {}).get("containers") or []) or len(containers)
    ready = sum(1 for c in containers if c.get("ready"))
    shown = status.get("reason") or status.get("phase") or "Pending"
    for c in containers:  # like kubectl: the container's waiting/terminated reason wins
        state = c.get("state") or {}
        reason = (state.get("waiting") or {}).get("reason") or (state.get("terminated") or {}).get("reason")
        if reason:
            shown = reason
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        shown = "Terminating"
    restarts = sum(int(c.get("restartCount") or 0) for c in containers)
    return [pod["metadata"]["name"], f"{ready}/{total}", shown, str(restarts),
            age(pod["metadata"].get("creationTimestamp"), now), (pod.get("spec") or {}).get("nodeName") or "<none>"]


def _event_columns() -> list[dict[str, Any]]:
    return [{"name": "Last Seen", "type": "string", "priority": 0, "description": "Since the last occurrence."},
            {"name": "Type", "type": "string", "priority": 0, "description": "Normal or Warning."},
            {"name": "Reason", "type": "string", "priority": 0, "description": "Why."},
            {"name": "Object", "type": "string", "priority": 0, "description": "What it is about."},
            {"name": "Message", "type": "string", "priority": 0, "description": "Details."}]


def _event_cells(event: Mapping[str, Any], now: datetime) -> list[Any]:
    involved = event.get("involvedObject") or {}
    when = event.get("lastTimestamp") or event.get("eventTime") or event["metadata"].get("creationTimestamp")
    return [age(when, now), event.get("type") or "", event.get("reason") or "",
            f"{str(involved.get('kind', '')).lower()}/{involved.get('name', '')}", event.get("message") or ""]


def columns_for(group: str, plural: str, printer_columns: Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
    """The column definitions kube-apiserver would send for this resource."""
    if (group, plural) == ("", "pods"):
        return _pod_columns()
    if (group, plural) == ("", "events"):
        return _event_columns()
    if printer_columns is not None:
        return [NAME_COLUMN] + [
            {"name": c["name"], "type": c.get("type", "string"),
             "format": c.get("format", ""), "description": c.get("description", ""), "priority": c.get("priority", 0)}
            for c in printer_columns]
    return [NAME_COLUMN, {"name": "Created At", "type": "date", "priority": 0,
                          "description": "When the object was created."}]


def _cells(group: str, plural: str, obj: Mapping[str, Any], printer_columns: Sequence[Mapping[str, Any]] | None,
           now: datetime) -> list[Any]:
    if (group, plural) == ("", "pods"):
        return _pod_cells(obj, now)
    if (group, plural) == ("", "events"):
        return _event_cells(obj, now)
    name = obj["metadata"]["name"]
    if printer_columns is None:
        return [name, obj["metadata"].get("creationTimestamp")]
    cells: list[Any] = [name]
    for column in printer_columns:
        value = jsonpath(obj, column["jsonPath"])
        cells.append(age(value, now) if column.get("type") == "date" and value else value)
    return cells


def to_table(group: str, plural: str, objects: Sequence[Mapping[str, Any]], resource_version: str,
             printer_columns: Sequence[Mapping[str, Any]] | None = None, now: datetime | None = None) -> dict[str, Any]:
    """A Table of `objects`; each row carries the object's metadata, as with includeObject=Metadata."""
    now = now or datetime.now(UTC)
    rows = [{"cells": _cells(group, plural, obj, printer_columns, now),
             "object": {"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
                        "metadata": dict(obj.get("metadata") or {})}}
            for obj in objects]
    return {**TABLE, "metadata": {"resourceVersion": resource_version},
            "columnDefinitions": columns_for(group, plural, printer_columns), "rows": rows}
