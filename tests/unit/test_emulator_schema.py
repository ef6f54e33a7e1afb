"""Structural-schema admission of custom resources in the API emulator, table-driven.

Behaviours: defaults (top-level, nested under a defaulted parent, not under an absent one,
in arrays and maps, re-applied after nulls are pruned); pruning of unknown fields, kept under
x-kubernetes-preserve-unknown-fields and for apiVersion/kind/metadata; validation errors with
the real server's field paths, reasons and wording (type, enum, bounds, lengths, patterns,
items, required, int-or-string, nullable, anyOf).
"""

from __future__ import annotations

import pytest

from lora_operator.emulator.schema import admit, apply_defaults, prune, validate

SCHEMA = {
    "type": "object",
    "properties": {
        "spec": {
            "type": "object",
            "required": ["model"],
            "properties": {
                "model": {"type": "string", "minLength": 1, "maxLength": 10, "pattern": "^[a-z0-9]*$"},
                "mode": {"type": "string", "enum": ["fast", "careful"], "default": "careful"},
                "replicas": {"type": "integer", "minimum": 1, "maximum": 8, "default": 1},
                "rate": {"type": "number", "minimum": 0, "exclusiveMinimum": True},
                "training": {"type": "object", "default": {}, "properties": {
                    "steps": {"type": "integer", "default": 100},
                    "optimizer": {"type": "object", "properties": {"name": {"type": "string", "default": "adamw"}}},
                }},
                "port": {"x-kubernetes-int-or-string": True},
                "extra": {"type": "object", "x-kubernetes-preserve-unknown-fields": True,
                          "properties": {"known": {"type": "object", "properties": {"a": {"type": "string"}}}}},
                "tags": {"type": "array", "maxItems": 2, "minItems": 1, "items": {"type": "string"}},
                "volumes": {"type": "array", "items": {"type": "object", "properties": {
                    "size": {"type": "string", "default": "1Gi"}}}},
                "env": {"type": "object", "additionalProperties": {"type": "object", "properties": {
                    "value": {"type": "string", "default": ""}}}},
                "note": {"type": "string", "nullable": True},
                "either": {"anyOf": [{"type": "integer"}, {"type": "string", "enum": ["auto"]}]},
            },
        },
        "status": {"type": "object", "properties": {"phase": {"type": "string"}}},
    },
}


def spec_of(**spec):
    return {"apiVersion": "x/v1", "kind": "X", "metadata": {"name": "n"}, "spec": {"model": "sd15", **spec}}


@pytest.mark.parametrize("given, expected", [
    ({}, {"mode": "careful", "replicas": 1, "training": {"steps": 100}}),
    ({"mode": "fast"}, {"mode": "fast", "replicas": 1, "training": {"steps": 100}}),
    ({"training": {"optimizer": {}}}, {"training": {"steps": 100, "optimizer": {"name": "adamw"}}}),
    ({"volumes": [{}, {"size": "2Gi"}]}, {"volumes": [{"size": "1Gi"}, {"size": "2Gi"}]}),
    ({"env": {"A": {}}}, {"env": {"A": {"value": ""}}}),
    ({"replicas": None}, {"replicas": 1}),
])
def test_defaults(given, expected):
    result, errors = admit(SCHEMA, spec_of(**given))
    assert errors == []
    assert {k: result["spec"][k] for k in expected} == expected


def test_nested_defaults_need_their_parent():
    value = apply_defaults(SCHEMA["properties"]["spec"]["properties"]["training"], {"steps": 5})
    assert value == {"steps": 5}  # optimizer is absent and has no default: its name is not defaulted


@pytest.mark.parametrize("given, expected", [
    ({"unknown": 1}, {}),
    ({"extra": {"anything": {"deep": 1}}}, {"extra": {"anything": {"deep": 1}}}),
    ({"extra": {"known": {"a": "x", "b": "pruned"}}}, {"extra": {"known": {"a": "x"}}}),
    ({"port": {"weird": 1}}, {"port": {"weird": 1}}),
    ({"note": None}, {"note": None}),
])
def test_pruning(given, expected):
    pruned = prune(SCHEMA, spec_of(**given))
    assert {k: v for k, v in pruned["spec"].items() if k != "model"} == expected


def test_root_metadata_is_never_pruned():
    obj = {"apiVersion": "x/v1", "kind": "X", "metadata": {"name": "n", "labels": {"a": "b"}}, "bogus": 1}
    assert prune(SCHEMA, obj) == {"apiVersion": "x/v1", "kind": "X", "metadata": {"name": "n", "labels": {"a": "b"}}}


@pytest.mark.parametrize("given, field, reason, text", [
    ({"mode": "reckless"}, "spec.mode", "FieldValueNotSupported",
     'Unsupported value: "reckless": supported values: "fast", "careful"'),
    ({"replicas": 0}, "spec.replicas", "FieldValueInvalid",
     "Invalid value: 0: spec.replicas in body should be greater than or equal to 1"),
    ({"replicas": 9}, "spec.replicas", "FieldValueInvalid",
     "Invalid value: 9: spec.replicas in body should be less than or equal to 8"),
    ({"rate": 0}, "spec.rate", "FieldValueInvalid", "Invalid value: 0: spec.rate in body should be greater than 0"),
    ({"replicas": "two"}, "spec.replicas", "FieldValueTypeInvalid",
     'Invalid value: "two": spec.replicas in body must be of type integer: "string"'),
    ({"replicas": 1.5}, "spec.replicas", "FieldValueTypeInvalid",
     'Invalid value: 1.5: spec.replicas in body must be of type integer: "number"'),
    ({"model": ""}, "spec.model", "FieldValueInvalid", 'Invalid value: "": spec.model in body should be at least 1 chars long'),
    ({"model": "x" * 11}, "spec.model", "FieldValueTooLong", "Too long: may not be more than 10 bytes"),
    ({"model": "A!"}, "spec.model", "FieldValueInvalid", "Invalid value: \"A!\": spec.model in body should match '^[a-z0-9]*$'"),
    ({"tags": ["a", "b", "c"]}, "spec.tags", "FieldValueTooMany", "Too many: 3: must have at most 2 items"),
    ({"tags": []}, "spec.tags", "FieldValueInvalid", "Invalid value: []: spec.tags in body should have at least 1 items"),
    ({"tags": ["a", 1]}, "spec.tags[1]", "FieldValueTypeInvalid",
     'Invalid value: 1: spec.tags[1] in body must be of type string: "number"'),
    ({"port": 1.5}, "spec.port", "FieldValueTypeInvalid",
     'Invalid value: 1.5: spec.port in body must be of type integer,string: "float"'),
    ({"either": "manual"}, "spec.either", "FieldValueInvalid",
     'Invalid value: "manual": spec.either in body must validate at least one schema (anyOf)'),
])
def test_validation_errors(given, field, reason, text):
    _, errors = admit(SCHEMA, spec_of(**given))
    assert [(e.field, e.reason, e.detail) for e in errors] == [(field, reason, text)]
    assert errors[0].message == f"{field}: {text}"


def test_required_field():
    errors = validate(SCHEMA, {"spec": {}})
    assert [(e.field, e.reason, e.message) for e in errors] == [("spec.model", "FieldValueRequired", "spec.model: Required value")]


@pytest.mark.parametrize("given", [{"port": 80}, {"port": "http"}, {"replicas": 2.0}, {"either": 3}, {"either": "auto"},
                                   {"note": None}, {"extra": {"x": [1, {"y": None}]}}])
def test_valid_values(given):
    assert admit(SCHEMA, spec_of(**given))[1] == []


def test_no_schema_admits_anything():
    assert admit(None, {"spec": {"anything": 1}}) == ({"spec": {"anything": 1}}, [])
