"""What a kubelet decides for the dev pod runner: container env, local mounts, pod status bodies.

All pure except `prepare_container`, which also creates the pod's local folders and volume files.

Env resolution follows the kubelet: `envFrom` first, then `env` in order; `$(VAR)` expands to a
variable defined earlier (`$$` escapes); `secretKeyRef`/`configMapKeyRef` read through `lookup`;
a missing object or key raises `ConfigError` with the kubelet's message (→ CreateContainerConfigError).

Mount rule: each volumeMount of the container maps to a local folder (`local_mounts`); an env value,
argument or workingDir that equals a mountPath or starts with `mountPath/` is rewritten to the
local folder (the longest mountPath wins), so `HOME=/scratch` becomes `<pod dir>/volumes/scratch`.
An env value that is a JSON object or array (a config passed in the environment, like the
trainer's LORA_TRAIN_CONFIG) gets the same rewrite on each of its string values.
"""

from __future__ import annotations

import datetime
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

POD_IP = "127.0.0.1"  # pods run on the host's loopback: no pod network here
NODE_SHUTDOWN_REASON = "Terminated"  # pod status.reason the kubelet's node-shutdown manager writes
NODE_SHUTDOWN_MESSAGE = "Pod was terminated in response to imminent node shutdown."
DISRUPTION_MESSAGES = {
    "TerminationByKubelet": NODE_SHUTDOWN_MESSAGE,
    "PreemptionByScheduler": "default-scheduler: preempting to accommodate a higher priority pod",
}
ESSENTIAL_ENV = ("LANG", "LC_ALL", "TZ")  # from the runner's env when the pod does not set them
LOST = (137, "ContainerStatusUnknown", "The container could not be located when the pod was terminated")
MAX_MESSAGE_BYTES = 4096  # the kubelet's cap on a termination message
FALLBACK_LOG_BYTES, FALLBACK_LOG_LINES = 2048, 80  # terminationMessagePolicy: FallbackToLogsOnError

Lookup = Callable[[str, str, str], "dict[str, bytes] | None"]
"""(kind "Secret" | "ConfigMap", namespace, name) → decoded data, or None when the object is missing."""


class ConfigError(Exception):
    """The container cannot be configured yet (CreateContainerConfigError); the message is the kubelet's."""


def now_iso() -> str:
    """RFC 3339 UTC, second precision, as the API writes times."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---- env ----------------------------------------------------------------------------------------

_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.\-]*)\)")


def expand(value: str, env: Mapping[str, str]) -> str:
    """Kubernetes `$(VAR)` expansion: defined variables are substituted, `$$` is a literal `$`."""
    def sub(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))
    return _REF.sub(sub, value)


def _field_value(pod: Mapping[str, Any], path: str) -> str:
    meta, spec = pod.get("metadata") or {}, pod.get("spec") or {}
    keyed = re.fullmatch(r"metadata\.(labels|annotations)\['([^']*)'\]", path)
    if keyed:
        return str((meta.get(keyed.group(1)) or {}).get(keyed.group(2), ""))
    simple = {
        "metadata.name": meta.get("name"), "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"), "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName"),
        "status.podIP": POD_IP, "status.podIPs": POD_IP, "status.hostIP": POD_IP, "status.hostIPs": POD_IP,
    }
    if path not in simple:
        raise ConfigError(f"unsupported fieldRef fieldPath {path!r}")
    return str(simple[path] or "")


def _key_ref(kind: str, ref: Mapping[str, Any], namespace: str, lookup: Lookup) -> str | None:
    name, key = ref.get("name", ""), ref.get("key", "")
    data = lookup(kind, namespace, name)
    if data is None:
        if ref.get("optional"):
            return None
        raise ConfigError(f'{kind.lower()} "{name}" not found')
    if key not in data:
        if ref.get("optional"):
            return None
        raise ConfigError(f"couldn't find key {key} in {kind} {namespace}/{name}")
    return data[key].decode("utf-8", "replace")


def resolve_env(pod: Mapping[str, Any], container: Mapping[str, Any], lookup: Lookup) -> dict[str, str]:
    """The container's environment as a kubelet builds it (raises ConfigError)."""
    namespace = pod["metadata"].get("namespace", "default")
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        kind, ref = ("Secret", source["secretRef"]) if source.get("secretRef") else ("ConfigMap", source.get("configMapRef") or {})
        data = lookup(kind, namespace, ref.get("name", ""))
        if data is None:
            if ref.get("optional"):
                continue
            raise ConfigError(f'{kind.lower()} "{ref.get("name", "")}" not found')
        for key, value in data.items():
            env[source.get("prefix", "") + key] = value.decode("utf-8", "replace")
    for var in container.get("env") or []:
        source = var.get("valueFrom")
        if not source:
            env[var["name"]] = expand(str(var.get("value", "")), env)
            continue
        value: str | None
        if source.get("secretKeyRef"):
            value = _key_ref("Secret", source["secretKeyRef"], namespace, lookup)
        elif source.get("configMapKeyRef"):
            value = _key_ref("ConfigMap", source["configMapKeyRef"], namespace, lookup)
        elif source.get("fieldRef"):
            value = _field_value(pod, source["fieldRef"].get("fieldPath", ""))
        elif source.get("resourceFieldRef"):
            ref = source["resourceFieldRef"]
            limits = (container.get("resources") or {}).get("limits") or {}
            value = str(limits.get(ref.get("resource", "").removeprefix("limits."), "0"))
        else:
            raise ConfigError(f"unsupported valueFrom for {var['name']}")
        if value is not None:
            env[var["name"]] = value
    return env


# ---- mounts -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Mounts:
    """mountPath → local folder pairs, longest mountPath first."""

    pairs: tuple[tuple[str, Path], ...]

    def rewrite(self, value: str) -> str:
        """`value` with a leading mountPath replaced by its local folder (other values unchanged)."""
        for mount_path, local in self.pairs:
            if value == mount_path or value.startswith(mount_path + "/"):
                return str(local) + value[len(mount_path):]
        return value

    def rewrite_env(self, value: str) -> str:
        """`rewrite`, and inside a JSON object or array every string value (paths in a config)."""
        if value.lstrip()[:1] not in ("{", "["):
            return self.rewrite(value)
        try:
            data = json.loads(value)
        except ValueError:
            return self.rewrite(value)
        return json.dumps(self._walk(data))

    def _walk(self, node: Any) -> Any:
        if isinstance(node, str):
            return self.rewrite(node)
        if isinstance(node, list):
            return [self._walk(item) for item in node]
        if isinstance(node, dict):
            return {key: self._walk(item) for key, item in node.items()}
        return node


def volume_folder(volume: Mapping[str, Any], namespace: str, pod_dir: Path, shared_dir: Path) -> Path:
    """Where a pod volume lives locally: hostPath is itself, a PVC is shared per claim, the rest per pod."""
    if volume.get("hostPath"):
        return Path(volume["hostPath"]["path"])
    if volume.get("persistentVolumeClaim"):
        return shared_dir / "pvc" / namespace / volume["persistentVolumeClaim"]["claimName"]
    return pod_dir / "volumes" / volume["name"]


def local_mounts(pod: Mapping[str, Any], container: Mapping[str, Any], pod_dir: Path, shared_dir: Path) -> Mounts:
    """The container's volumeMounts as local folders (raises ConfigError for an undeclared volume)."""
    namespace = pod["metadata"].get("namespace", "default")
    volumes = {v["name"]: v for v in (pod.get("spec") or {}).get("volumes") or []}
    pairs = []
    for mount in container.get("volumeMounts") or []:
        volume = volumes.get(mount.get("name", ""))
        if volume is None:
            raise ConfigError(f"cannot find volume {mount.get('name')!r} to mount into container {container['name']!r}")
        local = volume_folder(volume, namespace, pod_dir, shared_dir)
        pairs.append((mount["mountPath"].rstrip("/") or "/", local / mount["subPath"] if mount.get("subPath") else local))
    return Mounts(tuple(sorted(pairs, key=lambda pair: len(pair[0]), reverse=True)))


def prepare_container(pod: Mapping[str, Any], pod_dir: Path, shared_dir: Path, lookup: Lookup,
                      bin_dir: Path, overrides: Mapping[str, str]) -> tuple[list[str], dict[str, str], Path]:
    """argv, env and cwd of the first container, its folders made (raises ConfigError).

    The env is the pod's own (mount-rewritten) plus PATH (`bin_dir` first), HOME/TMPDIR/HOSTNAME
    defaults, ESSENTIAL_ENV, LORA_TERMINATION_LOG (a per-pod file), then `overrides`.
    """
    container = pod["spec"]["containers"][0]
    namespace = pod["metadata"].get("namespace", "default")
    if not container.get("command"):
        raise ConfigError("the dev pod runner needs an explicit command (it cannot read image entrypoints)")
    mounts = local_mounts(pod, container, pod_dir, shared_dir)
    env = {k: mounts.rewrite_env(v) for k, v in resolve_env(pod, container, lookup).items()}
    for volume in pod["spec"].get("volumes") or []:  # Secret / ConfigMap volumes become files
        if not (volume.get("secret") or volume.get("configMap")):
            continue
        kind, source = ("Secret", volume["secret"]) if volume.get("secret") else ("ConfigMap", volume["configMap"])
        name = source.get("secretName") if kind == "Secret" else source.get("name")
        data = lookup(kind, namespace, name or "")
        if data is None and not source.get("optional"):
            raise ConfigError(f'{kind.lower()} "{name}" not found')
        folder = volume_folder(volume, namespace, pod_dir, shared_dir)
        folder.mkdir(parents=True, exist_ok=True)
        for key, value in (data or {}).items():
            (folder / key).write_bytes(value)
    for _, local in mounts.pairs:
        local.mkdir(parents=True, exist_ok=True)
    (pod_dir / "tmp").mkdir(parents=True, exist_ok=True)
    env["PATH"] = os.pathsep.join([str(bin_dir), os.environ.get("PATH", os.defpath)])
    env.setdefault("HOME", str(pod_dir / "volumes"))
    env.setdefault("TMPDIR", str(pod_dir / "tmp"))
    env.setdefault("HOSTNAME", pod["metadata"]["name"])
    for name in ESSENTIAL_ENV:
        if name in os.environ:
            env.setdefault(name, os.environ[name])
    env["LORA_TERMINATION_LOG"] = str(pod_dir / "termination-log")
    env.update(overrides)
    argv = [mounts.rewrite(expand(a, env)) for a in [*container["command"], *(container.get("args") or [])]]
    cwd = Path(mounts.rewrite(container["workingDir"])) if container.get("workingDir") else pod_dir
    return argv, env, cwd if cwd.is_dir() else pod_dir  # an image's own folder does not exist here


# ---- status -------------------------------------------------------------------------------------

def exit_code(returncode: int) -> int:
    """A Popen return code as a container runtime reports it (signal N → 128 + N)."""
    return returncode if returncode >= 0 else 128 - returncode


def termination_message(log_file: Path, container_log: Path, policy: str | None, code: int) -> str:
    """The termination-log file's text, or with FallbackToLogsOnError the log tail of a failed container."""
    try:
        text = log_file.read_bytes()[:MAX_MESSAGE_BYTES].decode("utf-8", "replace")
    except OSError:
        text = ""
    if text.strip() or policy != "FallbackToLogsOnError" or code == 0:
        return text
    try:
        lines = container_log.read_bytes()[-FALLBACK_LOG_BYTES:].decode("utf-8", "replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-FALLBACK_LOG_LINES:])


def _conditions(ready: bool, now: str, reason: str | None = None, extra: list[dict[str, Any]] | None = None,
                initialized: bool = True) -> list[dict[str, Any]]:
    def cond(kind: str, status: bool, why: str | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"type": kind, "status": "True" if status else "False", "lastProbeTime": None,
                               "lastTransitionTime": now}
        if why and not status:
            out["reason"] = why
        return out
    return [*(extra or []), cond("PodReadyToStartContainers", initialized), cond("Initialized", initialized),
            cond("Ready", ready, reason), cond("ContainersReady", ready, reason), cond("PodScheduled", True)]


def _container(container: Mapping[str, Any], state: dict[str, Any], ready: bool, container_id: str = "") -> dict[str, Any]:
    out = {"name": container["name"], "image": container.get("image", ""), "imageID": "", "ready": ready,
           "started": "running" in state, "restartCount": 0, "state": state, "lastState": {}}
    if container_id:
        out["containerID"] = container_id
    return out


def _base(phase: str, start_time: str | None) -> dict[str, Any]:
    return {"phase": phase, "hostIP": POD_IP, "hostIPs": [{"ip": POD_IP}], "podIP": POD_IP,
            "podIPs": [{"ip": POD_IP}], "startTime": start_time, "reason": None, "message": None}


def waiting_status(pod: Mapping[str, Any], reason: str, message: str, start_time: str) -> dict[str, Any]:
    """Pending with the container waiting (e.g. CreateContainerConfigError)."""
    container = pod["spec"]["containers"][0]
    status = _base("Pending", start_time)
    status["conditions"] = _conditions(False, now_iso(), "ContainersNotReady")
    status["containerStatuses"] = [_container(container, {"waiting": {"reason": reason, "message": message}}, False)]
    return status


def running_status(pod: Mapping[str, Any], container_id: str, started_at: str, start_time: str,
                   disruption: dict[str, Any] | None = None) -> dict[str, Any]:
    """Running and ready (with a DisruptionTarget condition while a reclaim is under way)."""
    container = pod["spec"]["containers"][0]
    status = _base("Running", start_time)
    status["conditions"] = _conditions(True, now_iso(), extra=[disruption] if disruption else None)
    status["containerStatuses"] = [_container(container, {"running": {"startedAt": started_at}}, True, container_id)]
    return status


def terminated_status(pod: Mapping[str, Any], *, code: int, reason: str, message: str, container_id: str,
                      started_at: str | None, finished_at: str, start_time: str,
                      disruption: dict[str, Any] | None = None) -> dict[str, Any]:
    """Succeeded (exit 0) or Failed; after a reclaim always Failed, with the node-shutdown reason."""
    container = pod["spec"]["containers"][0]
    phase = "Failed" if disruption or code != 0 else "Succeeded"
    status = _base(phase, start_time)
    if disruption:
        status["reason"], status["message"] = NODE_SHUTDOWN_REASON, disruption.get("message") or NODE_SHUTDOWN_MESSAGE
    status["conditions"] = _conditions(False, finished_at, "PodCompleted", extra=[disruption] if disruption else None)
    terminated = {"exitCode": code, "reason": reason, "message": message, "startedAt": started_at,
                  "finishedAt": finished_at, "containerID": container_id}
    if not message:
        del terminated["message"]
    status["containerStatuses"] = [_container(container, {"terminated": terminated}, False, container_id)]
    return status


def disruption_condition(reason: str, message: str | None = None) -> dict[str, Any]:
    """The DisruptionTarget condition a node shutdown (or a preemption) adds to the pod."""
    return {"type": "DisruptionTarget", "status": "True", "reason": reason, "lastProbeTime": None,
            "message": message or DISRUPTION_MESSAGES.get(reason, NODE_SHUTDOWN_MESSAGE), "lastTransitionTime": now_iso()}
