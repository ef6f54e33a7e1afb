"""Server-side printing in the emulator (`kubectl get`).

Behaviours tested:
- ages read like kubectl's (apimachinery HumanDuration);
- dotted JSONPaths find nested values and give None for missing ones;
- pods show Ready n/m, the container's waiting/terminated reason over the phase, Terminating;
- custom resources get Name + printer columns, other kinds Name + Created At;
- only a Table Accept header asks for a Table.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from lora_operator.emulator.tables import age, jsonpath, to_table, wants_table

NOW = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)


def ago(seconds: float) -> str:
    return (NOW - timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.mark.parametrize(("seconds", "expected"), [
    (0, "0s"), (59, "59s"), (119, "119s"), (125, "2m5s"), (300, "5m"), (42 * 60, "42m"),
    (3 * 3600 + 20 * 60, "3h20m"), (5 * 3600, "5h"), (30 * 3600, "30h"), (3 * 86400 + 3600, "3d1h"),
    (40 * 86400, "40d"), (3 * 365 * 86400, "3y"),
])
def test_age(seconds: float, expected: str) -> None:
    assert age(ago(seconds), NOW) == expected


@pytest.mark.parametrize(("path", "expected"), [
    (".status.progress.step", 12), (".status.phase", "Running"), (".status.missing.deeper", None),
    (".metadata.name", "j"), (".status.progress.step.more", None),
])
def test_jsonpath(path: str, expected: object) -> None:
    obj = {"metadata": {"name": "j"}, "status": {"phase": "Running", "progress": {"step": 12}}}
    assert jsonpath(obj, path) == expected


def pod(phase: str, state: dict, deleting: bool = False) -> dict:
    meta = {"name": "p", "creationTimestamp": ago(30)}
    if deleting:
        meta["deletionTimestamp"] = ago(0)
    return {"metadata": meta, "spec": {"containers": [{"name": "trainer"}], "nodeName": "n1"},
            "status": {"phase": phase, "containerStatuses": [{"name": "trainer", "ready": "running" in state,
                                                              "restartCount": 0, "state": state}]}}


@pytest.mark.parametrize(("obj", "cells"), [
    (pod("Running", {"running": {}}), ["p", "1/1", "Running", "0", "30s", "n1"]),
    (pod("Pending", {"waiting": {"reason": "CreateContainerConfigError"}}),
     ["p", "0/1", "CreateContainerConfigError", "0", "30s", "n1"]),
    (pod("Failed", {"terminated": {"reason": "OOMKilled", "exitCode": 137}}), ["p", "0/1", "OOMKilled", "0", "30s", "n1"]),
    (pod("Running", {"running": {}}, deleting=True), ["p", "1/1", "Terminating", "0", "30s", "n1"]),
])
def test_pod_rows(obj: dict, cells: list) -> None:
    table = to_table("", "pods", [obj], "5", now=NOW)
    assert [c["name"] for c in table["columnDefinitions"]] == ["Name", "Ready", "Status", "Restarts", "Age", "Node"]
    assert table["rows"][0]["cells"] == cells


def test_custom_resource_and_default_columns() -> None:
    job = {"metadata": {"name": "j", "creationTimestamp": ago(90)}, "status": {"phase": "Running"}}
    columns = [{"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
               {"name": "Step", "type": "integer", "jsonPath": ".status.progress.step"},
               {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}]
    table = to_table("lora-operator.dev", "loratrainingjobs", [job], "9", columns, now=NOW)
    assert [c["name"] for c in table["columnDefinitions"]] == ["Name", "Phase", "Step", "Age"]
    assert table["rows"][0]["cells"] == ["j", "Running", None, "90s"]
    secret = to_table("", "secrets", [{"metadata": {"name": "s", "creationTimestamp": ago(5)}}], "9", now=NOW)
    assert [c["name"] for c in secret["columnDefinitions"]] == ["Name", "Created At"]


@pytest.mark.parametrize(("accept", "expected"), [
    ("application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json", True),
    ("application/json", False), (None, False), ("application/vnd.kubernetes.protobuf,application/json", False),
])
def test_wants_table(accept: str | None, expected: bool) -> None:
    assert wants_table(accept) is expected
