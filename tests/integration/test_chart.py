"""The Helm chart charts/lora-operator, rendered by Helm's engine and checked offline.

Behaviours tested:
- `helm lint --strict` (Kubernetes 1.30) reports no warning or error, with default and custom values.
- Default and custom values render; every object and every shipped CRD validates strictly against
  the Kubernetes 1.30 schemas; Kopf peering objects validate against the shipped peering CRDs.
- RBAC is exactly the table below (no wildcards): a ClusterRole when all namespaces are watched,
  a Role + RoleBinding per watched namespace otherwise; `rbac.secretNames` narrows secrets `get`;
  peering permissions only when peering is on.
- The Deployment: hardened pod and container securityContext, probes on :8080/healthz, the
  LORA_OPERATOR_* settings, standalone (Recreate) with one replica, peering with more.
- values.schema.json: every object is closed; values.yaml passes; typo'd keys fail, in jsonschema
  and in Helm itself. values.yaml comments every key, with an example.
- metrics: a Service on the operator's /metrics port (LORA_OPERATOR_METRICS_PORT), a ServiceMonitor
  only when asked for, neither (and port 0) with metrics.enabled false.
- The chart's product CRD is byte-identical to the generated crds/ at the repository root.
"""

from __future__ import annotations

import json
import re
import subprocess
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from helm_python import HelmValuesError

from tests.support.helmchart import (
    CHART,
    KUBE_VERSION,
    RELEASE_NAMESPACE,
    REPO,
    comment_block,
    crds,
    lint,
    manifests,
    notes,
    of_kind,
    one,
    rule_table,
    walk_schema,
)

CUSTOM: dict[str, Any] = {
    "fullnameOverride": "lora",
    "replicaCount": 2,
    "watchNamespaces": ["ml", "research"],
    "image": {"repository": "registry.example.com/lo/operator", "tag": "1.2.3", "pullPolicy": "Always"},
    "trainerImage": {"repository": "registry.example.com/lo/trainer", "tag": "1.2.3-cu124"},
    "imagePullSecrets": [{"name": "regcred"}],
    "config": {
        "progressInterval": 30,
        "pendingDeadline": 1200,
        "terminatingGrace": 60,
        "backoffBase": 5,
        "backoffMax": 120,
        "logFormat": "text",
        "allowedEndpoints": ["minio.minio.svc:9000", "*.amazonaws.com"],
        "prices": {"spotGpuHour": 1.1, "onDemandGpuHour": 3.67, "currency": "EUR"},
        "preemptionRatePerHour": 2.5,
        "preemptionRatePriorHours": 0,
    },
    "peering": {"name": "lora-prod"},
    "serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/lora"}},
    "rbac": {"secretNames": ["s3-creds", "minio-creds"]},
    "healthPort": 9090,
    "metrics": {"port": 9100},
    "extraEnv": [{"name": "AWS_CA_BUNDLE", "value": "/etc/ssl/ca.pem"}],
    "podLabels": {"team": "ml-platform"},
    "nodeSelector": {"kubernetes.io/os": "linux"},
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "system", "effect": "NoSchedule"}],
    "affinity": {
        "podAntiAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {"weight": 100, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname"}}
            ]
        }
    },
    "priorityClassName": "system-cluster-critical",
}
CASES = {"defaults": None, "custom": CUSTOM}

LTJ, CORE, EVENTS_API, KOPF = "lora-operator.dev", "", "events.k8s.io", "kopf.dev"
ALL_SECRETS = (frozenset({"get"}), ())
# What the operator calls, in every namespace it serves. Exact: nothing more may be granted.
EXPECTED_RULES = {
    (LTJ, "loratrainingjobs"): (frozenset({"get", "list", "watch", "patch", "update", "delete"}), ()),
    (LTJ, "loratrainingjobs/status"): (frozenset({"get", "patch", "update"}), ()),
    (CORE, "pods"): (frozenset({"create", "delete", "get", "list", "watch", "patch"}), ()),
    ("jobset.x-k8s.io", "jobsets"): (frozenset({"create", "delete", "get"}), ()),  # spec.nodes > 1
    (CORE, "events"): (frozenset({"create", "patch"}), ()),
    (EVENTS_API, "events"): (frozenset({"create", "patch"}), ()),
    (CORE, "secrets"): ALL_SECRETS,
}
PEERING_VERBS = (frozenset({"get", "list", "watch", "patch"}), ())
NODE_RULES = {(CORE, "nodes"): (frozenset({"get"}), ())}  # cluster-scoped: lost-node detection

ROOT_CRD = REPO / "crds" / "loratrainingjobs.lora-operator.dev.yaml"
CHART_CRD = CHART / "crds" / ROOT_CRD.name
SCHEMA = json.loads((CHART / "values.schema.json").read_text())
VALUES = yaml.safe_load((CHART / "values.yaml").read_text())


@pytest.fixture(scope="module", params=list(CASES))
def case(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    """(case name, rendered objects) for default and for custom values."""
    return request.param, manifests(CASES[request.param])


def _env(deployment: dict[str, Any]) -> dict[str, str]:
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return {item["name"]: item.get("value", "<from>") for item in container["env"]}


# ---- lint and schemas -------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_helm_lint_is_clean(name: str) -> None:
    assert lint(CASES[name]) == []


def test_every_rendered_object_validates_against_kubernetes(case) -> None:
    _, objects = case
    peering_schemas = {
        crd["spec"]["names"]["kind"]: crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        for crd in crds().values()
        if crd["spec"]["group"] == KOPF
    }
    for obj in objects:
        if obj["apiVersion"] == f"{KOPF}/v1":
            jsonschema.validate(obj, peering_schemas[obj["kind"]])
        else:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
        assert obj["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"


def test_shipped_crds_validate_and_include_kopf_peering() -> None:
    shipped = crds()
    for crd in shipped.values():
        kubernetes_validate.validate(crd, KUBE_VERSION, strict=True)
    scopes = {crd["metadata"]["name"]: crd["spec"]["scope"] for crd in shipped.values()}
    assert scopes["kopfpeerings.kopf.dev"] == "Namespaced"
    assert scopes["clusterkopfpeerings.kopf.dev"] == "Cluster"
    for name in ("kopfpeerings.kopf.dev", "clusterkopfpeerings.kopf.dev"):
        crd = next(c for c in shipped.values() if c["metadata"]["name"] == name)
        status = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
        assert status == {"type": "object", "x-kubernetes-preserve-unknown-fields": True}


def test_chart_crd_equals_the_generated_root_crd() -> None:
    if not ROOT_CRD.exists():
        pytest.skip(f"{ROOT_CRD.relative_to(REPO)} is not generated yet; the chart cannot ship it")
    assert CHART_CRD.exists(), "the chart lacks the product CRD: run charts/sync-crds.sh"
    assert CHART_CRD.read_bytes() == ROOT_CRD.read_bytes(), "chart CRD is stale: run charts/sync-crds.sh"
    check = subprocess.run([str(REPO / "charts" / "sync-crds.sh"), "--check"], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


# ---- RBAC -------------------------------------------------------------------------------------


def test_all_namespaces_get_exactly_one_cluster_role() -> None:
    objects = manifests()
    assert not of_kind(objects, "Role") and not of_kind(objects, "RoleBinding")
    role = one(objects, "ClusterRole")
    assert rule_table(role["rules"]) == {**EXPECTED_RULES, **NODE_RULES}  # one replica: no peering
    binding = one(objects, "ClusterRoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "lora-operator", "namespace": RELEASE_NAMESPACE}
    ]


def test_peering_cluster_wide_adds_cluster_kopf_peerings_only() -> None:
    role = one(manifests({"replicaCount": 3}), "ClusterRole")
    assert rule_table(role["rules"]) == {
        **EXPECTED_RULES,
        **NODE_RULES,
        (KOPF, "clusterkopfpeerings"): PEERING_VERBS,
    }
    without_nodes = one(manifests({"rbac": {"readNodes": False}}), "ClusterRole")
    assert rule_table(without_nodes["rules"]) == EXPECTED_RULES


def test_watch_namespaces_get_roles_and_only_node_reading_cluster_wide() -> None:
    objects = manifests(CUSTOM)
    node_role, node_binding = one(objects, "ClusterRole"), one(objects, "ClusterRoleBinding")
    assert node_role["metadata"]["name"] == "lora-nodes"
    assert rule_table(node_role["rules"]) == NODE_RULES
    assert node_binding["roleRef"]["name"] == "lora-nodes"
    assert node_binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "lora", "namespace": RELEASE_NAMESPACE}
    ]
    no_nodes = manifests({**CUSTOM, "rbac": {"readNodes": False}})
    assert not of_kind(no_nodes, "ClusterRole") and not of_kind(no_nodes, "ClusterRoleBinding")
    roles, bindings = of_kind(objects, "Role"), of_kind(objects, "RoleBinding")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["ml", "research"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["ml", "research"]
    expected = {
        **EXPECTED_RULES,
        (CORE, "secrets"): (frozenset({"get"}), ("minio-creds", "s3-creds")),
        (KOPF, "kopfpeerings"): PEERING_VERBS,
    }
    for role in roles:
        assert rule_table(role["rules"]) == expected
    for binding in bindings:
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "lora"}
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "lora", "namespace": RELEASE_NAMESPACE}
        ]


def test_rbac_and_service_account_can_be_left_to_the_user() -> None:
    objects = manifests({"rbac": {"create": False}, "serviceAccount": {"create": False, "name": "mine"}})
    assert sorted(o["kind"] for o in objects) == ["Deployment", "Service"]  # the Service: metrics
    assert one(objects, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "mine"


def test_service_account_name_is_required_when_not_created() -> None:
    with pytest.raises(Exception, match="serviceAccount.name is required"):
        manifests({"serviceAccount": {"create": False}})


# ---- peering objects ----------------------------------------------------------------------------


def test_peering_objects_follow_scope_and_replicas() -> None:
    assert not of_kind(manifests(), "ClusterKopfPeering")  # standalone
    cluster = one(manifests({"peering": {"enabled": True}}), "ClusterKopfPeering")
    assert cluster["metadata"]["name"] == "lora-operator" and "namespace" not in cluster["metadata"]
    namespaced = of_kind(manifests(CUSTOM), "KopfPeering")
    assert sorted((p["metadata"]["namespace"], p["metadata"]["name"]) for p in namespaced) == [
        ("ml", "lora-prod"),
        ("research", "lora-prod"),
    ]
    assert not of_kind(manifests({**CUSTOM, "peering": {"create": False}}), "KopfPeering")


# ---- the Deployment -----------------------------------------------------------------------------


def test_deployment_is_hardened(case) -> None:
    _, objects = case
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 1000
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    ctx = container["securityContext"]
    assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] == 1000
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"] == {"drop": ["ALL"]}
    assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]


def test_deployment_defaults() -> None:
    deployment = one(manifests(), "Deployment")
    assert deployment["metadata"]["namespace"] == RELEASE_NAMESPACE
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "ghcr.io/lora-operator/operator:0.1.0"
    assert container["command"] == ["lora-operator"] and container["args"] == ["run"]
    assert container["ports"] == [{"name": "health", "containerPort": 8080, "protocol": "TCP"},
                                  {"name": "metrics", "containerPort": 8000, "protocol": "TCP"}]
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert _env(deployment) == {
        "LORA_OPERATOR_NAMESPACES": "",
        "LORA_OPERATOR_TRAINER_IMAGE": "ghcr.io/lora-operator/trainer:0.1.0",
        "LORA_OPERATOR_PROGRESS_INTERVAL": "15",
        "LORA_OPERATOR_PENDING_DEADLINE": "600",
        "LORA_OPERATOR_TERMINATING_GRACE": "300",
        "LORA_OPERATOR_BACKOFF_BASE": "10",
        "LORA_OPERATOR_BACKOFF_MAX": "600",
        "LORA_OPERATOR_LOG_FORMAT": "json",
        "LORA_OPERATOR_ALLOWED_ENDPOINTS": "*",
        "LORA_OPERATOR_SPOT_GPU_HOUR_PRICE": "0",  # no prices: GPU-seconds in status, no cost
        "LORA_OPERATOR_ON_DEMAND_GPU_HOUR_PRICE": "0",
        "LORA_OPERATOR_CURRENCY": "USD",
        "LORA_OPERATOR_PREEMPTION_RATE_PER_HOUR": "0.25",
        "LORA_OPERATOR_PREEMPTION_RATE_PRIOR_HOURS": "1",
        "LORA_OPERATOR_LIVENESS": "http://0.0.0.0:8080/healthz",
        "LORA_OPERATOR_METRICS_PORT": "8000",
        "LORA_OPERATOR_PEERING": "lora-operator",
        "LORA_OPERATOR_STANDALONE": "true",
        "POD_NAME": "<from>",
        "POD_NAMESPACE": "<from>",
    }


def test_deployment_with_custom_values() -> None:
    deployment = one(manifests(CUSTOM), "Deployment")
    assert deployment["metadata"]["name"] == "lora"
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "registry.example.com/lo/operator:1.2.3"
    assert container["imagePullPolicy"] == "Always"
    assert container["ports"][0]["containerPort"] == 9090
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["priorityClassName"] == "system-cluster-critical"
    assert pod["nodeSelector"] == CUSTOM["nodeSelector"] and pod["tolerations"] == CUSTOM["tolerations"]
    assert pod["affinity"] == CUSTOM["affinity"]
    assert deployment["spec"]["template"]["metadata"]["labels"]["team"] == "ml-platform"
    env = _env(deployment)
    assert env["LORA_OPERATOR_NAMESPACES"] == "ml,research"
    assert env["LORA_OPERATOR_TRAINER_IMAGE"] == "registry.example.com/lo/trainer:1.2.3-cu124"
    assert env["LORA_OPERATOR_LOG_FORMAT"] == "text"
    assert env["LORA_OPERATOR_ALLOWED_ENDPOINTS"] == "minio.minio.svc:9000,*.amazonaws.com"
    assert env["LORA_OPERATOR_PROGRESS_INTERVAL"] == "30"
    assert env["LORA_OPERATOR_BACKOFF_MAX"] == "120"
    assert (env["LORA_OPERATOR_SPOT_GPU_HOUR_PRICE"], env["LORA_OPERATOR_ON_DEMAND_GPU_HOUR_PRICE"],
            env["LORA_OPERATOR_CURRENCY"]) == ("1.1", "3.67", "EUR")
    assert env["LORA_OPERATOR_PREEMPTION_RATE_PER_HOUR"] == "2.5"
    assert env["LORA_OPERATOR_PREEMPTION_RATE_PRIOR_HOURS"] == "0"
    assert env["LORA_OPERATOR_LIVENESS"] == "http://0.0.0.0:9090/healthz"
    assert env["LORA_OPERATOR_PEERING"] == "lora-prod"
    assert env["LORA_OPERATOR_STANDALONE"] == "false"
    assert env["AWS_CA_BUNDLE"] == "/etc/ssl/ca.pem"


def test_image_digest_wins_over_tag() -> None:
    digest = "sha256:" + "ab" * 32
    deployment = one(manifests({"image": {"repository": "r/op", "tag": "9", "digest": digest}}), "Deployment")
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == f"r/op@{digest}"


def test_notes_say_what_to_do_next() -> None:
    text = notes(CUSTOM)
    for expected in (
        "create secret generic s3-creds",
        "kubectl -n ml get ltj",
        "apply -f",
        "s3-creds, minio-creds",
        "lora-prod",
    ):
        assert expected in text


# ---- values and their schema ---------------------------------------------------------------------


def test_schema_closes_every_object() -> None:
    for path, node in walk_schema(SCHEMA):
        if node.get("type") != "object" or node.get("x-kubernetes-passthrough"):
            continue
        assert "additionalProperties" in node and node["additionalProperties"] is not True, path


def test_schema_accepts_values_yaml_and_custom_values() -> None:
    jsonschema.Draft7Validator.check_schema(SCHEMA)
    jsonschema.validate(VALUES, SCHEMA)
    jsonschema.validate(CUSTOM, SCHEMA)


TYPOS = [
    {"replicaCont": 2},
    {"image": {"tagg": "1"}},
    {"config": {"logformat": "json"}},
    {"rbac": {"secretName": ["a"]}},
    {"securityContext": {"runAsNonroot": True}},
    {"config": {"logFormat": "yaml"}},
    {"config": {"allowedEndpoints": []}},
    {"config": {"allowedEndpoints": ["http://minio:9000"]}},
    {"config": {"allowedEndpoints": "minio:9000,s3:9000"}},
    {"replicaCount": 0},
    {"metrics": {"serviceMonitor": {"enable": True}}},
    {"config": {"prices": {"spotGPUHour": 1.0}}},
    {"config": {"prices": {"onDemandGpuHour": -1}}},
]


@pytest.mark.parametrize("values", TYPOS, ids=lambda v: json.dumps(v))
def test_schema_rejects_typos(values: dict[str, Any]) -> None:
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(values, SCHEMA)
    with pytest.raises(HelmValuesError):
        manifests(values)


def test_values_yaml_comments_every_key_with_an_example() -> None:
    """cert-manager style: a comment above every key; every setting has an `Example`; keys that
    the schema knows but values.yaml leaves out are shown commented out."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    sections = {
        key
        for key, value in VALUES.items()
        if isinstance(value, dict)
        and "properties" in SCHEMA["properties"][key]
        and key not in _KUBERNETES_SHAPED
    }
    parent = None
    for index, line in enumerate(lines):
        match = re.match(r"^( *)([A-Za-z][\w-]*):", line)
        if not match:
            continue
        indent, key = len(match.group(1)), match.group(2)
        if indent == 0:
            parent = key
        elif not (indent == 2 and parent in sections):
            continue  # inside a value, e.g. resources.requests.cpu
        block = comment_block(lines, index)
        assert block, f"values.yaml: {key!r} (line {index + 1}) has no comment"
        if not (indent == 0 and key in sections):
            assert "Example" in block, f"values.yaml: {key!r} (line {index + 1}) has no example"
    for key in sections:
        for child in SCHEMA["properties"][key]["properties"]:
            if child not in VALUES[key]:
                assert any(line.startswith(f"  # {child}:") for line in lines), (
                    f"optional {key}.{child} is not shown commented out"
                )


_KUBERNETES_SHAPED = {
    "livenessProbe",
    "readinessProbe",
    "resources",
    "podSecurityContext",
    "securityContext",
    "affinity",
}


def test_metrics_service_and_optional_service_monitor() -> None:
    objects = manifests()
    deployment, service = one(objects, "Deployment"), one(objects, "Service")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert {"name": "metrics", "containerPort": 8000, "protocol": "TCP"} in container["ports"]
    assert _env(deployment)["LORA_OPERATOR_METRICS_PORT"] == "8000"
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 8000, "targetPort": "metrics", "protocol": "TCP"}]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert not of_kind(objects, "ServiceMonitor")  # off by default: it needs the prometheus-operator's CRDs

    monitored = manifests({"metrics": {"port": 9100, "serviceMonitor": {
        "enabled": True, "interval": "15s", "labels": {"release": "kube-prometheus-stack"}}}})
    monitor, service = one(monitored, "ServiceMonitor"), one(monitored, "Service")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "15s"}]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [RELEASE_NAMESPACE]}
    assert service["spec"]["ports"][0]["port"] == 9100

    off = manifests({"metrics": {"enabled": False, "serviceMonitor": {"enabled": True}}})
    assert not of_kind(off, "Service") and not of_kind(off, "ServiceMonitor")
    assert _env(one(off, "Deployment"))["LORA_OPERATOR_METRICS_PORT"] == "0"


def test_trainer_network_policy_is_optional_and_per_watched_namespace() -> None:
    assert not of_kind(manifests(), "NetworkPolicy")  # off by default
    minio = {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "minio"}}}],
             "ports": [{"port": 9000, "protocol": "TCP"}]}
    objects = manifests({"watchNamespaces": ["ml", "research"],
                         "trainerNetworkPolicy": {"enabled": True, "egress": [minio]}})
    policies = of_kind(objects, "NetworkPolicy")
    assert sorted(p["metadata"]["namespace"] for p in policies) == ["ml", "research"]
    for policy in policies:
        kubernetes_validate.validate(policy, KUBE_VERSION, strict=True)
        spec = policy["spec"]
        assert spec["podSelector"] == {"matchExpressions": [{"key": "lora-operator.dev/job", "operator": "Exists"}]}
        assert spec["policyTypes"] == ["Ingress", "Egress"] and spec["ingress"] == []
        dns, store = spec["egress"]
        assert {p["port"] for p in dns["ports"]} == {53} and store == minio
    with pytest.raises(Exception, match="needs watchNamespaces"):
        manifests({"trainerNetworkPolicy": {"enabled": True}})
