"""Trainer benchmarks: loop overhead, checkpoint cost, stall per checkpoint, resume time, steps lost.

All on the tiny SD model (resolution 32, batch 2, LoRA rank 4, CPU). Timings are ratios against a
reference measured in the same process, interleaved (variants rotate each repetition), medians:

1. speed      trainer steps/s ÷ a bare reference loop's (same model loading, peft LoRA, AdamW
              foreach=False, same per-step work, images read from the same files; no logging, no
              checkpoints, no progress). Target >= 0.95.
2. checkpoint trainer steps/s with a checkpoint every --save-steps ÷ without, for each of --stores:
              s3 (moto in its own process, on the same cores as the trainer) and local (a folder,
              no server). Target >= 0.95. Also recorded per checkpoint: loop time lost, the
              synchronous part, CPU on the process's other threads, S3 server CPU, requests.
3. stall      (from the runs of 2) the step right after each checkpoint minus the run's median
              step, p95 over all checkpoints. Target <= max(0.5 s, 5% of the checkpoint interval).
              Also recorded: the synchronous part alone (from the start of `save_state` to the
              start of the next step), which is what the loop waits for.
4. resume     `python -m lora_trainer` on S3, SIGTERM ×2 then SIGKILL at random moments ×--kills:
              Popen → first resumed step (and its phases), steps lost per preemption (SIGTERM: 0).

Steady state excludes the first --warmup steps; the trainer's step times are the `time` column of
its logs/metrics.jsonl, the bare loop's are taken the same way (time.time() after each step).
Before the timed repetitions one untimed short run (trainer, S3 checkpoints) pays the first-call
costs (lazy imports, kernel set-up, the first S3 client), which would otherwise land on whichever
variant happens to go first. Benches 1-3 run torch with --torch-threads (default 1) in every
variant: on a small shared machine, OpenMP threads that outnumber the free cores turn each
parallel op into a wait for the slowest thread, and step times then swing tenfold.

    .venv/bin/python bench/bench_trainer.py [--only speed,checkpoint,resume] [--reps 5] [--steps 100]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import csv
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from peft import LoraConfig  # noqa: E402
from PIL import Image  # noqa: E402
from procstat import process_cpu  # noqa: E402

import lora_trainer.state  # noqa: E402
import lora_trainer.storage  # noqa: E402
import lora_trainer.train  # noqa: E402
from lora_operator.devcluster.s3 import TEST_CREDENTIALS  # noqa: E402
from lora_trainer.config import TrainConfig, parse_config  # noqa: E402
from lora_trainer.contract import utcnow  # noqa: E402
from lora_trainer.signals import StopFlag  # noqa: E402
from lora_trainer.tasks import detect, with_family_defaults  # noqa: E402
from lora_trainer.tasks.sd import load_components  # noqa: E402
from lora_trainer.tiny import TINY_RESOLUTION, build_tiny_dataset, build_tiny_sd  # noqa: E402
from lora_trainer.train import Trainer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trainer_resume import child_env, run_resume_bench, start_s3_server, stop_s3_server  # noqa: E402

TARGET_SPEED_RATIO = 0.95
TARGET_CHECKPOINT_RATIO = 0.95
STALL_FLOOR_SECONDS = 0.5
STALL_INTERVAL_FRACTION = 0.05
BUCKET = "bench"
BENCHES = ("speed", "checkpoint", "resume")
DEFAULT_OUT = Path(__file__).parent / "results" / "trainer.json"


def base_config(model: Path, data: Path, output: str, work: Path, steps: int, **extra: object) -> TrainConfig:
    """The benchmark run: tiny model, batch 2, rank 4, constant LR, CPU."""
    return parse_config({
        "base_model": str(model), "train_data_dir": str(data), "output_dir": output, "resolution": TINY_RESOLUTION,
        "lora_rank": 4, "batch_size": 2, "max_train_steps": steps, "learning_rate": 1e-4, "seed": 7,
        "device": "cpu", "work_dir": str(work), "cache_dir": str(work.parent / "cache"), **extra,
    })


def load_pixels(path: Path, resolution: int) -> torch.Tensor:
    """An image file as a CHW float tensor in [-1, 1], resized to a square."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        if im.size != (resolution, resolution):
            im = im.resize((resolution, resolution), Image.Resampling.BICUBIC)
        arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def bare_run(config: TrainConfig, model: Path, data: Path) -> list[float]:
    """The reference loop: the per-step work of LoRA training and nothing else; time after each step."""
    # target_modules unset means the family's default: resolve it as the trainer does (same modules).
    config = with_family_defaults(config, detect(model, config.model_family, config.task))
    torch.manual_seed(config.seed)
    parts = load_components(model, config)
    parts.unet.add_adapter(LoraConfig(r=config.lora_rank, lora_alpha=config.alpha, lora_dropout=config.lora_dropout,
                                      init_lora_weights="gaussian", target_modules=list(config.target_modules)))
    params = [p for p in parts.unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                                  weight_decay=config.adam_weight_decay, eps=config.adam_epsilon, foreach=False)
    with (data / "metadata.csv").open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    tok, bs = parts.tokenizer, config.batch_size
    times: list[float] = []
    for step in range(config.max_train_steps or 0):
        batch = [rows[(step * bs + j) % len(rows)] for j in range(bs)]
        pixels = torch.stack([load_pixels(data / r["file_name"], config.resolution) for r in batch])
        with torch.no_grad():
            latents = parts.vae.encode(pixels).latent_dist.sample() * parts.vae.config.scaling_factor
            ids = tok([r["text"] for r in batch], padding="max_length", max_length=tok.model_max_length,
                      truncation=True, return_tensors="pt").input_ids
            hidden = parts.text_encoder(ids, return_dict=False)[0]
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, parts.scheduler.config.num_train_timesteps, (bs,)).long()
        pred = parts.unet(parts.scheduler.add_noise(latents, noise, timesteps), timesteps, hidden,
                          return_dict=False)[0]
        F.mse_loss(pred.float(), noise.float()).backward()
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm, foreach=False)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.time())
    return times


@contextlib.contextmanager
def call_starts(module: object, name: str, starts: list[float]):
    """While inside, record time.time() at the start of every call of `module.name`."""
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        starts.append(time.time())
        return original(*args, **kwargs)

    setattr(module, name, wrapper)
    try:
        yield
    finally:
        setattr(module, name, original)



@contextlib.contextmanager
def counted_requests(counts: collections.Counter[str]):
    """While inside, count the S3 requests of every client `lora_trainer.storage` makes, by operation."""
    original = lora_trainer.storage.make_client

    def make_client(*args, **kwargs):
        client = original(*args, **kwargs)
        client.meta.events.register("before-send.s3", lambda event_name, **_: counts.update([event_name.rsplit(".", 1)[-1]]))
        return client

    lora_trainer.storage.make_client = make_client
    try:
        yield
    finally:
        lora_trainer.storage.make_client = original


@dataclass
class Costs:
    """Where a variant's time went, summed over its runs: the loop thread's CPU, the CPU of every
    other thread of the process (uploads, logs), the S3 server's CPU, and requests sent."""

    runs: int = 0
    sync_seconds: list[float] = field(default_factory=list)
    main_cpu: float = 0.0
    background_cpu: float = 0.0
    server_cpu: float = 0.0
    requests: collections.Counter[str] = field(default_factory=collections.Counter)


def trainer_run(config: TrainConfig, costs: Costs | None = None, server_pid: int = 0) -> list[float]:
    """Trainer.run in this process; the step end times from the `time` column of its metrics.jsonl.

    `costs.sync_seconds` receives, per checkpoint, the seconds from the start of `save_state` to
    the start of the next step: the part of a checkpoint the loop waits for (uploads run on the
    uploader thread)."""
    costs = costs if costs is not None else Costs()
    saves: list[float] = []
    steps: list[float] = []
    main, cpu, server = time.thread_time(), time.process_time(), process_cpu(server_pid)
    with (call_starts(lora_trainer.state, "save_state", saves), call_starts(lora_trainer.train, "train_step", steps),
          counted_requests(costs.requests)):
        Trainer(config, StopFlag()).run()
    main = time.thread_time() - main
    costs.runs += 1
    costs.main_cpu += main
    costs.background_cpu += time.process_time() - cpu - main
    costs.server_cpu += process_cpu(server_pid) - server if server_pid else 0.0
    costs.sync_seconds += [next(t for t in steps if t >= s) - s for s in saves if any(t >= s for t in steps)]
    text = (Path(config.work_dir or "") / "logs" / "metrics.jsonl").read_text(encoding="utf-8")
    rows = sorted((json.loads(line) for line in text.splitlines() if line.strip()), key=lambda r: r["step"])
    return [float(r["time"]) for r in rows]


def steady_sps(times: list[float], warmup: int) -> float:
    """Steps per second over steps warmup+1..N (times[i] is when step i+1 ended)."""
    return (len(times) - warmup) / (times[-1] - times[warmup - 1])


def checkpoint_stalls(times: list[float], warmup: int, save_steps: int) -> tuple[list[float], float]:
    """Extra seconds of the step right after each checkpoint vs the median of the other steady steps."""
    dur = {s: times[s - 1] - times[s - 2] for s in range(warmup + 1, len(times) + 1)}
    after = {k + 1 for k in range(save_steps, len(times), save_steps) if k + 1 in dur}
    median = statistics.median(d for s, d in dur.items() if s not in after)
    return [dur[s] - median for s in sorted(after)], median


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def machine() -> dict:
    """Where the numbers were taken."""
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"cpu_cores": os.cpu_count(), "cpu_model": model, "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "torch_default_threads": torch.get_num_threads()}


def run_loop_benches(args: argparse.Namespace, model: Path, data: Path, root: Path, endpoint: str,
                     server_pid: int) -> dict:
    """Benches 1-3: interleaved repetitions of the bare loop and trainer variants in this process."""
    variants = ["trainer"]
    if "speed" in args.only:
        variants.insert(0, "bare")
    if "checkpoint" in args.only:
        variants += [f"trainer_ckpt_{store}" for store in args.stores]
    times: dict[str, list[list[float]]] = {v: [] for v in variants}
    costs: dict[str, Costs] = {v: Costs() for v in variants}

    def config_for(variant: str, name: str, steps: int) -> TrainConfig:
        work = root / "work" / name
        output = f"s3://{BUCKET}/{name}" if variant.endswith("_s3") else str(root / "out" / name)
        extra: dict = {"save_steps": args.save_steps} if variant.startswith("trainer_ckpt") else {}
        if variant.endswith("_s3"):
            extra["s3"] = {"endpoint_url": endpoint, "region": "us-east-1", "path_style": True}
        return base_config(model, data, output, work, steps, **extra)

    started = time.monotonic()
    trainer_run(config_for("trainer_ckpt_s3", "warm-up", args.warmup + args.save_steps + 2))
    print(f"  untimed warm-up run ({time.monotonic() - started:.0f}s)", flush=True)
    for rep in range(args.reps):
        for variant in variants[rep % len(variants):] + variants[:rep % len(variants)]:
            name = f"{variant}-{rep}"
            config = config_for(variant, name, args.steps)
            started = time.monotonic()
            t = bare_run(config, model, data) if variant == "bare" else trainer_run(config, costs[variant], server_pid)
            times[variant].append(t)
            print(f"  rep {rep} {variant:<20} {steady_sps(t, args.warmup):6.3f} steps/s "
                  f"({time.monotonic() - started:.0f}s)", flush=True)
            gc.collect()
    sps = {v: [round(steady_sps(t, args.warmup), 4) for t in ts] for v, ts in times.items()}
    med = {v: round(statistics.median(s), 4) for v, s in sps.items()}
    out: dict = {"variants": variants, "steps_per_second": sps, "median_steps_per_second": med,
                 "step_end_times": {v: [[round(x, 4) for x in t] for t in ts] for v, ts in times.items()}}
    if "speed" in args.only:
        ratio = med["trainer"] / med["bare"]
        paired = [a / b for a, b in zip(sps["trainer"], sps["bare"], strict=True)]
        out["speed"] = {"ratio_trainer_over_bare": round(ratio, 3), "paired_ratios": [round(r, 3) for r in paired],
                        "target": TARGET_SPEED_RATIO, "passed": ratio >= TARGET_SPEED_RATIO}
        print(f"1. speed: trainer/bare = {ratio:.3f} (paired {', '.join(f'{r:.3f}' for r in paired)}) "
              f"target >= {TARGET_SPEED_RATIO} {verdict(ratio >= TARGET_SPEED_RATIO)}")
    if "checkpoint" in args.only:
        out["checkpoint"], out["stall"] = {}, {}
        for store in args.stores:
            v = f"trainer_ckpt_{store}"
            ratio = med[v] / med["trainer"]
            out["checkpoint"][store] = {"ratio_checkpoint_over_none": round(ratio, 3),
                                        "target": TARGET_CHECKPOINT_RATIO, "passed": ratio >= TARGET_CHECKPOINT_RATIO}
            print(f"2. checkpoint every {args.save_steps} ({store}): with/without = {ratio:.3f} "
                  f"target >= {TARGET_CHECKPOINT_RATIO} {verdict(ratio >= TARGET_CHECKPOINT_RATIO)}")
            stalls, medians = [], []
            for t in times[v]:
                s, m = checkpoint_stalls(t, args.warmup, args.save_steps)
                stalls += s
                medians.append(m)
            p95 = float(np.percentile(stalls, 95))
            interval = args.save_steps * statistics.median(medians)
            limit = max(STALL_FLOOR_SECONDS, STALL_INTERVAL_FRACTION * interval)
            sync = costs[v].sync_seconds
            sync_p95 = float(np.percentile(sync, 95)) if sync else None
            out["stall"][store] = {
                "stalls_seconds": [round(s, 4) for s in stalls], "p95_seconds": round(p95, 4),
                "max_seconds": round(max(stalls), 4), "median_step_seconds": round(statistics.median(medians), 4),
                "checkpoint_interval_seconds": round(interval, 3), "target_seconds": round(limit, 3),
                "passed": p95 <= limit,
                "sync_seconds": [round(s, 4) for s in sync],
                "sync_p95_seconds": None if sync_p95 is None else round(sync_p95, 4),
            }
            print(f"3. stall per checkpoint ({store}): p95 {p95:.3f}s over {len(stalls)} checkpoints "
                  f"(median step {statistics.median(medians):.3f}s) target <= {limit:.3f}s {verdict(p95 <= limit)}; "
                  f"synchronous part p95 {sync_p95 or 0:.3f}s")
            out["checkpoint"][store]["cost_per_checkpoint"] = cost = checkpoint_cost(
                costs[v], costs["trainer"], args.steps // args.save_steps, args.save_steps, med[v], med["trainer"])
            print(f"   per checkpoint: {cost['loop_seconds_lost']:.3f}s of loop time lost; synchronous part "
                  f"{cost['sync_median_seconds']:.3f}s; CPU on other threads {cost['background_cpu_seconds']:.3f}s; "
                  f"S3 server CPU {cost['server_cpu_seconds']:.3f}s; {cost['requests']:.1f} requests "
                  f"({', '.join(f'{k} {n:.1f}' for k, n in cost['requests_by_operation'].items())})")
    out["costs"] = {v: {"runs": c.runs, "main_thread_cpu_seconds": round(c.main_cpu, 3),
                        "background_cpu_seconds": round(c.background_cpu, 3), "server_cpu_seconds": round(c.server_cpu, 3),
                        "requests": dict(c.requests)} for v, c in costs.items() if v != "bare"}
    return out


def checkpoint_cost(ckpt: Costs, none: Costs, per_run: int, save_steps: int, sps_ckpt: float, sps_none: float) -> dict:
    """What one checkpoint costs: loop time lost (from the median speeds), its synchronous part,
    and the CPU and requests it adds over a run without checkpoints (per run, then per checkpoint)."""
    n = per_run * ckpt.runs
    extra = collections.Counter(ckpt.requests)
    extra.subtract({op: c * ckpt.runs / none.runs for op, c in none.requests.items()})
    by_op = {op: round(c / n, 1) for op, c in sorted(extra.items()) if c > 0}
    return {
        "loop_seconds_lost": round(save_steps * (1 / sps_ckpt - 1 / sps_none), 4),
        "sync_median_seconds": round(statistics.median(ckpt.sync_seconds), 4) if ckpt.sync_seconds else 0.0,
        "main_thread_cpu_seconds": round((ckpt.main_cpu / ckpt.runs - none.main_cpu / none.runs) / per_run, 4),
        "background_cpu_seconds": round((ckpt.background_cpu / ckpt.runs - none.background_cpu / none.runs) / per_run, 4),
        "server_cpu_seconds": round((ckpt.server_cpu / ckpt.runs - none.server_cpu / none.runs) / per_run, 4),
        "requests": round(sum(extra.values()) / n, 1),
        "requests_by_operation": by_op,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(BENCHES), help=f"comma list of {', '.join(BENCHES)}")
    parser.add_argument("--reps", type=int, default=5, help="interleaved repetitions of each variant")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per run (benches 1-3)")
    parser.add_argument("--torch-threads", type=int, default=1, help="torch CPU threads in benches 1-3")
    parser.add_argument("--warmup", type=int, default=10, help="first steps left out of steady state")
    parser.add_argument("--save-steps", type=int, default=10, help="checkpoint interval (benches 2-3)")
    parser.add_argument("--stores", default="s3,local", help="checkpoint stores for bench 2: s3, local or s3,local")
    parser.add_argument("--kills", type=int, default=5, help="SIGKILLs in bench 4")
    parser.add_argument("--resume-save-steps", type=int, default=5, help="checkpoint interval in bench 4")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    args.only = [b.strip() for b in args.only.split(",") if b.strip()]
    args.stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    if bad := set(args.only) - set(BENCHES):
        parser.error(f"--only: unknown {sorted(bad)}; choose from {', '.join(BENCHES)}")
    os.environ.update(TEST_CREDENTIALS, AWS_EC2_METADATA_DISABLED="true")
    started, load_before = time.monotonic(), os.getloadavg()[0]
    result: dict = {
        "benchmark": "trainer",
        "command": shlex.join([".venv/bin/python", "bench/bench_trainer.py", *(argv if argv is not None
                                                                               else sys.argv[1:])]),
        "date": utcnow(), "machine": machine(),
        "settings": {"model": "lora_trainer.tiny (SD 1.x-style)", "resolution": TINY_RESOLUTION, "batch_size": 2,
                     "lora_rank": 4, "device": "cpu", "reps": args.reps, "steps": args.steps, "warmup": args.warmup,
                     "save_steps": args.save_steps, "stores": args.stores, "benches": args.only,
                     "torch_threads": args.torch_threads, "kills": args.kills,
                     "resume_save_steps": args.resume_save_steps,
                     "s3": "moto (ThreadedMotoServer) in a separate process on 127.0.0.1"},
    }
    import boto3

    server, endpoint = start_s3_server()
    try:
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
        with tempfile.TemporaryDirectory(prefix="bench-trainer-") as tmp:
            root = Path(tmp)
            model, data = build_tiny_sd(root / "sd"), build_tiny_dataset(root / "data", n=8)
            if {"speed", "checkpoint"} & set(args.only):
                torch.set_num_threads(args.torch_threads)
                print(f"benches 1-3: {args.reps} interleaved reps × {args.steps} steps, warm-up {args.warmup}")
                result.update(run_loop_benches(args, model, data, root, endpoint, server.pid))
            if "resume" in args.only:
                print(f"bench 4: resume chain on S3 (checkpoint every {args.resume_save_steps}, {args.kills} SIGKILLs)")
                r = run_resume_bench(model, data, root / "resume", endpoint, child_env(TEST_CREDENTIALS),
                                     save_steps=args.resume_save_steps, kills=args.kills)
                r["sigterm_passed"] = all(n == 0 for n in r["sigterm_steps_lost"])
                r["sigkill_passed"] = (r["sigkill_steps_lost_max"] or 0) <= args.resume_save_steps
                result["resume"] = r
                s = r["start_to_first_resumed_step_seconds"]
                print(f"4. start → first resumed step: median {s['median']:.2f}s (min {s['min']:.2f}, "
                      f"max {s['max']:.2f}); phases {r['startup_phases_seconds']}")
                print(f"   steps lost: SIGTERM {r['sigterm_steps_lost']} (expect 0) {verdict(r['sigterm_passed'])}; "
                      f"SIGKILL {r['sigkill_steps_lost']} max {r['sigkill_steps_lost_max']} mean "
                      f"{r['sigkill_steps_lost_mean']} (<= {args.resume_save_steps}) {verdict(r['sigkill_passed'])}")
    finally:
        stop_s3_server(server)
    result["load_average_1m"] = {"start": round(load_before, 2), "end": round(os.getloadavg()[0], 2)}
    result["total_seconds"] = round(time.monotonic() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"total {result['total_seconds']:.0f}s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
