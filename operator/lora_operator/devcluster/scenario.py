"""The steps of the recovery demo against a DevCluster, each one waiting for what it should cause.

`lora_operator.demo.run_scenario` calls them in order. Each `wait_*` polls the API, S3 and the
pods' logs until its condition holds, records a timeline event, and raises DemoError naming what
it waited for and the job's last status when the deadline passes or something ends wrongly.
`close()` (or leaving the `with` block) stops the operator and the cluster, killing every pod.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import yaml

from lora_operator.devcluster import seed
from lora_operator.devcluster.cluster import DevCluster, DevClusterError

T = TypeVar("T")
POLL = 0.1  # seconds between looks: the tiny job trains ~4 steps a second
OPERATOR_STOP_SECONDS = 10.0
RESUMED = re.compile(r"attempt (\d+): resumed from step (\d+)")
FRESH_START = re.compile(r"attempt (\d+): starting at step 0")


class DemoError(RuntimeError):
    """The scenario did not go as it should; the message says what was awaited and the last status."""


@dataclass(frozen=True)
class TimelineEvent:
    """Something that happened, `seconds` after the scenario started."""

    seconds: float
    kind: str  # setup | created | phase | running | checkpoint | reclaimed | preempted | resumed | succeeded
    message: str


def split_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/prefix/` → ("bucket", "prefix"); DemoError when the job's URI is not in S3."""
    try:
        return seed.split_s3_uri(uri)
    except ValueError as exc:
        raise DemoError(f"{exc}; the demo uploads its inputs to S3") from None


def status_summary(status: dict[str, Any] | None) -> str:
    """One line about a job's status, for error messages."""
    if not status:
        return "no status yet (is the operator running?)"
    progress = status.get("progress") or {}
    return (f"phase={status.get('phase')} reason={status.get('reason')} attempt={status.get('attempt')} "
            f"step={progress.get('step', '-')}/{progress.get('totalSteps', '-')} "
            f"preemptions={status.get('preemptions', 0)} failures={status.get('failures', 0)} "
            f"message={status.get('message')!r}")


class Scenario:
    """One run of the demo under `workdir`: inputs/, cluster/, outputs/, logs/."""

    def __init__(self, workdir: Path, *, s3_port: int, manifest: Path, timeout: float, progress_interval: float,
                 kube: str = "auto",
                 on_event: Callable[[TimelineEvent], None] | None = None) -> None:
        self.workdir = workdir
        self.s3_port = s3_port
        self.kube = kube
        self.manifest = manifest
        self.progress_interval = progress_interval
        self.on_event = on_event
        self.started = time.monotonic()
        self.deadline = self.started + timeout
        self.timeline: list[TimelineEvent] = []
        self.log_files: dict[str, Path] = {}
        self.model_dir = workdir / "inputs" / "tiny-sd"
        self.data_dir = workdir / "inputs" / "tiny"
        self.cluster: DevCluster | None = None
        self.operator: subprocess.Popen[bytes] | None = None
        self.spec: dict[str, Any] = {}  # the job's spec as applied (endpoint patched if need be)
        self._parsed: Any = None  # that spec parsed (lora_operator.spec.JobSpec)
        self.namespace = "default"
        self.job_name = ""
        self._clients: dict[str, Any] = {}
        self._phase: str | None = None
        self._status: dict[str, Any] | None = None

    # ---- bookkeeping ----------------------------------------------------------------------------

    def elapsed(self) -> float:
        """Seconds since the scenario started."""
        return time.monotonic() - self.started

    def event(self, kind: str, message: str) -> None:
        """Add to the timeline (and tell `on_event`)."""
        ev = TimelineEvent(round(self.elapsed(), 1), kind, message)
        self.timeline.append(ev)
        if self.on_event:
            self.on_event(ev)

    def _until(self, what: str, check: Callable[[], T | None]) -> T:
        """Poll `check` until it returns something; DemoError at the deadline or if the operator died."""
        while True:
            self._observe_job()
            value = check()
            if value is not None:
                return value
            if self.operator is not None and self.operator.poll() is not None:
                raise DemoError(f"the operator exited with code {self.operator.returncode} while waiting for "
                                f"{what}; see {self.log_files['operator']}")
            if time.monotonic() > self.deadline:
                raise DemoError(f"timeout waiting for {what}; last status: {status_summary(self._status)}")
            time.sleep(POLL)

    # ---- setup ----------------------------------------------------------------------------------

    def prepare_inputs(self) -> None:
        """Build the tiny model and dataset (fixed seeds; no downloads), replacing a previous run's."""
        from lora_trainer.tiny import build_tiny_dataset, build_tiny_sd

        for stale in ("inputs", "outputs"):
            shutil.rmtree(self.workdir / stale, ignore_errors=True)
        build_tiny_sd(self.model_dir)
        build_tiny_dataset(self.data_dir)
        self.event("setup", f"built the tiny SD model and 8-image dataset (seeded) in {self.workdir / 'inputs'}")

    def start_cluster(self) -> None:
        """S3 + Kubernetes API (real or emulator) + pod runner (a previous run's pod folders removed)."""
        shutil.rmtree(self.workdir / "cluster", ignore_errors=True)
        try:
            self.cluster = DevCluster(self.workdir / "cluster", s3_port=self.s3_port, kube=self.kube).start()
        except DevClusterError as exc:
            raise DemoError(str(exc)) from None
        self.event("setup", f"dev cluster up: API {self.cluster.api_url} ({self.cluster.kube}), "
                            f"S3 {self.cluster.s3_endpoint}, node {self.cluster.node_name}")

    def start_operator(self) -> None:
        """`lora-operator run --standalone` as a subprocess, its log in logs/operator.log."""
        assert self.cluster is not None
        log_file = self.workdir / "logs" / "operator.log"
        log_file.parent.mkdir(parents=True, exist_ok=True)
        self.log_files["operator"] = log_file
        # The dev cluster's S3 listens on loopback, which the operator refuses unless it is named.
        s3_host = urlsplit(self.cluster.s3_endpoint).hostname or "127.0.0.1"
        argv = [sys.executable, "-m", "lora_operator", "run", "--kubeconfig", str(self.cluster.kubeconfig),
                "--standalone", "--liveness", "", "--progress-interval", str(self.progress_interval),
                "--allowed-endpoints", f"*,{s3_host}"]
        with log_file.open("wb") as out:
            # Own session: a Ctrl-C reaches the demo only, which then stops the operator in order.
            self.operator = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                             start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.event("setup", f"operator started: lora-operator run --standalone (pid {self.operator.pid})")

    def _s3(self) -> Any:
        if "s3" not in self._clients:
            assert self.cluster is not None
            self._clients["s3"] = seed.s3_client(self.cluster.s3_endpoint)
        return self._clients["s3"]

    def _kube(self) -> tuple[Any, Any]:
        if "core" not in self._clients:
            import kubernetes

            assert self.cluster is not None
            client = kubernetes.config.new_client_from_config(config_file=str(self.cluster.kubeconfig))
            self._clients["api"] = client
            self._clients["core"] = kubernetes.client.CoreV1Api(client)
            self._clients["custom"] = kubernetes.client.CustomObjectsApi(client)
        return self._clients["core"], self._clients["custom"]

    def _load_manifest(self) -> dict[str, Any]:
        from lora_operator.spec import SpecError, parse_spec

        assert self.cluster is not None
        try:
            doc = yaml.safe_load(self.manifest.read_text(encoding="utf-8"))
        except OSError as exc:
            raise DemoError(f"cannot read the job manifest {self.manifest}: {exc.strerror}") from None
        spec = doc.setdefault("spec", {})
        storage = spec.setdefault("storage", {})
        if storage.get("endpoint") != self.cluster.s3_endpoint:  # only when S3 is not on the usual port
            storage["endpoint"] = self.cluster.s3_endpoint
        try:
            self._parsed = parse_spec(spec)
        except SpecError as exc:
            raise DemoError(f"{self.manifest}: {exc}") from None
        self.spec = spec
        self.namespace = doc["metadata"].get("namespace", "default")
        self.job_name = doc["metadata"]["name"]
        return doc

    def upload_inputs(self) -> None:
        """Buckets, the job's Secret (by the names its spec uses), model and dataset in S3."""
        spec, s3 = self._load_manifest()["spec"], self._s3()
        uris = [spec["baseModel"]["uri"], spec["dataset"]["uri"], spec["output"]["uri"]]
        for uri in uris:
            split_s3_uri(uri)  # DemoError for an input the demo cannot upload
        seed.ensure_buckets(s3, uris)
        # moto keeps buckets per process, not per server: a process that ran the scenario before
        # still holds that run's outputs, which attempt 1 would resume from.
        seed.clear_prefix(s3, spec["output"]["uri"])
        seed.upload_folder(s3, self.model_dir, spec["baseModel"]["uri"])
        seed.upload_folder(s3, self.data_dir, spec["dataset"]["uri"])
        secret = seed.credentials_secret(self._parsed.storage)
        if secret:
            core, _ = self._kube()
            core.create_namespaced_secret(self.namespace, secret)
        self.event("setup", f"uploaded model to {spec['baseModel']['uri']} and data to {spec['dataset']['uri']}"
                            + (f"; Secret {secret['metadata']['name']} created" if secret else ""))

    def apply_job(self) -> None:
        """Create the LoRATrainingJob (kubectl apply -f examples/tiny-job.yaml)."""
        from lora_operator.spec import GROUP, PLURAL, VERSION

        _, custom = self._kube()
        body = yaml.safe_load(self.manifest.read_text(encoding="utf-8"))
        body["spec"] = self.spec
        custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, body)
        self.event("created", f"job {self.namespace}/{self.job_name} created from {self.manifest.name}")

    # ---- observing ------------------------------------------------------------------------------

    def job_status(self) -> dict[str, Any] | None:
        """The job's status now (None before the operator wrote one)."""
        from lora_operator.spec import GROUP, PLURAL, VERSION

        _, custom = self._kube()
        job = custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, self.job_name)
        return job.get("status") or None

    def _observe_job(self) -> None:
        if not self.job_name:
            return
        self._status = self.job_status()
        phase = (self._status or {}).get("phase")
        if phase and phase != self._phase:
            self._phase = phase
            reason = (self._status or {}).get("reason")
            self.event("phase", f"operator: job phase {phase}" + (f" ({reason})" if reason else ""))

    def pod(self, attempt: int) -> dict[str, Any] | None:
        """The pod of an attempt as a dict, or None while it does not exist."""
        from kubernetes.client.rest import ApiException

        from lora_operator.pods import pod_name

        core, _ = self._kube()
        try:
            response = core.read_namespaced_pod(pod_name(self.job_name, attempt), self.namespace, _preload_content=False)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return json.loads(response.data)

    def _latest(self) -> Any:
        from botocore.exceptions import ClientError

        from lora_trainer.contract import LATEST_FILE, LatestPointer

        bucket, prefix = split_s3_uri(self.spec["output"]["uri"])
        try:
            body = self._s3().get_object(Bucket=bucket, Key=f"{prefix}/{LATEST_FILE}")["Body"].read()
        except ClientError:
            return None
        return LatestPointer.model_validate_json(body)

    def output_uri(self, rel: str) -> str:
        """A path under the job's output URI."""
        return self.spec["output"]["uri"].rstrip("/") + "/" + rel

    # ---- the scenario's waits -------------------------------------------------------------------

    def wait_attempt_running(self, attempt: int) -> dict[str, Any]:
        """Until the attempt's pod runs (bound to the node, its process started)."""
        def running() -> dict[str, Any] | None:
            pod = self.pod(attempt)
            phase = ((pod or {}).get("status") or {}).get("phase")
            if phase in ("Failed", "Succeeded"):
                raise DemoError(f"pod {pod['metadata']['name']} ended {phase} before it was seen running; "  # type: ignore[index]
                                f"see its container.log under {self.cluster.pods_dir if self.cluster else ''}")
            return pod if phase == "Running" else None

        pod = self._until(f"attempt {attempt}'s pod to run", running)
        assert self.cluster is not None
        self.log_files[f"attempt {attempt}"] = self.cluster.runner.pod_dir(pod) / "container.log"
        self.event("running", f"attempt {attempt}: pod {pod['metadata']['name']} running on {pod['spec']['nodeName']}")
        return pod

    def wait_first_checkpoint(self) -> int:
        """Until checkpoints/latest.json names a committed checkpoint; its step."""
        latest = self._until("the first committed checkpoint (checkpoints/latest.json)", self._latest)
        self.event("checkpoint", f"attempt 1: checkpoint at step {latest.step} committed ({latest.path})")
        return int(latest.step)

    def reclaim_attempt(self, attempt: int) -> None:
        """Reclaim the attempt's pod like a spot node shutdown (what `lora-operator dev reclaim` does)."""
        from lora_operator.pods import pod_name

        assert self.cluster is not None
        name = pod_name(self.job_name, attempt)
        self.cluster.reclaim(self.namespace, name)
        grace = self._parsed.spot.termination_grace_period_seconds
        self.event("reclaimed", f"spot node shutdown: pod {name} gets DisruptionTarget + SIGTERM ({grace} s grace)")

    def wait_preempted(self, attempt: int) -> tuple[int, int]:
        """Until the reclaimed pod ended; (step it stopped at, step of the committed checkpoint)."""
        from lora_trainer.contract import TerminationMessage

        def ended() -> dict[str, Any] | None:
            pod = self.pod(attempt)
            return pod if ((pod or {}).get("status") or {}).get("phase") in ("Failed", "Succeeded") else None

        pod = self._until(f"attempt {attempt}'s pod to stop after the reclaim", ended)
        name = pod["metadata"]["name"]
        if pod["status"]["phase"] == "Succeeded":
            raise DemoError(f"pod {name} trained to the end before the reclaim reached it: nothing to recover")
        terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
        try:
            message = TerminationMessage.model_validate_json(terminated.get("message") or "")
        except ValueError:
            raise DemoError(f"pod {name} exited {terminated['exitCode']} without a termination message; "
                            f"see {self.log_files.get(f'attempt {attempt}')}") from None
        if terminated["exitCode"] != 75 or message.step is None:
            raise DemoError(f"pod {name} exited {terminated['exitCode']} ({message.reason}: {message.message}), "
                            "not 75 after committing a checkpoint")
        latest = self._latest()
        committed = int(latest.step) if latest else -1
        self.event("preempted", f"attempt {attempt}: preempted at step {message.step} "
                                f"(exit 75, checkpoint step {committed} committed)")
        return int(message.step), committed

    def wait_preemption_counted(self) -> int | None:
        """Until the operator counted the preemption; status.latestCheckpoint.step at that moment."""
        status = self._until("the operator to count the preemption",
                             lambda: self._status if (self._status or {}).get("preemptions") else None)
        return ((status.get("latestCheckpoint") or {}).get("step"))

    def wait_resumed(self, attempt: int) -> int:
        """Until the attempt's trainer logged where it resumed; that step."""
        log_file = self.log_files[f"attempt {attempt}"]

        def resumed() -> int | None:
            text = log_file.read_text(errors="replace") if log_file.exists() else ""
            if FRESH_START.search(text):
                raise DemoError(f"attempt {attempt} started at step 0: it did not resume (see {log_file})")
            found = RESUMED.search(text)
            if found:
                return int(found.group(2))
            if ((self.pod(attempt) or {}).get("status") or {}).get("phase") in ("Failed", "Succeeded"):
                raise DemoError(f"attempt {attempt} ended without resuming (see {log_file})")
            return None

        step = self._until(f"attempt {attempt} to resume from the checkpoint", resumed)
        self.event("resumed", f"attempt {attempt}: resumed from step {step}")
        return step

    def wait_succeeded(self) -> dict[str, Any]:
        """Until the job Succeeded (DemoError when it Failed); its final status."""
        def done() -> dict[str, Any] | None:
            phase = (self._status or {}).get("phase")
            if phase == "Failed":
                raise DemoError(f"the job Failed: {status_summary(self._status)}")
            return self._status if phase == "Succeeded" else None

        status = self._until("phase Succeeded", done)
        progress = status.get("progress") or {}
        self.event("succeeded", f"job Succeeded: {progress.get('step')}/{progress.get('totalSteps')} steps, "
                                f"attempt {status.get('attempt')}, {status.get('preemptions', 0)} preemption(s)")
        return status

    def download_outputs(self) -> tuple[Path, dict[int, float]]:
        """Copy the output (without checkpoints/) to outputs/<job>/; (weights file, losses by step)."""
        from lora_trainer.contract import CHECKPOINTS_DIR, FINAL_WEIGHTS
        from lora_trainer.train import read_losses

        local = self.workdir / "outputs" / self.job_name
        seed.download_prefix(self._s3(), self.spec["output"]["uri"], local, skip=(f"{CHECKPOINTS_DIR}/",))
        metrics = local / "logs" / "metrics.jsonl"
        losses = read_losses(metrics.read_text()) if metrics.exists() else {}
        return local / FINAL_WEIGHTS, losses

    # ---- teardown -------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the operator (SIGTERM, then SIGKILL), then the cluster (which kills every pod)."""
        if self.operator is not None and self.operator.poll() is None:
            try:
                os.killpg(self.operator.pid, signal.SIGTERM)
                self.operator.wait(OPERATOR_STOP_SECONDS)
            except subprocess.TimeoutExpired:
                os.killpg(self.operator.pid, signal.SIGKILL)
                self.operator.wait()
            except ProcessLookupError:
                pass
        api = self._clients.pop("api", None)
        if api is not None:
            api.close()
        if self.cluster is not None:
            self.cluster.stop()

    def __enter__(self) -> Scenario:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
