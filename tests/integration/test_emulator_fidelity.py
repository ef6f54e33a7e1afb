"""The API emulator behaves like kube-apiserver, as seen through the official kubernetes client.

Each row is a behaviour plain kmock 0.8 lacks; every test runs on both targets of the run (ids
``[emulator]`` and ``[real]``: a kube-apiserver started from ``KUBEBUILDER_ASSETS``), or on
``LORA_TEST_KUBECONFIG``'s cluster: a throwaway namespace, the test CRD registered.

| behaviour                                                                  | test                                    |
|----------------------------------------------------------------------------|-----------------------------------------|
| create/get return the stored object: uid, creationTimestamp, rv, gen 1     | test_create_returns_stored_object       |
| duplicate create → 409 AlreadyExists Status                                | test_duplicate_create_is_already_exists |
| missing object → 404 NotFound Status                                       | test_missing_object_is_not_found_status |
| stale metadata.resourceVersion on update/patch → 409 Conflict              | test_stale_resource_version_conflicts   |
| merge, strategic-merge and json patches; PUT; all return the object        | test_patch_flavours_and_put             |
| delete: a CR gone at once → Status; held by finalizers or a pod → object; | test_delete_returns_object_then_404     |
|   deleting again → 404 Status                                              |                                         |
| one global resourceVersion, increasing on every write                      | test_resource_version_is_global         |
| generation bumps on spec changes only (CR and pod)                         | test_generation_tracks_spec_only        |
| label selectors on list (=, ==, !=, in, notin, exists, !exists)            | test_label_selectors_on_list            |
| field selectors on list (metadata.name/namespace, status.phase)            | test_field_selectors_on_list            |
| selectors on watch: objects enter (ADDED) and leave (DELETED) the selection| test_selectors_on_watch                 |
| /status writes change only status (pods/status keeps label changes);      | test_status_subresource_split           |
|   main writes leave status alone                                           |                                         |
| deleting an owner garbage-collects dependents, recursively                 | test_background_garbage_collection      |
| propagationPolicy=Orphan keeps dependents, drops their ownerReferences     | test_orphan_propagation                 |
| finalizers hold an object with deletionTimestamp until removed             | test_finalizers_hold_deletion           |
| a bound pod's graceful delete waits for the kubelet's grace-0 delete       | test_graceful_pod_deletion              |
| CRD schema violations → 422 Invalid naming the fields                      | test_schema_violations_are_invalid      |
| /status writes: schema-checked (422 naming status.<field>), unknowns pruned| test_status_writes_are_validated        |
| CRD defaults (nested), pruning, preserve-unknown-fields, int-or-string     | test_defaults_and_pruning               |
| defaults re-applied on update                                              | test_defaults_applied_on_update         |
| a registered CRD is served and discoverable, with its status subresource   | test_crd_is_discoverable                |
| list carries metadata.resourceVersion; watch from it replays later events  | test_watch_resumes_from_list_version    |
| core/v1 and events.k8s.io/v1 Events are creatable and listable; eventTime  | test_events_are_creatable_and_listable  |
|   must be a MicroTime (6 fractional digits) or 400                         |                                         |
| discovery as kubectl maps it: core is `v1`, subresources have no shortNames| test_discovery_as_kubectl_reads_it      |
| `kubectl get` Tables: Name + additionalPrinterColumns, dates as ages       | test_server_side_printing_tables        |
| a CRD schema may say nothing about metadata but its type → 422             | test_crd_metadata_schema_is_implicit    |
| fieldValidation=Strict (kubectl's default): unknown fields → 400 naming all | test_strict_field_validation            |
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import kubernetes
import pytest
from kubernetes.client.rest import ApiException

from tests.support.kube import KubeTarget, eventually, throwaway_namespace

GROUP, VERSION, PLURAL, KIND = "fidelity.lora-operator.dev", "v1", "gadgets", "Gadget"
CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": f"{PLURAL}.{GROUP}"},
    "spec": {
        "group": GROUP,
        "scope": "Namespaced",
        "names": {"plural": PLURAL, "singular": "gadget", "kind": KIND, "shortNames": ["gdg"]},
        "versions": [{
            "name": VERSION, "served": True, "storage": True, "subresources": {"status": {}},
            "additionalPrinterColumns": [
                {"name": "Mode", "type": "string", "jsonPath": ".spec.mode"},
                {"name": "Step", "type": "integer", "jsonPath": ".status.step"},
                {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
            ],
            "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                "spec": {"type": "object", "required": ["model"], "properties": {
                    "model": {"type": "string", "minLength": 1},
                    "mode": {"type": "string", "enum": ["fast", "careful"], "default": "careful"},
                    "replicas": {"type": "integer", "minimum": 1, "default": 1},
                    "training": {"type": "object", "default": {}, "properties": {
                        "learningRate": {"type": "number", "minimum": 0, "exclusiveMinimum": True,
                                         "maximum": 1, "default": 0.0001},
                        "steps": {"type": "integer", "default": 100},
                    }},
                    "port": {"x-kubernetes-int-or-string": True},
                    "extra": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                    "tags": {"type": "array", "maxItems": 3, "items": {"type": "string"}},
                }},
                "status": {"type": "object", "properties": {
                    "phase": {"type": "string"}, "step": {"type": "integer"},
                    "reason": {"type": "string", "maxLength": 16},
                }},
            }}},
        }],
    },
}
# No scheduler picks these pods up, so on a real cluster no kubelet ever runs them either.
NO_SCHEDULER = "fidelity-no-scheduler"
NODE = "fidelity-node"


@pytest.fixture(scope="module")
def target(kube_api: KubeTarget) -> KubeTarget:
    kube_api.register_crd(CRD)
    return kube_api


@pytest.fixture(scope="module")
def client(target: KubeTarget) -> Iterator[kubernetes.client.ApiClient]:
    with target.api_client() as client:
        yield client


@pytest.fixture(scope="module")
def ns(target: KubeTarget) -> Iterator[str]:
    with throwaway_namespace(target, "fidelity") as name:
        yield name


@pytest.fixture(scope="module")
def core(client: kubernetes.client.ApiClient) -> kubernetes.client.CoreV1Api:
    return kubernetes.client.CoreV1Api(client)


@pytest.fixture(scope="module")
def custom(client: kubernetes.client.ApiClient) -> kubernetes.client.CustomObjectsApi:
    return kubernetes.client.CustomObjectsApi(client)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def gadget(name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "metadata": {"name": name},
            "spec": {"model": "sd15", **spec}}


def pod(name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": labels or {}},
            "spec": {"schedulerName": NO_SCHEDULER, "terminationGracePeriodSeconds": 30,
                     "containers": [{"name": "main", "image": "registry.k8s.io/pause:3.9"}]}}


def create_gadget(custom: kubernetes.client.CustomObjectsApi, ns: str, name: str, **spec: Any) -> dict[str, Any]:
    return custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, gadget(name, **spec))


def error_of(call: Any, *args: Any, **kwargs: Any) -> tuple[int, dict[str, Any]]:
    with pytest.raises(ApiException) as info:
        call(*args, **kwargs)
    return info.value.status, json.loads(info.value.body)


def gadget_exists(custom: kubernetes.client.CustomObjectsApi, ns: str, name: str) -> bool:
    try:
        custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
        return True
    except ApiException as exc:
        assert exc.status == 404
        return False


def test_create_returns_stored_object(custom, ns):
    created = create_gadget(custom, ns, "identity")
    meta = created["metadata"]
    assert uuid.UUID(meta["uid"]).version == 4
    assert meta["creationTimestamp"].endswith("Z")
    assert meta["resourceVersion"].isdigit()
    assert meta["generation"] == 1
    assert custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "identity")["metadata"]["uid"] == meta["uid"]


def test_duplicate_create_is_already_exists(custom, ns):
    create_gadget(custom, ns, "twice")
    code, body = error_of(create_gadget, custom, ns, "twice")
    assert (code, body["kind"], body["status"], body["reason"], body["code"]) == (409, "Status", "Failure", "AlreadyExists", 409)
    assert body["details"]["name"] == "twice" and body["apiVersion"] == "v1"


def test_missing_object_is_not_found_status(core, custom, ns):
    code, body = error_of(core.read_namespaced_pod, "absent", ns)
    assert (code, body["kind"], body["reason"]) == (404, "Status", "NotFound")
    assert body["message"] == 'pods "absent" not found'
    code, body = error_of(custom.get_namespaced_custom_object, GROUP, VERSION, ns, PLURAL, "absent")
    assert (code, body["reason"], body["details"]["name"]) == (404, "NotFound", "absent")


def test_stale_resource_version_conflicts(custom, ns):
    old = create_gadget(custom, ns, "stale")
    custom.patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "stale", {"spec": {"replicas": 2}})
    code, body = error_of(custom.replace_namespaced_custom_object, GROUP, VERSION, ns, PLURAL, "stale", old)
    assert (code, body["reason"]) == (409, "Conflict")
    stale_patch = {"metadata": {"resourceVersion": old["metadata"]["resourceVersion"]}, "spec": {"replicas": 3}}
    code, body = error_of(custom.patch_namespaced_custom_object, GROUP, VERSION, ns, PLURAL, "stale", stale_patch)
    assert (code, body["reason"]) == (409, "Conflict")


def test_patch_flavours_and_put(core, custom, ns):
    created = create_gadget(custom, ns, "patched")
    merged = custom.patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "patched", {"spec": {"replicas": 4}})
    assert merged["spec"]["replicas"] == 4 and merged["spec"]["model"] == "sd15"
    ops = [{"op": "replace", "path": "/spec/mode", "value": "fast"}]
    jsonpatched = custom.patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "patched", ops,
                                                        _content_type="application/json-patch+json")
    assert jsonpatched["spec"]["mode"] == "fast"
    jsonpatched["spec"]["tags"] = ["a"]
    replaced = custom.replace_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "patched", jsonpatched)
    assert replaced["spec"]["tags"] == ["a"]
    assert int(replaced["metadata"]["resourceVersion"]) > int(created["metadata"]["resourceVersion"])
    core.create_namespaced_pod(ns, pod("patched-pod"))
    strategic = core.patch_namespaced_pod("patched-pod", ns, {"metadata": {"labels": {"x": "y"}}})
    assert strategic.metadata.labels == {"x": "y"}


def test_delete_returns_object_then_404(core, custom, ns):
    create_gadget(custom, ns, "doomed")
    deleted = custom.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "doomed")
    # A custom resource without finalizers is gone at once: the answer is a Status, not the object.
    assert (deleted["kind"], deleted["status"], deleted["details"]["name"]) == ("Status", "Success", "doomed")
    create_gadget(custom, ns, "held")
    custom.patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "held", {"metadata": {"finalizers": ["x/y"]}})
    pending = custom.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "held")
    assert pending["kind"] == KIND and pending["metadata"]["deletionTimestamp"]  # still there: the object
    custom.patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "held", {"metadata": {"finalizers": None}})
    pod_gone = core.create_namespaced_pod(ns, pod("doomed-pod"))
    assert core.delete_namespaced_pod("doomed-pod", ns, grace_period_seconds=0).metadata.uid == pod_gone.metadata.uid
    code, body = error_of(custom.delete_namespaced_custom_object, GROUP, VERSION, ns, PLURAL, "doomed")
    assert (code, body["kind"], body["reason"]) == (404, "Status", "NotFound")


def test_resource_version_is_global(core, custom, ns):
    a = create_gadget(custom, ns, "rv-a")
    b = core.create_namespaced_config_map(ns, {"metadata": {"name": "rv-b"}})
    c = custom.patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "rv-a", {"spec": {"replicas": 9}})
    versions = [int(a["metadata"]["resourceVersion"]), int(b.metadata.resource_version),
                int(c["metadata"]["resourceVersion"])]
    assert versions == sorted(versions) and len(set(versions)) == 3


def test_generation_tracks_spec_only(core, custom, ns):
    create_gadget(custom, ns, "gen")
    after_status = custom.patch_namespaced_custom_object_status(GROUP, VERSION, ns, PLURAL, "gen", {"status": {"step": 5}})
    after_label = custom.patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "gen", {"metadata": {"labels": {"a": "b"}}})
    after_spec = custom.patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "gen", {"spec": {"replicas": 2}})
    assert [o["metadata"]["generation"] for o in (after_status, after_label, after_spec)] == [1, 1, 2]


SELECTOR_CASES = [
    ("tier=gpu", {"a", "b"}),
    ("tier==gpu", {"a", "b"}),
    ("tier!=gpu", {"c", "d"}),
    ("tier in (gpu,cpu)", {"a", "b", "c"}),
    ("tier notin (gpu)", {"c", "d"}),
    ("spot", {"a", "c"}),
    ("!spot", {"b", "d"}),
    ("tier=gpu,spot", {"a"}),
]


@pytest.fixture(scope="module")
def labelled(core: kubernetes.client.CoreV1Api, ns: str) -> dict[str, str]:
    labels = {"a": {"tier": "gpu", "spot": "yes"}, "b": {"tier": "gpu"}, "c": {"tier": "cpu", "spot": "no"}, "d": {}}
    for suffix, value in labels.items():
        core.create_namespaced_config_map(ns, {"metadata": {"name": f"sel-{suffix}", "labels": {**value, "set": "sel"}}})
    return {suffix: f"sel-{suffix}" for suffix in labels}


@pytest.mark.parametrize("selector, expected", SELECTOR_CASES)
def test_label_selectors_on_list(core, ns, labelled, selector, expected):
    items = core.list_namespaced_config_map(ns, label_selector=f"set=sel,{selector}").items
    assert {item.metadata.name for item in items} == {labelled[s] for s in expected}


def test_field_selectors_on_list(core, ns):
    core.create_namespaced_pod(ns, pod("field-a"))
    core.create_namespaced_pod(ns, pod("field-b"))
    core.patch_namespaced_pod_status("field-b", ns, {"status": {"phase": "Failed"}})
    names = lambda **kw: {p.metadata.name for p in core.list_namespaced_pod(ns, **kw).items if p.metadata.name.startswith("field-")}  # noqa: E731
    assert names(field_selector="metadata.name=field-a") == {"field-a"}
    assert names(field_selector="status.phase=Failed") == {"field-b"}
    assert names(field_selector="status.phase!=Failed,metadata.name!=nothing") == {"field-a"}
    all_ns = core.list_pod_for_all_namespaces(field_selector=f"metadata.namespace={ns},metadata.name==field-b").items
    assert [p.metadata.name for p in all_ns] == ["field-b"]


def test_selectors_on_watch(core, ns):
    core.create_namespaced_config_map(ns, {"metadata": {"name": "w-in", "labels": {"watch": "me"}}})
    core.create_namespaced_config_map(ns, {"metadata": {"name": "w-out"}})
    rv = core.list_namespaced_config_map(ns).metadata.resource_version
    core.patch_namespaced_config_map("w-out", ns, {"metadata": {"labels": {"watch": "me"}}})
    core.patch_namespaced_config_map("w-in", ns, {"metadata": {"labels": {"watch": "no"}}})
    seen = []
    watch = kubernetes.watch.Watch()
    for event in watch.stream(core.list_namespaced_config_map, ns, label_selector="watch=me",
                              resource_version=rv, allow_watch_bookmarks=True, timeout_seconds=10):
        if event["type"] != "BOOKMARK":
            seen.append((event["type"], event["object"].metadata.name))
        if len(seen) == 2:
            watch.stop()
    assert seen == [("ADDED", "w-out"), ("DELETED", "w-in")]


def test_status_subresource_split(core, custom, ns):
    create_gadget(custom, ns, "split", replicas=1)
    via_status = custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, ns, PLURAL, "split", {"spec": {"replicas": 7}, "status": {"phase": "Running"}})
    assert (via_status["spec"]["replicas"], via_status["status"]["phase"]) == (1, "Running")
    via_main = custom.patch_namespaced_custom_object(
        GROUP, VERSION, ns, PLURAL, "split", {"spec": {"replicas": 2}, "status": {"phase": "Hacked"}})
    assert (via_main["spec"]["replicas"], via_main["status"]["phase"]) == (2, "Running")
    core.create_namespaced_pod(ns, pod("split-pod"))
    patched = core.patch_namespaced_pod("split-pod", ns, {"metadata": {"labels": {"a": "b"}}, "status": {"phase": "Failed"}})
    assert patched.status.phase == "Pending"
    patched = core.patch_namespaced_pod_status("split-pod", ns, {"metadata": {"labels": {"c": "d"}}, "status": {"phase": "Running"}})
    # pods/status keeps label changes (a kubelet may not rely on them being dropped) ...
    assert patched.status.phase == "Running" and patched.metadata.labels == {"a": "b", "c": "d"}
    # ... while a custom resource's /status drops every metadata change.
    via_status = custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, ns, PLURAL, "split", {"metadata": {"labels": {"c": "d"}}, "status": {"phase": "Done"}})
    assert via_status["status"]["phase"] == "Done" and "c" not in (via_status["metadata"].get("labels") or {})


def owner_ref(owner: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": owner["apiVersion"], "kind": owner["kind"], "name": owner["metadata"]["name"],
            "uid": owner["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}


# Two of kube-controller-manager's 30 s discovery syncs, and its work after them on a loaded machine.
GC_DISCOVERY_WAIT = 90.0


def test_background_garbage_collection(core, custom, ns):
    owner = create_gadget(custom, ns, "gc-owner")
    child = core.create_namespaced_config_map(ns, {"metadata": {"name": "gc-child", "ownerReferences": [owner_ref(owner)]}})
    child_dict = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "gc-child", "uid": child.metadata.uid}}
    core.create_namespaced_config_map(ns, {"metadata": {"name": "gc-grandchild", "ownerReferences": [owner_ref(child_dict)]}})
    custom.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "gc-owner")

    def collected() -> None:
        names = {cm.metadata.name for cm in core.list_namespaced_config_map(ns).items}
        assert not names & {"gc-child", "gc-grandchild"}
    # A real garbage collector learns of a freshly registered CRD at its next discovery sync (every 30 s).
    eventually(collected, GC_DISCOVERY_WAIT)


def test_orphan_propagation(core, custom, ns):
    owner = create_gadget(custom, ns, "orphan-owner")
    core.create_namespaced_config_map(ns, {"metadata": {"name": "orphan-child", "ownerReferences": [owner_ref(owner)]}})
    custom.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "orphan-owner", propagation_policy="Orphan")

    def orphaned() -> None:
        assert not gadget_exists(custom, ns, "orphan-owner")
        assert not core.read_namespaced_config_map("orphan-child", ns).metadata.owner_references
    eventually(orphaned, GC_DISCOVERY_WAIT)


def test_finalizers_hold_deletion(custom, ns):
    custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, {
        **gadget("held"), "metadata": {"name": "held", "finalizers": ["fidelity.lora-operator.dev/hold"]}})
    marked = custom.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "held")
    assert marked["metadata"]["deletionTimestamp"]
    assert custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "held")["metadata"]["deletionTimestamp"]
    custom.patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "held", {"metadata": {"finalizers": None}})
    eventually(lambda: not gadget_exists(custom, ns, "held") or pytest.fail("still there"))


def test_graceful_pod_deletion(core, ns):
    core.create_namespaced_pod(ns, pod("unbound"))
    core.delete_namespaced_pod("unbound", ns)
    assert error_of(core.read_namespaced_pod, "unbound", ns)[0] == 404  # no kubelet: gone at once

    core.create_namespaced_pod(ns, pod("bound"))
    core.create_namespaced_pod_binding("bound", ns, {"apiVersion": "v1", "kind": "Binding", "metadata": {"name": "bound"},
                                                     "target": {"apiVersion": "v1", "kind": "Node", "name": NODE}},
                                       _preload_content=False)
    marked = core.delete_namespaced_pod("bound", ns)
    assert marked.metadata.deletion_timestamp and marked.metadata.deletion_grace_period_seconds == 30
    assert core.read_namespaced_pod("bound", ns).metadata.deletion_timestamp  # waits for its kubelet
    core.delete_namespaced_pod("bound", ns, grace_period_seconds=0)  # the kubelet's confirmation
    eventually(lambda: error_of(core.read_namespaced_pod, "bound", ns)[0] == 404)


@pytest.mark.parametrize("spec, field, reason", [
    ({"mode": "reckless"}, "spec.mode", "FieldValueNotSupported"),
    ({"replicas": 0}, "spec.replicas", "FieldValueInvalid"),
    ({"training": {"learningRate": 5}}, "spec.training.learningRate", "FieldValueInvalid"),
    ({"replicas": "two"}, "spec.replicas", "FieldValueTypeInvalid"),
    ({"tags": ["a", "b", "c", "d"]}, "spec.tags", "FieldValueTooMany"),
    ({"model": None}, "spec.model", "FieldValueRequired"),
])
def test_schema_violations_are_invalid(custom, ns, spec, field, reason):
    body = gadget(unique("bad"), **spec)
    body["spec"] = {k: v for k, v in body["spec"].items() if v is not None}
    code, status = error_of(custom.create_namespaced_custom_object, GROUP, VERSION, ns, PLURAL, body)
    assert (code, status["kind"], status["reason"]) == (422, "Status", "Invalid")
    assert f"{field}:" in status["message"]
    assert {(c["field"], c["reason"]) for c in status["details"]["causes"]} >= {(field, reason)}


def test_defaults_and_pruning(custom, ns):
    created = create_gadget(custom, ns, "defaults", port="http", unknown=1, extra={"anything": {"goes": True}})
    spec = created["spec"]
    assert (spec["mode"], spec["replicas"], spec["training"]) == ("careful", 1, {"learningRate": 0.0001, "steps": 100})
    assert "unknown" not in spec and spec["extra"] == {"anything": {"goes": True}} and spec["port"] == "http"
    assert create_gadget(custom, ns, "port-int", port=8080)["spec"]["port"] == 8080


def test_defaults_applied_on_update(custom, ns):
    current = create_gadget(custom, ns, "redefault", mode="fast")
    del current["spec"]["mode"], current["spec"]["training"]["steps"]
    replaced = custom.replace_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "redefault", current)
    assert (replaced["spec"]["mode"], replaced["spec"]["training"]["steps"]) == ("careful", 100)


def test_crd_is_discoverable(client, custom):
    found = custom.get_api_resources(GROUP, VERSION)
    names = {r.name: r for r in found.resources}
    assert names[PLURAL].kind == KIND and names[PLURAL].namespaced is True
    assert f"{PLURAL}/status" in names
    groups = kubernetes.client.ApisApi(client).get_api_versions().groups
    assert GROUP in {g.name for g in groups}


def test_watch_resumes_from_list_version(custom, ns):
    listed = custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)
    rv = listed["metadata"]["resourceVersion"]
    assert rv.isdigit()
    created = create_gadget(custom, ns, "watched")
    patched = custom.patch_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, "watched", {"spec": {"replicas": 5}})
    events = []
    watch = kubernetes.watch.Watch()
    for event in watch.stream(custom.list_namespaced_custom_object, GROUP, VERSION, ns, PLURAL,
                              resource_version=rv, allow_watch_bookmarks=True, timeout_seconds=10):
        if event["type"] != "BOOKMARK" and event["object"]["metadata"]["name"] == "watched":
            events.append((event["type"], event["object"]["metadata"]["resourceVersion"]))
        if len(events) == 2:
            watch.stop()
    assert events == [("ADDED", created["metadata"]["resourceVersion"]),
                      ("MODIFIED", patched["metadata"]["resourceVersion"])]


def test_events_are_creatable_and_listable(client, core, ns):
    involved = {"apiVersion": "v1", "kind": "Namespace", "name": ns}
    core.create_namespaced_event(ns, {"metadata": {"generateName": "fidelity-"}, "involvedObject": {**involved, "namespace": ns},
                                      "reason": "Tested", "message": "core event", "type": "Normal"})
    listed = core.list_namespaced_event(ns).items
    assert [e.metadata.name.startswith("fidelity-") for e in listed if e.reason == "Tested"] == [True]
    new_event = {"apiVersion": "events.k8s.io/v1", "kind": "Event", "regarding": {**involved, "namespace": ns},
                 "reason": "Tested",
                 "note": "new event", "type": "Normal", "action": "Test", "reportingController": "fidelity/test",
                 "reportingInstance": "fidelity-1"}
    # Sent raw: the official client turns eventTime into a datetime and re-serialises it as
    # `+00:00`, which a real server refuses (Kopf and our operator send JSON themselves).
    path = f"/apis/events.k8s.io/v1/namespaces/{ns}/events"
    good = {**new_event, "metadata": {"name": "fidelity-new"}, "eventTime": "2024-01-01T00:00:00.000000Z"}
    code, body = send_raw(client, "POST", path, good)
    assert code == 201, body["message"]
    # Listed raw too: the client's model insists on an eventTime that core/v1 Events lack.
    assert "fidelity-new" in {e["metadata"]["name"] for e in get_raw(client, path)["items"]}
    # eventTime is a MicroTime: an RFC 3339 time without six fractional digits is a 400.
    bad = {**new_event, "metadata": {"name": "fidelity-bad-time"}, "eventTime": "2024-01-01T00:00:00+00:00"}
    code, body = send_raw(client, "POST", path, bad)
    assert (code, body["reason"]) == (400, "BadRequest") and "2006-01-02T15:04:05.000000Z07:00" in body["message"]


def send_raw(client: kubernetes.client.ApiClient, method: str, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """Send a JSON body exactly as given; the status code and the JSON answer."""
    method, url, headers, body, _ = client.param_serialize(
        method, path, header_params={"Content-Type": "application/json", "Accept": "application/json"},
        body=body, auth_settings=["BearerToken"])
    response = client.call_api(method, url, header_params=headers, body=body)
    response.read()
    return response.status, json.loads(response.data)


def test_crd_metadata_schema_is_implicit(target):
    crd = {**CRD, "metadata": {"name": "widgets.fidelity.lora-operator.dev"}, "spec": {
        **CRD["spec"], "names": {"plural": "widgets", "singular": "widget", "kind": "Widget", "listKind": "WidgetList"},
        "versions": [{**CRD["spec"]["versions"][0], "schema": {"openAPIV3Schema": {"type": "object", "properties": {
            "metadata": {"type": "object", "description": "not allowed"}}}}}]}}
    with target.api_client() as client:
        ext = kubernetes.client.ApiextensionsV1Api(client)
        code, body = error_of(ext.create_custom_resource_definition, crd)
    assert (code, body["reason"]) == (422, "Invalid")
    assert "must not specify anything other than name and generateName" in body["message"]


def get_raw(client: kubernetes.client.ApiClient, path: str, accept: str = "application/json") -> dict[str, Any]:
    """GET a path with the client's credentials; the JSON body as sent."""
    method, url, headers, body, _ = client.param_serialize("GET", path, header_params={"Accept": accept},
                                                           auth_settings=["BearerToken"])
    response = client.call_api(method, url, header_params=headers, body=body)
    response.read()
    assert response.status == 200, response.data
    return json.loads(response.data)


def test_discovery_as_kubectl_reads_it(client):
    assert kubernetes.client.CoreApi(client).get_api_versions().versions == ["v1"]
    listed = get_raw(client, "/api/v1")
    assert listed["groupVersion"] == "v1" and "secrets" in {r["name"] for r in listed["resources"]}
    found = {r.name: r for r in kubernetes.client.CustomObjectsApi(client).get_api_resources(GROUP, VERSION).resources}
    assert found[PLURAL].short_names == ["gdg"]
    assert not found[f"{PLURAL}/status"].short_names  # else `kubectl get gdg` is ambiguous


TABLE_ACCEPT = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"


def test_server_side_printing_tables(client, custom, ns):
    create_gadget(custom, ns, "printed", mode="fast")
    custom.patch_namespaced_custom_object_status(GROUP, VERSION, ns, PLURAL, "printed", {"status": {"step": 7}})
    path = f"/apis/{GROUP}/{VERSION}/namespaces/{ns}/{PLURAL}"
    for url in (path, f"{path}/printed"):
        table = get_raw(client, url, TABLE_ACCEPT)
        assert (table["kind"], table["apiVersion"]) == ("Table", "meta.k8s.io/v1")
        assert [c["name"] for c in table["columnDefinitions"]] == ["Name", "Mode", "Step", "Age"]
        (row,) = [r for r in table["rows"] if r["cells"][0] == "printed"]
        assert row["cells"][1:3] == ["fast", 7]
        assert row["cells"][3][-1] in "smhdy" and row["object"]["metadata"]["name"] == "printed"


@pytest.mark.parametrize("status, field, reason", [
    ({"step": "two"}, "status.step", "FieldValueTypeInvalid"),
    ({"reason": "R" * 17}, "status.reason", "FieldValueTooLong"),
])
def test_status_writes_are_validated(custom, ns, status, field, reason):
    name = unique("status")
    create_gadget(custom, ns, name)
    code, body = error_of(custom.patch_namespaced_custom_object_status, GROUP, VERSION, ns, PLURAL, name,
                          {"status": status})
    assert (code, body["kind"], body["reason"]) == (422, "Status", "Invalid")
    assert f"{field}:" in body["message"]
    assert {(c["field"], c["reason"]) for c in body["details"]["causes"]} >= {(field, reason)}
    assert "status" not in custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)  # nothing written
    written = custom.patch_namespaced_custom_object_status(
        GROUP, VERSION, ns, PLURAL, name, {"status": {"phase": "Ok", "unknown": 1, "reason": "R" * 16}})
    assert written["status"] == {"phase": "Ok", "reason": "R" * 16}


def test_strict_field_validation(custom, ns):
    body = gadget(unique("strict"), training={"steps": 3, "stpes": 4}, bogus=1)
    with pytest.raises(ApiException) as info:
        custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body, field_validation="Strict")
    answer = json.loads(info.value.body)
    assert (info.value.status, answer["reason"]) == (400, "BadRequest")
    assert 'unknown field "spec.bogus", unknown field "spec.training.stpes"' in answer["message"]
    created = custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, body)  # default: pruned
    assert "bogus" not in created["spec"] and "stpes" not in created["spec"]["training"]
