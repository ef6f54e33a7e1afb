"""Operator scale: N LoRATrainingJobs created at once against the API emulator.

Measures, per job, the time from its create call returning to its pod `<job>-a1` appearing in a
pod watch (p50/p99/max), the time until every job has its pod and until every status says
attempt 1, and the operator's peak RSS (VmHWM of the `lora-operator run` subprocess).
Writes bench/results/operator_scale.json with the command, the machine's CPUs and load.

    python bench/bench_operator_scale.py [--jobs 500]

Three processes, so that none steals another's interpreter lock: the API emulator, the operator
(`python -m lora_operator run`), and this one (creating jobs, watching pods).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import kubernetes
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from procstat import process_cpu  # noqa: E402

from lora_operator.crd import build_crd  # noqa: E402
from lora_operator.emulator import serve_emulator  # noqa: E402
from lora_operator.spec import GROUP, PLURAL, VERSION  # noqa: E402

NAMESPACE = "bench"
JOB_LABEL = "lora-operator.dev/job"


def job(name: str) -> dict[str, Any]:
    """A LoRATrainingJob from examples/tiny-job.yaml under a new name."""
    return {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "LoRATrainingJob", "metadata": {"name": name},
        "spec": yaml.safe_load((ROOT / "examples" / "tiny-job.yaml").read_text())["spec"],
    }


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident set (VmHWM) in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def percentile(values: list[float], q: float) -> float:
    """The q-quantile by nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def serve(kubeconfig: Path) -> int:
    """`--serve-emulator PATH`: run the emulator, write its kubeconfig, stop when stdin closes."""
    with serve_emulator(crds=[build_crd()]) as emu:
        emu.write_kubeconfig(kubeconfig)
        sys.stdin.read()
    return 0


def wait_for_file(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear")
        time.sleep(0.05)


class PodWatch:
    """Records when each job's first pod appears, from a raw watch stream (cheap to parse)."""

    def __init__(self, core: kubernetes.client.CoreV1Api) -> None:
        self.core = core
        self.seen: dict[str, float] = {}
        self.pods: set[str] = set()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="pod-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        rv = ""
        while not self._stop:
            stream = self.core.list_namespaced_pod(NAMESPACE, watch=True, resource_version=rv or None,
                                                   allow_watch_bookmarks=True, timeout_seconds=30,
                                                   _preload_content=False)
            for line in stream:
                now = time.monotonic()
                event = json.loads(line)
                meta = event["object"].get("metadata") or {}
                rv = meta.get("resourceVersion", rv)
                if event["type"] == "ADDED":
                    self.pods.add(meta["name"])
                    self.seen.setdefault(meta["labels"][JOB_LABEL], now)

    def stop(self) -> None:
        self._stop = True


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--serve-emulator", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_emulator:
        return serve(args.serve_emulator)

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        kubeconfig = Path(tmp) / "kubeconfig"
        emulator = subprocess.Popen([sys.executable, __file__, "--serve-emulator", str(kubeconfig)],
                                    stdin=subprocess.PIPE)
        operator = None
        try:
            wait_for_file(kubeconfig, 30)
            client = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))
            client.configuration.connection_pool_maxsize = 32
            core, custom = kubernetes.client.CoreV1Api(client), kubernetes.client.CustomObjectsApi(client)
            core.create_namespace({"metadata": {"name": NAMESPACE}})
            env = {**os.environ, "LORA_OPERATOR_PROGRESS_INTERVAL": "15"}
            operator = subprocess.Popen(
                [sys.executable, "-m", "lora_operator", "run", "--standalone", "--namespace", NAMESPACE,
                 "--kubeconfig", str(kubeconfig), "--liveness", "", "--log-format", "json"],
                env=env, stdout=subprocess.DEVNULL,
                stderr=open(os.environ.get("BENCH_OPERATOR_LOG", os.devnull), "w"),
            )
            time.sleep(3)  # the operator starts and lists the (empty) namespace
            watch = PodWatch(core)
            names = [f"job-{i:04d}" for i in range(args.jobs)]
            created: dict[str, float] = {}
            t0 = time.monotonic()

            def create(name: str) -> None:
                custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, job(name),
                                                       _preload_content=False)
                created[name] = time.monotonic()

            with ThreadPoolExecutor(16) as pool:
                list(pool.map(create, names))
            t_created = time.monotonic() - t0
            deadline = t0 + args.timeout
            while len(watch.seen) < len(names) and time.monotonic() < deadline:
                time.sleep(0.02)
            t_all_pods = max(watch.seen.values(), default=t0) - t0
            while time.monotonic() < deadline:
                body = json.loads(custom.list_namespaced_custom_object(
                    GROUP, VERSION, NAMESPACE, PLURAL, _preload_content=False).data)
                if sum(1 for j in body["items"] if (j.get("status") or {}).get("attempt") == 1) == len(names):
                    break
                time.sleep(0.5)
            t_all_status = time.monotonic() - t0
            time.sleep(2)  # a few more ticks at rest: no second pod may appear
            rss = peak_rss_mib(operator.pid)
            cpu = {"operator": process_cpu(operator.pid), "emulator": process_cpu(emulator.pid),
                   "bench_client": process_cpu(os.getpid())}
            pods_total = len(json.loads(core.list_namespaced_pod(NAMESPACE, _preload_content=False).data)["items"])
            watch.stop()
        finally:
            if operator is not None:
                operator.terminate()
                operator.wait(30)
            emulator.communicate(timeout=30)
    latencies = [watch.seen[n] - created[n] for n in names if n in watch.seen and n in created]
    result = {
        "command": f"python bench/bench_operator_scale.py --jobs {args.jobs}",
        "jobs": args.jobs,
        "jobs_with_pod": len(latencies),
        "pods_total": pods_total,
        "duplicates": pods_total - len(latencies),
        "create_all_jobs_s": round(t_created, 2),
        "every_job_has_pod_s": round(t_all_pods, 2),
        "every_status_written_s": round(t_all_status, 2),
        "pod_latency_p50_s": round(percentile(latencies, 0.5), 3) if latencies else None,
        "pod_latency_p99_s": round(percentile(latencies, 0.99), 3) if latencies else None,
        "pod_latency_max_s": round(max(latencies), 3) if latencies else None,
        "pod_latency_mean_s": round(statistics.mean(latencies), 3) if latencies else None,
        "operator_peak_rss_mib": round(rss, 1),
        # Where the 2 cores went (whole run, including start-up): the three processes share them.
        "cpu_seconds": {k: round(v, 1) for k, v in cpu.items()},
        "api": "lora_operator.emulator (own process, 127.0.0.1)",
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "load_avg_1m_before": round(load_before[0], 2),
        "load_avg_1m_after": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(result, indent=2))
    out = ROOT / "bench" / "results" / "operator_scale.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["jobs_with_pod"] == args.jobs and result["duplicates"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
