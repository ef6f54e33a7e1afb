"""Flux at 512 and 1024 px in bf16 on a GPU: `lora-train` against diffusers' train_dreambooth_lora_flux.py.

The real FLUX.1-dev architecture (bench/flux_models.py "full": the 12 B transformer, CLIP-L, T5-XXL's
shape, the 16-channel VAE) with seeded random weights saved in bf16 (about 34 GB of disk; nothing is
downloaded; speed and memory do not depend on the weights), batch 1, LoRA rank 4 on the script's
default targets, bf16 mixed precision, gradient checkpointing, frozen text encoders, no checkpoints.
Paired, interleaved runs as in bench_flux.py / bench_sdxl.py (which have the measuring code), once per
resolution; reported: steady steps/s, its ratio ours/diffusers, and the peak GPU memory each process
allocated (torch.cuda.max_memory_allocated).

Without CUDA it prints SKIP and writes nothing, unless asked for the CPU smoke test:

    .venv/bin/python bench/gpu/flux.py --reps 2                 # on a GPU machine with >= 80 GB (not yet run)
    .venv/bin/python bench/gpu/flux.py --device cpu --tiny      # smoke test: small model, 64 px, fp32

It lives under bench/gpu/ so that run_all.py (every bench/bench_*.py, on CPU machines) skips it.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/
import bench_flux  # noqa: E402
import bench_sdxl  # noqa: E402
from bench_sdxl import BENCH, DEFAULT_TORCHVISION, Settings, report, run_bench  # noqa: E402

GPU = Settings(size="full", resolution=1024, images=8, image_size=1152, batch_size=1, steps=20, threads=0,
               device="cuda", mixed_precision="bf16", gradient_checkpointing=True)
TINY_CPU = Settings(size="small", resolution=64, images=8, image_size=80, batch_size=1, steps=8, threads=1,
                    device="cpu", mixed_precision="no", gradient_checkpointing=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tiny", action="store_true", help="the small model at 64 px (with --device cpu: the smoke test)")
    p.add_argument("--resolutions", default=None, help="comma-separated; default 512,1024 (64 with --tiny)")
    p.add_argument("--diffusers-script", type=Path, default=bench_flux.DEFAULT_SCRIPT)
    p.add_argument("--torchvision", type=Path, default=DEFAULT_TORCHVISION)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        print("SKIP: no CUDA device here; run on a GPU machine, or `--device cpu --tiny` for the smoke test")
        return
    if a.device == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # as the operator sets it in a GPU pod
    if problem := bench_flux.check_inputs(a.diffusers_script, a.torchvision):
        print(f"SKIP: {problem}")
        return
    base = TINY_CPU if a.tiny else GPU
    dtype = "bfloat16" if a.device == "cuda" else "float32"
    bench_flux.use_flux()
    # The model saved in bf16 on a GPU (the 12 B transformer in float32 alone is 48 GB).
    bench_sdxl.prepare = functools.partial(bench_flux.prepare, dtype=dtype)
    resolutions = [int(r) for r in (a.resolutions or ("64" if a.tiny else "512,1024")).split(",")]
    for res in resolutions:
        s = Settings(**{**base.__dict__, "device": a.device, "resolution": res, "image_size": res + res // 8,
                        "mixed_precision": "bf16" if a.device == "cuda" else "no",
                        "threads": 0 if a.device == "cuda" else 1, "steps": a.steps or base.steps})
        out = a.out or BENCH / "results" / (f"flux_gpu_{res}.json" if a.device == "cuda" and not a.tiny
                                            else f"flux_gpu_{a.device}_{'tiny' if a.tiny else 'full'}_{res}.json")
        print(f"Flux {s.size} at {res} px, {s.mixed_precision}, on {s.device}: {a.reps} paired repetitions", flush=True)
        with tempfile.TemporaryDirectory(prefix="bench-flux-gpu-") as tmp:
            result = run_bench(a.diffusers_script, a.torchvision, s, a.reps, ("diffusers", "ours"), 1, Path(tmp))
        for v, row in result["summary"].items():
            mem = row.get("cuda_peak_mib")
            print(f"{v} at {res} px: steady {row['steady_steps_per_s']:.3f} steps/s, peak "
                  + (f"GPU memory {mem:.0f} MiB" if mem is not None else f"RSS {row['peak_rss_mib']:.0f} MiB"))
        a.variants, a.warmup_epochs, a.out = "diffusers,ours", 1, out
        report(result, a, s, argv)


if __name__ == "__main__":
    main()
