"""SDXL at 1024 px in bf16 on a GPU: `lora-train` against diffusers' train_text_to_image_lora_sdxl.py.

The real SDXL base 1.0 architecture (bench/sdxl_models.py "full": 2.6 B UNet parameters, both CLIP
text encoders, the VAE) with seeded random weights (nothing is downloaded; speed and memory do not
depend on the weights), 1024 px images, batch 1, LoRA rank 4, bf16 mixed precision, gradient
checkpointing, frozen text encoders, no checkpoints. Paired, interleaved runs as in bench_sdxl.py
(which has the measuring code); reported: steady steps/s and its ratio ours/diffusers, and the
peak GPU memory each process allocated (torch.cuda.max_memory_allocated).

Differences kept on purpose, each the program's own default: diffusers' script keeps the VAE in
fp32 under bf16 (it loads no separate VAE), lora-train keeps it in bf16 (fp32 only under fp16).

Without CUDA it prints SKIP and writes nothing, unless asked for the CPU smoke test:

    .venv/bin/python bench/gpu/sdxl.py --reps 2                 # on a GPU machine (about 12 min)
    .venv/bin/python bench/gpu/sdxl.py --device cpu --tiny      # smoke test: small model, 64 px, fp32

It lives under bench/gpu/ so that run_all.py (every bench/bench_*.py, on CPU machines) skips it.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/
from bench_sdxl import (  # noqa: E402
    BENCH,
    DEFAULT_SCRIPT,
    DEFAULT_TORCHVISION,
    Settings,
    check_inputs,
    report,
    run_bench,
)

GPU = Settings(size="full", resolution=1024, images=8, image_size=1152, batch_size=1, steps=20, threads=0,
               device="cuda", mixed_precision="bf16", gradient_checkpointing=True)
TINY_CPU = Settings(size="small", resolution=64, images=8, image_size=80, batch_size=1, steps=8, threads=1,
                    device="cpu", mixed_precision="no", gradient_checkpointing=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tiny", action="store_true", help="the small model at 64 px (with --device cpu: the smoke test)")
    p.add_argument("--diffusers-script", type=Path, default=DEFAULT_SCRIPT)
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
        # As the operator sets it in a GPU pod (lora-train's default determinism, exact, needs it); given to
        # both programs so that cuBLAS runs with one workspace setting in each.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    base = TINY_CPU if a.tiny else GPU
    s = Settings(**{**base.__dict__, "device": a.device,
                    "mixed_precision": "bf16" if a.device == "cuda" else "no",
                    "threads": 0 if a.device == "cuda" else 1,
                    "steps": a.steps or base.steps})
    a.out = a.out or BENCH / "results" / ("sdxl_gpu.json" if a.device == "cuda" and not a.tiny
                                          else f"sdxl_gpu_{a.device}_{'tiny' if a.tiny else 'full'}.json")
    if problem := check_inputs(a.diffusers_script, a.torchvision):
        print(f"SKIP: {problem}")
        return
    print(f"SDXL {s.size} at {s.resolution} px, {s.mixed_precision}, on {s.device}: {a.reps} paired repetitions", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-sdxl-gpu-") as tmp:
        result = run_bench(a.diffusers_script, a.torchvision, s, a.reps, ("diffusers", "ours"), 1, Path(tmp))
    for v, row in result["summary"].items():
        mem = row.get("cuda_peak_mib")
        print(f"{v}: steady {row['steady_steps_per_s']:.3f} steps/s, peak "
              + (f"GPU memory {mem:.0f} MiB" if mem is not None else f"RSS {row['peak_rss_mib']:.0f} MiB"))
    a.variants, a.warmup_epochs = "diffusers,ours", 1
    report(result, a, s, argv)


if __name__ == "__main__":
    main()
