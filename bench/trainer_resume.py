"""Resume benchmark helpers for bench_trainer.py (target 4): time to the first resumed step, steps lost.

A chain of real `python -m lora_trainer` processes trains one S3 output (moto in its own process):
SIGTERM twice (each restart must resume at exactly the step reached: 0 steps lost), then SIGKILL
at random moments within a checkpoint interval. Each process's stderr is read line by line and
stamped on arrival: `step N/M` lines (log_every=1) give the steps reached, `resumed from step N`
the resume point, the first `step` line the time from Popen to the first resumed step. One
restart runs under a timing wrapper (the same CLI via runpy) that marks the start-up phases.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from lora_trainer import contract

STEP_LINE = re.compile(r"\bstep (\d+)/(\d+)\b")
RESUMED_LINE = re.compile(r"resumed from step (\d+)")
MARK_LINE = re.compile(r"^BENCH-MARK (\S+) ([0-9.]+)$")
SPAN_LINE = re.compile(r"^BENCH-SPAN (\S+) ([0-9.]+)$")

S3_SERVER = (
    "import sys; from lora_operator.devcluster.s3 import start_s3_server; "
    "_, url = start_s3_server('127.0.0.1', 0); print(url, flush=True); sys.stdin.read()"
)

# Runs the real CLI (`python -m lora_trainer`) with timers around the start-up phases.
TIMED_CLI = r"""
import sys, time, runpy
def mark(name): print(f"BENCH-MARK {name} {time.time():.4f}", file=sys.stderr, flush=True)
mark("interpreter")
import lora_trainer.train as tr, lora_trainer.checkpoint as ck, lora_trainer.state as st
mark("imports")
def timed(name, fn, once=False):
    done = []
    def wrapper(*a, **k):
        if once and done: return fn(*a, **k)
        done.append(1); t = time.perf_counter(); out = fn(*a, **k)
        print(f"BENCH-SPAN {name} {time.perf_counter() - t:.4f}", file=sys.stderr, flush=True); return out
    return wrapper
tr.Trainer._fetch = timed("fetch_inputs", tr.Trainer._fetch)
tr.check_dataset = timed("check_dataset", tr.check_dataset)
tr.load_components = timed("load_model", tr.load_components)
tr.add_lora = timed("add_lora", tr.add_lora)
ck.find_resumable = timed("download_checkpoint", ck.find_resumable)
st.load_state = timed("load_state", st.load_state)
tr.RunLogs = timed("open_logs", tr.RunLogs)
tr.train_step = timed("first_step", tr.train_step, once=True)
sys.argv = ["lora_trainer"]
runpy.run_module("lora_trainer", run_name="__main__", alter_sys=True)
"""


def start_s3_server() -> tuple[subprocess.Popen[str], str]:
    """moto in its own process (so it never shares the trainer's GIL); returns (process, endpoint)."""
    proc = subprocess.Popen([sys.executable, "-c", S3_SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()


def stop_s3_server(proc: subprocess.Popen[str]) -> None:
    """Close its stdin, which ends it."""
    assert proc.stdin is not None
    proc.stdin.close()
    proc.wait(timeout=20)


@dataclass
class Attempt:
    """One trainer process: when it started, what it printed (arrival-stamped), how it ended."""

    popen_at: float
    proc: subprocess.Popen[str]
    lines: list[tuple[float, str]] = field(default_factory=list)
    code: int | None = None
    reader: threading.Thread | None = None

    def steps(self) -> list[tuple[float, int]]:
        """(arrival time, step) of every `step N/M` line so far."""
        return [(t, int(m.group(1))) for t, line in list(self.lines) if (m := STEP_LINE.search(line))]

    def resumed_from(self) -> int | None:
        """The step it resumed from (0 when it started fresh), once logged."""
        for _, line in list(self.lines):
            if m := RESUMED_LINE.search(line):
                return int(m.group(1))
            if "starting at step 0" in line:
                return 0
        return None

    def marks(self) -> dict[str, float]:
        """BENCH-MARK name → unix time, from the timing wrapper."""
        return {m.group(1): float(m.group(2)) for _, line in self.lines if (m := MARK_LINE.match(line.strip()))}

    def spans(self) -> dict[str, float]:
        """BENCH-SPAN name → seconds spent in it (summed over calls), from the timing wrapper."""
        out: dict[str, float] = {}
        for _, line in self.lines:
            if m := SPAN_LINE.match(line.strip()):
                out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
        return out


def launch(config: dict, env: dict[str, str], term_log: Path, timed: bool = False) -> Attempt:
    """Start `python -m lora_trainer` (or the timing wrapper) and read its output on a thread."""
    child_env = {**env, contract.ENV_CONFIG: json.dumps(config), contract.ENV_TERMINATION_LOG: str(term_log)}
    argv = [sys.executable, "-c", TIMED_CLI] if timed else [sys.executable, "-m", "lora_trainer"]
    popen_at = time.time()
    proc = subprocess.Popen(argv, env=child_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    attempt = Attempt(popen_at, proc)

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            attempt.lines.append((time.time(), line.rstrip("\n")))

    attempt.reader = threading.Thread(target=read, daemon=True)
    attempt.reader.start()
    return attempt


def wait_until(attempt: Attempt, predicate, timeout: float = 240.0) -> None:
    """Poll until `predicate(attempt)` holds; fail with the log tail if the process dies first."""
    deadline = time.monotonic() + timeout
    while not predicate(attempt):
        if attempt.proc.poll() is not None or time.monotonic() > deadline:
            tail = "\n".join(line for _, line in attempt.lines[-15:])
            raise RuntimeError(f"trainer exited {attempt.proc.returncode} or timed out; last lines:\n{tail}")
        time.sleep(0.02)


def stop(attempt: Attempt, sig: signal.Signals) -> int:
    """Send `sig`, wait for the exit, drain the output; returns the exit code."""
    attempt.proc.send_signal(sig)
    attempt.code = attempt.proc.wait(timeout=120)
    if attempt.reader is not None:
        attempt.reader.join(timeout=10)
    return attempt.code


def last_step(attempt: Attempt) -> int:
    """The last optimizer step the attempt reported."""
    steps = attempt.steps()
    return steps[-1][1] if steps else (attempt.resumed_from() or 0)


def first_step_seconds(attempt: Attempt) -> float:
    """Popen → arrival of the first step line."""
    return attempt.steps()[0][0] - attempt.popen_at


def phases(attempt: Attempt) -> dict[str, float]:
    """Start-up split into phases (seconds), from the timing wrapper's marks and the first step line."""
    m = attempt.marks()
    out = {"interpreter_start": m["interpreter"] - attempt.popen_at, "imports": m["imports"] - m["interpreter"]}
    out.update(attempt.spans())
    out["total_to_first_step"] = first_step_seconds(attempt)
    out["other"] = out["total_to_first_step"] - sum(v for k, v in out.items() if k != "total_to_first_step")
    return {k: round(v, 3) for k, v in out.items()}


def run_resume_bench(model: Path, data: Path, root: Path, endpoint: str, env: dict[str, str],
                     save_steps: int = 5, kills: int = 5, seed: int = 3) -> dict:
    """The SIGTERM/SIGKILL chain on one S3 output; returns every number measured."""
    rng = random.Random(seed)
    config = {
        "base_model": str(model), "train_data_dir": str(data), "output_dir": "s3://bench/resume",
        "resolution": 32, "lora_rank": 4, "batch_size": 2, "max_train_steps": 100_000, "save_steps": save_steps,
        "keep_last": 2, "log_every": 1, "seed": 5, "device": "cpu", "cache_dir": str(root / "cache"),
        "work_dir": str(root / "work"), "preemption_grace_seconds": 30,
        "s3": {"endpoint_url": endpoint, "region": "us-east-1", "path_style": True},
    }
    term_log = root / "termination.json"
    restarts: list[dict] = []
    timed_phases: dict[str, float] = {}
    step_seconds = 1.0

    # Attempt 1 trains past its first checkpoint and is stopped with SIGTERM.
    first = launch(config, env, term_log)
    wait_until(first, lambda a: last_step(a) >= save_steps + 2)
    code = stop(first, signal.SIGTERM)
    prev, prev_sig, prev_code = first, "SIGTERM", code
    plan = ["SIGTERM", "SIGTERM", *(["SIGKILL"] * kills), None]
    for i, sig in enumerate(plan[1:]):
        reached = last_step(prev)
        attempt = launch(config, env, term_log, timed=(i == 1))
        wait_until(attempt, lambda a: bool(a.steps()))
        resumed = attempt.resumed_from()
        restarts.append({
            "after": prev_sig, "exit_code": prev_code, "step_reached": reached, "resumed_from": resumed,
            "steps_lost": reached - resumed if resumed is not None else None,
            "start_to_first_step_seconds": round(first_step_seconds(attempt), 3),
            "timed_wrapper": i == 1,
        })
        if i == 1:
            wait_until(attempt, lambda a: len(a.steps()) >= 2)
            timed_phases = phases(attempt)
        if sig is None:
            stop(attempt, signal.SIGKILL)
            break
        if sig == "SIGTERM":
            wait_until(attempt, lambda a: len(a.steps()) >= 3)
        else:  # a random moment within one checkpoint interval after the first resumed step
            time.sleep(rng.uniform(0.0, save_steps * step_seconds))
        steps = attempt.steps()
        if len(steps) >= 3:
            step_seconds = statistics.median(b[0] - a[0] for a, b in zip(steps, steps[1:], strict=False))
        prev_code = stop(attempt, signal.SIGTERM if sig == "SIGTERM" else signal.SIGKILL)
        prev, prev_sig = attempt, sig
    term = [r for r in restarts if r["after"] == "SIGTERM"]
    kill = [r for r in restarts if r["after"] == "SIGKILL"]
    start_all = [r["start_to_first_step_seconds"] for r in restarts]
    return {
        "config": {k: v for k, v in config.items() if k not in ("s3", "cache_dir", "work_dir")},
        "restarts": restarts,
        "start_to_first_resumed_step_seconds": {
            "median": round(statistics.median(start_all), 3), "min": min(start_all), "max": max(start_all),
            "after_sigterm_median": round(statistics.median(r["start_to_first_step_seconds"] for r in term), 3),
        },
        "startup_phases_seconds": timed_phases,
        "sigterm_exit_codes": [r["exit_code"] for r in term],
        "sigterm_steps_lost": [r["steps_lost"] for r in term],
        "sigkill_steps_lost": [r["steps_lost"] for r in kill],
        "sigkill_steps_lost_max": max(r["steps_lost"] for r in kill) if kill else None,
        "sigkill_steps_lost_mean": round(statistics.mean(r["steps_lost"] for r in kill), 2) if kill else None,
        "step_seconds_estimate": round(step_seconds, 3),
    }


def child_env(credentials: dict[str, str]) -> dict[str, str]:
    """The environment a trainer pod would get: S3 credentials, offline hub, nothing else of ours."""
    return {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"), "HF_HUB_OFFLINE": "1",
            "AWS_EC2_METADATA_DISABLED": "true", **credentials}
