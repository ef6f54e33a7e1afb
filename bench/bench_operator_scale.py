"""Operator scale: N LoRATrainingJobs created at once, against the API emulator or a real API server.

Measures, per job, the time from its create call returning to its pod `<job>-a1` appearing in a
pod watch (p50/p99/max), the time until every job has its pod and until every status says
attempt 1, the operator's peak RSS (VmHWM of the `lora-operator run` subprocess), and where the
CPU went. On the real server it also counts the API requests (the apiserver's own
`apiserver_request_total`, by verb and resource) during the burst and during a rest window of
`--rest` seconds afterwards, when nothing changes and every job's loop just ticks.

    python bench/bench_operator_scale.py [--jobs 500] [--target emulator|real|both]

`--target real` starts a throwaway control plane (etcd, kube-apiserver, kube-controller-manager)
from $KUBEBUILDER_ASSETS (see lora_operator.devcluster.controlplane) and registers the product CRD
from crds/; `both` runs the emulator, then the real server, in one session. Results go to
bench/results/operator_scale.json (emulator), operator_scale_real.json (real) or
operator_scale_both.json (both), or to `--out`.

Separate processes, so that none steals another's interpreter lock: the API server (the emulator
in a child process, or the control plane's binaries), the operator (`python -m lora_operator
run`), and this one (creating jobs, watching pods). `--profile PATH` runs the operator under
cProfile and writes its stats there; `--operator-src DIR` runs the operator package from another
checkout (a `git worktree` of an older commit), so that two versions can be measured in one session.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import kubernetes
import urllib3
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from procstat import process_cpu  # noqa: E402

from lora_operator.crd import build_crd  # noqa: E402
from lora_operator.devcluster.controlplane import ControlPlane, assets_dir  # noqa: E402
from lora_operator.emulator import serve_emulator  # noqa: E402
from lora_operator.spec import GROUP, PLURAL, VERSION  # noqa: E402

NAMESPACE = "bench"
JOB_LABEL = "lora-operator.dev/job"
CRD_FILE = ROOT / "crds" / "loratrainingjobs.lora-operator.dev.yaml"
PROGRESS_INTERVAL = 15
TINY_SPEC = yaml.safe_load((ROOT / "examples" / "tiny-job.yaml").read_text())["spec"]


def job(name: str) -> dict[str, Any]:
    """A LoRATrainingJob from examples/tiny-job.yaml under a new name."""
    return {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "LoRATrainingJob", "metadata": {"name": name},
        "spec": {**TINY_SPEC, "output": {"uri": f"s3://lora-demo/outputs/{name}/"}},  # one output each (OutputInUse)
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


def by_tenth(names: list[str], created: dict[str, float], seen: dict[str, float]) -> list[float]:
    """The median create-to-pod latency of each tenth of the jobs, in the order they were created."""
    ordered = sorted((n for n in names if n in created and n in seen), key=created.__getitem__)
    size = max(1, len(ordered) // 10)
    return [round(statistics.median(seen[n] - created[n] for n in ordered[i:i + size]), 2)
            for i in range(0, len(ordered), size)][:10]


def serve(kubeconfig: Path) -> int:
    """`--serve-emulator PATH`: run the emulator, write its kubeconfig, stop when stdin closes."""
    with serve_emulator(crds=[build_crd()]) as emu:
        emu.write_kubeconfig(kubeconfig)
        sys.stdin.read()
    return 0


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> None:
    """Until `url` answers 200 (raises if the process exits or `timeout` passes)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the operator exited {proc.returncode} before it was ready")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=2) as answer:  # noqa: S310 - our own 127.0.0.1 endpoint
                if answer.status == 200:
                    return
        time.sleep(0.2)
    raise TimeoutError(f"the operator's liveness endpoint {url} did not answer within {timeout:.0f}s")


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
            try:
                for line in stream:
                    now = time.monotonic()
                    event = json.loads(line)
                    meta = event["object"].get("metadata") or {}
                    rv = meta.get("resourceVersion", rv)
                    if event["type"] == "ADDED":
                        self.pods.add(meta["name"])
                        self.seen.setdefault(meta["labels"][JOB_LABEL], now)
            except urllib3.exceptions.HTTPError:
                if self._stop:
                    return  # the server went away at the end of the run
                raise

    def stop(self) -> None:
        self._stop = True


class Target:
    """An API server for one run: its kubeconfig, its processes (for CPU) and, when real, metrics."""

    def __init__(self, name: str, kubeconfig: Path, pids: dict[str, int], real: bool) -> None:
        self.name, self.kubeconfig, self.pids, self.real = name, kubeconfig, pids, real

    def request_counts(self, client: kubernetes.client.ApiClient) -> Counter[str]:
        """apiserver_request_total summed by `VERB resource[/subresource]` (real server only)."""
        counts: Counter[str] = Counter()
        if not self.real:
            return counts
        text = client.rest_client.pool_manager.request("GET", f"{client.configuration.host}/metrics").data
        for line in text.decode().splitlines():
            if not line.startswith("apiserver_request_total{"):
                continue
            labels_text, value = line[len("apiserver_request_total{"):].rsplit("} ", 1)
            labels = dict(part.split("=", 1) for part in labels_text.split('",') if "=" in part)
            labels = {k: v.strip('"') for k, v in labels.items()}
            if labels.get("verb") == "WATCH" or labels.get("resource") in ("", None):
                continue
            key = f"{labels['verb']} {labels['resource']}" + (f"/{labels['subresource']}" if labels.get("subresource") else "")
            counts[key] += int(float(value))
        return counts


@contextlib.contextmanager
def open_target(name: str, tmp: Path, profiling: bool = False) -> Iterator[Target]:
    """The emulator in a child process, or a throwaway real control plane with the product CRD."""
    kubeconfig = tmp / "kubeconfig"
    if name == "emulator":
        emulator = subprocess.Popen([sys.executable, __file__, "--serve-emulator", str(kubeconfig)],
                                    stdin=subprocess.PIPE)
        try:
            wait_for_file(kubeconfig, 30)
            yield Target(name, kubeconfig, {"emulator": emulator.pid}, real=False)
        finally:
            emulator.communicate(timeout=30)
        return
    assets = assets_dir()
    if assets is None:
        raise SystemExit("--target real needs KUBEBUILDER_ASSETS (a folder with etcd and kube-apiserver)")
    with ControlPlane(assets, tmp / "controlplane", profiling=profiling) as plane:
        with kubernetes.config.new_client_from_config(config_file=str(plane.kubeconfig)) as client:
            ext = kubernetes.client.ApiextensionsV1Api(client)
            for crd in (d for d in yaml.safe_load_all(CRD_FILE.read_text()) if d):
                ext.create_custom_resource_definition(crd)
                deadline = time.monotonic() + 60
                while not any(c.type == "Established" and c.status == "True"
                              for c in ext.read_custom_resource_definition(crd["metadata"]["name"]).status.conditions or []):
                    if time.monotonic() > deadline:
                        raise TimeoutError("the CRD did not become Established")
                    time.sleep(0.1)
        pids = {proc.name: proc.popen.pid for proc in getattr(plane, "_procs", [])}
        yield Target(name, plane.kubeconfig, pids, real=True)


def apiserver_profile(client: kubernetes.client.ApiClient, path: Path, seconds: int) -> None:
    """The apiserver's CPU profile (pprof) over `seconds` from now, saved to `path` (`go tool pprof`)."""
    answer = client.rest_client.pool_manager.request(
        "GET", f"{client.configuration.host}/debug/pprof/profile?seconds={seconds}", timeout=seconds + 30)
    path.write_bytes(answer.data)


def wait_for_default_service_account(core: kubernetes.client.CoreV1Api, timeout: float = 60) -> None:
    """On a real server, pods are refused until the controller-manager made the namespace's `default` SA."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            core.read_namespaced_service_account("default", NAMESPACE)
            return
        except kubernetes.client.ApiException as exc:
            if exc.status != 404 or time.monotonic() > deadline:
                raise
        time.sleep(0.1)


def run(target_name: str, args: argparse.Namespace) -> dict[str, Any]:
    """One benchmark run against one target."""
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp_name, \
            open_target(target_name, Path(tmp_name), profiling=bool(args.apiserver_profile)) as target:
        operator = None
        try:
            config = kubernetes.client.Configuration()
            kubernetes.config.load_kube_config(config_file=str(target.kubeconfig), client_configuration=config)
            # One kept-alive connection per creating thread: the pool is sized when the client is built,
            # and a full pool drops connections, so each request beyond it paid a new TLS handshake.
            config.connection_pool_maxsize = 32
            client = kubernetes.client.ApiClient(config)
            core, custom = kubernetes.client.CoreV1Api(client), kubernetes.client.CustomObjectsApi(client)
            core.create_namespace({"metadata": {"name": NAMESPACE}})
            if target.real:
                wait_for_default_service_account(core)
            env = {**os.environ, "LORA_OPERATOR_PROGRESS_INTERVAL": str(PROGRESS_INTERVAL),
                   "LORA_OPERATOR_ALLOWED_ENDPOINTS": "*,127.0.0.1"}  # examples/tiny-job.yaml's S3
            if args.operator_src:  # another checkout's operator package (e.g. a worktree of the baseline)
                env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(args.operator_src), env.get("PYTHONPATH")]))
            profile = [] if not args.profile else ["-m", "cProfile", "-o", str(Path(args.profile).resolve())]
            log_path = os.environ.get("BENCH_OPERATOR_LOG", os.devnull)
            health = f"http://127.0.0.1:{free_port()}/healthz"
            operator = subprocess.Popen(
                [sys.executable, *profile, "-m", "lora_operator", "run", "--standalone", "--namespace", NAMESPACE,
                 "--kubeconfig", str(target.kubeconfig), "--liveness", health, "--log-format", "json",
                 "--metrics-port", "0"],
                env=env, stdout=subprocess.DEVNULL, stderr=open(log_path, "w"),
            )
            # The burst measures a running operator, not its start-up: Kopf answers its liveness
            # endpoint once it has started, and the (empty) namespace is listed right after.
            wait_healthy(health, operator, timeout=300)
            time.sleep(1)
            watch = PodWatch(core)
            names = [f"job-{i:04d}" for i in range(args.jobs)]
            created: dict[str, float] = {}
            requests_before = target.request_counts(client)
            cpu_before = {"operator": process_cpu(operator.pid), "bench_client": process_cpu(os.getpid()),
                          **{name: process_cpu(pid) for name, pid in target.pids.items()}}
            profiler = None
            if args.apiserver_profile and target.real:
                profiler = threading.Thread(target=apiserver_profile, args=(client, Path(args.apiserver_profile),
                                                                            args.apiserver_profile_seconds))
                profiler.start()
            t0 = time.monotonic()

            def create(name: str) -> None:
                custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, job(name),
                                                       _preload_content=False)
                created[name] = time.monotonic()

            def yield_cpu() -> None:  # Linux: a thread's own niceness (PRIO_PROCESS with its thread id)
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), args.client_nice)

            with ThreadPoolExecutor(16, initializer=yield_cpu if args.client_nice else None) as pool:
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
            requests_burst = target.request_counts(client)
            cpu_burst = process_cpu(operator.pid)
            cpu_in_burst = {"operator": cpu_burst, "bench_client": process_cpu(os.getpid()),
                            **{name: process_cpu(pid) for name, pid in target.pids.items()}}
            if profiler is not None:
                profiler.join()
            time.sleep(args.rest)  # ticks at rest: no second pod may appear; count what a tick costs
            requests_rest = target.request_counts(client)
            cpu_rest = process_cpu(operator.pid) - cpu_burst
            rss = peak_rss_mib(operator.pid)
            cpu = {"operator": process_cpu(operator.pid), "bench_client": process_cpu(os.getpid()),
                   **{name: process_cpu(pid) for name, pid in target.pids.items()}}
            pods_total = len(json.loads(core.list_namespaced_pod(NAMESPACE, _preload_content=False).data)["items"])
            watch.stop()
        finally:
            if operator is not None:
                operator.terminate()
                operator.wait(60)
    latencies = [watch.seen[n] - created[n] for n in names if n in watch.seen and n in created]
    result: dict[str, Any] = {
        "target": target_name,
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
        # Median latency of each tenth of the jobs, in creation order: flat when the operator keeps up with
        # the creates, rising when a backlog builds during the burst.
        "pod_latency_p50_by_tenth_s": by_tenth(names, created, watch.seen),
        "operator_peak_rss_mib": round(rss, 1),
        # Where the CPUs went (whole run, including start-up): the processes share them.
        "cpu_seconds": {k: round(v, 1) for k, v in cpu.items()},
        # From the first create until every status says attempt 1: what the burst itself cost.
        "cpu_seconds_burst": {k: round(v - cpu_before[k], 1) for k, v in cpu_in_burst.items()},
        "operator_cpu_at_rest_s_per_s": round(cpu_rest / args.rest, 3) if args.rest else None,
        "api": "lora_operator.emulator (own process, 127.0.0.1)" if not target.real else
               "kube-apiserver + etcd + kube-controller-manager from KUBEBUILDER_ASSETS (127.0.0.1)",
        "load_avg_1m_before": round(load_before[0], 2),
        "load_avg_1m_after": round(os.getloadavg()[0], 2),
    }
    if target.real:
        burst = requests_burst - requests_before
        rest = requests_rest - requests_burst
        # Requests of every client: the operator's, plus this script's creates and status LISTs.
        result["api_requests_burst"] = dict(burst.most_common())
        result["api_requests_at_rest_per_s"] = {k: round(v / args.rest, 1) for k, v in rest.most_common()} \
            if args.rest else {}
        result["api_requests_at_rest_total_per_s"] = round(sum(rest.values()) / args.rest, 1) if args.rest else None
    return result


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--target", choices=("emulator", "real", "both"), default="emulator")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--rest", type=float, default=PROGRESS_INTERVAL + 5,
                        help="seconds to watch at rest after every status is written")
    parser.add_argument("--out", type=Path, help="results file (default: bench/results/operator_scale*.json)")
    parser.add_argument("--profile", help="run the operator under cProfile, stats to this file")
    parser.add_argument("--operator-src", type=Path,
                        help="run lora_operator from this folder (e.g. WORKTREE/operator) instead of this checkout's")
    parser.add_argument("--client-nice", type=int, default=0,
                        help="niceness of the threads creating the jobs (the load generator): in a cluster the "
                             "clients creating jobs run on other machines than the API server and the operator; "
                             "0 lets them compete for the same cores")
    parser.add_argument("--apiserver-profile", help="real target: the kube-apiserver's CPU profile during "
                        "the burst, in pprof format, to this file")
    parser.add_argument("--apiserver-profile-seconds", type=int, default=15)
    parser.add_argument("--serve-emulator", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_emulator:
        return serve(args.serve_emulator)

    targets = ["emulator", "real"] if args.target == "both" else [args.target]
    runs = []
    for name in targets:
        runs.append(run(name, args))
        print(json.dumps(runs[-1], indent=2), flush=True)
    git = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "operator/lora_operator/*.py"],
                           capture_output=True, text=True)
    result = {
        "command": f"python bench/bench_operator_scale.py --jobs {args.jobs} --target {args.target}"
                   + (f" --client-nice {args.client_nice}" if args.client_nice else "")
                   + (f" --operator-src {args.operator_src}" if args.operator_src else "")
                   + (f" --out {args.out}" if args.out else ""),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": git.stdout.strip(),
        "operator_files_uncommitted": [line[3:] for line in dirty.stdout.splitlines()],
        "operator_src": str(args.operator_src or ROOT / "operator"),
        "progress_interval_s": PROGRESS_INTERVAL,
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        **({"runs": runs} if len(runs) > 1 else runs[0]),
    }
    default = {"emulator": "operator_scale.json", "real": "operator_scale_real.json", "both": "operator_scale_both.json"}
    out = args.out or ROOT / "bench" / "results" / default[args.target]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    ok = all(r["jobs_with_pod"] == args.jobs and r["duplicates"] == 0 for r in runs)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
