"""The generated CRD and the example manifests.

Behaviours tested:
- crds/ holds exactly what `lora-operator crd` prints (regenerate with `lora-operator crd > ...`);
- the CRD validates against the upstream apiextensions schema and is structural: no $ref,
  anyOf, title or const anywhere, a type and a description on every field, except an int-or-string
  field (checkpoint.everySteps), which has exactly the `anyOf: [integer, string]` the API server allows;
- everySteps takes an integer >= 1 or "auto" and nothing else (the schema, as jsonschema reads it);
- printer columns, short names, the status subresource and the immutability rules are there;
- every LoRATrainingJob under examples/ validates against the CRD's openAPIV3Schema (its metadata
  against the upstream ObjectMeta schema that kubernetes-validate ships), every other manifest
  there against the upstream schemas, and every job spec maps onto a TrainConfig.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import schema_contents
from referencing import Registry, Resource

from lora_operator.crd import CRD_FILE, build_crd, render_crd
from lora_operator.spec import IMMUTABLE_FIELDS, KIND, parse_spec, to_train_config

ROOT = Path(__file__).resolve().parents[2]
K8S_VERSION = "1.30.0"
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def schema() -> dict[str, Any]:
    return build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def json_schema(node: Any) -> Any:
    """OpenAPI v3.0 → JSON Schema draft 4: nullable as a null type; unknown fields are errors, as
    with kubectl's strict field validation."""
    if isinstance(node, list):
        return [json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: json_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
    if node.get("nullable"):
        out["type"] = [node["type"], "null"]
    if "properties" in node and "additionalProperties" not in node:
        out["additionalProperties"] = False
    if "properties" in out:
        out["properties"] = {k: json_schema(v) for k, v in node["properties"].items()}
    return out


def validate_metadata(meta: dict[str, Any]) -> None:
    """Validate metadata against upstream ObjectMeta (strict), as kubernetes-validate would."""
    folder = f"kubernetes-json-schema/v{K8S_VERSION}-local-strict/"
    object_meta = schema_contents(folder + "objectmeta-meta-v1.json", K8S_VERSION)
    registry = Resource.from_contents(schema_contents(folder + "_definitions.json", K8S_VERSION)) @ (
        Resource.from_contents(object_meta) @ Registry())
    jsonschema.Draft202012Validator(object_meta, registry=registry).validate(meta)


def validate_job(doc: dict[str, Any]) -> None:
    """Validate a LoRATrainingJob manifest: the CRD's openAPIV3Schema, and upstream ObjectMeta."""
    root = json_schema(schema())
    root["properties"]["metadata"] = {"type": "object"}
    jsonschema.Draft4Validator(root).validate(doc)
    validate_metadata(doc["metadata"])


def test_committed_crd_is_fresh() -> None:
    committed = (ROOT / CRD_FILE).read_text()
    assert committed == render_crd(), f"{CRD_FILE} is stale: run `lora-operator crd > {CRD_FILE}`"


def test_crd_validates_upstream() -> None:
    kubernetes_validate.validate(yaml.safe_load((ROOT / CRD_FILE).read_text()), K8S_VERSION, strict=True)


def _walk(node: dict[str, Any], path: str):
    yield path, node
    for key, child in (node.get("properties") or {}).items():
        yield from _walk(child, f"{path}.{key}")
    if isinstance(node.get("items"), dict):
        yield from _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}{{}}")


INT_OR_STRING = [{"type": "integer"}, {"type": "string"}]


def test_schema_is_structural_and_described() -> None:
    for path, node in _walk(schema(), ""):
        if node.get("x-kubernetes-int-or-string"):
            assert node["anyOf"] == INT_OR_STRING and "type" not in node, f"{path} is not the int-or-string form"
            node = {k: v for k, v in node.items() if k not in ("anyOf", "x-kubernetes-int-or-string")}
            node["type"] = "integer-or-string"
        for bad in ("$ref", "anyOf", "oneOf", "allOf", "title", "const", "$defs"):
            assert bad not in node, f"{path} has {bad}"
        assert "type" in node, f"{path} has no type"
        if path == ".metadata":
            # A real API server refuses anything but `type` on metadata (it is implicit).
            assert node == {"type": "object"}, f"{path} says more than its type: {node}"
        elif not path.endswith(("[]", "{}")):
            assert node.get("description"), f"{path} has no description"


@pytest.mark.parametrize(("value", "ok"), [(1, True), (500, True), ("auto", True), (0, False), ("Auto", False),
                                           ("500", False), (2.5, False), (True, False), (None, False)])
def test_every_steps_is_an_integer_or_auto(value: Any, ok: bool) -> None:
    doc = yaml.safe_load((ROOT / "examples" / "tiny-job.yaml").read_text())
    doc["spec"]["checkpoint"]["everySteps"] = value
    if ok:
        validate_job(doc)
    else:
        with pytest.raises(jsonschema.ValidationError):
            validate_job(doc)


def test_names_columns_and_subresources() -> None:
    crd = build_crd()
    assert crd["spec"]["names"]["shortNames"] == ["ltj", "lorajob"]
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = version["additionalPrinterColumns"]
    assert [c["name"] for c in columns if not c.get("priority")] == [
        "Phase", "Step", "Progress", "Preemptions", "Failures", "Checkpoint", "Age"]
    # `kubectl get ltj -o wide` adds the queue, the pool, the GPU-seconds split and the cost.
    assert [c["name"] for c in columns if c.get("priority") == 1] == [
        "Queue", "Pool", "Spot-GPU-s", "OnDemand-GPU-s", "Cost", "Saved"]


def test_defaults_enums_bounds() -> None:
    spec = schema()["properties"]["spec"]
    training = spec["properties"]["training"]
    assert training["default"] == {}
    assert training["properties"]["lrScheduler"]["enum"][0] == "constant"
    assert training["properties"]["learningRate"]["exclusiveMinimum"] is True
    assert spec["properties"]["lora"]["properties"]["rank"] == {
        "default": 8, "description": "LoRA rank (r): width of the low-rank update.", "maximum": 1024,
        "minimum": 1, "type": "integer"}
    assert spec["properties"]["dataset"]["properties"]["captions"]["nullable"] is True
    assert set(spec["required"]) == {"baseModel", "dataset", "output"}


def test_training_fields_are_immutable() -> None:
    spec = schema()["properties"]["spec"]["properties"]
    for name in IMMUTABLE_FIELDS:
        (rule,) = spec[name]["x-kubernetes-validations"]
        assert rule["rule"] == "self == oldSelf" and f"spec.{name}" in rule["message"]
    assert "x-kubernetes-validations" not in spec["suspend"]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_validate(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs
    for doc in docs:
        if doc.get("kind") == KIND:
            validate_job(doc)
            to_train_config(parse_spec(doc["spec"]))
        else:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_examples_are_found() -> None:
    # examples/*.yaml are manifests; examples/train/ holds trainer configs (lora-train --config).
    assert {"tiny-job.yaml", "portrait-style.yaml"} <= {p.name for p in EXAMPLES}


def test_schema_rejects_bad_jobs() -> None:
    bad_meta = yaml.safe_load((ROOT / "examples" / "tiny-job.yaml").read_text())
    bad_meta["metadata"]["labels"] = {"team": 7}
    with pytest.raises(jsonschema.ValidationError):
        validate_job(bad_meta)
    for path, value in [(("training", "learningRate"), 0), (("lora", "rnak"), 4), (("training", "resolution"), 33),
                        (("training", "lrScheduler"), "exotic"), (("output", "uri"), "/tmp/out")]:
        bad = yaml.safe_load((ROOT / "examples" / "tiny-job.yaml").read_text())
        bad["spec"][path[0]][path[1]] = value
        with pytest.raises(jsonschema.ValidationError):
            validate_job(bad)
