"""API errors rendered as real ``Status`` objects.

One exception, ``ApiError``, carries the HTTP code, the ``reason`` (NotFound, AlreadyExists,
Conflict, Invalid, BadRequest, Gone, MethodNotAllowed, UnsupportedMediaType) and ``details``;
the helpers below build them with the real server's wording.
"""

from __future__ import annotations

from typing import Any

import attrs
from kmock import KubernetesError

from lora_operator.emulator.schema import FieldError

__all__ = [
    "ApiError",
    "already_exists",
    "bad_request",
    "conflict",
    "gone",
    "invalid",
    "method_not_allowed",
    "not_found",
    "status_body",
    "unsupported_media_type",
]


@attrs.frozen
class ApiError(KubernetesError):
    """An error answered as a ``kind: Status`` body (a kmock KubernetesError, so kmock renders it too)."""

    status: int = 500
    reason: str | None = "InternalError"
    message: str | None = None
    details: Any | None = None


def status_body(code: int, reason: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    """A ``Status`` object with ``status: Failure`` as the API server returns it."""
    body: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Status",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details:
        body["details"] = details
    return body


def _details(name: str | None, group: str, plural: str) -> dict[str, Any]:
    details: dict[str, Any] = {"kind": plural}
    if name:
        details["name"] = name
    if group:
        details["group"] = group
    return details


def _qualified(group: str, plural: str) -> str:
    return f"{plural}.{group}" if group else plural


def not_found(group: str, plural: str, name: str) -> ApiError:
    """404: ``pods "x" not found``."""
    return ApiError(404, "NotFound", f'{_qualified(group, plural)} "{name}" not found', _details(name, group, plural))


def already_exists(group: str, plural: str, name: str) -> ApiError:
    """409: ``pods "x" already exists``."""
    return ApiError(409, "AlreadyExists", f'{_qualified(group, plural)} "{name}" already exists',
                    _details(name, group, plural))


def conflict(group: str, plural: str, name: str) -> ApiError:
    """409: the optimistic-concurrency failure on a stale resourceVersion."""
    return ApiError(409, "Conflict",
                    f'Operation cannot be fulfilled on {_qualified(group, plural)} "{name}": the object has been '
                    "modified; please apply your changes to the latest version and try again",
                    _details(name, group, plural))


def invalid(group: str, kind: str, name: str, errors: list[FieldError]) -> ApiError:
    """422: ``Kind.group "name" is invalid: field: detail`` with ``details.causes``."""
    lines = [error.message for error in errors]
    text = lines[0] if len(lines) == 1 else f"[{', '.join(lines)}]"
    qualified = f"{kind}.{group}" if group else kind
    details: dict[str, Any] = {
        "name": name,
        "kind": kind,
        "causes": [{"reason": e.reason, "message": e.detail, "field": e.field} for e in errors],
    }
    if group:
        details["group"] = group
    return ApiError(422, "Invalid", f'{qualified} "{name}" is invalid: {text}', details)


def bad_request(message: str) -> ApiError:
    """400 BadRequest."""
    return ApiError(400, "BadRequest", message, None)


def gone(message: str) -> ApiError:
    """410 Expired: a watch/list resourceVersion older than the retained history."""
    return ApiError(410, "Expired", message, None)


def method_not_allowed(message: str = "the server does not allow this method on the requested resource") -> ApiError:
    """405 MethodNotAllowed."""
    return ApiError(405, "MethodNotAllowed", message, None)


def unsupported_media_type(content_type: str) -> ApiError:
    """415 UnsupportedMediaType."""
    return ApiError(415, "UnsupportedMediaType", f"the body of the request was in an unknown format: {content_type}")
