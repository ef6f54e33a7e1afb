"""Run a ``FaithfulEmulator`` on 127.0.0.1 in a background thread (tests, the dev cluster).

``with serve_emulator(crds=[crd]) as emu:`` gives ``emu.url`` and ``emu.write_kubeconfig(path)``;
the server stops (watches ended, port closed, thread joined) when the block exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import pathlib
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import aiohttp.web
import yaml

from lora_operator.emulator.server import DEFAULT_NAMESPACES, FaithfulEmulator

__all__ = ["RunningEmulator", "kubeconfig_dict", "serve_emulator"]

logger = logging.getLogger(__name__)

TOKEN = "lora-emulator-token"  # the emulator accepts any token; clients just need one to send


def kubeconfig_dict(server: str, namespace: str = "default", name: str = "lora-emulator") -> dict[str, Any]:
    """A kubeconfig for an insecure http server with a dummy bearer token."""
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": name, "cluster": {"server": server}}],
        "users": [{"name": name, "user": {"token": TOKEN}}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": name, "namespace": namespace}}],
        "current-context": name,
        "preferences": {},
    }


class RunningEmulator:
    """A started emulator: its URL, a kubeconfig writer and a few blocking helpers."""

    def __init__(self, emulator: FaithfulEmulator, host: str = "127.0.0.1", port: int = 0) -> None:
        self.emulator = emulator
        self._host = host
        self._port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="lora-emulator", daemon=True)

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return f"http://{self._host}:{self._port}"

    @property
    def port(self) -> int:
        """The port actually bound."""
        return self._port

    def start(self, timeout: float = 10) -> RunningEmulator:
        """Start serving; returns once the port accepts connections."""
        self._thread.start()
        if not self._ready.wait(timeout) or self._error is not None:
            raise RuntimeError(f"the emulator did not start: {self._error!r}")
        return self

    def stop(self, timeout: float = 10) -> None:
        """End watches, close the port and join the thread."""
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)
        if self._thread.is_alive():  # pragma: no cover  # only if aiohttp hangs on shutdown
            logger.warning("the emulator thread did not stop within %s s", timeout)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported to start(); a thread must not die silently
            self._error = exc
            self._ready.set()
            logger.exception("the emulator stopped with an error")

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with self.emulator:
            # handler_cancellation: a client that hangs up on a watch ends that watch's task.
            server = aiohttp.web.Server(self.emulator, handler_cancellation=True)
            runner = aiohttp.web.ServerRunner(server, shutdown_timeout=1.0)
            await runner.setup()
            site = aiohttp.web.TCPSite(runner, self._host, self._port, shutdown_timeout=1.0)
            await site.start()
            sockets = getattr(site._server, "sockets", None) or []
            self._port = sockets[0].getsockname()[1] if sockets else self._port
            self._ready.set()
            try:
                await self._stop.wait()
            finally:
                self.emulator.close()
                await runner.cleanup()

    def write_kubeconfig(self, path: str | pathlib.Path, namespace: str = "default") -> pathlib.Path:
        """Write a kubeconfig for this server (usable by kubernetes.config and by Kopf)."""
        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(kubeconfig_dict(self.url, namespace)), encoding="utf-8")
        return path

    def request(self, method: str, path: str, body: Any = None,
                content_type: str = "application/json") -> tuple[int, Any]:
        """One blocking HTTP call to the emulator (for setup code); returns (status, JSON body)."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": content_type, "Authorization": f"Bearer {TOKEN}"})
        try:
            with urllib.request.urlopen(req, timeout=10) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def register_crd(self, crd: Mapping[str, Any]) -> None:
        """Create (or replace) a CRD through the API; its resource is served on return."""
        name = crd["metadata"]["name"]
        status, body = self.request("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd)
        if status == 409:
            _, current = self.request("GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")
            updated = {**crd, "metadata": {**crd["metadata"], "resourceVersion": current["metadata"]["resourceVersion"]}}
            status, body = self.request("PUT", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}", updated)
        if status >= 300:
            raise RuntimeError(f"CRD {name} was rejected: {body.get('message') if isinstance(body, dict) else body}")


@contextlib.contextmanager
def serve_emulator(
    crds: Iterable[Mapping[str, Any]] = (),
    *,
    namespaces: Iterable[str] = DEFAULT_NAMESPACES,
    host: str = "127.0.0.1",
    port: int = 0,
    **options: Any,
) -> Iterator[RunningEmulator]:
    """Run a FaithfulEmulator in a thread for the duration of the block, CRDs registered."""
    emulator = FaithfulEmulator(namespaces=tuple(namespaces), **options)
    running = RunningEmulator(emulator, host, port).start()
    try:
        for crd in crds:
            running.register_crd(crd)
        yield running
    finally:
        started = time.monotonic()
        running.stop()
        logger.debug("emulator stopped in %.2f s", time.monotonic() - started)
