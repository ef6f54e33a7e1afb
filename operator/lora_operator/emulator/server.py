"""``FaithfulEmulator``: kmock's Kubernetes scaffold with a faithful object API behind it.

kmock provides the HTTP handler, the reaction DSL (``emu['get /api/v1/pods'] << 500`` still
injects faults ahead of the emulation), discovery of the served resources and the bundled list
of built-in ones. This class replaces kmock's naive object handling with ``Engine`` (the write
path) and serves list/get/watch with selectors, resourceVersions and Status errors.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp.web
import attrs
from kmock import KubernetesNotFoundError, KubernetesScaffold, Request, Response, resource
from kmock._internal import enums, parsing, rendering

from lora_operator.emulator import errors
from lora_operator.emulator.engine import Engine
from lora_operator.emulator.resources import Model, Registry
from lora_operator.emulator.schema import unknown_fields
from lora_operator.emulator.selectors import (
    SelectorError,
    match_fields,
    match_labels,
    parse_field_selector,
    parse_label_selector,
    supported_fields,
)
from lora_operator.emulator.store import Store, WatchEvent
from lora_operator.emulator.tables import to_table, wants_table

__all__ = ["FaithfulEmulator", "parse_api_path"]

logger = logging.getLogger(__name__)

DEFAULT_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")
_JSON = {"Content-Type": "application/json"}


def parse_api_path(path: str) -> parsing.ParsedPath:
    """Split ``/api(s)/...`` into group/version/plural/namespace/name/subresource.

    kmock 0.8 fails on ``/api/v1/namespaces`` and reads ``/api/v1/namespaces/x`` as a namespace
    without a resource, so namespaces (the resource) are recognised here first.
    """
    parts = [part for part in path.strip("/").split("/") if part]
    if len(parts) >= 2 and parts[0] == "api":
        group, version, rest = "", parts[1], parts[2:]
    elif len(parts) >= 2 and parts[0] == "apis":
        group, version, rest = parts[1], (parts[2] if len(parts) > 2 else None), parts[3:]
    else:
        return parsing.ParsedPath()
    namespace: str | None = None
    if rest and rest[0] == "namespaces" and len(rest) >= 3 and rest[2] not in ("status", "finalize"):
        namespace, rest = rest[1], rest[2:]
    plural = rest[0] if rest else None
    name = rest[1] if len(rest) > 1 else None
    subresource = "/".join(rest[2:]) or None
    return parsing.ParsedPath(group, version, plural, namespace, name, subresource)


def _delete_options(request: Request) -> dict[str, Any]:
    options: dict[str, Any] = dict(request.data) if isinstance(request.data, Mapping) else {}
    params = request.params
    if "gracePeriodSeconds" in params:
        options["gracePeriodSeconds"] = int(params["gracePeriodSeconds"])
    if "propagationPolicy" in params:
        options["propagationPolicy"] = params["propagationPolicy"]
    if params.get("orphanDependents") in ("true", "false"):
        options["orphanDependents"] = params["orphanDependents"] == "true"
    return options


@attrs.define(kw_only=True)
class FaithfulEmulator(KubernetesScaffold):
    """A Kubernetes API emulator that behaves like kube-apiserver where our code can tell."""

    history: int = 50_000  # watch events kept for resourceVersion replays
    bookmark_interval: float = 5.0  # seconds between BOOKMARKs on quiet watches that allow them
    # kmock logs every request for its assertion DSL, and matching a request to a reaction walks
    # that whole log: each request cost O(requests so far), and 500 jobs took minutes. Without
    # the log, `_requests` holds only the requests being answered (what matching needs); keep
    # it (request_log=True) to assert on past requests or to use count-based slices.
    request_log: bool = False
    namespaces: tuple[str, ...] = DEFAULT_NAMESPACES

    store: Store = attrs.field(init=False)
    registry: Registry = attrs.field(init=False)
    engine: Engine = attrs.field(init=False)
    _closing: bool = attrs.field(default=False, init=False)
    _gc_scheduled: bool = attrs.field(default=False, init=False)
    _request_count: int = attrs.field(default=0, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        # Kopf discovers nothing on a bare kmock: the built-in resource list must be loaded.
        self.resources.load_bundled()
        self.store = Store(self.history)
        self.registry = Registry(self.resources)
        self.engine = Engine(self.registry, self.store, self._schedule_gc)
        ns_model = self.registry.get("", "v1", "namespaces")
        assert ns_model is not None
        for name in self.namespaces:
            self.engine.create(ns_model, None, {"metadata": {"name": name}})
        self.fallback[lambda req: req.resource is not None and req.resource.plural is not None] << self._serve

    # ---- kmock plumbing -------------------------------------------------------------------------

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        """Serve one HTTP request (kmock's entry point, with our own path parsing)."""
        await raw_request.read()
        raw_response: aiohttp.web.StreamResponse | None = None
        try:
            request = await self._parse(raw_request)
            self._request_count += 1
            self._requests.append(request)
            try:
                return await self._handle(request)
            except rendering.StreamingError as exc:
                raw_response = exc.args[0]
                if exc.__cause__ is None:
                    raise
                raise exc.__cause__ from None  # kmock's wrapper only says "the stream had started"
            finally:
                if not self.request_log:
                    self._forget(request)
        except Exception as exc:
            if raw_response is None or not raw_response.prepared:
                return await self._render_error(exc)
            await self._stream_error(exc, raw_response)
            await raw_response.write_eof()
            return raw_response

    def _forget(self, request: Request) -> None:
        # By identity: kmock's Request.__eq__ compares loosely (to strings, dicts, ...).
        for index, seen in enumerate(self._requests):
            if seen is request:
                del self._requests[index]
                return

    async def _parse(self, raw_request: aiohttp.web.BaseRequest) -> Request:
        body = await raw_request.read()
        try:
            data = await raw_request.json() if body else None
        except ValueError:
            data = None
        # Clients ask for "/apis/g/v/" as well as "/apis/g/v"; kmock's routes know only the latter.
        path = raw_request.path.rstrip("/") or "/"
        k8s = parse_api_path(path)
        ref = None if k8s.group is None else resource(group=k8s.group, version=k8s.version, plural=k8s.plural)
        query = dict(raw_request.query)
        return Request(
            id=self._request_count, raw_request=raw_request, url=raw_request.url.with_path(path),
            method=raw_request.method,
            params=query, headers=dict(raw_request.headers), cookies=dict(raw_request.cookies),
            data=data, body=body, text=body.decode("utf-8", "replace"),
            action=parsing.guess_k8s(k8s, enums.method(raw_request.method), query),
            resource=ref, namespace=k8s.namespace, name=k8s.name, subresource=k8s.subresource,
        )

    async def _render_error(self, exc: Exception) -> aiohttp.web.StreamResponse:
        if isinstance(exc, errors.ApiError):
            body = errors.status_body(exc.status, exc.reason or "InternalError", exc.message or "", exc.details)
            return aiohttp.web.json_response(body, status=exc.status)
        if isinstance(exc, (NotImplementedError, KubernetesNotFoundError)):  # kmock: nothing matched
            return aiohttp.web.json_response(errors.status_body(404, "NotFound", "the server could not find the requested resource"), status=404)
        logger.exception("emulator failure")
        return aiohttp.web.json_response(errors.status_body(500, "InternalError", repr(exc)), status=500)

    async def _stream_error(self, exc: Exception, raw_response: aiohttp.web.StreamResponse) -> None:
        if isinstance(exc, errors.KubernetesError):
            status = errors.status_body(exc.status, exc.reason or "InternalError", exc.message or "", exc.details)
        else:
            logger.exception("emulator failure in a stream")
            status = errors.status_body(500, "InternalError", repr(exc))
        await raw_response.write(json.dumps({"type": "ERROR", "object": status}).encode() + b"\n")

    def close(self) -> None:
        """End every open watch stream (for a quick, clean server shutdown)."""
        self._closing = True
        self.store.wake_all()

    def _schedule_gc(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # seeding before the server runs: nothing to collect yet
        if not self._gc_scheduled:
            self._gc_scheduled = True
            loop.call_soon(self._run_gc)

    def _run_gc(self) -> None:
        # Like the real controller, this runs after the request that triggered it has been answered.
        self._gc_scheduled = False
        for _ in range(1000):
            if not self.engine.collect_garbage():
                break

    async def _serve_api(self, request: Request) -> Any:
        """/api as kube-apiserver writes it (typed clients require serverAddressByClientCIDRs)."""
        return {"kind": "APIVersions", "apiVersion": "v1", "versions": ["v1"],
                "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": request.url.host
                                                + (f":{request.url.port}" if request.url.port else "")}]}

    async def _serve_version(self, request: Request) -> Any:
        """An APIResourceList as kube-apiserver writes it (kubectl maps kinds through it):
        the core group is `v1`, not `/v1`, and subresources carry no short names or categories
        (else `kubectl get ltj` warns that `ltj` also matches `loratrainingjobs/status`)."""
        doc = await super()._serve_version(request)
        ref = request.resource
        if isinstance(doc, dict) and ref is not None and not ref.group:
            doc["groupVersion"] = ref.version
        for entry in (doc or {}).get("resources") or []:
            if "/" in entry.get("name", ""):
                entry.pop("shortNames", None)
                entry.pop("categories", None)
                entry["singularName"] = ""
        return doc

    # ---- the object API -------------------------------------------------------------------------

    def _model(self, request: Request) -> Model:
        ref = request.resource
        assert ref is not None and ref.plural is not None
        model = self.registry.get(ref.group or "", ref.version or "", ref.plural)
        if model is None or (request.namespace and not model.namespaced):
            raise errors.ApiError(404, "NotFound", "the server could not find the requested resource", {})
        return model

    async def _serve(self, request: Request) -> Response:
        # Always a fresh, explicit status: kmock copies a returned Response's status onto the
        # reaction, so a bare dict after a 201 would otherwise be answered as 201 too.
        status, payload = self._dispatch(request)
        return Response(status=status, headers=_JSON, payload=payload)

    def _dispatch(self, request: Request) -> tuple[int, Any]:
        model = self._model(request)
        method, ns, name, sub = request.method.value, request.namespace, request.name, request.subresource
        if method == "GET" and request.params.get("watch") in ("true", "1"):
            return 200, self._watch(model, request)
        content_type = request.headers.get("Content-Type", "")
        if method in ("POST", "PUT") and content_type.startswith("application/vnd.kubernetes.protobuf"):
            # As a server without protobuf would answer: clients such as kubectl retry in JSON.
            raise errors.unsupported_media_type(content_type)
        table = method == "GET" and sub is None and wants_table(request.headers.get("Accept"))
        if table:
            objects = self._list(model, request)["items"] if name is None else [self.engine.read(model, ns, name)]
            return 200, to_table(model.group, model.plural, objects, str(self.store.resource_version),
                                 self._printer_columns(model))
        if method in ("POST", "PUT", "PATCH") and model.crd_name and request.params.get("fieldValidation") == "Strict":
            # kubectl's default since 1.27: unknown fields are an error, not silently pruned.
            unknown = unknown_fields(model.schema, request.data)
            if unknown:
                raise errors.bad_request(f'{model.kind} in version "{model.version}" cannot be handled as a '
                                         f"{model.kind}: strict decoding error: "
                                         + ", ".join(f'unknown field "{path}"' for path in unknown))
        if name is None:
            if method == "GET":
                return 200, self._list(model, request)
            if method == "POST":
                return 201, self.engine.create(model, ns, request.data)
            if method == "DELETE":
                return 200, self._delete_collection(model, request)
            raise errors.method_not_allowed()
        if method == "GET" and sub in (None, "status"):
            return 200, self.engine.read(model, ns, name)
        if method == "POST" and sub == "binding" and model.storage_key == ("", "pods"):
            return 201, self.engine.bind_pod(model, ns, name, request.data)
        if method == "PUT":
            return 200, self.engine.replace(model, ns, name, request.data, sub)
        if method == "PATCH":
            content_type = request.headers.get("Content-Type", "application/merge-patch+json")
            return 200, self.engine.patch(model, ns, name, request.data, content_type, sub)
        if method == "DELETE" and sub is None:
            return 200, self.engine.delete(model, ns, name, _delete_options(request))
        raise errors.method_not_allowed()

    def _printer_columns(self, model: Model) -> list[dict[str, Any]] | None:
        """A custom resource's additionalPrinterColumns (Age alone when it has none); None otherwise."""
        if model.crd_name is None:
            return None
        crd = self.store.peek(("apiextensions.k8s.io", "customresourcedefinitions", "", model.crd_name)) or {}
        for version in (crd.get("spec") or {}).get("versions") or []:
            if version.get("name") == model.version and version.get("additionalPrinterColumns"):
                return list(version["additionalPrinterColumns"])
        return [{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}]

    def _matcher(self, model: Model, request: Request) -> Any:
        try:
            labels = parse_label_selector(request.params.get("labelSelector"))
            fields = parse_field_selector(request.params.get("fieldSelector"))
        except SelectorError as exc:
            raise errors.bad_request(f"unable to parse requirement: {exc}") from exc
        allowed = supported_fields(model.group, model.plural)
        for field in fields:
            if field.field not in allowed:
                raise errors.bad_request(f'field label not supported: {field.field}')
        name = request.name

        def matches(obj: Mapping[str, Any]) -> bool:
            meta = obj.get("metadata") or {}
            return ((name is None or meta.get("name") == name) and match_labels(labels, meta.get("labels"))
                    and match_fields(fields, obj))
        return matches

    def _selected(self, model: Model, request: Request) -> list[dict[str, Any]]:
        matches = self._matcher(model, request)
        found = [obj for _, obj in sorted(self.store.items(*model.storage_key, request.namespace)) if matches(obj)]
        return [self.engine.present(model, copy.deepcopy(obj)) for obj in found]

    def _list(self, model: Model, request: Request) -> dict[str, Any]:
        items = self._selected(model, request)
        metadata: dict[str, Any] = {"resourceVersion": str(self.store.resource_version)}
        limit = int(request.params.get("limit") or 0)
        if limit > 0:
            offset = int(request.params.get("continue") or 0)
            remaining = len(items) - offset - limit
            items = items[offset:offset + limit]
            if remaining > 0:
                metadata.update({"continue": str(offset + limit), "remainingItemCount": remaining})
        return {"apiVersion": model.api_version, "kind": f"{model.kind}List", "metadata": metadata, "items": items}

    def _delete_collection(self, model: Model, request: Request) -> dict[str, Any]:
        options = _delete_options(request)
        deleted = [self.engine.delete(model, obj["metadata"].get("namespace"), obj["metadata"]["name"], options)
                   for obj in self._selected(model, request)]
        return {"apiVersion": model.api_version, "kind": f"{model.kind}List",
                "metadata": {"resourceVersion": str(self.store.resource_version)}, "items": deleted}

    async def _watch(self, model: Model, request: Request) -> AsyncIterator[Any]:
        yield b""  # send the headers now: a quiet watch must not look like a hung request
        matches = self._matcher(model, request)
        params = request.params
        bookmarks = params.get("allowWatchBookmarks") == "true"
        timeout = float(params["timeoutSeconds"]) if params.get("timeoutSeconds") else None
        deadline = time.monotonic() + timeout if timeout else None
        since = params.get("resourceVersion") or "0"
        if since == "0":
            for obj in self._selected(model, request):
                yield {"type": "ADDED", "object": obj}
            last = self.store.resource_version
        else:
            if not since.isdigit() or int(since) < self.store.oldest_replayable:
                raise errors.gone(f"too old resource version: {since} ({self.store.oldest_replayable})")
            last = int(since)
        while not self._closing:
            for event in self.store.events_after(last):
                last = event.rv
                kind = self._event_type(model, request, event, matches)
                if kind is not None:
                    yield {"type": kind, "object": self.engine.present(model, copy.deepcopy(event.obj))}
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return
            wait = min(left, self.bookmark_interval) if (bookmarks and left is not None) else (
                self.bookmark_interval if bookmarks else left)
            before = self.store.resource_version
            await self.store.wait_for_change(wait)
            if bookmarks and self.store.resource_version == before and not self._closing:
                yield {"type": "BOOKMARK", "object": {"apiVersion": model.api_version, "kind": model.kind,
                                                      "metadata": {"resourceVersion": str(last)}}}

    @staticmethod
    def _event_type(model: Model, request: Request, event: WatchEvent, matches: Any) -> str | None:
        # Selector-filtered watches see objects enter and leave the selection as ADDED/DELETED.
        group, plural, namespace, _ = event.key
        if (group, plural) != model.storage_key or (request.namespace and namespace != request.namespace):
            return None
        now = matches(event.obj)
        before = event.old is not None and matches(event.old)
        if event.type == "MODIFIED":
            return "MODIFIED" if now and before else "ADDED" if now else "DELETED" if before else None
        return event.type if now else None
