"""The LoRATrainingJob CRD, generated from the spec and status pydantic models.

pydantic's JSON schema becomes a structural OpenAPI v3 schema: $refs inlined, `X | None` as
`nullable`, no titles, `const` as a one-value enum, exclusive bounds in the OpenAPI 3.0 form.
`lora-operator crd` prints it; a unit test fails when crds/ holds a stale copy.
"""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import BaseModel

from lora_operator.spec import (
    API_VERSION,
    GROUP,
    IMMUTABLE_FIELDS,
    KIND,
    MAX_JOB_NAME,
    PLURAL,
    VERSION,
    JobSpec,
)
from lora_operator.status import JobStatus

CRD_NAME = f"{PLURAL}.{GROUP}"
CRD_FILE = f"crds/{CRD_NAME}.yaml"
_DROP = {"title", "examples"}


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_inline(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = _inline(defs[node["$ref"].rsplit("/", 1)[-1]], defs)
        extra = {k: v for k, v in node.items() if k != "$ref"}
        return {**target, **_inline(extra, defs)}
    return {k: _inline(v, defs) for k, v in node.items() if k not in ("$defs",)}


def _structural(node: dict[str, Any]) -> dict[str, Any]:
    """One pydantic JSON-schema node as a structural OpenAPI v3 node."""
    node = {k: v for k, v in node.items() if k not in _DROP}
    if node.get("x-kubernetes-int-or-string"):
        # Already structural (int-or-string: its anyOf is the one the API server allows there).
        return {k: v for k, v in node.items() if not (k == "default" and v is None)}
    for key in ("anyOf", "oneOf"):
        if key in node:
            given = node.pop(key)
            options = [o for o in given if o.get("type") != "null"]
            if len(options) != 1:
                raise ValueError(f"cannot express {options} structurally")
            merged = {**_structural(options[0]), **{k: v for k, v in node.items()}}
            if len(options) < len(given):
                merged["nullable"] = True
            node = merged
    if "allOf" in node and len(node["allOf"]) == 1:
        node = {**_structural(node.pop("allOf")[0]), **node}
    if "const" in node:
        node["enum"] = [node.pop("const")]
    if "enum" in node and "type" not in node:
        node["type"] = "string"
    for bound, plain in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(node.get(bound), (int, float)) and not isinstance(node.get(bound), bool):
            node[plain] = node.pop(bound)
            node[bound] = True
    if node.get("default", 0) is None:
        del node["default"]
    if "properties" in node:
        node["properties"] = {k: _structural(v) for k, v in node["properties"].items()}
        node.setdefault("type", "object")
    if isinstance(node.get("additionalProperties"), dict):
        node["additionalProperties"] = _structural(node["additionalProperties"])
    elif node.get("additionalProperties") is False:
        del node["additionalProperties"]  # structural schemas prune unknown fields instead
    if isinstance(node.get("items"), dict):
        node["items"] = _structural(node["items"])
    if node.get("type") == "object" and "properties" not in node and "additionalProperties" not in node:
        node["x-kubernetes-preserve-unknown-fields"] = True
    return node


def openapi_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of a pydantic model (camelCase aliases)."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return _structural(_inline(raw, raw.get("$defs", {})))


def _immutable(spec: dict[str, Any]) -> None:
    # Transition rules: the fields that define what is trained cannot change once a job exists.
    for name in IMMUTABLE_FIELDS:
        prop = spec["properties"][name]
        prop["x-kubernetes-validations"] = [{
            "rule": "self == oldSelf",
            "message": f"spec.{name} is immutable: create a new LoRATrainingJob to train something else",
        }]


# Cross-field rules the API server checks at admission (parse_spec checks them again, naming the field).
CROSS_FIELD_RULES: dict[str, list[dict[str, str]]] = {
    "": [{
        "rule": "!(has(self.training) && has(self.training.cacheTextEmbeddings) && self.training.cacheTextEmbeddings"
                " && has(self.lora) && has(self.lora.trainTextEncoder) && self.lora.trainTextEncoder)",
        "message": "spec.training.cacheTextEmbeddings needs spec.lora.trainTextEncoder false (a trained text encoder's "
                   "outputs change as training goes); set one of them to false",
    }],
    "training.buckets": [{
        "rule": "!has(self.minResolution) || !has(self.maxResolution) || self.minResolution <= self.maxResolution",
        "message": "spec.training.buckets.minResolution must not be over maxResolution",
    }],
}


def _cross_field(spec: dict[str, Any]) -> None:
    for path, rules in CROSS_FIELD_RULES.items():
        node = spec
        for name in filter(None, path.split(".")):
            node = node["properties"][name]
        node.setdefault("x-kubernetes-validations", []).extend(rules)


def build_crd() -> dict[str, Any]:
    """The CustomResourceDefinition as a dict."""
    spec = openapi_schema(JobSpec)
    spec["description"] = "What to train and where; see examples/ for complete jobs."
    _immutable(spec)
    _cross_field(spec)
    status = openapi_schema(JobStatus)
    status["description"] = "Observed state, written by the operator."
    root = {
        "type": "object",
        "description": "A LoRA fine-tuning run that survives spot preemption by resuming from checkpoints.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "API version of this object."},
            "kind": {"type": "string", "description": "Kind of this object."},
            "metadata": {"type": "object"},  # the API server refuses anything else here (name/generateName only)
            "spec": spec,
            "status": status,
        },
        "x-kubernetes-validations": [{
            "rule": f"size(self.metadata.name) <= {MAX_JOB_NAME}",
            "message": f"metadata.name must be at most {MAX_JOB_NAME} characters (pod names add -a<attempt>)",
        }],
    }
    column = [
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "Phase of the job."},
        {"name": "Step", "type": "integer", "jsonPath": ".status.progress.step", "description": "Steps done."},
        {"name": "Progress", "type": "number", "jsonPath": ".status.progress.percent", "description": "Percent done."},
        {"name": "Preemptions", "type": "integer", "jsonPath": ".status.preemptions", "description": "Preempted attempts."},
        {"name": "Failures", "type": "integer", "jsonPath": ".status.failures", "description": "Failed attempts."},
        {"name": "Checkpoint", "type": "integer", "jsonPath": ".status.latestCheckpoint.step",
         "description": "Step of the newest committed checkpoint."},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        # `kubectl get ltj -o wide` (priority 1): where it runs and what spot saved (spec.spot.fallback).
        {"name": "Queue", "type": "string", "jsonPath": ".spec.queueName", "priority": 1,
         "description": "Kueue LocalQueue."},
        {"name": "Pool", "type": "string", "jsonPath": ".status.placement.pool", "priority": 1,
         "description": "Spot or OnDemand: the pool of the current attempt."},
        {"name": "Spot-GPU-s", "type": "number", "jsonPath": ".status.usage.spotGpuSeconds", "priority": 1,
         "description": "GPU-seconds on spot."},
        {"name": "OnDemand-GPU-s", "type": "number", "jsonPath": ".status.usage.onDemandGpuSeconds", "priority": 1,
         "description": "GPU-seconds on on-demand."},
        {"name": "Cost", "type": "number", "jsonPath": ".status.cost.total", "priority": 1,
         "description": "Estimated cost at the operator's prices."},
        {"name": "Saved", "type": "number", "jsonPath": ".status.cost.saved", "priority": 1,
         "description": "What spot saved against all on-demand."},
    ]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": CRD_NAME, "labels": {"app.kubernetes.io/name": "lora-operator"}},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": KIND.lower(),
                "shortNames": ["ltj", "lorajob"],
                "categories": ["lora"],
            },
            "versions": [{
                "name": VERSION,
                "served": True,
                "storage": True,
                "schema": {"openAPIV3Schema": root},
                "subresources": {"status": {}},
                "additionalPrinterColumns": column,
            }],
        },
    }


def render_crd() -> str:
    """The CRD as the YAML committed under crds/."""
    header = f"# Generated by `lora-operator crd` from lora_operator.spec and lora_operator.status ({API_VERSION}).\n"
    header += "# Do not edit: change the models and regenerate.\n"
    return header + yaml.safe_dump(build_crd(), sort_keys=False, width=120)
