"""Time until a checkpoint is durable: our commit path vs. a raw boto3 upload of the same bytes.

Ours: `checkpoint.commit` returns (sha256 of every file, three fencing checks, upload, MANIFEST,
latest.json; keep_last=0, because retention runs after the checkpoint is already durable). Raw: boto3 `upload_file` of the same files,
one after another, default client and TransferConfig, nothing else. Both against one moto S3
server in its own process on loopback, interleaved, median of --runs. Prints raw/ours (target
>= 0.8: the protocol costs at most 25% over a bare upload) and writes a results JSON.

    .venv/bin/python bench/bench_checkpoint_durable.py [--runs 5] [--out bench/results/checkpoint_durable.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import boto3
import botocore
from botocore.config import Config as BotoConfig
from lora_trainer import checkpoint
from lora_trainer.config import S3Config
from lora_trainer.contract import utcnow
from lora_trainer.storage import open_store

MIB = 1024 * 1024
FILES = {  # shaped like a rank-64 SD 1.5 LoRA, its AdamW moments, and the small JSON state
    "lora.safetensors": 13 * MIB,
    "optimizer.safetensors": 27 * MIB,
    "train_state.json": 4096,
}
TARGET = 0.8
BUCKET = "bench"

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


def time_raw(client: object, local: Path, run: int) -> float:
    started = time.perf_counter()
    for name in FILES:
        client.upload_file(str(local / name), BUCKET, f"raw/run-{run}/{name}")  # type: ignore[attr-defined]
    return time.perf_counter() - started


def time_ours(s3: S3Config, local: Path, run: int, signed: bool = True) -> float:
    store = open_store(f"s3://{BUCKET}/{'ours' if signed else 'unsigned'}", s3)
    if not signed:
        # Diagnostic only: with request_checksum_calculation="when_required" botocore SHA-256-signs
        # every payload; this variant shows how much of the gap that integrity check accounts for.
        store.client = boto3.client(  # type: ignore[attr-defined]
            "s3", endpoint_url=s3.endpoint_url,
            config=store.client.meta.config.merge(  # type: ignore[attr-defined]
                BotoConfig(s3={"addressing_style": "path", "payload_signing_enabled": False})
            ),
        )
    started = time.perf_counter()
    checkpoint.commit(store, local, run, 1, "bench", {"seed": 0}, keep_last=0)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "checkpoint_durable.json")
    args = parser.parse_args()
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    proc, url = start_server()
    try:
        raw_client = boto3.client("s3", endpoint_url=url)
        raw_client.create_bucket(Bucket=BUCKET)
        s3 = S3Config(endpoint_url=url, region="us-east-1")
        with tempfile.TemporaryDirectory() as tmp:
            local = make_files(Path(tmp))
            time_raw(raw_client, local, 0)  # warm-up: connections, first-call setup
            time_ours(s3, local, 0)
            time_ours(s3, local, 0, signed=False)
            raw: list[float] = []
            ours: list[float] = []
            unsigned: list[float] = []
            for run in range(1, args.runs + 1):
                for i in range(3):  # rotate who goes first, so server-side drift hits all alike
                    which = (run + i) % 3
                    if which == 0:
                        raw.append(time_raw(raw_client, local, run))
                    elif which == 1:
                        ours.append(time_ours(s3, local, run))
                    else:
                        unsigned.append(time_ours(s3, local, run, signed=False))
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=10)
    raw_median, ours_median = statistics.median(raw), statistics.median(ours)
    unsigned_median = statistics.median(unsigned)
    ratio = raw_median / ours_median
    total = sum(FILES.values())
    print(f"checkpoint of {len(FILES)} files, {total / MIB:.1f} MiB, {args.runs} runs, moto on loopback")
    print(f"raw boto3 upload_file : median {raw_median * 1000:7.1f} ms  ({total / MIB / raw_median:.0f} MiB/s)")
    print(f"ours (commit, durable): median {ours_median * 1000:7.1f} ms  ({total / MIB / ours_median:.0f} MiB/s)")
    print(f"ours, payload signing off (diagnostic): median {unsigned_median * 1000:7.1f} ms")
    print(f"ratio raw/ours = {ratio:.2f} (target >= {TARGET}) {'PASS' if ratio >= TARGET else 'FAIL'}")
    print(f"ratio raw/ours with payload signing off = {raw_median / unsigned_median:.2f}")
    result = {
        "benchmark": "checkpoint_durable",
        "command": shlex.join([".venv/bin/python", "bench/bench_checkpoint_durable.py", *sys.argv[1:]]),
        "date": utcnow(),
        "files": FILES,
        "total_bytes": total,
        "runs": args.runs,
        "raw_seconds": [round(t, 4) for t in raw],
        "ours_seconds": [round(t, 4) for t in ours],
        "raw_median_seconds": round(raw_median, 4),
        "ours_median_seconds": round(ours_median, 4),
        "ratio_raw_over_ours": round(ratio, 3),
        "ours_unsigned_seconds": [round(t, 4) for t in unsigned],
        "ours_unsigned_median_seconds": round(unsigned_median, 4),
        "ratio_raw_over_ours_unsigned": round(raw_median / unsigned_median, 3),
        "target": TARGET,
        "passed": ratio >= TARGET,
        "environment": {
            "python": platform.python_version(),
            "boto3": boto3.__version__,
            "botocore": botocore.__version__,
            "cpus": os.cpu_count(),
            "load_average_1m": round(os.getloadavg()[0], 2),
            "server": "moto (ThreadedMotoServer) in a separate process on 127.0.0.1",
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
