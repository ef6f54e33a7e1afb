"""A local "node" for the dev cluster: schedules pods onto itself and runs them as local processes.

    runner = PodRunner(kubeconfig, node_name="dev-node", workdir=tmp / "pods").start()
    ...
    runner.reclaim("default", "job-a1")    # what a spot reclamation does to the pod
    runner.stop()                          # every pod process group is killed

It plays scheduler and kubelet with documented API calls only (works against a real API server):
unbound pods (schedulerName default-scheduler, nodeSelector and resources ignored) are bound with
`pods/{name}/binding`; pods on its node get the first container's `command + args` run as a local
process (own session, PATH with this venv's bin first, stdout+stderr to `<pod dir>/container.log`,
the pod's env only: see `kubelet.py` for env and mount rules); status is written through
`pods/{name}/status` (JSON merge patch of the whole status) like a kubelet: Pending with
CreateContainerConfigError while a Secret/key is missing (retried), Running, then Succeeded/Failed
with `state.terminated` (exitCode, reason Completed | Error | OOMKilled (SIGKILL it did not send),
message from `$LORA_TERMINATION_LOG`). A graceful delete: SIGTERM to the process group, SIGKILL
after deletionGracePeriodSeconds, final status, then a `gracePeriodSeconds=0` delete.

Reclaim = a GKE spot VM's graceful node shutdown: condition DisruptionTarget (reason
TerminationByKubelet by default), SIGTERM, SIGKILL after terminationGracePeriodSeconds, then phase
Failed, reason `Terminated`, message "Pod was terminated in response to imminent node shutdown.";
the pod stays (PodGC would remove it once the node is gone). `reclaim()` in-process, or annotate
the pod `dev.lora-operator.dev/reclaim: "true"` (what `lora-operator dev reclaim` does).
Stopping the runner kills processes but writes no status (as when a kubelet dies).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes
from kubernetes.client.rest import ApiException

from lora_operator.devcluster import kubelet
from lora_operator.devcluster.nodeapi import NodeApi

log = logging.getLogger(__name__)

RECLAIM_ANNOTATION = "dev.lora-operator.dev/reclaim"
RECLAIM_REASON_ANNOTATION = "dev.lora-operator.dev/reclaim-reason"
DEFAULT_RECLAIM_REASON = "TerminationByKubelet"
WATCH_SECONDS = 30
TICK = 0.05  # how often running processes are polled


@dataclass
class _Proc:
    """One running container process and what has been decided about it."""

    pod: dict[str, Any]
    popen: subprocess.Popen[bytes]
    pod_dir: Path
    started_at: str
    start_time: str
    stop_at: float | None = None  # SIGKILL deadline once SIGTERM was sent
    killed: bool = False  # we sent SIGKILL (so a -9 is not an OOM kill)
    deleting: bool = False
    disruption: dict[str, Any] | None = None
    final: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def key(self) -> str:
        return f"{self.pod['metadata']['namespace']}/{self.pod['metadata']['name']}"

    @property
    def container_id(self) -> str:
        return f"local://{self.popen.pid}"


class PodRunner:
    """Binds pods to `node_name` and runs them as local processes, reporting status like a kubelet."""

    def __init__(self, kube: str | os.PathLike[str] | kubernetes.client.ApiClient, node_name: str = "dev-node",
                 workdir: str | os.PathLike[str] = ".dev/pods", *, env_overrides: Mapping[str, str] | None = None,
                 python_bin_dir: str | os.PathLike[str] | None = None, namespace: str | None = None,
                 register_node: bool = False, resync_seconds: float = 2.0) -> None:
        self._client = kube if isinstance(kube, kubernetes.client.ApiClient) else \
            kubernetes.config.new_client_from_config(config_file=str(kube))
        self._own_client = not isinstance(kube, kubernetes.client.ApiClient)
        self.api = NodeApi(self._client, namespace)
        self.node_name = node_name
        self.workdir = Path(workdir).resolve()
        self.env_overrides = dict(env_overrides or {})
        self.python_bin_dir = Path(python_bin_dir or Path(sys.executable).parent)
        self.namespace = namespace
        self.register_node = register_node
        self.resync_seconds = resync_seconds
        self._inbox: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._stopping = threading.Event()
        self._procs: dict[str, _Proc] = {}  # by pod uid
        self._done: set[str] = set()  # uids whose final status is written
        self._waiting: dict[str, tuple[float, str]] = {}  # uid → (next retry, last message) on config errors
        self._threads: list[threading.Thread] = []

    # ---- public ---------------------------------------------------------------------------------

    def start(self) -> PodRunner:
        """Register the node (if asked) and start the watch and worker threads."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.register_node:
            self.api.register_node(self.node_name)
        for target, name in ((self._watch_loop, "watch"), (self._work_loop, "worker")):
            thread = threading.Thread(target=target, name=f"podrunner-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info("pod runner for node %s started (workdir %s)", self.node_name, self.workdir)
        return self

    def stop(self, grace: float = 5.0) -> None:
        """Stop watching and kill every pod process group (SIGTERM, SIGKILL after `grace` s)."""
        self._stopping.set()
        self.api.interrupt()
        for thread in self._threads:
            thread.join(timeout=5)
        procs = list(self._procs.values())
        for proc in procs:
            self._signal(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=max(deadline - time.monotonic(), 0))
            self._signal(proc, signal.SIGKILL)
            proc.popen.wait()
        self._procs.clear()
        if self._own_client:
            self._client.close()
        log.info("pod runner for node %s stopped (%d processes ended)", self.node_name, len(procs))

    def reclaim(self, namespace: str, name: str, reason: str = DEFAULT_RECLAIM_REASON,
                message: str | None = None) -> None:
        """Reclaim the pod like a spot node going away (asynchronous: watch the pod's status)."""
        self._inbox.put(("reclaim", (namespace, name, reason, message)))

    def pod_dir(self, pod: Mapping[str, Any]) -> Path:
        """The local folder of a pod: container.log, termination-log, volumes/."""
        meta = pod["metadata"]
        return self.workdir / f"{meta['namespace']}_{meta['name']}_{meta['uid'][:8]}"

    def __enter__(self) -> PodRunner:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    # ---- threads --------------------------------------------------------------------------------

    def _watch_loop(self) -> None:
        version = None
        while not self._stopping.is_set():
            try:
                if version is None:
                    pods, version = self.api.list_pods()
                    for pod in pods:
                        self._inbox.put(("pod", ("ADDED", pod)))
                if self._stopping.is_set():
                    return
                for event in self.api.watch_pods(version, WATCH_SECONDS):
                    if event["type"] == "ERROR":  # 410 Gone: relist
                        version = None
                        break
                    version = event["object"]["metadata"]["resourceVersion"]
                    if event["type"] != "BOOKMARK":
                        self._inbox.put(("pod", (event["type"], event["object"])))
            except Exception as exc:  # the API went away or hung up: relist after a pause
                if self._stopping.is_set():
                    return
                log.warning("pod watch of node %s failed (%s); relisting", self.node_name, exc)
                version = None
                self._stopping.wait(1.0)

    def _work_loop(self) -> None:
        next_resync = time.monotonic() + self.resync_seconds
        while not self._stopping.is_set():
            try:
                kind, item = self._inbox.get(timeout=TICK)
            except queue.Empty:
                kind, item = "", None
            try:
                if kind == "pod":
                    self._sync(item[1], deleted=item[0] == "DELETED")
                elif kind == "reclaim":
                    self._reclaim(*item)
                self._tick()
                if time.monotonic() >= next_resync:
                    next_resync = time.monotonic() + self.resync_seconds
                    self._resync()
            except Exception:  # level-based: the next event or resync tries again
                log.exception("pod runner of node %s: unexpected error", self.node_name)

    def _resync(self) -> None:
        pods, _ = self.api.list_pods()
        for pod in pods:
            self._sync(pod)
        present = {pod["metadata"]["uid"] for pod in pods}
        for uid, proc in list(self._procs.items()):
            if uid not in present:
                self._sync(proc.pod, deleted=True)

    # ---- decisions per pod ----------------------------------------------------------------------

    def _sync(self, pod: dict[str, Any], deleted: bool = False) -> None:
        meta, spec = pod["metadata"], pod.get("spec") or {}
        uid, key = meta["uid"], f"{meta['namespace']}/{meta['name']}"
        node = spec.get("nodeName")
        if node and node != self.node_name:
            return
        proc = self._procs.get(uid)
        if deleted:
            if proc and not proc.killed:  # force-deleted: nobody waits for a status any more
                log.info("pod %s was removed from the API; killing its processes", key)
                self._signal(proc, signal.SIGKILL)
                proc.killed = True
            self._waiting.pop(uid, None)
            return
        phase = (pod.get("status") or {}).get("phase")
        if not node:
            if meta.get("deletionTimestamp") or phase in ("Succeeded", "Failed"):
                return
            if spec.get("schedulerName", "default-scheduler") != "default-scheduler":
                return
            if not self._bind(pod):
                return
        if proc:
            proc.pod = pod
            if meta.get("deletionTimestamp") and not proc.deleting:
                proc.deleting = True
                self._terminate(proc, int(meta.get("deletionGracePeriodSeconds") or 0), "deleted")
            elif (meta.get("annotations") or {}).get(RECLAIM_ANNOTATION) == "true" and not proc.disruption:
                self._reclaim(meta["namespace"], meta["name"], self._annotated_reason(pod), None)
            return
        if uid in self._done or phase in ("Succeeded", "Failed"):
            if meta.get("deletionTimestamp"):
                self.api.remove(pod)
            return
        if meta.get("deletionTimestamp"):
            self.api.remove(pod)  # never started: nothing to stop
        elif (meta.get("annotations") or {}).get(RECLAIM_ANNOTATION) == "true":
            self._finish_unstarted(pod, kubelet.disruption_condition(self._annotated_reason(pod)))
        elif phase == "Running":  # running before this runner started: the process is gone
            log.warning("pod %s was running before this runner started; reporting it lost", key)
            self._finish_unstarted(pod, None)
        else:
            self._start(pod)

    @staticmethod
    def _annotated_reason(pod: Mapping[str, Any]) -> str:
        return (pod["metadata"].get("annotations") or {}).get(RECLAIM_REASON_ANNOTATION) or DEFAULT_RECLAIM_REASON

    def _reclaim(self, namespace: str, name: str, reason: str, message: str | None) -> None:
        condition = kubelet.disruption_condition(reason, message)
        proc = next((p for p in self._procs.values() if p.key == f"{namespace}/{name}"), None)
        if proc is None:
            try:
                pod = self.api.read_pod(namespace, name)
            except ApiException as exc:
                log.warning("reclaim of pod %s/%s: %s", namespace, name, exc.reason)
                return
            if pod["metadata"]["uid"] in self._done or (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed") \
                    or pod["spec"].get("nodeName") not in (None, self.node_name):
                log.info("reclaim of pod %s/%s: not running on node %s; nothing to do", namespace, name, self.node_name)
                return
            self._finish_unstarted(pod, condition)
            return
        if proc.disruption:
            return
        proc.disruption = condition
        log.info("pod %s: reclaimed (%s), SIGTERM", proc.key, reason)
        self.api.write_status(proc.pod, kubelet.running_status(proc.pod, proc.container_id, proc.started_at,
                                                           proc.start_time, condition))
        self._terminate(proc, int(proc.pod["spec"].get("terminationGracePeriodSeconds", 30)), "reclaimed")

    # ---- actions --------------------------------------------------------------------------------

    def _bind(self, pod: dict[str, Any]) -> bool:
        meta = pod["metadata"]
        if not self.api.bind(pod, self.node_name):
            return False
        log.info("pod %s/%s: bound to node %s", meta["namespace"], meta["name"], self.node_name)
        pod["spec"]["nodeName"] = self.node_name
        return True

    def _start(self, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        uid, key = meta["uid"], f"{meta['namespace']}/{meta['name']}"
        retry_at, last = self._waiting.get(uid, (0.0, ""))
        if time.monotonic() < retry_at:
            return
        pod_dir = self.pod_dir(pod)
        start_time = (pod.get("status") or {}).get("startTime") or kubelet.now_iso()
        try:
            argv, env, cwd = kubelet.prepare_container(pod, pod_dir, self.workdir, self.api.lookup,
                                                       self.python_bin_dir, self.env_overrides)
        except kubelet.ConfigError as exc:
            if str(exc) != last:
                log.info("pod %s: CreateContainerConfigError: %s", key, exc)
                self.api.write_status(pod, kubelet.waiting_status(pod, "CreateContainerConfigError", str(exc), start_time))
            self._waiting[uid] = (time.monotonic() + self.resync_seconds, str(exc))
            return
        self._waiting.pop(uid, None)
        argv[0] = shutil.which(argv[0], path=env["PATH"]) or argv[0]
        log_file = open(pod_dir / "container.log", "ab")  # noqa: SIM115  # the child holds it; closed below
        try:
            popen = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log_file,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as exc:
            log.info("pod %s: StartError: %s", key, exc)
            self._done.add(uid)
            now = kubelet.now_iso()
            self.api.write_status(pod, kubelet.terminated_status(
                pod, code=128, reason="StartError", message=f"failed to start {argv[0]!r}: {exc.strerror or exc}",
                container_id="", started_at=None, finished_at=now, start_time=start_time))
            return
        finally:
            log_file.close()
        (pod_dir / "pid").write_text(str(popen.pid))
        proc = _Proc(pod, popen, pod_dir, started_at=kubelet.now_iso(), start_time=start_time)
        self._procs[uid] = proc
        log.info("pod %s: started %s as pid %d (log %s)", key, argv[0], popen.pid, pod_dir / "container.log")
        self.api.write_status(pod, kubelet.running_status(pod, proc.container_id, proc.started_at, start_time))

    def _terminate(self, proc: _Proc, grace: int, why: str) -> None:
        deadline = time.monotonic() + grace
        if proc.stop_at is not None and proc.stop_at <= deadline:
            return  # already stopping, at least as soon
        log.info("pod %s: %s; SIGTERM, SIGKILL in %d s", proc.key, why, grace)
        proc.stop_at = deadline
        self._signal(proc, signal.SIGTERM if grace > 0 else signal.SIGKILL)
        proc.killed = proc.killed or grace <= 0

    def _tick(self) -> None:
        for uid, proc in list(self._procs.items()):
            if proc.final is None:
                try:  # exited? (WNOWAIT: the zombie keeps its pid, so the group kill below is safe)
                    exited = os.waitid(os.P_PID, proc.popen.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
                except ChildProcessError:
                    exited = None if proc.popen.returncode is None else True
                if exited is None and proc.popen.returncode is None:
                    if proc.stop_at is not None and time.monotonic() >= proc.stop_at and not proc.killed:
                        log.info("pod %s: grace period over; SIGKILL", proc.key)
                        proc.killed = True
                        self._signal(proc, signal.SIGKILL)
                    continue
                self._signal(proc, signal.SIGKILL)  # leftovers of the container's process group
                proc.final = self._final_status(proc, proc.popen.wait())
            if not self.api.write_status(proc.pod, proc.final, missing_ok=True):
                continue  # the API did not answer: try again next tick
            del self._procs[uid]
            self._done.add(uid)
            if proc.deleting:
                self.api.remove(proc.pod)

    def _final_status(self, proc: _Proc, returncode: int) -> dict[str, Any]:
        code = kubelet.exit_code(returncode)
        reason = "Completed" if code == 0 else "OOMKilled" if returncode == -signal.SIGKILL and not proc.killed else "Error"
        container = proc.pod["spec"]["containers"][0]
        message = kubelet.termination_message(proc.pod_dir / "termination-log", proc.pod_dir / "container.log",
                                              container.get("terminationMessagePolicy"), code)
        log.info("pod %s: container exited with code %d (%s)", proc.key, code, reason)
        return kubelet.terminated_status(proc.pod, code=code, reason=reason, message=message,
                                         container_id=proc.container_id, started_at=proc.started_at,
                                         finished_at=kubelet.now_iso(), start_time=proc.start_time,
                                         disruption=proc.disruption)

    def _finish_unstarted(self, pod: dict[str, Any], disruption: dict[str, Any] | None) -> None:
        meta = pod["metadata"]
        code, reason, message = kubelet.LOST if disruption is None else (137, "ContainerStatusUnknown", "")
        status = kubelet.terminated_status(pod, code=code, reason=reason, message=message, container_id="",
                                           started_at=None, finished_at=kubelet.now_iso(),
                                           start_time=(pod.get("status") or {}).get("startTime") or kubelet.now_iso(),
                                           disruption=disruption)
        if self.api.write_status(pod, status, missing_ok=True):
            self._done.add(meta["uid"])
            self._waiting.pop(meta["uid"], None)
            log.info("pod %s/%s: Failed without a running container (%s)", meta["namespace"], meta["name"],
                     disruption["reason"] if disruption else "lost")

    @staticmethod
    def _signal(proc: _Proc, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.popen.pid, sig)
