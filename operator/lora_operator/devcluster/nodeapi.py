"""The API calls a kubelet (and a scheduler binding pods) makes, for the dev pod runner (thin).

Documented endpoints only, so the runner works against a real API server: pods list/watch,
`pods/{name}/binding`, `pods/{name}/status` (JSON merge patch), delete with gracePeriodSeconds=0
and a uid precondition, secrets/configmaps get, nodes create and `nodes/{name}/status`.
Bodies are plain camelCase dicts (raw JSON, no client models).
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

import kubernetes
from kubernetes.client.rest import ApiException
from kubernetes.watch.watch import iter_resp_lines

from lora_operator.devcluster.kubelet import POD_IP, now_iso

log = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"
TIMEOUT = (5, 30)  # connect, read seconds per call: a hung API server must not hang the runner


def _json(response: Any) -> Any:
    return json.loads(response.data or b"null")


class NodeApi:
    """Pod, secret and node calls on one CoreV1Api; `namespace` limits pod lists to one namespace."""

    def __init__(self, client: kubernetes.client.ApiClient, namespace: str | None = None) -> None:
        self.core = kubernetes.client.CoreV1Api(client)
        self.namespace = namespace
        self._watch: Any = None

    def _pods(self, **kwargs: Any) -> Any:
        if self.namespace:
            return self.core.list_namespaced_pod(self.namespace, _preload_content=False, **kwargs)
        return self.core.list_pod_for_all_namespaces(_preload_content=False, **kwargs)

    def list_pods(self) -> tuple[list[dict[str, Any]], str]:
        """All pods in scope and the list's resourceVersion."""
        listed = _json(self._pods(_request_timeout=TIMEOUT))
        return listed.get("items") or [], listed["metadata"]["resourceVersion"]

    def watch_pods(self, version: str, seconds: int) -> Iterator[dict[str, Any]]:
        """Watch events (dicts with type/object) from `version`; ends after `seconds` or on `interrupt()`."""
        self._watch = self._pods(watch=True, resource_version=version, allow_watch_bookmarks=True,
                                 timeout_seconds=seconds, _request_timeout=(5, seconds + 5))
        try:
            for line in iter_resp_lines(self._watch):
                yield json.loads(line)
        finally:
            self._watch.release_conn()

    def interrupt(self) -> None:
        """Unblock a `watch_pods` reader in another thread (it then raises or ends)."""
        response = self._watch
        if response is not None:
            with contextlib.suppress(Exception):
                response.shutdown() if hasattr(response, "shutdown") else response.close()

    def read_pod(self, namespace: str, name: str) -> dict[str, Any]:
        """The pod (raises ApiException, 404 when gone)."""
        return _json(self.core.read_namespaced_pod(name, namespace, _preload_content=False, _request_timeout=TIMEOUT))

    def bind(self, pod: Mapping[str, Any], node: str) -> bool:
        """POST pods/{name}/binding; False when the pod is gone or already bound elsewhere."""
        meta = pod["metadata"]
        body = {"apiVersion": "v1", "kind": "Binding", "metadata": {"name": meta["name"], "uid": meta["uid"]},
                "target": {"apiVersion": "v1", "kind": "Node", "name": node}}
        try:
            self.core.create_namespaced_pod_binding(meta["name"], meta["namespace"], body, _preload_content=False,
                                                    _request_timeout=TIMEOUT)
        except ApiException as exc:
            if exc.status not in (404, 409):
                log.warning("binding pod %s/%s to %s failed: %s", meta["namespace"], meta["name"], node, exc.reason)
            return False
        return True

    def lookup(self, kind: str, namespace: str, name: str) -> dict[str, bytes] | None:
        """A Secret's or ConfigMap's data, decoded; None when it does not exist."""
        read = self.core.read_namespaced_secret if kind == "Secret" else self.core.read_namespaced_config_map
        try:
            body = _json(read(name, namespace, _preload_content=False, _request_timeout=TIMEOUT))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        if kind == "Secret":
            return {k: base64.b64decode(v) for k, v in (body.get("data") or {}).items()}
        return {**{k: v.encode() for k, v in (body.get("data") or {}).items()},
                **{k: base64.b64decode(v) for k, v in (body.get("binaryData") or {}).items()}}

    def write_status(self, pod: Mapping[str, Any], status: dict[str, Any], missing_ok: bool = False) -> bool:
        """Replace the pod's status fields through /status; False on failure (the caller retries)."""
        meta = pod["metadata"]
        try:
            self.core.patch_namespaced_pod_status(meta["name"], meta["namespace"], {"status": status},
                                                  _content_type=MERGE_PATCH, _preload_content=False,
                                                  _request_timeout=TIMEOUT)
        except ApiException as exc:
            if exc.status == 404 and missing_ok:
                return True
            log.warning("pod %s/%s: status update failed: %s", meta["namespace"], meta["name"], exc.reason)
            return False
        except Exception as exc:  # connection trouble
            log.warning("pod %s/%s: status update failed: %s", meta["namespace"], meta["name"], exc)
            return False
        return True

    def remove(self, pod: Mapping[str, Any]) -> None:
        """The kubelet's last word on a deleted pod: delete this very pod (uid) with grace 0."""
        meta = pod["metadata"]
        try:
            self.core.delete_namespaced_pod(meta["name"], meta["namespace"], grace_period_seconds=0,
                                            body={"gracePeriodSeconds": 0, "preconditions": {"uid": meta["uid"]}},
                                            _preload_content=False, _request_timeout=TIMEOUT)
        except ApiException as exc:
            if exc.status not in (404, 409):
                log.warning("pod %s/%s: final delete failed: %s", meta["namespace"], meta["name"], exc.reason)
            return
        log.info("pod %s/%s: removed", meta["namespace"], meta["name"])

    def register_node(self, name: str) -> None:
        """Create the Node (if missing) and mark it Ready, so `kubectl get nodes` and health checks see it."""
        labels = {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                  "kubernetes.io/arch": "amd64", "node.kubernetes.io/instance-type": "dev-local"}
        try:
            self.core.create_node({"metadata": {"name": name, "labels": labels}},
                                  _preload_content=False, _request_timeout=TIMEOUT)
        except ApiException as exc:
            if exc.status != 409:
                raise
        now, cpus = now_iso(), str(os.cpu_count() or 1)
        status = {"conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                                  "message": "dev pod runner is posting ready status",
                                  "lastHeartbeatTime": now, "lastTransitionTime": now}],
                  "addresses": [{"type": "InternalIP", "address": POD_IP}, {"type": "Hostname", "address": name}],
                  "capacity": {"cpu": cpus, "pods": "110"}, "allocatable": {"cpu": cpus, "pods": "110"}}
        self.core.patch_node_status(name, {"status": status}, _content_type=MERGE_PATCH,
                                    _preload_content=False, _request_timeout=TIMEOUT)
