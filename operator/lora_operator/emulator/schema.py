"""Structural OpenAPI v3 schemas of CRDs: pruning, defaulting and validation (pure).

Follows the apiextensions-apiserver order: drop non-nullable nulls and unknown fields, apply
defaults (nested ones too, only where the parent exists), then validate. Validation errors are
``FieldError`` values whose messages read like the real server's ``field.Error`` strings, e.g.
``spec.replicas: Invalid value: 0: spec.replicas in body should be greater than or equal to 1``.
Not covered: CEL ``x-kubernetes-validations``, ``format`` checks, list-type/map-keys uniqueness.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["FieldError", "admit", "apply_defaults", "prune", "unknown_fields", "validate"]

Schema = Mapping[str, Any]

# Kept at the root and in embedded resources whatever the schema says.
_ALWAYS_KEPT = ("apiVersion", "kind", "metadata")


@dataclass(frozen=True)
class FieldError:
    """One invalid field: ``reason`` is the Status cause reason (FieldValueInvalid, ...)."""

    field: str
    reason: str
    detail: str  # the message without the "field: " prefix, as in Status details.causes[].message

    @property
    def message(self) -> str:
        """The full "field: detail" line used in the Status message."""
        return f"{self.field}: {self.detail}"


def _go_repr(value: Any) -> str:
    # Close enough to Go's %v/%q rendering used in the real messages.
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if value is None:
        return "null"
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _keeps_unknown(schema: Schema) -> bool:
    return bool(schema.get("x-kubernetes-preserve-unknown-fields")) or schema.get("additionalProperties") is True


def prune(schema: Schema, value: Any, *, root: bool = True) -> Any:
    """Drop fields the schema does not know and nulls it does not allow (returns a copy)."""
    if schema.get("x-kubernetes-int-or-string"):
        return copy.deepcopy(value)
    if isinstance(value, dict):
        properties: Mapping[str, Schema] = schema.get("properties") or {}
        additional = schema.get("additionalProperties")
        keep_meta = root or bool(schema.get("x-kubernetes-embedded-resource"))
        result: dict[str, Any] = {}
        for key, item in value.items():
            if keep_meta and key in _ALWAYS_KEPT:
                result[key] = copy.deepcopy(item)
            elif key in properties:
                sub = properties[key]
                if item is None and not sub.get("nullable"):
                    continue  # real servers prune non-nullable nulls before defaulting
                result[key] = prune(sub, item, root=False)
            elif isinstance(additional, Mapping):
                result[key] = prune(additional, item, root=False)
            elif _keeps_unknown(schema):
                result[key] = copy.deepcopy(item)
        return result
    if isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        return [prune(schema["items"], item, root=False) for item in value]
    return copy.deepcopy(value)


def unknown_fields(schema: Schema | None, value: Any, path: str = "", *, root: bool = True) -> list[str]:
    """The dotted paths of fields ``prune`` would drop (what Strict field validation refuses)."""
    if not schema or schema.get("x-kubernetes-int-or-string") or _keeps_unknown(schema):
        return []
    if isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        return [p for item in value for p in unknown_fields(schema["items"], item, f"{path}[]", root=False)]
    if not isinstance(value, dict):
        return []
    properties: Mapping[str, Schema] = schema.get("properties") or {}
    additional = schema.get("additionalProperties")
    keep_meta = root or bool(schema.get("x-kubernetes-embedded-resource"))
    found: list[str] = []
    for key, item in value.items():
        where = f"{path}.{key}" if path else key
        if keep_meta and key in _ALWAYS_KEPT:
            continue
        if key in properties:
            found += unknown_fields(properties[key], item, where, root=False)
        elif isinstance(additional, Mapping):
            found += unknown_fields(additional, item, where, root=False)
        else:
            found.append(where)
    return sorted(found)


def apply_defaults(schema: Schema, value: Any) -> Any:
    """Fill absent fields with their schema defaults, recursing into present objects (in place)."""
    if isinstance(value, dict):
        properties: Mapping[str, Schema] = schema.get("properties") or {}
        for key, sub in properties.items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
        for key, item in value.items():
            if key in properties:
                value[key] = apply_defaults(properties[key], item)
            elif isinstance(schema.get("additionalProperties"), Mapping):
                value[key] = apply_defaults(schema["additionalProperties"], item)
    elif isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        for index, item in enumerate(value):
            value[index] = apply_defaults(schema["items"], item)
    return value


def _type_ok(expected: str, value: Any) -> bool:
    if expected == "object":
        return isinstance(value, dict)
    if expected == "array":
        return isinstance(value, list)
    if expected == "string":
        return isinstance(value, str)
    if expected == "boolean":
        return isinstance(value, bool)
    if expected == "integer":
        # JSON "1.0" decodes to an integer on a real server too.
        return not isinstance(value, bool) and (
            isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        )
    if expected == "number":
        return not isinstance(value, bool) and isinstance(value, (int, float))
    return True


def _invalid(path: str, value: Any, text: str) -> FieldError:
    return FieldError(path, "FieldValueInvalid", f"Invalid value: {_go_repr(value)}: {path} in body {text}")


def validate(schema: Schema, value: Any, path: str = "") -> list[FieldError]:
    """All violations of the schema by the value; field paths are dotted (``spec.a[0].b``)."""
    errors: list[FieldError] = []
    if value is None:
        if schema.get("nullable") or not path:
            return errors
        return [FieldError(path, "FieldValueTypeInvalid",
                           f"Invalid value: \"null\": {path} in body must be of type {schema.get('type', 'object')}: \"null\"")]
    if schema.get("x-kubernetes-int-or-string"):
        if not (_type_ok("integer", value) or isinstance(value, str)):
            errors.append(FieldError(path, "FieldValueTypeInvalid",
                                     f"Invalid value: {_go_repr(value)}: {path} in body must be of type "
                                     f"integer,string: {_go_repr(type(value).__name__)}"))
            return errors
    elif "type" in schema and not _type_ok(schema["type"], value):
        kind = {dict: "object", list: "array", str: "string", bool: "boolean"}.get(type(value), "number")
        errors.append(FieldError(path, "FieldValueTypeInvalid",
                                 f"Invalid value: {_go_repr(value)}: {path} in body must be of type "
                                 f"{schema['type']}: {_go_repr(kind)}"))
        return errors  # nothing else makes sense on the wrong type

    if "enum" in schema and value not in schema["enum"]:
        supported = ", ".join(_go_repr(v) for v in schema["enum"])
        errors.append(FieldError(path, "FieldValueNotSupported",
                                 f"Unsupported value: {_go_repr(value)}: supported values: {supported}"))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        errors.extend(_check_number(schema, value, path))
    if isinstance(value, str):
        errors.extend(_check_string(schema, value, path))
    if isinstance(value, list):
        errors.extend(_check_array(schema, value, path))
    if isinstance(value, dict):
        errors.extend(_check_object(schema, value, path))
    errors.extend(_check_combinators(schema, value, path))
    return errors


def _check_number(schema: Schema, value: float, path: str) -> list[FieldError]:
    errors: list[FieldError] = []
    if "minimum" in schema:
        if schema.get("exclusiveMinimum") is True and value <= schema["minimum"]:
            errors.append(_invalid(path, value, f"should be greater than {_go_repr(schema['minimum'])}"))
        elif value < schema["minimum"]:
            errors.append(_invalid(path, value, f"should be greater than or equal to {_go_repr(schema['minimum'])}"))
    if "maximum" in schema:
        if schema.get("exclusiveMaximum") is True and value >= schema["maximum"]:
            errors.append(_invalid(path, value, f"should be less than {_go_repr(schema['maximum'])}"))
        elif value > schema["maximum"]:
            errors.append(_invalid(path, value, f"should be less than or equal to {_go_repr(schema['maximum'])}"))
    if schema.get("multipleOf") and (value / schema["multipleOf"]) % 1 != 0:
        errors.append(_invalid(path, value, f"should be a multiple of {_go_repr(schema['multipleOf'])}"))
    return errors


def _check_string(schema: Schema, value: str, path: str) -> list[FieldError]:
    errors: list[FieldError] = []
    if "maxLength" in schema and len(value) > schema["maxLength"]:
        errors.append(FieldError(path, "FieldValueTooLong", f"Too long: may not be more than {schema['maxLength']} bytes"))
    if "minLength" in schema and len(value) < schema["minLength"]:
        errors.append(_invalid(path, value, f"should be at least {schema['minLength']} chars long"))
    if "pattern" in schema and not re.search(schema["pattern"], value):
        errors.append(_invalid(path, value, f"should match '{schema['pattern']}'"))
    return errors


def _check_array(schema: Schema, value: list[Any], path: str) -> list[FieldError]:
    errors: list[FieldError] = []
    if "maxItems" in schema and len(value) > schema["maxItems"]:
        errors.append(FieldError(path, "FieldValueTooMany",
                                 f"Too many: {len(value)}: must have at most {schema['maxItems']} items"))
    if "minItems" in schema and len(value) < schema["minItems"]:
        errors.append(_invalid(path, value, f"should have at least {schema['minItems']} items"))
    if schema.get("uniqueItems") and len({json.dumps(v, sort_keys=True) for v in value}) != len(value):
        errors.append(FieldError(path, "FieldValueDuplicate", f"Duplicate value: {_go_repr(value)}"))
    if isinstance(schema.get("items"), Mapping):
        for index, item in enumerate(value):
            errors.extend(validate(schema["items"], item, _join(path, index)))
    return errors


def _check_object(schema: Schema, value: dict[str, Any], path: str) -> list[FieldError]:
    errors: list[FieldError] = []
    for key in schema.get("required") or ():
        if key not in value:
            errors.append(FieldError(_join(path, key), "FieldValueRequired", "Required value"))
    if "maxProperties" in schema and len(value) > schema["maxProperties"]:
        errors.append(FieldError(path, "FieldValueTooMany",
                                 f"Too many: {len(value)}: must have at most {schema['maxProperties']} items"))
    if "minProperties" in schema and len(value) < schema["minProperties"]:
        errors.append(_invalid(path, value, f"should have at least {schema['minProperties']} properties"))
    properties: Mapping[str, Schema] = schema.get("properties") or {}
    additional = schema.get("additionalProperties")
    for key, item in value.items():
        if not path and key in _ALWAYS_KEPT and key not in properties:
            continue
        if key in properties:
            errors.extend(validate(properties[key], item, _join(path, key)))
        elif isinstance(additional, Mapping):
            errors.extend(validate(additional, item, _join(path, key)))
    return errors


def _check_combinators(schema: Schema, value: Any, path: str) -> list[FieldError]:
    errors: list[FieldError] = []
    for sub in schema.get("allOf") or ():
        errors.extend(validate(sub, value, path))
    if schema.get("anyOf") and not any(not validate(sub, value, path) for sub in schema["anyOf"]):
        errors.append(_invalid(path, value, "must validate at least one schema (anyOf)"))
    if schema.get("oneOf") and sum(not validate(sub, value, path) for sub in schema["oneOf"]) != 1:
        errors.append(_invalid(path, value, "must validate one and only one schema (oneOf)"))
    if isinstance(schema.get("not"), Mapping) and not validate(schema["not"], value, path):
        errors.append(_invalid(path, value, "must not validate the schema (not)"))
    return errors


def admit(schema: Schema | None, obj: Mapping[str, Any]) -> tuple[dict[str, Any], list[FieldError]]:
    """Prune, default and validate a whole object; returns the admitted copy and its errors."""
    if not schema:
        return copy.deepcopy(dict(obj)), []
    result = prune(schema, dict(obj))
    result = apply_defaults(schema, result)
    return result, validate(schema, result)
