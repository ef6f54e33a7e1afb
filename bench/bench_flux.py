"""Flux steps/s: `lora-train` against diffusers' own train_dreambooth_lora_flux.py, paired runs.

bench_sdxl.py's machinery (its step clock, interleaved paired repetitions, medians of paired
ratios, verdicts on steps per CPU second) on a Flux model: bench/flux_models.py "small" (FLUX.1-dev's
layout with a few million parameters, built from configs with a fixed seed), the same 16 PNGs (160 px;
metadata.csv for us, an imagefolder with metadata.jsonl passed as --dataset_name with --caption_column
text for diffusers, so both encode each step's own captions), the same settings (resolution 128,
centre crop, no flip, batch 2, LoRA rank 4 on the script's default targets: both streams' attention
and the double blocks' feed-forward layers, AdamW lr 1e-4 constant, fp32, guidance 3.5, weighting
scheme none, T5 sequence length 32 = the tiny tokenizer's, seed 1, no checkpoints, frozen text
encoders), same venv, one torch thread each. Variants: diffusers (the script, unchanged), ours (no
caches), ours-cached (cache_latents + cache_text_embeddings). Targets: >= 1.0 and >= 1.3.

    .venv/bin/python bench/bench_flux.py [--diffusers-script PATH] [--reps 3] [--steps 24]
"""

from __future__ import annotations

import csv
import json
import shutil
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import bench_sdxl as sdxl  # noqa: E402  (the shared machinery: clock, rates, summary, report)
from bench_sdxl import Settings  # noqa: E402

DEFAULT_SCRIPT = sdxl.THIRD_PARTY / "train_dreambooth_lora_flux.py"
DEFAULT_OUT = BENCH / "results" / "flux.json"
SCRIPT_PATH = "examples/dreambooth/train_dreambooth_lora_flux.py"
# The diffusers script's default lora_layers, given to lora-train as target_modules.
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
           "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]


def prepare(root: Path, s: Settings, dtype: str = "float32") -> tuple[Path, Path, Path]:
    """Build the model (weights stored in `dtype`) and the dataset twice (metadata.csv for lora-train,
    metadata.jsonl for diffusers)."""
    from flux_models import build_flux

    from lora_trainer.tiny import build_tiny_dataset

    model = build_flux(root / "model", s.size, seed=0, dtype=dtype)
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
    from lora_trainer.tiny_flux import T5_MAX_LENGTH

    args = ["--script", str(script), "--",
            "--pretrained_model_name_or_path", str(model), "--dataset_name", str(data), "--caption_column", "text",
            "--instance_prompt", "a photo", "--output_dir", str(out), "--resolution", str(s.resolution),
            "--center_crop", "--train_batch_size", str(s.batch_size), "--max_train_steps", str(steps),
            "--learning_rate", str(s.learning_rate), "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
            "--rank", str(s.rank), "--seed", str(s.seed), "--checkpointing_steps", str(10 * steps),
            "--mixed_precision", s.mixed_precision, "--dataloader_num_workers", "0", "--guidance_scale", "3.5",
            "--max_sequence_length", str(T5_MAX_LENGTH), "--weighting_scheme", "none"]
    return args + (["--gradient_checkpointing"] if s.gradient_checkpointing else [])


def ours_args(model: Path, data: Path, out: Path, s: Settings, steps: int, cached: bool) -> list[str]:
    """lora-train's command line: a config file written next to the output."""
    config = {
        "base_model": str(model), "train_data_dir": str(data), "output_dir": str(out), "resolution": s.resolution,
        "center_crop": True, "random_flip": False, "batch_size": s.batch_size, "max_train_steps": steps,
        "learning_rate": s.learning_rate, "lr_scheduler": "constant", "lora_rank": s.rank, "lora_alpha": s.rank,
        "target_modules": TARGETS, "seed": s.seed, "device": s.device, "mixed_precision": s.mixed_precision,
        "gradient_checkpointing": s.gradient_checkpointing, "guidance_scale": 3.5, "weighting_scheme": "none",
        "cache_latents": cached, "cache_text_embeddings": cached, "cache_dir": str(out.parent / "cache"),
    }
    path = out.parent / f"{out.name}.json"
    path.write_text(json.dumps(config), encoding="utf-8")  # YAML is a superset of JSON
    return ["--module", "lora_trainer", "--", "--config", str(path)]


def use_flux() -> None:
    """Point bench_sdxl's shared run loop at the Flux model, data and command lines."""
    sdxl.prepare, sdxl.diffusers_args, sdxl.ours_args = prepare, diffusers_args, ours_args


def main(argv: list[str] | None = None) -> None:
    use_flux()
    a = sdxl.parse_args(argv)
    if a.diffusers_script == sdxl.DEFAULT_SCRIPT:
        a.diffusers_script = DEFAULT_SCRIPT
    if a.out == sdxl.DEFAULT_OUT:
        a.out = DEFAULT_OUT
    s = Settings(size=a.size, resolution=a.resolution, batch_size=a.batch_size, steps=a.steps, threads=a.threads)
    variants = tuple(v for v in a.variants.split(",") if v)
    if problem := check_inputs(a.diffusers_script, a.torchvision):
        print(f"SKIP: {problem}")
        return
    print(f"Flux steps/s, {a.reps} paired repetitions of {', '.join(variants)} ({s.steps} steps each)", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-flux-") as tmp:
        result = sdxl.run_bench(a.diffusers_script, a.torchvision, s, a.reps, variants, a.warmup_epochs, Path(tmp))
    sdxl.report(result, a, s, argv)


def check_inputs(script: Path, torchvision: Path) -> str | None:
    """Why the reference cannot run, or None."""
    if not script.is_file():
        return (f"no diffusers script at {script}: fetch huggingface/diffusers and "
                f"`git --git-dir=... show HEAD:{SCRIPT_PATH} > {script}`")
    return sdxl.check_inputs(script, torchvision)


if __name__ == "__main__":
    main()
