"""The generated spec reference (docs/spec-reference.md).

Behaviours tested:
- docs/ holds exactly what `lora-operator crd --markdown` prints (regenerate when it fails);
- every field of spec and status in the CRD schema has exactly one row, under its CRD path
  (`[]` marks the fields of a list's items: spec.resources.tolerations[].key);
- rows say type, default, limits (bounds, exclusive bounds, lengths, enum, pattern, required,
  immutable) and the description, as the schema has them;
- Markdown stays well-formed: a pipe in a pattern or description cannot split a row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from lora_operator.cli import main as cli_main
from lora_operator.crd import build_crd
from lora_operator.specdoc import DOC_FILE, limits_text, render_markdown, sections, type_name

ROOT = Path(__file__).resolve().parents[2]


def test_committed_reference_is_fresh() -> None:
    committed = (ROOT / DOC_FILE).read_text()
    assert committed == render_markdown(), f"{DOC_FILE} is stale: run `lora-operator crd --markdown > {DOC_FILE}`"


def test_cli_prints_the_reference(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["crd", "--markdown"]) == 0
    assert capsys.readouterr().out == render_markdown()


def _paths(node: dict[str, Any], path: str) -> set[str]:
    out: set[str] = set()
    for name, child in (node.get("properties") or {}).items():
        out.add(f"{path}.{name}")
        out |= _paths(child, f"{path}.{name}")
        if isinstance(child.get("items"), dict):
            out |= _paths(child["items"], f"{path}.{name}[]")
    return out


@pytest.mark.parametrize("part", ["spec", "status"])
def test_every_field_has_one_row(part: str) -> None:
    schema = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"][part]
    rows = [row[0].strip("`").split("](")[0].lstrip("[") for s in sections(part) for row in s.rows]
    assert len(rows) == len(set(rows))
    assert set(rows) == _paths(schema, part)
    assert all(row[4] for s in sections(part) for row in s.rows), "a field without a description"


def row(path: str) -> tuple[str, ...]:
    part = path.split(".")[0]
    for section in sections(part):
        for r in section.rows:
            if r[0] in (f"`{path}`", f"[{path}](#{path.replace('.', '').lower()})"):
                return r
    raise AssertionError(f"no row for {path}")


@pytest.mark.parametrize(("path", "type_", "default", "limits"), [
    ("spec.lora.rank", "`integer`", "`8`", "≥ 1; ≤ 1024"),
    ("spec.lora.alpha", "`number`", "", "> 0; ≤ 4096; may be null"),
    ("spec.training.learningRate", "`number`", "`0.0001`", "> 0; ≤ 1"),
    ("spec.training.lrScheduler", "`string`", "`constant`", "one of `constant`"),
    ("spec.output.uri", "`string`", "", "**required**; length ≥ 1; length ≤ 1024; matches `^s3://[^/]+(/.*)?$`"),
    ("spec.training", "`object`", "`{}`", "immutable"),
    ("spec.suspend", "`boolean`", "`false`", ""),
    ("spec.resources.nodeSelector", "`map[string]string`", "", "entries ≤ 64"),
    ("spec.lora.targetModules", "`[]string`", "", "items ≥ 1; items ≤ 64"),
    ("spec.resources.tolerations[].effect", "`string`", '`""`', "one of `\"\"`, `NoSchedule`"),
    ("status.progress.percent", "`number`", "`0`", "≥ 0; ≤ 100"),
])
def test_rows(path: str, type_: str, default: str, limits: str) -> None:
    _, t, d, lim, description = row(path)
    assert (t, d) == (type_, default)
    assert lim.startswith(limits), lim
    assert description


@pytest.mark.parametrize(("node", "required", "expected"), [
    ({"type": "integer", "minimum": 0, "maximum": 3}, False, "≥ 0; ≤ 3"),
    ({"type": "number", "minimum": 0, "exclusiveMinimum": True}, True, "**required**; > 0"),
    ({"type": "string", "enum": ["a", ""]}, False, 'one of `a`, `""`'),
    ({"type": "object", "x-kubernetes-validations": [{"rule": "self == oldSelf", "message": "m"}]}, False, "immutable"),
    ({"type": "string", "nullable": True}, False, "may be null"),
])
def test_limits_text(node: dict[str, Any], required: bool, expected: str) -> None:
    assert limits_text(node, required) == expected


@pytest.mark.parametrize(("node", "expected"), [
    ({"type": "array", "items": {"type": "object", "properties": {"a": {}}}}, "[]object"),
    ({"type": "array", "items": {"type": "integer"}}, "[]integer"),
    ({"type": "object", "additionalProperties": {"type": "string"}}, "map[string]string"),
    ({"type": "string", "format": "date-time"}, "string (date-time)"),
])
def test_type_name(node: dict[str, Any], expected: str) -> None:
    assert type_name(node) == expected


def test_rows_have_five_cells() -> None:
    for line in render_markdown().splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            cells = line.replace("\\|", "").strip("|").split("|")
            assert len(cells) == 5, line
