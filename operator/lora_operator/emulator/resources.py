"""What the emulated server serves: built-in resources (kmock's bundled list) and CRDs.

A ``Model`` is one served group/version/plural with what the write path needs to know: kind,
scope, whether ``/status`` is a subresource, and the OpenAPI schema of a custom resource.
Registering a CRD also feeds kmock's ``resources`` so that discovery lists it (Kopf needs that).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from kmock import ResourceInfo, ResourcesArray, resource

from lora_operator.emulator.schema import FieldError

__all__ = ["CRD_GROUP", "CRD_PLURAL", "Model", "Registry", "check_crd"]

CRD_GROUP = "apiextensions.k8s.io"
CRD_PLURAL = "customresourcedefinitions"
CR_VERBS = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")


@dataclass(frozen=True)
class Model:
    """One served resource (group, version, plural) and how writes to it behave."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    has_status: bool
    schema: Mapping[str, Any] | None = None
    crd_name: str | None = None  # set for custom resources
    subresources: frozenset[str] = field(default_factory=frozenset)

    @property
    def api_version(self) -> str:
        """``v1`` or ``group/version``."""
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def storage_key(self) -> tuple[str, str]:
        """Objects are stored per group+plural, whatever version is asked for (no conversion)."""
        return (self.group, self.plural)


class Registry:
    """The served resources, kept in step with kmock's discovery array."""

    def __init__(self, discovery: ResourcesArray) -> None:
        self._discovery = discovery
        self._models: dict[tuple[str, str, str], Model] = {}
        for ref in list(discovery):
            info = discovery[ref]
            if ref.group is None or ref.version is None or ref.plural is None:
                continue
            self._models[(ref.group, ref.version, ref.plural)] = Model(
                group=ref.group, version=ref.version, plural=ref.plural,
                kind=info.kind or ref.plural.capitalize(),
                namespaced=bool(info.namespaced),
                has_status="status" in info.subresources,
                subresources=frozenset(info.subresources),
            )

    def get(self, group: str, version: str, plural: str) -> Model | None:
        """The model served at that group/version/plural, if any."""
        return self._models.get((group, version, plural))

    def __iter__(self) -> Iterator[Model]:
        return iter(list(self._models.values()))

    def register_crd(self, crd: Mapping[str, Any]) -> list[Model]:
        """Serve every served version of a (validated) CRD; replaces earlier registrations."""
        self.unregister_crd(crd["metadata"]["name"])
        spec = crd["spec"]
        names = spec["names"]
        models = []
        for version in spec.get("versions", []):
            if not version.get("served", True):
                continue
            subresources = version.get("subresources") or spec.get("subresources") or {}
            schema = (version.get("schema") or spec.get("validation") or {}).get("openAPIV3Schema")
            model = Model(
                group=spec["group"], version=version["name"], plural=names["plural"], kind=names["kind"],
                namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                has_status="status" in subresources, schema=schema, crd_name=crd["metadata"]["name"],
                subresources=frozenset(subresources),
            )
            self._models[(model.group, model.version, model.plural)] = model
            self._discovery[resource(model.group, model.version, model.plural)] = ResourceInfo(
                kind=model.kind, singular=names.get("singular") or model.kind.lower(),
                namespaced=model.namespaced, verbs=set(CR_VERBS),
                shortnames=set(names.get("shortNames") or ()), categories=set(names.get("categories") or ()),
                subresources=set(model.subresources),
            )
            models.append(model)
        return models

    def unregister_crd(self, crd_name: str) -> None:
        """Stop serving every version of a CRD."""
        for key, model in list(self._models.items()):
            if model.crd_name == crd_name:
                del self._models[key]
                del self._discovery[resource(*key)]


_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def check_crd(crd: Mapping[str, Any]) -> list[FieldError]:
    """The CRD fields a real server insists on before it serves anything."""
    errors: list[FieldError] = []
    spec = crd.get("spec") or {}
    names = spec.get("names") or {}
    for path, value in (("spec.group", spec.get("group")), ("spec.names.plural", names.get("plural")),
                        ("spec.names.kind", names.get("kind"))):
        if not value:
            errors.append(FieldError(path, "FieldValueRequired", "Required value"))
    if spec.get("scope") not in ("Namespaced", "Cluster"):
        errors.append(FieldError("spec.scope", "FieldValueNotSupported",
                                 f'Unsupported value: "{spec.get("scope")}": supported values: "Cluster", "Namespaced"'))
    if names.get("plural") and not _DNS_LABEL.match(names["plural"]):
        errors.append(FieldError("spec.names.plural", "FieldValueInvalid", f'Invalid value: "{names["plural"]}"'))
    expected = f"{names.get('plural')}.{spec.get('group')}"
    name = (crd.get("metadata") or {}).get("name")
    if spec.get("group") and names.get("plural") and name != expected:
        errors.append(FieldError("metadata.name", "FieldValueInvalid",
                                 f'Invalid value: "{name}": must be spec.names.plural+"."+spec.group'))
    versions = spec.get("versions") or []
    if not versions:
        errors.append(FieldError("spec.versions", "FieldValueRequired", "Required value: must have exactly one version marked as storage version"))
    elif sum(bool(v.get("storage")) for v in versions) != 1:
        errors.append(FieldError("spec.versions", "FieldValueInvalid",
                                 "Invalid value: must have exactly one version marked as storage version"))
    for index, version in enumerate(versions):
        root = (version.get("schema") or {}).get("openAPIV3Schema")
        if not root:
            errors.append(FieldError(f"spec.versions[{index}].schema.openAPIV3Schema", "FieldValueRequired",
                                     "Required value: schemas are required"))
            continue
        metadata = (root.get("properties") or {}).get("metadata")
        if isinstance(metadata, Mapping) and set(metadata) - {"type", "properties"}:
            # What refused the product's CRD on a real server: metadata is implicit, only
            # `type: object` (and constraints on name/generateName) may be said about it.
            errors.append(FieldError("spec.validation.openAPIV3Schema.properties[metadata]", "FieldValueForbidden",
                                     "Forbidden: must not specify anything other than name and generateName, "
                                     "but metadata is implicitly specified"))
    return errors
