"""Render and inspect the lora-operator Helm chart offline, with Helm's own engine.

Helm is reached through `helm-python-sdk` (import name `helm_python`, from the `dev` extra):
a ctypes binding to a C build of Helm's Go SDK (v4), so `render` is `helm template` and
`lint` is `helm lint`, template functions and schema validation included, with no `helm`
binary and no cluster. `lookup` returns nothing offline; the chart does not use it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import helm_python
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "lora-operator"
RELEASE = "lora-operator"
RELEASE_NAMESPACE = "lora-system"
KUBE_VERSION = "1.30"

Manifest = dict[str, Any]


def render(values: dict[str, Any] | None = None) -> dict[str, str]:
    """`helm template` the chart: template path → rendered text (NOTES.txt included)."""
    with helm_python.Chart.load(CHART) as chart:
        return chart.render(values, name=RELEASE, namespace=RELEASE_NAMESPACE, is_install=True)


def manifests(values: dict[str, Any] | None = None) -> list[Manifest]:
    """The rendered Kubernetes objects (templates only; CRDs are in `crds()`)."""
    objects: list[Manifest] = []
    for path, text in sorted(render(values).items()):
        if path.endswith("NOTES.txt"):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


def notes(values: dict[str, Any] | None = None) -> str:
    """The rendered NOTES.txt."""
    return next(text for path, text in render(values).items() if path.endswith("NOTES.txt"))


def crds() -> dict[str, Manifest]:
    """The CRDs the chart ships in crds/ (installed by Helm before the templates): file name → CRD."""
    return {path.name: yaml.safe_load(path.read_text()) for path in sorted((CHART / "crds").glob("*.yaml"))}


def lint(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """`helm lint --strict` for Kubernetes 1.30: the findings of severity warning or error."""
    report = helm_python.lint(CHART, values, strict=True, kube_version=f"v{KUBE_VERSION}.0")
    return [message for message in report["messages"] if message["severity"] >= 2]


def of_kind(objects: list[Manifest], kind: str) -> list[Manifest]:
    """The objects of one kind."""
    return [obj for obj in objects if obj["kind"] == kind]


def one(objects: list[Manifest], kind: str) -> Manifest:
    """The single object of a kind; fails if there are none or several."""
    found = of_kind(objects, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


RuleKey = tuple[str, str]
RuleGrant = tuple[frozenset[str], tuple[str, ...]]


def rule_table(rules: list[dict[str, Any]]) -> dict[RuleKey, RuleGrant]:
    """Flatten RBAC rules to {(apiGroup, resource): (verbs, resourceNames)}.

    Fails on anything a least-privilege table must not contain: wildcards, non-resource URLs,
    or the same resource granted twice (which would hide a broader grant).
    """
    table: dict[RuleKey, RuleGrant] = {}
    for rule in rules:
        assert "nonResourceURLs" not in rule, rule
        for field in ("apiGroups", "resources", "verbs", "resourceNames"):
            assert "*" not in rule.get(field, []), f"wildcard in {field}: {rule}"
        grant = (frozenset(rule["verbs"]), tuple(sorted(rule.get("resourceNames", []))))
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                assert (group, resource) not in table, f"{group}/{resource} granted twice"
                table[(group, resource)] = grant
    return table


def walk_schema(node: Any, path: str = "$"):
    """Yield (path, node) for every sub-schema of a JSON schema."""
    if not isinstance(node, dict):
        return
    yield path, node
    for key, child in node.get("properties", {}).items():
        yield from walk_schema(child, f"{path}.{key}")
    for keyword in ("items", "additionalProperties"):
        if isinstance(node.get(keyword), dict):
            yield from walk_schema(node[keyword], f"{path}[{keyword}]")
    for keyword in ("oneOf", "anyOf", "allOf"):
        for index, child in enumerate(node.get(keyword, [])):
            yield from walk_schema(child, f"{path}<{keyword}{index}>")


def comment_block(lines: list[str], index: int) -> str:
    """The comment lines directly above lines[index]."""
    block: list[str] = []
    for line in reversed(lines[:index]):
        if not line.strip().startswith("#"):
            break
        block.append(line)
    return "\n".join(block)
