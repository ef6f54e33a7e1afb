"""Patch documents: JSON merge patch (RFC 7386) and JSON patch (RFC 6902) (pure).

Strategic merge patch is applied as a merge patch: lists are replaced, not merged by key, and
``$patch`` directives are not understood. Our code only patches status and annotations, where
the two agree.
"""

from __future__ import annotations

import copy
from typing import Any

__all__ = ["PatchError", "json_patch", "merge_patch"]


class PatchError(ValueError):
    """A patch that cannot be applied (a real server answers 422 or 400)."""


def merge_patch(target: Any, patch: Any) -> Any:
    """Apply an RFC 7386 merge patch; ``None`` deletes a key. Returns a new value."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _unescape(token: str) -> str:
    return token.replace("~1", "/").replace("~0", "~")


def _parse_pointer(pointer: str) -> list[str]:
    if pointer == "":
        return []
    if not pointer.startswith("/"):
        raise PatchError(f"invalid JSON pointer: {pointer!r}")
    return [_unescape(token) for token in pointer[1:].split("/")]


def _walk(doc: Any, tokens: list[str]) -> Any:
    for token in tokens:
        if isinstance(doc, dict):
            if token not in doc:
                raise PatchError(f"doc is missing path: /{'/'.join(tokens)}")
            doc = doc[token]
        elif isinstance(doc, list):
            try:
                doc = doc[int(token)]
            except (ValueError, IndexError):
                raise PatchError(f"doc is missing path: /{'/'.join(tokens)}") from None
        else:
            raise PatchError(f"doc is missing path: /{'/'.join(tokens)}")
    return doc


def _add(doc: Any, tokens: list[str], value: Any) -> Any:
    if not tokens:
        return value
    parent = _walk(doc, tokens[:-1])
    last = tokens[-1]
    if isinstance(parent, dict):
        parent[last] = value
    elif isinstance(parent, list):
        index = len(parent) if last == "-" else int(last)
        if not 0 <= index <= len(parent):
            raise PatchError(f"add operation index out of range: {index}")
        parent.insert(index, value)
    else:
        raise PatchError(f"cannot add to a scalar at /{'/'.join(tokens)}")
    return doc


def _remove(doc: Any, tokens: list[str]) -> Any:
    if not tokens:
        raise PatchError("cannot remove the whole document")
    parent = _walk(doc, tokens[:-1])
    last = tokens[-1]
    if isinstance(parent, dict) and last in parent:
        del parent[last]
    elif isinstance(parent, list) and last.isdigit() and int(last) < len(parent):
        del parent[int(last)]
    else:
        raise PatchError(f"unable to remove nonexistent key: /{'/'.join(tokens)}")
    return doc


def json_patch(target: Any, operations: Any) -> Any:
    """Apply an RFC 6902 JSON patch (add, remove, replace, move, copy, test). Returns a new value."""
    if not isinstance(operations, list):
        raise PatchError("a JSON patch must be a list of operations")
    doc = copy.deepcopy(target)
    for op in operations:
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise PatchError(f"invalid operation: {op!r}")
        tokens = _parse_pointer(op["path"])
        kind = op["op"]
        if kind == "add":
            doc = _add(doc, tokens, copy.deepcopy(op.get("value")))
        elif kind == "remove":
            doc = _remove(doc, tokens)
        elif kind == "replace":
            _walk(doc, tokens)  # must exist
            doc = _add(_remove(doc, tokens), tokens, copy.deepcopy(op.get("value"))) if tokens else op.get("value")
        elif kind in ("move", "copy"):
            source = _parse_pointer(op.get("from", ""))
            value = copy.deepcopy(_walk(doc, source))
            if kind == "move":
                doc = _remove(doc, source)
            doc = _add(doc, tokens, value)
        elif kind == "test":
            if _walk(doc, tokens) != op.get("value"):
                raise PatchError(f"testing value /{'/'.join(tokens)} failed")
        else:
            raise PatchError(f"unexpected kind: {kind!r}")
    return doc
