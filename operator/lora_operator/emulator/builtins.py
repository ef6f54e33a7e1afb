"""Per-kind behaviour of built-in resources that our code can observe (pure).

Pods: the defaults the API server fills in, the initial ``Pending`` status, which spec fields an
update may change, and how long a graceful delete keeps the pod. CRDs: the ``Established``
status. Names: the RFC 1123 checks.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from typing import Any

from lora_operator.emulator.schema import FieldError

__all__ = [
    "crd_status",
    "default_pod",
    "pod_create_errors",
    "pod_grace_seconds",
    "pod_spec_update_errors",
    "validate_name",
]

_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# Resources whose names must be DNS labels rather than subdomains.
_LABEL_NAMED = {("", "namespaces"), ("", "services")}


def validate_name(group: str, plural: str, name: str) -> list[FieldError]:
    """``metadata.name`` errors: RFC 1123 subdomain (or label for namespaces/services)."""
    if (group, plural) in _LABEL_NAMED:
        if len(name) > 63 or not _LABEL.match(name):
            return [FieldError("metadata.name", "FieldValueInvalid",
                               f'Invalid value: "{name}": a lowercase RFC 1123 label must consist of lower case '
                               "alphanumeric characters or '-', and must start and end with an alphanumeric character")]
        return []
    if len(name) > 253 or not _SUBDOMAIN.match(name):
        return [FieldError("metadata.name", "FieldValueInvalid",
                           f'Invalid value: "{name}": a lowercase RFC 1123 subdomain must consist of lower case '
                           "alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character")]
    return []


def _qos_class(containers: list[dict[str, Any]]) -> str:
    requests_limits = [(c.get("resources") or {}) for c in containers]
    if not any(r.get("requests") or r.get("limits") for r in requests_limits):
        return "BestEffort"
    guaranteed = all(
        r.get("limits") and all(k in r["limits"] for k in ("cpu", "memory"))
        and all(r.get("requests", {}).get(k, r["limits"][k]) == r["limits"][k] for k in r["limits"])
        for r in requests_limits
    )
    return "Guaranteed" if guaranteed else "Burstable"


def _default_container(container: dict[str, Any]) -> None:
    image = container.get("image", "")
    tag = image.rsplit("/", 1)[-1]
    latest = "@" not in image and (":" not in tag or tag.endswith(":latest"))
    container.setdefault("imagePullPolicy", "Always" if latest else "IfNotPresent")
    container.setdefault("terminationMessagePath", "/dev/termination-log")
    container.setdefault("terminationMessagePolicy", "File")
    container.setdefault("resources", {})
    limits = container["resources"].get("limits")
    if limits and "requests" not in container["resources"]:
        container["resources"]["requests"] = dict(limits)  # requests default to limits


def pod_create_errors(pod: Mapping[str, Any]) -> list[FieldError]:
    """The few pod spec checks a real server would certainly fail on."""
    containers = (pod.get("spec") or {}).get("containers")
    if not containers:
        return [FieldError("spec.containers", "FieldValueRequired", "Required value")]
    errors: list[FieldError] = []
    for index, container in enumerate(containers):
        if not container.get("name"):
            errors.append(FieldError(f"spec.containers[{index}].name", "FieldValueRequired", "Required value"))
        if not container.get("image"):
            errors.append(FieldError(f"spec.containers[{index}].image", "FieldValueRequired", "Required value"))
    return errors


def default_pod(pod: dict[str, Any]) -> dict[str, Any]:
    """Fill the spec defaults and the initial Pending status (returns a copy)."""
    pod = copy.deepcopy(pod)
    spec = pod.setdefault("spec", {})
    spec.setdefault("restartPolicy", "Always")
    spec.setdefault("terminationGracePeriodSeconds", 30)
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("schedulerName", "default-scheduler")
    spec.setdefault("securityContext", {})
    spec.setdefault("enableServiceLinks", True)
    spec.setdefault("priority", 0)
    spec.setdefault("serviceAccountName", spec.get("serviceAccount", "default"))
    spec.setdefault("serviceAccount", spec["serviceAccountName"])
    for container in spec.get("initContainers", []) + spec.get("containers", []):
        _default_container(container)
    pod["status"] = {"phase": "Pending", "qosClass": _qos_class(spec.get("containers", []))}
    return pod


# Fields of a running pod's spec an update may change (everything else is immutable).
_MUTABLE_SPEC = {"activeDeadlineSeconds", "tolerations", "terminationGracePeriodSeconds"}


def pod_spec_update_errors(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[FieldError]:
    """A Forbidden error when an update touches an immutable part of a pod's spec."""
    def comparable(spec: Mapping[str, Any]) -> dict[str, Any]:
        spec = copy.deepcopy(dict(spec))
        for name in _MUTABLE_SPEC:
            spec.pop(name, None)
        for kind in ("containers", "initContainers"):
            for container in spec.get(kind, []):
                container.pop("image", None)
        return spec

    if comparable(old.get("spec") or {}) != comparable(new.get("spec") or {}):
        return [FieldError("spec", "FieldValueForbidden",
                           "Forbidden: pod updates may not change fields other than `spec.containers[*].image`, "
                           "`spec.initContainers[*].image`, `spec.activeDeadlineSeconds`, `spec.tolerations` "
                           "(only additions to existing tolerations) or `spec.terminationGracePeriodSeconds` "
                           "(allow it to be set to 1 if it was previously negative)")]
    return []


def pod_grace_seconds(pod: Mapping[str, Any], requested: int | None) -> int:
    """How long a delete keeps the pod: 0 when no kubelet owns it (unbound) or it already finished."""
    spec = pod.get("spec") or {}
    phase = (pod.get("status") or {}).get("phase")
    if not spec.get("nodeName") or phase in ("Succeeded", "Failed"):
        return 0
    grace = requested if requested is not None else spec.get("terminationGracePeriodSeconds", 30)
    return max(int(grace), 0)


def crd_status(crd: Mapping[str, Any], now: str) -> dict[str, Any]:
    """A freshly accepted CRD: names accepted, established, storage version recorded."""
    spec = crd["spec"]
    storage = [v["name"] for v in spec.get("versions", []) if v.get("storage")]
    conditions = [
        {"type": t, "status": "True", "reason": r, "message": m, "lastTransitionTime": now}
        for t, r, m in (("NamesAccepted", "NoConflicts", "no conflicts found"),
                        ("Established", "InitialNamesAccepted", "the initial names have been accepted"))
    ]
    return {"conditions": conditions, "acceptedNames": copy.deepcopy(spec["names"]), "storedVersions": storage}


_MICRO_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}(Z|[+-]\d{2}:\d{2})$")


def event_time_error(event: Mapping[str, Any]) -> str | None:
    """Why an Event's eventTime is refused (MicroTime: exactly six fractional digits), or None."""
    value = event.get("eventTime")
    if value is None or (isinstance(value, str) and _MICRO_TIME.match(value)):
        return None
    return (f'parsing time "{value}" as "2006-01-02T15:04:05.000000Z07:00": '
            "eventTime must be a MicroTime with six fractional digits")
