"""SDXL steps/s: `lora-train` against diffusers' own train_text_to_image_lora_sdxl.py, paired runs.

Same model (bench/sdxl_models.py, "small": SDXL's layout with a few million parameters, built
from configs with a fixed seed), same images (16 PNGs, 160 px, as an imagefolder with
metadata.jsonl for diffusers and metadata.csv for us), same settings (resolution 128, centre crop,
no flip, batch 2, LoRA rank 4 on to_q/to_k/to_v/to_out.0, AdamW lr 1e-4 constant, fp32, seed 1,
no checkpoints, frozen text encoders), same venv, one torch thread each (--threads). Three
variants, run as separate processes and interleaved (the order rotates every repetition):

    diffusers    the example script, unchanged (--diffusers-script; fetch it, see bench/README.md)
    ours         lora-train, no caches
    ours-cached  lora-train with cache_latents and cache_text_embeddings

Each process runs under bench/sdxl_stepclock.py, which notes the time of every optimizer step
with torch's global optimizer hook, so both programs are timed by the same code. steps/s is taken
over the steps after the first epoch (--warmup-epochs 1: the caches fill during the first epoch,
so the cached rate is the steady state), and also over the whole run (first to last step), in wall
time and in the process's CPU time (all its threads). Ratios are ours/diffusers within each
repetition (paired), then the median. Targets: >= 1.0 without caches, >= 1.3 with both caches,
judged on steps per CPU second: with one torch thread each, that is the steps/s of a machine the
process has to itself, and unlike wall time it does not swing with what else the shared machine
runs (wall ratios are printed and kept beside it, with their own PASS/FAIL). The process never
fails on a miss.

    .venv/bin/python bench/bench_sdxl.py [--diffusers-script PATH] [--reps 3] [--steps 24]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
THIRD_PARTY = ROOT / ".cache" / "third_party"
DEFAULT_SCRIPT = THIRD_PARTY / "train_text_to_image_lora_sdxl.py"
DEFAULT_TORCHVISION = THIRD_PARTY / "torchvision"
DEFAULT_OUT = BENCH / "results" / "sdxl.json"
TARGETS = {"ours": 1.0, "ours-cached": 1.3}
VARIANTS = ("diffusers", "ours", "ours-cached")
QUIET = {"TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
         "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@dataclass
class Settings:
    """What every variant trains with."""

    size: str = "small"
    resolution: int = 128
    images: int = 16
    image_size: int = 160
    batch_size: int = 2
    steps: int = 24
    rank: int = 4
    learning_rate: float = 1e-4
    seed: int = 1
    threads: int = 1
    device: str = "cpu"
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False

    @property
    def steps_per_epoch(self) -> int:
        return max(1, self.images // self.batch_size)


def prepare(root: Path, s: Settings) -> tuple[Path, Path, Path]:
    """Build the model and the dataset twice (metadata.csv for lora-train, metadata.jsonl for diffusers)."""
    sys.path.insert(0, str(BENCH))
    from sdxl_models import build_sdxl

    from lora_trainer.tiny import build_tiny_dataset

    model = build_sdxl(root / "model", s.size, seed=0)
    data = build_tiny_dataset(root / "data", n=s.images, seed=0, resolution=s.image_size)
    jsonl = root / "data_jsonl"
    jsonl.mkdir()
    with (data / "metadata.csv").open(encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        shutil.copy(data / row["file_name"], jsonl / row["file_name"])
    (jsonl / "metadata.jsonl").write_text(
        "".join(json.dumps({"file_name": r["file_name"], "text": r["text"]}) + "\n" for r in rows), encoding="utf-8")
    return model, data, jsonl


def diffusers_args(script: Path, model: Path, data: Path, out: Path, s: Settings, steps: int) -> list[str]:
    """The example script's command line for these settings."""
    args = ["--script", str(script), "--",
            "--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data), "--output_dir", str(out),
            "--resolution", str(s.resolution), "--center_crop", "--train_batch_size", str(s.batch_size),
            "--max_train_steps", str(steps), "--learning_rate", str(s.learning_rate), "--lr_scheduler", "constant",
            "--rank", str(s.rank), "--seed", str(s.seed), "--checkpointing_steps", str(10 * steps),
            "--mixed_precision", s.mixed_precision, "--dataloader_num_workers", "0"]
    return args + (["--gradient_checkpointing"] if s.gradient_checkpointing else [])


def ours_args(model: Path, data: Path, out: Path, s: Settings, steps: int, cached: bool) -> list[str]:
    """lora-train's command line: a config file written next to the output."""
    config = {
        "base_model": str(model), "train_data_dir": str(data), "output_dir": str(out), "resolution": s.resolution,
        "center_crop": True, "random_flip": False, "batch_size": s.batch_size, "max_train_steps": steps,
        "learning_rate": s.learning_rate, "lr_scheduler": "constant", "lora_rank": s.rank, "seed": s.seed,
        "device": s.device, "mixed_precision": s.mixed_precision, "gradient_checkpointing": s.gradient_checkpointing,
        "cache_latents": cached, "cache_text_embeddings": cached, "cache_dir": str(out.parent / "cache"),
    }
    path = out.parent / f"{out.name}.json"
    path.write_text(json.dumps(config), encoding="utf-8")  # YAML is a superset of JSON
    return ["--module", "lora_trainer", "--", "--config", str(path)]


def run_clocked(args: list[str], work: Path, s: Settings, torchvision: Path | None) -> dict:
    """Run one variant under the step clock; its step times, peak memory and wall time."""
    clock = work / "clock.json"
    env = {**os.environ, **QUIET}
    if s.threads:
        env.update(OMP_NUM_THREADS=str(s.threads), MKL_NUM_THREADS=str(s.threads))
    if torchvision is not None:  # the reference's dependency, kept off the trainer's path
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(torchvision), env.get("PYTHONPATH", "")]))
    cmd = [sys.executable, str(BENCH / "sdxl_stepclock.py"), str(clock), "--threads", str(s.threads), *args]
    started = time.perf_counter()
    with (work / "log.txt").open("wb") as log:
        code = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=work).returncode
    wall = time.perf_counter() - started
    if code != 0 or not clock.is_file():
        tail = (work / "log.txt").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{shlex.join(cmd)} exited {code}:\n{tail}")
    data = json.loads(clock.read_text())
    data.update(wall=wall, command=shlex.join(cmd))
    return data


def rates(clock: dict, skip: int) -> dict[str, float | int | None]:
    """steps/s after `skip` steps and over the whole run; seconds to the first step."""
    t, cpu = clock["steps"], clock.get("cpu") or []
    steady = (len(t) - 1 - skip) / (t[-1] - t[skip]) if len(t) - 1 > skip else None
    whole = (len(t) - 1) / (t[-1] - t[0]) if len(t) > 1 else None
    steady_cpu = (len(cpu) - 1 - skip) / (cpu[-1] - cpu[skip]) if len(cpu) - 1 > skip else None
    return {"steps": len(t), "steady_steps_per_s": steady, "whole_steps_per_s": whole,
            "steady_steps_per_cpu_s": steady_cpu,
            "first_step_s": t[0] - clock["start"] if t else None, "wall_s": clock["wall"],
            "peak_rss_mib": clock.get("peak_rss_mib"), "cuda_peak_mib": clock.get("cuda_peak_mib")}


def variant_args(name: str, script: Path, paths: tuple[Path, Path, Path], out: Path, s: Settings,
                 steps: int) -> tuple[list[str], bool]:
    """(stepclock args, needs torchvision) of one variant."""
    model, data, jsonl = paths
    if name == "diffusers":
        return diffusers_args(script, model, jsonl, out, s, steps), True
    return ours_args(model, data, out, s, steps, cached=name == "ours-cached"), False


def run_bench(script: Path, torchvision: Path, s: Settings, reps: int, variants: tuple[str, ...],
              warmup_epochs: int, root: Path) -> dict:
    """Warm-up runs, then `reps` interleaved repetitions of every variant; the results as plain data."""
    paths = prepare(root, s)
    skip = min(s.steps - 2, warmup_epochs * s.steps_per_epoch)
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    # One short untimed run of each pays the first-call costs (page cache, lazy imports).
    for v in variants:
        work = root / f"warm-{v}"
        work.mkdir()
        args, needs_tv = variant_args(v, script, paths, work / "out", s, 2)
        run_clocked(args, work, s, torchvision if needs_tv else None)
    for rep in range(reps):
        order = variants[rep % len(variants):] + variants[:rep % len(variants)]
        for v in order:
            work = root / f"r{rep}-{v}"
            work.mkdir()
            args, needs_tv = variant_args(v, script, paths, work / "out", s, s.steps)
            clock = run_clocked(args, work, s, torchvision if needs_tv else None)
            row = {"rep": rep, "order": order.index(v), **rates(clock, skip), "command": clock["command"]}
            runs[v].append(row)
            print(f"  rep {rep} {v:12s} steady {row['steady_steps_per_s']:.3f} steps/s "
                  f"({row['steady_steps_per_cpu_s']:.3f} per CPU s), whole {row['whole_steps_per_s']:.3f}, "
                  f"first step after {row['first_step_s']:.1f} s", flush=True)
    return {"runs": runs, "skip_steps": skip, "summary": summarise(runs)}


def summarise(runs: dict[str, list[dict]]) -> dict:
    """Median rates per variant and median paired ratios against diffusers, with PASS/FAIL."""
    out: dict = {}
    for v, rows in runs.items():
        out[v] = {k: statistics.median(r[k] for r in rows) for k in ("steady_steps_per_s", "whole_steps_per_s",
                                                                    "steady_steps_per_cpu_s", "first_step_s",
                                                                    "peak_rss_mib")}
        if rows and rows[0].get("cuda_peak_mib") is not None:
            out[v]["cuda_peak_mib"] = statistics.median(r["cuda_peak_mib"] for r in rows)
    if "diffusers" not in runs:
        return out
    for v in runs:
        if v == "diffusers":
            continue
        paired = {k: [a[k] / b[k] for a, b in zip(runs[v], runs["diffusers"], strict=True)]
                  for k in ("steady_steps_per_s", "whole_steps_per_s", "steady_steps_per_cpu_s")}
        ratio = statistics.median(paired["steady_steps_per_s"])
        ratio_cpu = statistics.median(paired["steady_steps_per_cpu_s"])
        target = TARGETS.get(v)
        out[v].update(ratio=ratio, ratios=paired["steady_steps_per_s"],
                      ratio_whole=statistics.median(paired["whole_steps_per_s"]), ratios_whole=paired["whole_steps_per_s"],
                      ratio_cpu=ratio_cpu, ratios_cpu=paired["steady_steps_per_cpu_s"], target=target,
                      verdict=None if target is None else ("PASS" if ratio_cpu >= target else "FAIL"),
                      verdict_wall=None if target is None else ("PASS" if ratio >= target else "FAIL"))
    return out


def parse_args(argv: list[str] | None = None, **defaults) -> argparse.Namespace:
    s = Settings(**defaults)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--diffusers-script", type=Path, default=DEFAULT_SCRIPT)
    p.add_argument("--torchvision", type=Path, default=DEFAULT_TORCHVISION,
                   help="folder with torchvision for the reference only (pip install --no-deps --target)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--steps", type=int, default=s.steps)
    p.add_argument("--resolution", type=int, default=s.resolution)
    p.add_argument("--size", default=s.size)
    p.add_argument("--batch-size", type=int, default=s.batch_size)
    p.add_argument("--threads", type=int, default=s.threads)
    p.add_argument("--warmup-epochs", type=int, default=1)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return p.parse_args(argv)


def check_inputs(script: Path, torchvision: Path) -> str | None:
    """Why the reference cannot run, or None."""
    if not script.is_file():
        return (f"no diffusers script at {script}: fetch huggingface/diffusers and "
                f"`git --git-dir=... show HEAD:examples/text_to_image/train_text_to_image_lora_sdxl.py > {script}`")
    if not (torchvision / "torchvision").is_dir():
        return (f"no torchvision under {torchvision}: `.venv/bin/pip install --no-deps --target {torchvision} "
                "torchvision==<the one for this torch>` (the example script imports it; the trainer does not)")
    return None


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    s = Settings(size=a.size, resolution=a.resolution, batch_size=a.batch_size, steps=a.steps, threads=a.threads)
    variants = tuple(v for v in a.variants.split(",") if v)
    if problem := check_inputs(a.diffusers_script, a.torchvision):
        print(f"SKIP: {problem}")
        return
    print(f"SDXL steps/s, {a.reps} paired repetitions of {', '.join(variants)} ({s.steps} steps each)", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-sdxl-") as tmp:
        result = run_bench(a.diffusers_script, a.torchvision, s, a.reps, variants, a.warmup_epochs, Path(tmp))
    report(result, a, s, argv)


def _relative(path: Path) -> str:
    try:
        return path.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return str(path)


def report(result: dict, a: argparse.Namespace, s: Settings, argv: list[str] | None) -> None:
    """Print the verdicts and write the JSON."""
    for v, row in result["summary"].items():
        if "ratio" in row:
            print(f"{v}/diffusers steady steps per CPU second: {row['ratio_cpu']:.3f} (paired "
                  f"{', '.join(f'{r:.3f}' for r in row['ratios_cpu'])}); target >= {row['target']}: {row['verdict']}; "
                  f"wall steps/s {row['ratio']:.3f} (paired {', '.join(f'{r:.3f}' for r in row['ratios'])}, "
                  f"{row['verdict_wall']}), whole run {row['ratio_whole']:.3f}")
    import hashlib

    import diffusers

    log = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    data = {
        "command": shlex.join([".venv/bin/python", _relative(Path(sys.argv[0])), *(sys.argv[1:] if argv is None else argv)]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": log.stdout.strip() or None,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load": os.getloadavg()},
        "diffusers_script": str(a.diffusers_script), "diffusers_version": diffusers.__version__,
        "diffusers_script_sha256": hashlib.sha256(a.diffusers_script.read_bytes()).hexdigest(),
        "settings": s.__dict__, **result,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
