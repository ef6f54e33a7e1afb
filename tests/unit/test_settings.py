"""Operator settings and the Kopf peering priority.

Behaviours tested:
- settings come from LORA_OPERATOR_* variables, CLI flags win over them, bad values are refused;
- the peering priority is the setting when given, else a hash of POD_NAME, else of the host
  name: the same pod name always gives the same priority (across processes: no salted hash()),
  and the pods of one Deployment get distinct ones (equal priorities would pause every replica).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from lora_operator.settings import (
    MAX_PRIORITY,
    Settings,
    parse,
    peering_priority,
    priority_from_name,
)

DEPLOYMENT_PODS = [f"lora-operator-6f7d9c8b5-{suffix}" for suffix in ("x2kqz", "p9w4m", "b7n3c", "zz8ll", "a1b2c")]


@pytest.mark.parametrize(("setting", "environ", "hostname", "expected"), [
    (7, {"POD_NAME": "op-a"}, "host", 7),                       # the setting wins
    (0, {}, "host", 0),                                          # 0 is a valid explicit priority
    (None, {"POD_NAME": "op-a"}, "host", priority_from_name("op-a")),
    (None, {"POD_NAME": ""}, "host-1", priority_from_name("host-1")),  # empty POD_NAME: host name
    (None, {}, "host-1", priority_from_name("host-1")),
])
def test_peering_priority_sources(setting: int | None, environ: dict[str, str], hostname: str, expected: int) -> None:
    settings = Settings(priority=setting)
    assert peering_priority(settings, environ, hostname) == expected


def test_priority_is_stable_across_processes() -> None:
    code = "from lora_operator.settings import priority_from_name as p; print(p('lora-operator-6f7d9c8b5-x2kqz'))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert int(other) == priority_from_name("lora-operator-6f7d9c8b5-x2kqz")


def test_replicas_get_distinct_priorities_in_range() -> None:
    priorities = [priority_from_name(name) for name in DEPLOYMENT_PODS]
    assert len(set(priorities)) == len(priorities)
    assert all(1 <= p <= MAX_PRIORITY for p in priorities)


@pytest.mark.parametrize(("env", "argv", "field", "expected"), [
    ({"LORA_OPERATOR_PRIORITY": "42"}, [], "priority", 42),
    ({"LORA_OPERATOR_PRIORITY": "42"}, ["--priority", "5"], "priority", 5),
    ({"LORA_OPERATOR_NAMESPACES": "a, b,,c"}, [], "namespaces", ["a", "b", "c"]),
    ({"LORA_OPERATOR_NAMESPACES": "a"}, ["-n", "x", "-n", "y"], "namespaces", ["x", "y"]),
    ({"LORA_OPERATOR_STANDALONE": "true"}, [], "standalone", True),
    ({}, ["--pending-deadline", "30"], "pending_deadline", 30.0),
    ({"LORA_OPERATOR_TRAINER_IMAGE": "reg/trainer:1"}, [], "trainer_image", "reg/trainer:1"),
])
def test_env_and_flags(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], argv: list[str], field: str,
                       expected: object) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert getattr(parse(argv), field) == expected


@pytest.mark.parametrize("env", [
    {"LORA_OPERATOR_PRIORITY": "-1"},
    {"LORA_OPERATOR_PRIORITY": str(MAX_PRIORITY + 1)},
    {"LORA_OPERATOR_PROGRESS_INTERVAL": "0"},
    {"LORA_OPERATOR_LOG_FORMAT": "xml"},
])
def test_bad_settings_are_refused(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValidationError):
        parse([])
