"""The CUDA training options on a tiny SDXL: each trains, and resumes bit-exactly (issue 11 item 4).

Variants (each a real `Trainer` run on the tiny SDXL of lora_trainer.tiny_sdxl, built here from
configs; nothing is downloaded):

    fp32        mixed_precision no
    bf16        bf16 autocast, frozen weights in bf16, LoRA weights in fp32
    fp16        fp16 autocast with the GradScaler (its state goes through the checkpoint)
    gc          gradient_checkpointing with both text encoders trained
    bf16-gc     both
    adamw8bit   bitsandbytes' AdamW8bit (its state dict goes through the same save/load); skipped,
                and said so, when bitsandbytes does not import

For each: A runs uninterrupted; B is stopped as on SIGTERM after `--stop-at` steps (checkpoint
committed, exit 75) and resumed in a new Trainer; PASS when B's final weights are sha256-equal to
A's and every loss is finite. Reported per variant: PASS/FAIL, steps/s of A, and on CUDA the peak
GPU memory of a step (metrics.jsonl gpu_mem_peak_mib, lora_trainer.gpustats). One JSON (--out).

    .venv/bin/python bench/gpu/check.py                      # on a GPU machine (a few minutes)
    .venv/bin/python bench/gpu/check.py --device cpu --variants fp32,gc --steps 3   # the CPU smoke test

On the CPU mixed precision does not apply (the trainer trains fp32 there), so only the plumbing is
checked. Not yet run on a GPU: no GPU machine was lent when it was written. Exit 0 when every variant
that ran passed, 1 otherwise; without CUDA and without --device cpu it prints SKIP and exits 0.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import math
import sys
import tempfile
import time
from pathlib import Path

VARIANTS: dict[str, dict[str, object]] = {
    "fp32": {},
    "bf16": {"mixed_precision": "bf16"},
    "fp16": {"mixed_precision": "fp16"},
    "gc": {"gradient_checkpointing": True, "train_text_encoder": True},
    "bf16-gc": {"mixed_precision": "bf16", "gradient_checkpointing": True, "train_text_encoder": True},
    "adamw8bit": {"optimizer": "adamw8bit"},
}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_variant(name: str, extra: dict[str, object], model: Path, data: Path, root: Path, a: argparse.Namespace
                ) -> dict[str, object]:
    from lora_trainer.config import parse_config
    from lora_trainer.errors import Preempted
    from lora_trainer.signals import StopFlag
    from lora_trainer.train import Trainer, read_losses, read_metric

    class StopAfter(StopFlag):
        """As if SIGTERM came once `steps` optimizer steps were done (the loop asks before each step)."""

        def __init__(self, steps: int) -> None:
            super().__init__()
            self.asked, self.steps = 0, steps

        @property
        def requested(self) -> bool:
            self.asked += 1
            if self.asked > self.steps:
                self.request()
            return super().requested

    def config(out: Path):
        base = {"base_model": str(model), "train_data_dir": str(data), "output_dir": str(out),
                "resolution": a.resolution, "lora_rank": 4, "batch_size": 2, "max_train_steps": a.steps,
                "learning_rate": 1e-3, "save_steps": max(1, a.stop_at), "keep_last": 1, "seed": 7,
                "target_modules": ["to_q", "to_k", "to_v", "to_out.0"], "device": a.device,
                "cache_dir": str(root / "cache"), "log_every": 1}
        return parse_config({**base, **extra, **a.set})

    if extra.get("optimizer") == "adamw8bit":
        try:
            importlib.import_module("bitsandbytes.optim")
        except Exception as exc:  # noqa: BLE001 - absent, or present without a usable CUDA
            return {"variant": name, "result": "SKIP", "why": f"bitsandbytes does not import ({type(exc).__name__})"}
    out_a, out_b = root / name / "a", root / name / "b"
    started = time.monotonic()
    Trainer(config(out_a)).run()
    seconds = time.monotonic() - started
    try:
        Trainer(config(out_b), stop=StopAfter(a.stop_at)).run()
        return {"variant": name, "result": "FAIL", "why": "the stopped run was not stopped"}
    except Preempted:
        pass
    resumed = Trainer(config(out_b)).run()
    metrics = (out_a / "logs/metrics.jsonl").read_text()
    losses = read_losses(metrics)
    peaks = read_metric(metrics, "gpu_mem_peak_mib")
    final = "pytorch_lora_weights.safetensors"
    exact = sha(out_a / final) == sha(out_b / final)
    finite = all(math.isfinite(v) for v in losses.values())
    why = [] if exact else ["resumed weights differ from the uninterrupted run's"]
    why += [] if finite else ["a loss is not finite"]
    why += [] if resumed.resumed_from == a.stop_at else [f"resumed from {resumed.resumed_from}, not {a.stop_at}"]
    return {"variant": name, "result": "FAIL" if why else "PASS", "why": "; ".join(why),
            "settings": extra, "exact_resume": exact, "losses": losses,
            "steps_per_second": round(a.steps / seconds, 3),
            "peak_gpu_mib": max(peaks.values()) if peaks else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--stop-at", type=int, default=None, help="step after which B is stopped (default: half)")
    p.add_argument("--resolution", type=int, default=None, help="default 128 on CUDA, 32 on the CPU")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra trainer config for every run (YAML values), e.g. --set noise_offset=0.05")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    import torch
    import yaml

    if a.device == "cuda" and not torch.cuda.is_available():
        print("SKIP: no CUDA device here; run on a GPU machine, or `--device cpu` for the smoke test")
        return 0
    unknown = [v for v in a.variants.split(",") if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    a.stop_at = a.stop_at or max(1, a.steps // 2)
    a.resolution = a.resolution or (128 if a.device == "cuda" else 32)
    a.set = {k: yaml.safe_load(v) for k, _, v in (s.partition("=") for s in a.set)}
    from lora_trainer.tiny import build_tiny_dataset
    from lora_trainer.tiny_sdxl import build_tiny_sdxl

    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        root = Path(tmp)
        model = build_tiny_sdxl(root / "model")
        data = build_tiny_dataset(root / "data", n=8, resolution=a.resolution)
        for name in a.variants.split(","):
            row = run_variant(name, VARIANTS[name], model, data, root, a)
            rows.append(row)
            peak = f"{row['peak_gpu_mib']:.0f} MiB" if row.get("peak_gpu_mib") else "-"
            print(f"{name:10s} {row['result']:4s} {row.get('steps_per_second', '-')!s:>7} steps/s  peak {peak:>9}  "
                  f"{row.get('why', '')}", flush=True)
    result = {"device": a.device, "gpu": torch.cuda.get_device_name() if a.device == "cuda" else None,
              "torch": torch.__version__, "steps": a.steps, "stop_at": a.stop_at, "resolution": a.resolution,
              "rows": rows}
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=1))
    failed = [r["variant"] for r in rows if r["result"] == "FAIL"]
    print("FAIL: " + ", ".join(failed) if failed else "PASS: every variant that ran resumed bit-exactly")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
