"""GPU determinism check (issue 16): exact resume per family in `determinism: exact`, and its price.

For SD 1.x and every other family this checkout has (sdxl, flux, causal-lm: tests.e2e.chaos.WORKLOADS,
the tiny random-init models of lora_trainer.tiny*, built here; nothing is downloaded), real
`lora-train` processes (tests.e2e.chaos.run_attempt) on one device:

  exact  A  uninterrupted, timed (the reference: final weights sha256 and per-step losses)
         B  uninterrupted again: must equal A bit for bit
         T  SIGTERM at a random step (exit 75), then resumed to the end: must equal A
         K  SIGKILL at a random step after a checkpoint was committed, then resumed: must equal A
  fast   F  uninterrupted, timed: the price of exactness is A's steps/s against F's

steps/s is the median step pace from the trainer's log; peak memory is the trainer's own CUDA peak
(metrics.jsonl gpu_mem_peak_mib) on a GPU, the trainer process's peak RSS (VmHWM) on the CPU. One
JSON (--out) and a printed table. On CUDA the image families train at --cuda-resolution (256) with
batch 4 and the LLM at 256 tokens: tiny widths, activations of a realistic size for the kernels
that matter (convolutions, attention backward); full-size models are bench/gpu/sdxl.py's and
llm.py's business. The families run in turn until --budget-seconds is spent (the rest are
reported as skipped): the default fits 10 minutes on one GPU.

    .venv/bin/python bench/gpu/determinism.py                          # on a CUDA machine
    .venv/bin/python bench/gpu/determinism.py --device cpu --families sd --steps 8   # proof on the CPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # tests.e2e.chaos, when run as a script

from lora_trainer.config import S3Config  # noqa: E402
from lora_trainer.determinism import CUBLAS_ENV, library_versions, settings_for  # noqa: E402
from lora_trainer.errors import EXIT_PREEMPTED  # noqa: E402
from lora_trainer.storage import open_store  # noqa: E402
from tests.e2e.chaos import (  # noqa: E402
    WORKLOADS,
    Attempt,
    KillPlan,
    available_workloads,
    base_env,
    chaos_config,
    read_result,
    run_attempt,
)

DEFAULT_OUT = ROOT / "bench" / "results" / "determinism.json"
IMAGE_KEYS = ("train_data_dir",)


@dataclass
class Run:
    """One training (one or two attempts) and what it produced."""

    result: tuple[str, dict[int, float]] | None  # (weights sha256, per-step losses) when it finished
    attempts: list[Attempt]
    peak_mib: float
    killed_at: int | None = None  # the step the log showed when the signal went

    @property
    def steps_per_second(self) -> float | None:
        pace = self.attempts[0].log.pace()
        return 1.0 / pace if pace else None


class PeakRss:
    """Peak resident memory (VmHWM, MiB) of this process's children, sampled while a run goes."""

    def __init__(self) -> None:
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        me = str(os.getpid())
        while not self._stop.wait(0.2):
            for stat in Path("/proc").glob("[0-9]*/stat"):
                try:
                    if stat.read_text().rsplit(")", 1)[1].split()[1] != me:
                        continue
                    for line in (stat.parent / "status").read_text().splitlines():
                        if line.startswith("VmHWM:"):
                            self.peak = max(self.peak, int(line.split()[1]) / 1024)
                except (OSError, IndexError):
                    continue


def gpu_peak_mib(output: Path) -> float:
    """The largest gpu_mem_peak_mib the trainer logged (0 when it logged none: the CPU)."""
    path = output / "logs" / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    return max((float(r.get("gpu_mem_peak_mib", 0.0)) for r in rows), default=0.0)


def family_config(name: str, inputs: dict, work: Path, args: argparse.Namespace, mode: str) -> dict:
    """The run's trainer config: chaos' tiny run with this check's steps, device and mode."""
    config = chaos_config("", "", str(work / "out"), S3Config(), work / "cache", inputs)
    config.update(max_train_steps=args.steps, save_steps=args.save_steps, lr_warmup_steps=1, device=args.device,
                  determinism=mode, work_dir=str(work / "scratch"))
    if args.device == "cuda":
        config["mixed_precision"] = args.mixed_precision
        if name == "causal-lm":
            config["max_seq_length"] = args.cuda_seq_len
        else:
            config.update(resolution=args.cuda_resolution, batch_size=4)
    return config


def train(config: dict, env: dict[str, str], work: Path, plan: KillPlan | None, timeout: float) -> Run:
    """One training to its end: killed once as `plan` says and resumed, or uninterrupted."""
    attempts: list[Attempt] = []
    killed_at = None
    with PeakRss() as rss:
        first = run_attempt(config, env, work, timeout=timeout, plan=plan, draw=lambda p, w: None)
        attempts.append(first)
        if first.killed:
            killed_at = first.log.step
            attempts.append(run_attempt(config, env, work, timeout=timeout))
    done = attempts[-1].code == 0 and not attempts[-1].timed_out
    result = read_result(open_store(config["output_dir"], S3Config())) if done else None
    peak = gpu_peak_mib(Path(config["output_dir"])) if config["device"] == "cuda" else rss.peak
    return Run(result, attempts, peak, killed_at)


def check_family(name: str, root: Path, args: argparse.Namespace, rng: random.Random, env: dict[str, str]) -> dict:
    """The five runs of one family; a row of the results."""
    inputs = WORKLOADS[name](root / "inputs" / name)
    started = time.monotonic()
    timeout = args.attempt_timeout
    exact_env = dict(env)
    if workspace := settings_for(args.device, "exact").cublas_workspace:
        exact_env[CUBLAS_ENV] = workspace  # as the operator puts it in the pod

    def run(label: str, mode: str, plan: KillPlan | None = None) -> Run:
        work = root / name / label
        return train(family_config(name, inputs, work, args, mode), exact_env if mode == "exact" else env,
                     work, plan, timeout)

    a = run("exact-a", "exact")
    if a.result is None:
        return {"family": name, "error": f"the reference run exited {a.attempts[-1].code}",
                "log": str(root / name / "exact-a" / "trainer.log")}
    b = run("exact-b", "exact")
    term_step = rng.randint(1, args.steps - 1)
    t = run("exact-sigterm", "exact", KillPlan("step", signal.SIGTERM, step=term_step))
    kill_step = rng.randint(args.save_steps + 1, args.steps - 1)
    k = run("exact-sigkill", "exact", KillPlan("step", signal.SIGKILL, step=kill_step, after_commit=True))
    f = run("fast", "fast")

    def resumed(r: Run, code: int) -> dict:
        second = r.attempts[1] if len(r.attempts) > 1 else None
        return {"planned_step": None, "killed_at_step": r.killed_at, "first_exit": r.attempts[0].code,
                "first_exit_expected": code, "resumed_from": second.log.start_step if second and second.log.resumed else None,
                "equal": r.result == a.result and r.attempts[0].code == code and bool(second and second.log.resumed)}

    sigterm, sigkill = resumed(t, EXIT_PREEMPTED), resumed(k, -signal.SIGKILL)
    sigterm["planned_step"], sigkill["planned_step"] = term_step, kill_step
    exact_sps, fast_sps = a.steps_per_second, f.steps_per_second
    return {
        "family": name,
        "exact": {"two_runs_equal": b.result == a.result, "sigterm_resume": sigterm, "sigkill_resume": sigkill,
                  "weights_sha256": a.result[0], "steps_per_second": exact_sps, "peak_memory_mib": round(a.peak_mib, 1)},
        "fast": {"steps_per_second": fast_sps, "peak_memory_mib": round(f.peak_mib, 1),
                 "equal_to_exact": f.result == a.result},
        "exact_speed_vs_fast": round(exact_sps / fast_sps, 3) if exact_sps and fast_sps else None,
        "all_exact": b.result == a.result and sigterm["equal"] and sigkill["equal"],
        "seconds": round(time.monotonic() - started, 1),
    }


def machine(device: str) -> dict:
    import torch

    out = {"device": device, "platform": platform.platform(), "python": platform.python_version(),
           "cpu_cores": os.cpu_count(), "load_average": [round(x, 1) for x in os.getloadavg()], **library_versions()}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        out |= {"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1), "cuda": torch.version.cuda}
    return out


def table(rows: list[dict]) -> str:
    """The printed summary: one line per family."""
    head = (f"{'family':<10} {'2 runs':<7} {'SIGTERM':<14} {'SIGKILL':<14} {'exact st/s':>10} {'fast st/s':>10} "
            f"{'exact/fast':>10} {'exact MiB':>10} {'fast MiB':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "exact" not in r:
            lines.append(f"{r['family']:<10} {r.get('error') or r.get('skipped')}")
            continue
        e, f = r["exact"], r["fast"]

        def res(x: dict) -> str:
            return f"{'equal' if x['equal'] else 'DIFFERENT'}@{x['killed_at_step']}"

        def num(x: float | None, fmt: str) -> str:
            return format(x, fmt) if x is not None else "-"

        lines.append(f"{r['family']:<10} {'equal' if e['two_runs_equal'] else 'DIFF':<7} {res(e['sigterm_resume']):<14} "
                     f"{res(e['sigkill_resume']):<14} {num(e['steps_per_second'], '10.2f')} "
                     f"{num(f['steps_per_second'], '10.2f')} {num(r['exact_speed_vs_fast'], '10.3f')} "
                     f"{e['peak_memory_mib']:>10.0f} {f['peak_memory_mib']:>9.0f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--families", default=None, help="comma-separated (default: sd first, then every family present)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--save-steps", type=int, default=4)
    parser.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="bf16", help="CUDA only")
    parser.add_argument("--cuda-resolution", type=int, default=256)
    parser.add_argument("--cuda-seq-len", type=int, default=256)
    parser.add_argument("--budget-seconds", type=float, default=540.0, help="start no family after this")
    parser.add_argument("--attempt-timeout", type=float, default=600.0)
    parser.add_argument("--seed", type=int, default=16)
    parser.add_argument("--out", type=Path, default=None, help=f"default {DEFAULT_OUT.relative_to(ROOT)} "
                        "(determinism_cpu.json with --device cpu)")
    args = parser.parse_args(argv)
    if args.steps < args.save_steps + 2:
        parser.error("--steps must leave room for a kill after the first checkpoint: at least --save-steps + 2")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench/gpu/determinism.py: no CUDA device here; prove it on the CPU with --device cpu --families sd",
              file=sys.stderr)
        return 2
    names = [n.strip() for n in args.families.split(",")] if args.families else available_workloads()
    if unknown := [n for n in names if n not in WORKLOADS]:
        parser.error(f"--families: {', '.join(unknown)} unknown; choose from {', '.join(WORKLOADS)}")
    out = args.out or (DEFAULT_OUT.with_name("determinism_cpu.json") if args.device == "cpu" else DEFAULT_OUT)
    rng = random.Random(args.seed)
    env = base_env()
    started = time.monotonic()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="determinism-") as tmp:
        for name in names:
            if time.monotonic() - started > args.budget_seconds:
                rows.append({"family": name, "skipped": f"budget of {args.budget_seconds:.0f}s spent"})
                continue
            rows.append(check_family(name, Path(tmp), args, rng, env))
            print(f"{name}: {json.dumps(rows[-1])}", flush=True)
    checked = [r for r in rows if "exact" in r]
    ok = bool(checked) and all(r["all_exact"] for r in checked) and not any("error" in r for r in rows)
    result = {"command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
              "machine": machine(args.device), "seconds": round(time.monotonic() - started, 1),
              "settings": {"steps": args.steps, "save_steps": args.save_steps, "seed": args.seed,
                           "mixed_precision": args.mixed_precision if args.device == "cuda" else "no"},
              "families": rows, "all_exact": ok}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(rows))
    print(f"{'ALL EXACT' if ok else 'NOT ALL EXACT'} on {args.device} in {result['seconds']:.0f}s; results in {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
