"""Operator scale: N LoRATrainingJobs created at once against the API emulator.

Measures, per job, the time from its create call returning to its pod `<job>-a1` existing
(p50/p99/max), the time until every job has its pod and its status written, and the operator's
peak RSS (VmHWM of the `lora-operator run` subprocess). Writes bench/results/operator_scale.json.

    python bench/bench_operator_scale.py [--jobs 500]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import kubernetes
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lora_operator.crd import build_crd  # noqa: E402
from lora_operator.emulator import serve_emulator  # noqa: E402
from lora_operator.spec import GROUP, PLURAL, VERSION  # noqa: E402

NAMESPACE = "bench"


def job(name: str) -> dict:
    return {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "LoRATrainingJob", "metadata": {"name": name},
        "spec": yaml.safe_load((ROOT / "examples" / "tiny-job.yaml").read_text())["spec"],
    }


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp, serve_emulator(crds=[build_crd()]) as emu:
        kubeconfig = emu.write_kubeconfig(Path(tmp) / "kubeconfig")
        client = kubernetes.config.new_client_from_config(config_file=str(kubeconfig))
        core, custom = kubernetes.client.CoreV1Api(client), kubernetes.client.CustomObjectsApi(client)
        core.create_namespace({"metadata": {"name": NAMESPACE}})
        env = {**os.environ, "LORA_OPERATOR_PROGRESS_INTERVAL": "15"}
        operator = subprocess.Popen(
            [sys.executable, "-m", "lora_operator", "run", "--standalone", "--namespace", NAMESPACE,
             "--kubeconfig", str(kubeconfig), "--liveness", "", "--log-format", "json"],
            env=env, stdout=subprocess.DEVNULL, stderr=open(os.environ.get("BENCH_OPERATOR_LOG", os.devnull), "w"),
        )
        try:
            time.sleep(3)  # the operator starts and lists the (empty) namespace
            names = [f"job-{i:04d}" for i in range(args.jobs)]
            created: dict[str, float] = {}
            t0 = time.monotonic()

            def create(name: str) -> None:
                custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, job(name))
                created[name] = time.monotonic()

            with ThreadPoolExecutor(16) as pool:
                list(pool.map(create, names))
            t_created = time.monotonic() - t0
            seen: dict[str, float] = {}
            deadline = time.monotonic() + args.timeout
            while len(seen) < len(names) and time.monotonic() < deadline:
                now = time.monotonic()
                for pod in core.list_namespaced_pod(NAMESPACE).items:
                    seen.setdefault(pod.metadata.labels["lora-operator.dev/job"], now)
                time.sleep(0.05)
            t_all_pods = time.monotonic() - t0
            while time.monotonic() < deadline:
                items = custom.list_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL)["items"]
                if sum(1 for j in items if (j.get("status") or {}).get("attempt") == 1) == len(names):
                    break
                time.sleep(0.2)
            t_all_status = time.monotonic() - t0
            time.sleep(2)  # a few more ticks at rest
            rss = peak_rss_mib(operator.pid)
            pods_total = len(core.list_namespaced_pod(NAMESPACE).items)
        finally:
            operator.terminate()
            operator.wait(30)
        latencies = [seen[n] - created[n] for n in names if n in seen]
        result = {
            "command": "python bench/bench_operator_scale.py --jobs %d" % args.jobs,
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
            "api": "lora_operator.emulator (in-process thread, 127.0.0.1)",
            "python": sys.version.split()[0],
            "cpus": os.cpu_count(),
        }
    print(json.dumps(result, indent=2))
    out = ROOT / "bench" / "results" / "operator_scale.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["jobs_with_pod"] == args.jobs and result["duplicates"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
