"""The write path of the emulated API server: create, update, patch, delete, garbage collection.

Transport-free: methods take plain dicts and raise ``ApiError``. Semantics follow kube-apiserver:
uid/creationTimestamp/generation/resourceVersion, optimistic concurrency, the status
subresource split, CRD schema admission, finalizers, graceful pod deletion, and a level-based
garbage collector (ownerReferences, namespace termination, foreground deletion).
"""

from __future__ import annotations

import copy
import datetime
import logging
import secrets
import string
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from lora_operator.emulator import builtins, errors
from lora_operator.emulator.patches import PatchError, json_patch, merge_patch
from lora_operator.emulator.resources import CRD_GROUP, CRD_PLURAL, Model, Registry, check_crd
from lora_operator.emulator.schema import FieldError, admit
from lora_operator.emulator.store import Key, Store

__all__ = ["Engine", "now_iso"]

logger = logging.getLogger(__name__)

# Set by the server, never by clients.
_SYSTEM_META = ("uid", "creationTimestamp", "generation", "deletionTimestamp", "deletionGracePeriodSeconds")
_FOREGROUND = "foregroundDeletion"
_ORPHAN = "orphan"


def now_iso(offset: float = 0) -> str:
    """RFC 3339 UTC timestamp with second precision, as in metadata."""
    moment = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=offset)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _spec_part(obj: Mapping[str, Any], model: Model) -> dict[str, Any]:
    # What generation tracks: everything but metadata (and status when it is a subresource).
    skipped = {"metadata", "status"} if model.has_status else {"metadata"}
    return {k: v for k, v in obj.items() if k not in skipped}


class Engine:
    """Applies API semantics to the store; one instance per emulator."""

    def __init__(self, registry: Registry, store: Store, schedule: Callable[[], None] = lambda: None) -> None:
        self.registry = registry
        self.store = store
        self._schedule_gc = schedule

    # ---- keys and reads -------------------------------------------------------------------------

    @staticmethod
    def key(model: Model, namespace: str | None, name: str) -> Key:
        """The store key of an object of that model."""
        return (model.group, model.plural, namespace or "" if model.namespaced else "", name)

    def present(self, model: Model, obj: dict[str, Any]) -> dict[str, Any]:
        """The stored object as served at the requested version (no conversion, only apiVersion)."""
        obj["apiVersion"] = model.api_version
        obj["kind"] = model.kind
        return obj

    def read(self, model: Model, namespace: str | None, name: str) -> dict[str, Any]:
        """The object, or 404."""
        obj = self.store.get(self.key(model, namespace, name))
        if obj is None:
            raise errors.not_found(model.group, model.plural, name)
        return self.present(model, obj)

    # ---- create ---------------------------------------------------------------------------------

    def create(self, model: Model, namespace: str | None, body: Any) -> dict[str, Any]:
        """POST: assign identity, admit, store; 409 if the name is taken."""
        if not isinstance(body, dict):
            raise errors.bad_request("the body of the request must be a JSON object")
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if obj.get("kind") not in (None, model.kind):
            raise errors.bad_request(f"the kind {obj.get('kind')!r} of the object does not match {model.kind!r}")
        if model.namespaced:
            if meta.get("namespace") and namespace and meta["namespace"] != namespace:
                raise errors.bad_request("the namespace of the provided object does not match the namespace sent on the request")
            namespace = namespace or meta.get("namespace")
            if not namespace:
                raise errors.bad_request("an empty namespace may not be set during creation")
            self._check_namespace_open(namespace)
            meta["namespace"] = namespace
        else:
            meta.pop("namespace", None)
        if not meta.get("name"):
            if not meta.get("generateName"):
                raise errors.invalid(model.group, model.kind, "", [FieldError(
                    "metadata.name", "FieldValueRequired", "Required value: name or generateName is required")])
            suffix = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(5))
            meta["name"] = meta["generateName"] + suffix
        name = meta["name"]
        for field in (*_SYSTEM_META, "resourceVersion", "selfLink", "managedFields"):
            meta.pop(field, None)
        problems = builtins.validate_name(model.group, model.plural, name)
        if problems:
            raise errors.invalid(model.group, model.kind, name, problems)

        obj = self._admit_kind(model, None, obj)
        key = self.key(model, namespace, name)
        if key in self.store:
            raise errors.already_exists(model.group, model.plural, name)
        meta = obj["metadata"]
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = now_iso()
        meta["generation"] = 1
        meta["resourceVersion"] = self.store.next_rv()
        obj = self.present(model, obj)
        stored = self.store.write(key, obj, "ADDED")
        if (model.group, model.plural) == (CRD_GROUP, CRD_PLURAL):
            self.registry.register_crd(stored)
        if meta.get("ownerReferences"):
            self._schedule_gc()  # a dependent of a vanished owner is collected at once
        return stored

    def _check_namespace_open(self, namespace: str) -> None:
        ns = self.store.get(("", "namespaces", "", namespace))
        if ns is None:
            raise errors.not_found("", "namespaces", namespace)
        if ns["metadata"].get("deletionTimestamp"):
            raise errors.ApiError(403, "Forbidden", f"unable to create new content in namespace {namespace} "
                                  "because it is being terminated")

    def _admit_kind(self, model: Model, old: dict[str, Any] | None, obj: dict[str, Any]) -> dict[str, Any]:
        # Kind-specific defaulting and validation, for creates (old is None) and updates.
        name = obj["metadata"].get("name", "")
        problems: list[FieldError] = []
        if model.crd_name is not None:
            if old is None and model.has_status:
                obj.pop("status", None)  # status is reset on create, as the real server does
            obj, problems = admit(model.schema, obj)
        elif (model.group, model.plural) == ("", "pods"):
            if old is None:
                problems = builtins.pod_create_errors(obj)
                obj = builtins.default_pod(obj) if not problems else obj
            else:
                problems = builtins.pod_spec_update_errors(old, obj)
        elif (model.group, model.plural) == (CRD_GROUP, CRD_PLURAL):
            problems = check_crd(obj)
            if not problems:
                obj["status"] = builtins.crd_status(obj, now_iso()) if old is None else old.get("status", {})
        elif model.plural == "events" and model.group in ("", "events.k8s.io"):
            bad = builtins.event_time_error(obj)
            if bad:
                raise errors.bad_request(f'Event in version "{model.version}" cannot be handled as a Event: {bad}')
        elif (model.group, model.plural) == ("", "namespaces") and old is None:
            obj["status"] = {"phase": "Active"}
            obj["metadata"].setdefault("labels", {})["kubernetes.io/metadata.name"] = name
        if problems:
            raise errors.invalid(model.group, model.kind, name, problems)
        return obj

    def _admit_status(self, model: Model, obj: dict[str, Any]) -> dict[str, Any]:
        # A /status write of a custom resource is pruned, defaulted and validated against the
        # CRD's schema like any write (the real server's status strategy). Only status fields can
        # fail it: the rest was copied from the stored object (validation ratcheting).
        admitted, problems = admit(model.schema, obj)
        problems = [p for p in problems if p.field == "status" or p.field.startswith(("status.", "status["))]
        if problems:
            raise errors.invalid(model.group, model.kind, obj["metadata"].get("name", ""), problems)
        return admitted

    # ---- update and patch -----------------------------------------------------------------------

    def replace(self, model: Model, namespace: str | None, name: str, body: Any, subresource: str | None) -> dict[str, Any]:
        """PUT: full replacement of the main resource or of /status."""
        if not isinstance(body, dict):
            raise errors.bad_request("the body of the request must be a JSON object")
        meta = body.get("metadata") or {}
        if meta.get("name") not in (None, name):
            raise errors.bad_request("the name of the object does not match the name on the URL")
        old = self.read(model, namespace, name)
        if model.crd_name is not None and not meta.get("resourceVersion"):
            raise errors.invalid(model.group, model.kind, name, [FieldError(
                "metadata.resourceVersion", "FieldValueInvalid", "Invalid value: 0x0: must be specified for an update")])
        return self._update(model, old, copy.deepcopy(body), subresource)

    def patch(self, model: Model, namespace: str | None, name: str, body: Any, content_type: str,
              subresource: str | None) -> dict[str, Any]:
        """PATCH with json-patch, merge-patch or strategic-merge-patch (applied as merge)."""
        old = self.read(model, namespace, name)
        kind = content_type.split(";")[0].strip().lower()
        try:
            if kind == "application/json-patch+json":
                new = json_patch(old, body)
            elif kind in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
                if not isinstance(body, dict):
                    raise errors.bad_request("a merge patch must be a JSON object")
                new = merge_patch(old, body)
            else:
                raise errors.unsupported_media_type(content_type)
        except PatchError as exc:
            raise errors.ApiError(422, "Invalid", str(exc)) from exc
        if not isinstance(new, dict):
            raise errors.bad_request("the patched object is not a JSON object")
        # A patch that carries a resourceVersion is a precondition; one without is unconditional.
        supplied = (body.get("metadata") or {}).get("resourceVersion") if isinstance(body, dict) else None
        if supplied is None and kind == "application/json-patch+json":
            supplied = new.get("metadata", {}).get("resourceVersion")
        new.setdefault("metadata", {})["resourceVersion"] = supplied or old["metadata"]["resourceVersion"]
        return self._update(model, old, new, subresource)

    def _update(self, model: Model, old: dict[str, Any], new: dict[str, Any], subresource: str | None) -> dict[str, Any]:
        name = old["metadata"]["name"]
        supplied = (new.get("metadata") or {}).get("resourceVersion")
        if supplied and str(supplied) != old["metadata"]["resourceVersion"]:
            raise errors.conflict(model.group, model.plural, name)
        if subresource == "status":
            if not model.has_status:
                raise errors.not_found(model.group, model.plural, name)
            merged = copy.deepcopy(old)
            if "status" in new:
                merged["status"] = new["status"]
            else:
                merged.pop("status", None)
            if (model.group, model.plural) == ("", "pods"):
                # A real pods/status write keeps label and annotation changes (only custom
                # resources reset all of metadata on /status).
                for field in ("labels", "annotations"):
                    value = (new.get("metadata") or {}).get(field)
                    if value is None:
                        merged["metadata"].pop(field, None)
                    else:
                        merged["metadata"][field] = value
            new = merged
        elif subresource:
            raise errors.method_not_allowed(f"subresource {subresource!r} is not supported by the emulator")
        else:
            if model.has_status:
                new.pop("status", None)
                if "status" in old:
                    new["status"] = copy.deepcopy(old["status"])
            meta = new.setdefault("metadata", {})
            for field in ("name", "namespace", *_SYSTEM_META):
                if field in old["metadata"]:
                    meta[field] = old["metadata"][field]
                else:
                    meta.pop(field, None)
            if old["metadata"].get("deletionTimestamp"):
                added = set(meta.get("finalizers") or ()) - set(old["metadata"].get("finalizers") or ())
                if added:
                    raise errors.invalid(model.group, model.kind, name, [FieldError(
                        "metadata.finalizers", "FieldValueForbidden",
                        f"Forbidden: no new finalizers can be added if the object is being deleted, found new finalizers {sorted(added)!r}")])
            new = self._admit_kind(model, old, new)
        if subresource == "status" and model.crd_name is not None:
            new = self._admit_status(model, new)
        new["apiVersion"], new["kind"] = old["apiVersion"], old["kind"]
        new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
        if new == old:
            return old  # a no-op write is not a write: same resourceVersion, no event
        if _spec_part(new, model) != _spec_part(old, model):
            new["metadata"]["generation"] = int(old["metadata"].get("generation", 1)) + 1
        new["metadata"]["resourceVersion"] = self.store.next_rv()
        key = self.key(model, old["metadata"].get("namespace"), name)
        stored = self.store.write(key, new, "MODIFIED")
        meta = stored["metadata"]
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            grace = meta.get("deletionGracePeriodSeconds") or 0
            if not (model.group, model.plural) == ("", "pods") or grace == 0:
                self._remove(key)  # the last finalizer is gone: the object goes, the response shows it
        if (model.group, model.plural) == (CRD_GROUP, CRD_PLURAL) and key in dict(self.store.items(CRD_GROUP, CRD_PLURAL)):
            self.registry.register_crd(stored)
        return stored

    def bind_pod(self, model: Model, namespace: str | None, name: str, body: Any) -> dict[str, Any]:
        """POST pods/{name}/binding: what the scheduler does; the only way to set spec.nodeName later."""
        pod = self.read(model, namespace, name)
        node = ((body or {}).get("target") or {}).get("name") if isinstance(body, dict) else None
        if not node:
            raise errors.invalid("", "Binding", name, [FieldError("target.name", "FieldValueRequired", "Required value")])
        if pod["spec"].get("nodeName"):
            raise errors.ApiError(409, "Conflict", f'Operation cannot be fulfilled on pods/binding "{name}": '
                                  f'pod {name} is already assigned to node "{pod["spec"]["nodeName"]}"',
                                  {"name": name, "kind": "pods/binding"})
        if pod["metadata"].get("deletionTimestamp"):
            raise errors.ApiError(409, "Conflict", f'pod {name} is being deleted, cannot be assigned to a host')
        pod["spec"]["nodeName"] = node
        conditions = [c for c in pod.setdefault("status", {}).get("conditions", []) if c.get("type") != "PodScheduled"]
        pod["status"]["conditions"] = [*conditions, {"type": "PodScheduled", "status": "True", "lastTransitionTime": now_iso()}]
        pod["metadata"]["resourceVersion"] = self.store.next_rv()
        self.store.write(self.key(model, namespace, name), pod, "MODIFIED")
        return {"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Success", "code": 201}

    # ---- delete and garbage collection ----------------------------------------------------------

    def delete(self, model: Model, namespace: str | None, name: str, options: Mapping[str, Any]) -> dict[str, Any]:
        """DELETE: finalizers, graceful pods, propagation; returns the object as last seen."""
        obj = self.read(model, namespace, name)
        meta = obj["metadata"]
        pre = options.get("preconditions") or {}
        if (pre.get("uid") and pre["uid"] != meta["uid"]) or (
                pre.get("resourceVersion") and pre["resourceVersion"] != meta["resourceVersion"]):
            raise errors.conflict(model.group, model.plural, name)
        grace = options.get("gracePeriodSeconds")
        policy = options.get("propagationPolicy") or ("Orphan" if options.get("orphanDependents") else "Background")
        if policy not in ("Background", "Foreground", "Orphan"):
            raise errors.bad_request(f"propagationPolicy {policy!r} is not supported")
        return self.delete_object(model, self.key(model, namespace, name), obj, grace, policy)

    def delete_object(self, model: Model, key: Key, obj: dict[str, Any], grace: int | None, policy: str) -> dict[str, Any]:
        """Delete one object (also used by the garbage collector)."""
        meta = obj["metadata"]
        is_pod = (model.group, model.plural) == ("", "pods")
        if policy == "Orphan":
            self._orphan(meta["uid"])
        grace_s = builtins.pod_grace_seconds(obj, None if grace is None else int(grace)) if is_pod else 0
        finalizers = list(meta.get("finalizers") or ())
        if policy == "Foreground" and _FOREGROUND not in finalizers and not meta.get("deletionTimestamp"):
            finalizers.append(_FOREGROUND)
        if meta.get("deletionTimestamp"):
            # Already terminating: only a shorter grace period (the kubelet's grace-0 delete) changes anything.
            current = meta.get("deletionGracePeriodSeconds") or 0
            if not is_pod or grace_s >= current:
                return obj
        if is_pod and grace_s > 0:
            # A bound pod stays until its kubelet has stopped it and confirms with a grace-0 delete.
            changes = {"deletionTimestamp": now_iso(grace_s), "deletionGracePeriodSeconds": grace_s}
            return self._mark(key, obj, changes, finalizers)
        if finalizers or (model.group, model.plural) == ("", "namespaces"):
            changes = {"deletionTimestamp": meta.get("deletionTimestamp") or now_iso(), "deletionGracePeriodSeconds": 0}
            if (model.group, model.plural) == ("", "namespaces"):
                obj = {**obj, "status": {"phase": "Terminating"}}
            result = self._mark(key, obj, changes, finalizers)
            self._schedule_gc()
            return result
        removed = self._remove(key)
        if model.crd_name is not None:
            # Custom resources gone at once answer a Status (built-in kinds answer the object).
            return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                    "details": {"name": meta["name"], "group": model.group, "kind": model.plural,
                                "uid": meta["uid"]}}
        return removed

    def _mark(self, key: Key, obj: dict[str, Any], changes: dict[str, Any], finalizers: list[str]) -> dict[str, Any]:
        obj = copy.deepcopy(obj)
        obj["metadata"].update(changes)
        if finalizers:
            obj["metadata"]["finalizers"] = finalizers
        obj["metadata"]["resourceVersion"] = self.store.next_rv()
        return self.store.write(key, obj, "MODIFIED")

    def _remove(self, key: Key) -> dict[str, Any]:
        removed = self.store.remove(key)
        if key[:2] == (CRD_GROUP, CRD_PLURAL):
            self.registry.unregister_crd(key[3])
            group, plural = removed["spec"]["group"], removed["spec"]["names"]["plural"]
            for cr_key, _ in list(self.store.items(group, plural)):
                self.store.remove(cr_key)  # custom resources go with their definition
        self._schedule_gc()
        return removed

    def _orphan(self, uid: str) -> None:
        for key, obj in list(self.store.items()):
            refs = obj["metadata"].get("ownerReferences") or []
            if any(ref.get("uid") == uid for ref in refs):
                updated = copy.deepcopy(obj)
                kept = [ref for ref in refs if ref.get("uid") != uid]
                if kept:
                    updated["metadata"]["ownerReferences"] = kept
                else:
                    updated["metadata"].pop("ownerReferences")
                updated["metadata"]["resourceVersion"] = self.store.next_rv()
                self.store.write(key, updated, "MODIFIED")

    def collect_garbage(self) -> int:
        """One level-based sweep; returns how many objects it acted on (run until 0)."""
        acted = 0
        live = {obj["metadata"]["uid"]: obj for _, obj in self.store.items()}
        models: dict[tuple[str, str], Model] = {}
        for model in self.registry:  # the first model served for a storage key, as before
            models.setdefault(model.storage_key, model)
        for key, obj in list(self.store.items()):
            if key not in self.store:  # removed earlier in this sweep (no deep copy: it runs per write)
                continue
            meta = obj["metadata"]
            model = models.get(key[:2])
            if model is None:
                continue
            refs = meta.get("ownerReferences") or []
            owners = [live.get(ref.get("uid")) for ref in refs]
            foreground_owner = any(o is not None and _FOREGROUND in (o["metadata"].get("finalizers") or [])
                                   for o in owners)
            namespace = live.get(self._namespace_uid(key[2])) if key[2] else None
            terminating_ns = namespace is not None and namespace["metadata"].get("deletionTimestamp")
            dangling = bool(refs) and all(o is None for o in owners)
            if (dangling or foreground_owner or terminating_ns) and not meta.get("deletionTimestamp"):
                logger.debug("garbage-collecting %s", key)
                self.delete_object(model, key, copy.deepcopy(obj), None, "Background")
                acted += 1
            elif _FOREGROUND in (meta.get("finalizers") or []) and not self._has_dependents(meta["uid"]):
                self._drop_finalizer(model, key, _FOREGROUND)
                acted += 1
            elif key[:2] == ("", "namespaces") and meta.get("deletionTimestamp") and not any(
                    k[2] == key[3] for k, _ in self.store.items()):
                self._remove(key)
                acted += 1
        return acted

    def _namespace_uid(self, namespace: str) -> str | None:
        ns = self.store.peek(("", "namespaces", "", namespace))
        return ns["metadata"]["uid"] if ns else None

    def _has_dependents(self, uid: str) -> bool:
        return any(any(ref.get("uid") == uid for ref in obj["metadata"].get("ownerReferences") or [])
                   for _, obj in self.store.items())

    def _drop_finalizer(self, model: Model, key: Key, finalizer: str) -> None:
        obj = self.store.get(key)
        assert obj is not None
        obj["metadata"]["finalizers"] = [f for f in obj["metadata"].get("finalizers", []) if f != finalizer]
        self._update(model, self.store.get(key) or {}, obj, None)
