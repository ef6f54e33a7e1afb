"""The Kubernetes API calls the operator makes (thin), with errors in our words.

    KubeError            anything the API said no to
    ├── NotFound         404
    ├── AlreadyExists    409 on create (for a deterministic name: the work is done)
    ├── Conflict         409 otherwise
    ├── Invalid          422 / 400: the object can never be accepted as it is
    └── Unavailable      5xx, 429, timeouts, connection errors: try again later

Bodies are plain camelCase dicts as the API sends them (raw JSON, not client models), so the
pure modules see exactly what a watch event would show them.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import queue
import threading
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import kubernetes
import urllib3
from kubernetes.client.rest import ApiException

from lora_operator import jobset as js
from lora_operator.classify import JOB_LABEL
from lora_operator.spec import GROUP, PLURAL, VERSION

T = TypeVar("T")
MERGE_PATCH = "application/merge-patch+json"
REQUEST_TIMEOUT = (5, 30)  # connect, read seconds: a hung API server must not hang a job's loop
# Which waiting request goes first when every worker is busy (lower first): starting or stopping
# pods is what a user waits for; a status write can follow, since the next one carries the same truth.
URGENT, READ, STATUS = 0, 1, 2
# At most this many status writes in flight. A busy API server shares its CPU among every request in
# flight, and a status write costs it about four pod creates (validation, CEL, managed fields): with
# 500 new jobs, 32 status writes at a time made each pod wait seconds; with 4 the pods kept pace with
# the creates (bench_operator_scale --target real: pod p99 4.3-5.8 s -> 1.3-1.9 s) and the statuses
# were all written about as soon as before, just after the pods. A handful of jobs never reaches it.
STATUS_WRITES_IN_FLIGHT = 4


class KubeError(Exception):
    """The API refused or failed a request; `status` is the HTTP code (0: no answer)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class NotFound(KubeError):
    pass


class AlreadyExists(KubeError):
    pass


class Conflict(KubeError):
    pass


class Invalid(KubeError):
    pass


class Unavailable(KubeError):
    pass


def _translate(exc: Exception, what: str) -> KubeError:
    if not isinstance(exc, ApiException):
        return Unavailable(f"{what}: the API server did not answer ({type(exc).__name__}: {exc})")
    try:
        message = json.loads(exc.body or "{}").get("message") or exc.reason
    except ValueError:
        message = exc.reason
    text = f"{what}: {message}"
    status = exc.status or 0
    if status == 404:
        return NotFound(text, status)
    if status == 409:
        reason = ""
        try:
            reason = json.loads(exc.body or "{}").get("reason", "")
        except ValueError:
            pass
        return (AlreadyExists if reason == "AlreadyExists" else Conflict)(text, status)
    if status in (400, 422):
        return Invalid(text, status)
    if status == 429 or status >= 500:
        return Unavailable(text, status)
    return KubeError(text, status)


def load_configuration(kubeconfig: str | None = None) -> kubernetes.client.Configuration:
    """Client configuration: the given kubeconfig, else in-cluster, else $KUBECONFIG/~/.kube/config."""
    config = kubernetes.client.Configuration()
    if kubeconfig:
        kubernetes.config.load_kube_config(config_file=kubeconfig, client_configuration=config)
        return config
    try:
        kubernetes.config.load_incluster_config(client_configuration=config)
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config(client_configuration=config)
    return config


class PriorityPool:
    """Worker threads that take the most urgent waiting call first (then the oldest).

    With 500 new jobs, a FIFO pool put each job's pod create behind hundreds of status writes, and a
    busy API server shares its CPU among everything in flight: the pods came seconds later."""

    def __init__(self, workers: int, limits: Mapping[int, int] | None = None) -> None:
        # Calls of a limited priority wait here (in the event loop) for one of their slots.
        self._slots = {priority: asyncio.Semaphore(n) for priority, n in (limits or {}).items()}
        self._queue: queue.PriorityQueue[tuple[int, int, Callable[[], None] | None]] = queue.PriorityQueue()
        self._order = itertools.count()
        self._threads = [threading.Thread(target=self._work, name=f"kube-{i}", daemon=True) for i in range(workers)]
        for thread in self._threads:
            thread.start()

    def _work(self) -> None:
        while (item := self._queue.get()[2]) is not None:
            item()

    async def run(self, priority: int, fn: Callable[[], T]) -> T:
        """Run `fn` on a worker when its turn comes (and, for a limited priority, a slot is free);
        its result or exception."""
        slots = self._slots.get(priority)
        if slots is None:
            return await self._run(priority, fn)
        async with slots:
            return await self._run(priority, fn)

    async def _run(self, priority: int, fn: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()

        def settle(result: T | None, exc: BaseException | None) -> None:
            if not future.done():
                future.set_result(result) if exc is None else future.set_exception(exc)  # type: ignore[arg-type]

        def item() -> None:
            result: T | None = None
            error: BaseException | None = None
            try:
                result = fn()
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
                error = exc
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody awaits it any more
                loop.call_soon_threadsafe(settle, result, error)

        self._queue.put((priority, next(self._order), item))
        return await future

    def close(self) -> None:
        """Let the workers end once the calls before this one are done."""
        for _ in self._threads:
            self._queue.put((1 << 30, next(self._order), None))


class Kube:
    """The operator's API calls; blocking client calls run on a bounded pool of worker threads."""

    def __init__(self, configuration: kubernetes.client.Configuration, workers: int = 32) -> None:
        configuration.connection_pool_maxsize = workers
        self.configuration = configuration
        self.client = kubernetes.client.ApiClient(configuration)
        self.core = kubernetes.client.CoreV1Api(self.client)
        self.custom = kubernetes.client.CustomObjectsApi(self.client)
        self._pool = PriorityPool(workers, limits={STATUS: STATUS_WRITES_IN_FLIGHT})

    def close(self) -> None:
        """Stop the worker threads and close connections."""
        self._pool.close()
        self.client.close()

    async def _call(self, what: str, fn: Callable[..., Any], *args: Any, priority: int = READ, **kwargs: Any) -> Any:
        def run() -> Any:
            try:
                response = fn(*args, _preload_content=False, _request_timeout=REQUEST_TIMEOUT, **kwargs)
                return json.loads(response.data or b"null")
            except (ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
                raise _translate(exc, what) from exc

        return await self._pool.run(priority, run)

    @staticmethod
    def _object(body: Any, what: str) -> dict[str, Any]:
        # An API server always answers a successful write with the object; anything else is broken.
        if not isinstance(body, dict) or not (body.get("metadata") or {}).get("name"):
            raise Unavailable(f"{what}: the API server answered without the object")
        return body

    async def job_resource_served(self) -> bool:
        """Whether discovery lists loratrainingjobs (the CRD is installed and Established)."""
        try:
            body = await self._call("discover the LoRATrainingJob API", self.custom.get_api_resources, GROUP, VERSION)
        except NotFound:
            return False
        return any(r.get("name") == PLURAL for r in (body or {}).get("resources") or [])

    async def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The job as stored now, None when it is gone."""
        try:
            body = await self._call(f"get job {namespace}/{name}", self.custom.get_namespaced_custom_object,
                                    GROUP, VERSION, namespace, PLURAL, name)
        except NotFound:
            return None
        return self._object(body, f"get job {namespace}/{name}")

    async def list_pods(self, namespace: str, job: str) -> list[dict[str, Any]]:
        """Every pod of the job (by label), fresh from the API server."""
        body = await self._call(f"list pods of {namespace}/{job}", self.core.list_namespaced_pod,
                                namespace, label_selector=f"{JOB_LABEL}={job}")
        if not isinstance(body, dict) or not isinstance(body.get("items"), list):
            raise Unavailable(f"list pods of {namespace}/{job}: the API server answered without a list")
        return body["items"]

    async def create_pod(self, pod: Mapping[str, Any]) -> dict[str, Any]:
        """Create a pod; AlreadyExists means an earlier run did it."""
        meta = pod["metadata"]
        what = f"create pod {meta['namespace']}/{meta['name']}"
        body = await self._call(what, self.core.create_namespaced_pod, meta["namespace"], dict(pod),
                                priority=URGENT)
        return self._object(body, what)

    async def delete_pod(self, namespace: str, name: str, grace_seconds: int | None = None) -> None:
        """Delete a pod (its own grace period unless given; 0 forces); gone already is fine."""
        options: dict[str, Any] = {"propagationPolicy": "Background"}
        if grace_seconds is not None:
            options["gracePeriodSeconds"] = grace_seconds
        try:
            await self._call(f"delete pod {namespace}/{name}", self.core.delete_namespaced_pod,
                             name, namespace, body=options, priority=URGENT)
        except NotFound:
            pass

    async def delete_job(self, namespace: str, name: str) -> None:
        """Delete a job in the background: the garbage collector removes its pods (owner references);
        gone already is fine."""
        try:
            await self._call(f"delete job {namespace}/{name}", self.custom.delete_namespaced_custom_object,
                             GROUP, VERSION, namespace, PLURAL, name, body={"propagationPolicy": "Background"})
        except NotFound:
            pass

    async def jobsets_served(self) -> bool:
        """Whether discovery lists jobsets.jobset.x-k8s.io/v1alpha2 (JobSet is installed)."""
        try:
            body = await self._call("discover the JobSet API", self.custom.get_api_resources, js.GROUP, js.VERSION)
        except NotFound:
            return False
        return any(r.get("name") == js.PLURAL for r in (body or {}).get("resources") or [])

    async def get_jobset(self, namespace: str, name: str) -> dict[str, Any] | None:
        """A group attempt's JobSet as stored now, None when it is gone."""
        what = f"get JobSet {namespace}/{name}"
        try:
            body = await self._call(what, self.custom.get_namespaced_custom_object,
                                    js.GROUP, js.VERSION, namespace, js.PLURAL, name)
        except NotFound:
            return None
        return self._object(body, what)

    async def create_jobset(self, jobset: Mapping[str, Any]) -> dict[str, Any]:
        """Create a group attempt's JobSet; AlreadyExists means an earlier pass did it."""
        meta = jobset["metadata"]
        what = f"create JobSet {meta['namespace']}/{meta['name']}"
        body = await self._call(what, self.custom.create_namespaced_custom_object,
                                js.GROUP, js.VERSION, meta["namespace"], js.PLURAL, dict(jobset), priority=URGENT)
        return self._object(body, what)

    async def delete_jobset(self, namespace: str, name: str) -> None:
        """Delete a JobSet; the garbage collector stops its pods, each with its grace period. Gone is fine."""
        try:
            await self._call(f"delete JobSet {namespace}/{name}", self.custom.delete_namespaced_custom_object,
                             js.GROUP, js.VERSION, namespace, js.PLURAL, name, body={"propagationPolicy": "Background"},
                             priority=URGENT)
        except NotFound:
            pass

    async def patch_job_status(self, namespace: str, name: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        """Merge-patch the job's /status subresource."""
        what = f"patch status of {namespace}/{name}"
        body = await self._call(what, self.custom.patch_namespaced_custom_object_status,
                                GROUP, VERSION, namespace, PLURAL, name, {"status": dict(patch)},
                                _content_type=MERGE_PATCH, priority=STATUS)
        return self._object(body, what)

    async def read_secret(self, namespace: str, name: str) -> dict[str, str] | None:
        """A Secret's data, decoded; None when it does not exist. Never log the result."""
        try:
            body = await self._call(f"read secret {namespace}/{name}", self.core.read_namespaced_secret, name, namespace)
        except NotFound:
            return None
        data = (body or {}).get("data") or {}
        return {k: base64.b64decode(v).decode("utf-8", "replace") for k, v in data.items()}

    async def node_ready(self, name: str) -> bool | None:
        """Whether the node's Ready condition is True; None when the node is gone or unknown."""
        if not name:
            return None
        try:
            body = await self._call(f"read node {name}", self.core.read_node, name)
        except (NotFound, KubeError):
            return None
        for cond in ((body or {}).get("status") or {}).get("conditions") or []:
            if cond.get("type") == "Ready":
                return cond.get("status") == "True"
        return None
