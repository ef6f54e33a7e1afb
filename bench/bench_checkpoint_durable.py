"""Time until a checkpoint is durable: our commit path vs. a raw boto3 upload of the same bytes.

Ours: `checkpoint.commit` returns (sha256 of every file, three fencing checks, the files side by
side, MANIFEST, latest.json; keep_last=0, because retention runs after the checkpoint is already
durable), into a fresh output that holds the attempt's claim, as in a real run.

Reference ("raw"): boto3 `upload_file` of the same files one after another, default
TransferConfig, nothing else, through the same S3 client settings a user of the trainer gets
(`storage.make_client`: checksums only when required, so that R2 and GCS accept the uploads;
over plain http botocore then SHA-256-signs each payload). The ratio raw/ours is the cost of the
commit protocol alone; target >= 0.8 (at most 25% over a bare upload).

Also measured, not the target: "raw_default", the same upload through a boto3 client with
botocore's defaults (CRC32 trailer, unsigned payload), which the trainer cannot use because R2
and GCS reject it. It shows what that client setting costs on this server, not the protocol.

All three against one moto S3 server in its own process on loopback, interleaved (the order
rotates every run), median of --runs; client and server CPU seconds and request counts per
variant are recorded so the gaps can be explained.

    .venv/bin/python bench/bench_checkpoint_durable.py [--runs 15] [--out bench/results/checkpoint_durable.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import botocore
from procstat import process_cpu

from lora_trainer import checkpoint
from lora_trainer.config import S3Config
from lora_trainer.contract import utcnow
from lora_trainer.storage import make_client, open_store

MIB = 1024 * 1024
FILES = {  # shaped like a rank-64 SD 1.5 LoRA, its AdamW moments, and the small JSON state
    "lora.safetensors": 13 * MIB,
    "optimizer.safetensors": 27 * MIB,
    "train_state.json": 4096,
}
TARGET = 0.8
BUCKET = "bench"
VARIANTS = ("raw", "ours", "raw_default")

SERVER = (
    "import sys, time; from lora_operator.devcluster.s3 import start_s3_server; "
    "_, url = start_s3_server('127.0.0.1', 0); print(url, flush=True); "
    "sys.stdin.read()"  # runs until the parent closes stdin
)


def start_server() -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()



def make_files(root: Path) -> Path:
    d = root / "state"
    d.mkdir()
    for name, size in FILES.items():
        (d / name).write_bytes(os.urandom(size))
    return d


class Requests:
    """Counts the HTTP requests a boto3 client sends, by operation."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()

    def attach(self, client: Any) -> Any:
        client.meta.events.register("before-send.s3", self._count)
        return client

    def _count(self, event_name: str, **_: Any) -> None:
        self.counts[event_name.rsplit(".", 1)[-1]] += 1


def raw_upload(client: Any, local: Path, prefix: str) -> Callable[[], None]:
    def run() -> None:
        for name in FILES:
            client.upload_file(str(local / name), BUCKET, f"{prefix}/{name}")

    return run


def ours_commit(s3: S3Config, local: Path, prefix: str, requests: Requests, step: int) -> Callable[[], None]:
    store = open_store(f"s3://{BUCKET}/{prefix}", s3)
    checkpoint.claim_attempt(store, 1)  # a real run claims its attempt at start, before any commit
    requests.attach(store.client)  # type: ignore[attr-defined]  # counts the commit only

    def run() -> None:
        checkpoint.commit(store, local, step, 1, "bench", {"seed": 0}, keep_last=0)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "checkpoint_durable.json")
    args = parser.parse_args()
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    load_before = os.getloadavg()[0]
    proc, url = start_server()
    seconds: dict[str, list[float]] = {v: [] for v in VARIANTS}
    client_cpu: dict[str, list[float]] = {v: [] for v in VARIANTS}
    server_cpu: dict[str, list[float]] = {v: [] for v in VARIANTS}
    requests = {v: Requests() for v in VARIANTS}
    try:
        s3 = S3Config(endpoint_url=url, region="us-east-1")
        default_client = requests["raw_default"].attach(boto3.client("s3", endpoint_url=url))
        default_client.create_bucket(Bucket=BUCKET)
        same_client = requests["raw"].attach(make_client(s3))
        with tempfile.TemporaryDirectory() as tmp:
            local = make_files(Path(tmp))

            def prepare(variant: str, run: int) -> Callable[[], None]:
                prefix = f"{variant}/run-{run}"
                if variant == "ours":
                    return ours_commit(s3, local, prefix, requests["ours"], run)
                return raw_upload(default_client if variant == "raw_default" else same_client, local, prefix)

            for variant in VARIANTS:  # warm-up: connections, first-call setup
                prepare(variant, 0)()
            for counter in requests.values():
                counter.counts.clear()
            for run in range(1, args.runs + 1):
                for i in range(len(VARIANTS)):  # rotate who goes first, so drift hits all alike
                    variant = VARIANTS[(run + i) % len(VARIANTS)]
                    call = prepare(variant, run)  # the claim of a fresh output is not timed
                    cpu, server, started = time.process_time(), process_cpu(proc.pid), time.perf_counter()
                    call()
                    seconds[variant].append(time.perf_counter() - started)
                    client_cpu[variant].append(time.process_time() - cpu)
                    server_cpu[variant].append(process_cpu(proc.pid) - server)
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=10)
    med = {v: statistics.median(seconds[v]) for v in VARIANTS}
    ratio, ratio_default = med["raw"] / med["ours"], med["raw_default"] / med["ours"]
    per_run = {v: {op: n / args.runs for op, n in sorted(requests[v].counts.items())} for v in VARIANTS}
    total = sum(FILES.values())
    print(f"checkpoint of {len(FILES)} files, {total / MIB:.1f} MiB, {args.runs} runs, moto on loopback")
    for v, label in (("raw", "raw upload_file, trainer's client"), ("ours", "ours (commit, durable)"),
                     ("raw_default", "raw upload_file, botocore defaults")):
        print(f"{label:<36}: median {med[v] * 1000:7.1f} ms ({total / MIB / med[v]:4.0f} MiB/s), client CPU "
              f"{statistics.median(client_cpu[v]) * 1000:4.0f} ms, server CPU {statistics.median(server_cpu[v]) * 1000:4.0f}"
              f" ms, {sum(per_run[v].values()):.0f} requests")
    print(f"ratio raw/ours = {ratio:.2f} (target >= {TARGET}) {'PASS' if ratio >= TARGET else 'FAIL'}")
    print(f"ratio raw_default/ours = {ratio_default:.2f} (not the target: a client setting the trainer cannot use)")
    result = {
        "benchmark": "checkpoint_durable",
        "command": shlex.join([".venv/bin/python", "bench/bench_checkpoint_durable.py", *sys.argv[1:]]),
        "date": utcnow(),
        "files": FILES,
        "total_bytes": total,
        "runs": args.runs,
        "reference": "boto3 upload_file of each file in turn, default TransferConfig, client from storage.make_client",
        "seconds": {v: [round(t, 4) for t in seconds[v]] for v in VARIANTS},
        "median_seconds": {v: round(med[v], 4) for v in VARIANTS},
        "median_client_cpu_seconds": {v: round(statistics.median(client_cpu[v]), 4) for v in VARIANTS},
        "median_server_cpu_seconds": {v: round(statistics.median(server_cpu[v]), 4) for v in VARIANTS},
        "requests_per_run": per_run,
        "ratio_raw_over_ours": round(ratio, 3),
        "ratio_raw_default_over_ours": round(ratio_default, 3),
        "target": TARGET,
        "passed": ratio >= TARGET,
        "environment": {
            "python": platform.python_version(),
            "boto3": boto3.__version__,
            "botocore": botocore.__version__,
            "cpus": os.cpu_count(),
            "load_average_1m": {"start": round(load_before, 2), "end": round(os.getloadavg()[0], 2)},
            "server": "moto (ThreadedMotoServer) in a separate process on 127.0.0.1",
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
