"""Label and field selectors, parsed and matched the way kube-apiserver does it (pure).

Label selectors: ``a=b``, ``a==b``, ``a!=b``, ``a in (x,y)``, ``a notin (x,y)``, ``a``, ``!a``,
``a>1``, ``a<1``; terms are ANDed, separated by commas. Field selectors: ``f=v``, ``f==v``,
``f!=v`` over a per-resource set of supported field paths (anything else is a 400 on a real
server too: "field label not supported").
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "FieldRequirement",
    "LabelRequirement",
    "SelectorError",
    "field_value",
    "match_fields",
    "match_labels",
    "parse_field_selector",
    "parse_label_selector",
    "supported_fields",
]


class SelectorError(ValueError):
    """A selector that a real API server would reject with 400 BadRequest."""


_NAME = r"([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9]"
_KEY_RE = re.compile(rf"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?{_NAME}$")
_VALUE_RE = re.compile(rf"^({_NAME})?$")
_SET_RE = re.compile(r"^(?P<key>[^\s!=<>()]+)\s+(?P<op>in|notin)\s*\((?P<values>[^()]*)\)$")
_CMP_RE = re.compile(r"^(?P<key>[^\s!=<>()]+)\s*(?P<op>==|=|!=|>|<)\s*(?P<value>[^\s!=<>()]*)$")


@dataclass(frozen=True)
class LabelRequirement:
    """One ANDed term of a label selector: ``op`` is =, !=, in, notin, exists, !, gt or lt."""

    key: str
    op: str
    values: tuple[str, ...] = ()


@dataclass(frozen=True)
class FieldRequirement:
    """One ANDed term of a field selector: ``op`` is = or !=."""

    field: str
    op: str
    value: str


def _split_terms(text: str) -> list[str]:
    # Commas inside "in (a,b)" belong to the term, not to the selector.
    terms, depth, current = [], 0, []
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            terms.append("".join(current).strip())
            current = []
        else:
            current.append(char)
    terms.append("".join(current).strip())
    return [term for term in terms if term]


def _check_key(key: str) -> str:
    if not _KEY_RE.match(key) or len(key.rsplit("/", 1)[-1]) > 63:
        raise SelectorError(f"invalid label key {key!r}")
    return key


def _check_value(value: str) -> str:
    if not _VALUE_RE.match(value):
        raise SelectorError(f"invalid label value: {value!r}")
    return value


def parse_label_selector(text: str | None) -> tuple[LabelRequirement, ...]:
    """Parse a label selector string; an empty one matches everything."""
    requirements: list[LabelRequirement] = []
    for term in _split_terms(text or ""):
        if term.startswith("!"):
            requirements.append(LabelRequirement(_check_key(term[1:].strip()), "!"))
        elif match := _SET_RE.match(term):
            values = tuple(v.strip() for v in match["values"].split(",") if v.strip())
            if not values:
                raise SelectorError(f"{term!r}: for 'in', 'notin' operators, values set can't be empty")
            requirements.append(
                LabelRequirement(_check_key(match["key"]), match["op"], tuple(_check_value(v) for v in values))
            )
        elif match := _CMP_RE.match(term):
            op = {"==": "=", ">": "gt", "<": "lt"}.get(match["op"], match["op"])
            value = match["value"]
            if op in ("gt", "lt") and not re.fullmatch(r"-?\d+", value):
                raise SelectorError(f"{term!r}: for 'Gt', 'Lt' operators, the value must be an integer")
            requirements.append(LabelRequirement(_check_key(match["key"]), op, (_check_value(value),)))
        elif re.fullmatch(r"[^\s!=<>()]+", term):
            requirements.append(LabelRequirement(_check_key(term), "exists"))
        else:
            raise SelectorError(f"unable to parse requirement: {term!r}")
    return tuple(requirements)


def match_labels(requirements: tuple[LabelRequirement, ...], labels: Mapping[str, str] | None) -> bool:
    """Whether the labels satisfy every requirement."""
    labels = labels or {}
    for req in requirements:
        present = req.key in labels
        value = labels.get(req.key)
        if req.op == "exists":
            ok = present
        elif req.op == "!":
            ok = not present
        elif req.op == "=":
            ok = present and value == req.values[0]
        elif req.op == "!=":
            ok = not present or value != req.values[0]
        elif req.op == "in":
            ok = present and value in req.values
        elif req.op == "notin":
            ok = not present or value not in req.values
        elif req.op in ("gt", "lt"):
            try:
                number = int(value) if value is not None else None
            except ValueError:
                number = None
            bound = int(req.values[0])
            ok = number is not None and (number > bound if req.op == "gt" else number < bound)
        else:  # pragma: no cover  # the parser never produces other operators
            raise SelectorError(f"unknown operator {req.op!r}")
        if not ok:
            return False
    return True


def _split_unescaped(text: str, sep: str) -> list[str]:
    # Field selector values may contain "\," "\=" "\\" escapes (k8s fields.EscapeValue).
    parts, current, escaped = [], [], False
    for char in text:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == sep:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def parse_field_selector(text: str | None) -> tuple[FieldRequirement, ...]:
    """Parse a field selector string; an empty one matches everything."""
    requirements: list[FieldRequirement] = []
    for term in _split_unescaped(text or "", ","):
        term = term.strip()
        if not term:
            continue
        match = re.fullmatch(r"(?P<field>[^!=]+?)\s*(?P<op>==|!=|=)\s*(?P<value>.*)", term)
        if not match:
            raise SelectorError(f"invalid selector: {term!r}; can't understand {term!r}")
        op = "=" if match["op"] == "==" else match["op"]
        requirements.append(FieldRequirement(match["field"].strip(), op, match["value"]))
    return tuple(requirements)


# Which field labels each resource supports beyond metadata.name/metadata.namespace
# (from the registered field-label conversion functions in kube-apiserver).
_EXTRA_FIELDS: dict[tuple[str, str], frozenset[str]] = {
    ("", "pods"): frozenset({
        "spec.nodeName", "spec.restartPolicy", "spec.schedulerName", "spec.serviceAccountName",
        "spec.hostNetwork", "status.phase", "status.podIP", "status.nominatedNodeName",
    }),
    ("", "events"): frozenset({
        "involvedObject.kind", "involvedObject.namespace", "involvedObject.name", "involvedObject.uid",
        "involvedObject.apiVersion", "involvedObject.resourceVersion", "involvedObject.fieldPath",
        "reason", "reportingComponent", "source", "type",
    }),
    ("", "namespaces"): frozenset({"status.phase"}),
    ("", "nodes"): frozenset({"spec.unschedulable"}),
    ("", "secrets"): frozenset({"type"}),
}


def supported_fields(group: str, plural: str) -> frozenset[str]:
    """The field labels a resource can be selected by."""
    return frozenset({"metadata.name", "metadata.namespace"}) | _EXTRA_FIELDS.get((group, plural), frozenset())


def field_value(obj: Mapping[str, Any], path: str) -> str:
    """The string form of a field, as the API server's field set renders it ("" if absent)."""
    value: Any = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


def match_fields(requirements: tuple[FieldRequirement, ...], obj: Mapping[str, Any]) -> bool:
    """Whether the object satisfies every field requirement."""
    for req in requirements:
        equal = field_value(obj, req.field) == req.value
        if equal != (req.op == "="):
            return False
    return True
