"""Label and field selectors of the API emulator: parsing and matching, table-driven.

Behaviours: equality (=, ==, !=), set-based (in, notin), existence (key, !key), Gt/Lt, ANDed
terms, invalid selectors rejected; field selectors with = == != on nested paths, escapes, and
the per-resource list of supported field labels.
"""

from __future__ import annotations

import pytest

from lora_operator.emulator.selectors import (
    FieldRequirement,
    LabelRequirement,
    SelectorError,
    field_value,
    match_fields,
    match_labels,
    parse_field_selector,
    parse_label_selector,
    supported_fields,
)

LABELS = {"tier": "gpu", "spot": "yes", "rank": "8", "example.com/team": "ml"}


@pytest.mark.parametrize("selector, expected", [
    ("", True),
    ("tier=gpu", True),
    ("tier==gpu", True),
    ("tier=cpu", False),
    ("tier!=cpu", True),
    ("missing!=x", True),
    ("tier in (cpu, gpu)", True),
    ("tier in (cpu)", False),
    ("missing in (x)", False),
    ("tier notin (cpu)", True),
    ("tier notin (gpu,cpu)", False),
    ("missing notin (x)", True),
    ("spot", True),
    ("missing", False),
    ("!missing", True),
    ("!spot", False),
    ("rank>4", True),
    ("rank<4", False),
    ("example.com/team=ml", True),
    ("tier=gpu,spot,!missing,tier in (gpu)", True),
    ("tier=gpu,missing", False),
])
def test_label_selector_matching(selector, expected):
    assert match_labels(parse_label_selector(selector), LABELS) is expected


@pytest.mark.parametrize("selector, parsed", [
    ("a=b", (LabelRequirement("a", "=", ("b",)),)),
    ("a == b", (LabelRequirement("a", "=", ("b",)),)),
    ("a!=b", (LabelRequirement("a", "!=", ("b",)),)),
    ("a in (x,y)", (LabelRequirement("a", "in", ("x", "y")),)),
    ("a notin (x)", (LabelRequirement("a", "notin", ("x",)),)),
    ("a,!b", (LabelRequirement("a", "exists"), LabelRequirement("b", "!"))),
    ("a=", (LabelRequirement("a", "=", ("",)),)),
])
def test_label_selector_parsing(selector, parsed):
    assert parse_label_selector(selector) == parsed


@pytest.mark.parametrize("selector", ["a in ()", "a in x", "-bad=x", "a=b c", "a>x", "a=(b)", "a=" + "x" * 64])
def test_invalid_label_selectors_are_rejected(selector):
    with pytest.raises(SelectorError):
        parse_label_selector(selector)


def test_labels_absent_match_only_negative_terms():
    assert match_labels(parse_label_selector("a!=b,!c,a notin (x)"), None)
    assert not match_labels(parse_label_selector("a"), None)


POD = {"metadata": {"name": "p1", "namespace": "ml"}, "status": {"phase": "Running"}, "spec": {"hostNetwork": False}}


@pytest.mark.parametrize("selector, expected", [
    ("", True),
    ("metadata.name=p1", True),
    ("metadata.name==p1", True),
    ("metadata.name!=p1", False),
    ("metadata.namespace=ml,status.phase=Running", True),
    ("status.phase!=Running", False),
    ("status.phase=Failed", False),
    ("spec.nodeName=", True),
    ("spec.hostNetwork=false", True),
])
def test_field_selector_matching(selector, expected):
    assert match_fields(parse_field_selector(selector), POD) is expected


def test_field_selector_parsing_with_escapes():
    assert parse_field_selector(r"metadata.name=a\,b,status.phase!=x") == (
        FieldRequirement("metadata.name", "=", "a,b"), FieldRequirement("status.phase", "!=", "x"))


@pytest.mark.parametrize("selector", ["metadata.name", "=x"])
def test_invalid_field_selectors_are_rejected(selector):
    with pytest.raises(SelectorError):
        parse_field_selector(selector)


@pytest.mark.parametrize("group, plural, field, supported", [
    ("", "pods", "status.phase", True),
    ("", "pods", "spec.nodeName", True),
    ("", "configmaps", "status.phase", False),
    ("lora-operator.dev", "loratrainingjobs", "metadata.name", True),
    ("lora-operator.dev", "loratrainingjobs", "spec.suspend", False),
    ("", "events", "involvedObject.name", True),
])
def test_supported_field_labels(group, plural, field, supported):
    assert (field in supported_fields(group, plural)) is supported


def test_field_value_renders_missing_as_empty():
    assert field_value({}, "status.phase") == ""
