"""The LoRATrainingJob reference as Markdown, rendered from the CRD schema (pure).

The CRD schema is itself generated from the pydantic models, so this page, the CRD and the
operator's validation cannot disagree. `lora-operator crd --markdown` prints it (or
`python -m lora_operator.specdoc`); docs/spec-reference.md is the committed copy and a unit
test fails when it is stale.

Every field gets a row: its CRD path, type, default, limits (bounds, lengths, enum, pattern,
required, immutable) and description. Objects get a section of their own, in schema order.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from lora_operator.crd import build_crd
from lora_operator.spec import API_VERSION, KIND

DOC_FILE = "docs/spec-reference.md"


@dataclass(frozen=True)
class Section:
    """An object in the schema: its path, description, rules, and the rows of its fields."""

    path: str
    description: str
    notes: tuple[str, ...]
    rows: tuple[tuple[str, str, str, str, str], ...]


def _cell(text: str) -> str:
    # A table cell: one line, pipes escaped so they do not split the row.
    return " ".join(str(text).split()).replace("|", "\\|")


def _code(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return f"`{text}`" if text != "" else '`""`'


def _is_object(node: Mapping[str, Any]) -> bool:
    return node.get("type") == "object" and "properties" in node


def type_name(node: Mapping[str, Any]) -> str:
    """The field's type in words: `integer`, `[]string`, `map[string]string`, `object`."""
    kind = node.get("type", "integer-or-string" if node.get("x-kubernetes-int-or-string") else "any")
    if kind == "array":
        items = node.get("items") or {}
        return "[]" + ("object" if _is_object(items) else type_name(items))
    if kind == "object" and isinstance(node.get("additionalProperties"), Mapping):
        return f"map[string]{type_name(node['additionalProperties'])}"
    if node.get("format"):
        return f"{kind} ({node['format']})"
    return kind


def default_text(node: Mapping[str, Any]) -> str:
    """The default the API server applies, in code font; empty when there is none."""
    # A block's `{}` matters too: an omitted block is filled in with its fields' defaults.
    return _code(node["default"]) if "default" in node else ""


def limits_text(node: Mapping[str, Any], required: bool) -> str:
    """Bounds, lengths, enum, pattern, required and immutability, as short phrases."""
    out: list[str] = []
    if required:
        out.append("**required**")
    if "minimum" in node:
        out.append(f"{'>' if node.get('exclusiveMinimum') else '≥'} {node['minimum']}")
    if "maximum" in node:
        out.append(f"{'<' if node.get('exclusiveMaximum') else '≤'} {node['maximum']}")
    for key, words in (("minLength", "length ≥"), ("maxLength", "length ≤"), ("minItems", "items ≥"),
                       ("maxItems", "items ≤"), ("maxProperties", "entries ≤")):
        if key in node:
            out.append(f"{words} {node[key]}")
    if "enum" in node:
        out.append("one of " + ", ".join(_code(v) for v in node["enum"]))
    if "pattern" in node:
        out.append(f"matches {_code(node['pattern'])}")
    if node.get("nullable"):
        out.append("may be null")
    if any(rule.get("rule") == "self == oldSelf" for rule in node.get("x-kubernetes-validations") or []):
        out.append("immutable")
    return "; ".join(out)


def _sections(node: Mapping[str, Any], path: str) -> Iterator[Section]:
    required = set(node.get("required") or [])
    rows, nested = [], []
    for name, child in (node.get("properties") or {}).items():
        child_path = f"{path}.{name}"
        items = child.get("items") if child.get("type") == "array" else None
        shown = f"[{child_path}](#{_anchor(child_path)})" if _is_object(child) or (items and _is_object(items)) \
            else f"`{child_path}`"
        rows.append((shown, f"`{type_name(child)}`", default_text(child), limits_text(child, name in required),
                     child.get("description", "")))
        if _is_object(child):
            nested.append((child, child_path))
        elif items and _is_object(items):
            nested.append((items, child_path + "[]"))
    notes = tuple(rule["message"] for rule in node.get("x-kubernetes-validations") or []
                  if rule.get("rule") != "self == oldSelf")
    yield Section(path, node.get("description", ""), notes, tuple(rows))
    for child, child_path in nested:
        yield from _sections(child, child_path)


def _anchor(path: str) -> str:
    # GitHub's heading anchors: lower case, punctuation dropped, spaces to dashes.
    return "".join(ch for ch in path.lower() if ch.isalnum() or ch in "-_")


def sections(part: str = "spec") -> list[Section]:
    """The sections of `spec` (or `status`), parents before children."""
    root = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return list(_sections(root["properties"][part], part))


def _render(section: Section, top: bool = False) -> list[str]:
    # The top section sits right under its `## spec` / `## status` heading.
    lines = [] if top else [f"### {section.path}", "", _cell(section.description) or "-", ""]
    lines += [f"Rule: {_cell(note)}." for note in section.notes]
    if section.notes:
        lines.append("")
    lines += ["| Field | Type | Default | Limits | Description |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in section.rows]
    return lines + [""]


def render_markdown() -> str:
    """The whole reference page."""
    crd = build_crd()
    version = crd["spec"]["versions"][0]
    root = version["schema"]["openAPIV3Schema"]
    names = crd["spec"]["names"]
    lines = [
        f"# {KIND} reference (`{API_VERSION}`)",
        "",
        "<!-- Generated by `lora-operator crd --markdown` from lora_operator.spec and lora_operator.status."
        " Do not edit: change the models and regenerate. -->",
        "",
        _cell(root.get("description", "")),
        "",
        f"Plural `{names['plural']}`, short names {', '.join(_code(n) for n in names['shortNames'])}; "
        "namespaced. Defaults are applied by the API server; limits are enforced by its schema validation, "
        "and what a schema cannot say (for example `warmupSteps` ≤ `maxTrainSteps`) by the operator, "
        "which then marks the job `Failed` with reason `InvalidSpec` and the field's path.",
        "",
    ]
    lines += [f"- {_cell(rule['message'])}." for rule in root.get("x-kubernetes-validations") or []]
    columns = version["additionalPrinterColumns"]
    lines += ["", "`kubectl get ltj` columns: " + ", ".join(
        f"{c['name']} (`{c['jsonPath']}`)" for c in columns if not c.get("priority")) + "; `-o wide` adds " + ", ".join(
        f"{c['name']} (`{c['jsonPath']}`)" for c in columns if c.get("priority")) + ".", ""]
    for part, intro in (("spec", "What to train and where; examples/ has complete jobs."),
                        ("status", "Written by the operator only (the `/status` subresource).")):
        lines += [f"## {part}", "", intro, ""]
        for index, section in enumerate(sections(part)):
            lines += _render(section, top=index == 0)
    return "\n".join(lines).rstrip("\n") + "\n"


def main() -> int:
    """`python -m lora_operator.specdoc`: print the page."""
    sys.stdout.write(render_markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
