"""LLM LoRA throughput: `lora-train` (task causal-lm) against TRL's SFTTrainer and a bare peft loop.

One session, one process, the same venv. Every variant trains the same model, data, LoRA and batch:

- model: a Llama-architecture causal LM built here from a LlamaConfig with a fixed seed (hidden 256,
  4 layers, 8 heads with 4 KV heads, MLP 688, about 3.3M parameters: 8x the tests' tiny one in
  width x depth) with the tests' tokenizer (lora_trainer.tiny_llm), saved with save_pretrained;
- data: JSONL `text` records longer than --seq-len tokens, so every sample is truncated to exactly
  --seq-len tokens: no padding anywhere, and every variant runs tensors of the same shape
  (tokens per step = batch x seq-len in all three);
- LoRA r 8, alpha 16, dropout 0 on q_proj, k_proj, v_proj, o_proj; AdamW lr 1e-4, weight decay 0.01,
  constant schedule, grad-norm clipping 1.0; fp32 on CPU; torch threads --torch-threads (default 1:
  on a small shared machine more OpenMP threads than free cores make step times swing).

Variants (rotated each repetition, so none always runs first; one untimed warm-up run of each first):
  lora-train  lora_trainer.train.Trainer in this process on a YAML-equivalent config (local output,
              no checkpoints); step end times from the `time` column of its logs/metrics.jsonl
  trl         trl.SFTTrainer with gradient checkpointing off (TRL's SFTConfig turns it on by default,
              which recomputes every forward in the backward), otherwise its
              defaults (AdamW as transformers picks it, entropy and token-accuracy metrics); no saving,
              report_to none; step end times from a callback's on_step_end
  bare        AutoModelForCausalLM + peft get_peft_model + torch AdamW over pre-tokenized batches:
              forward with labels, backward, clip, step, zero_grad; time after each step
Steady tokens/s = (steps after --warmup) x batch x seq-len / their wall time. Ratios: lora-train /
trl (target >= 1.0) and lora-train / bare (target >= 0.95), as the median of paired per-repetition
ratios, beside the ratio of medians.

    .venv/bin/python bench/bench_llm.py [--reps 5] [--steps 40] [--out bench/results/llm.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

TARGET_VS_TRL = 1.0
TARGET_VS_BARE = 0.95
VARIANTS = ("lora-train", "trl", "bare")
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]
DEFAULT_OUT = Path(__file__).parent / "results" / "llm.json"
MODEL_SHAPE = {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 8,
               "num_key_value_heads": 4}


def build_model(folder: Path, shape: dict, seed: int = 0) -> Path:
    """A LlamaForCausalLM of `shape` with the tests' tokenizer, random weights from `seed`, saved to `folder`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_trainer.tiny_llm import MAX_POSITIONS, build_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(folder, seed)
    config = LlamaConfig(vocab_size=len(tok), max_position_embeddings=MAX_POSITIONS, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
                         **shape)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    return folder


def write_long_texts(path: Path, n: int, words: int, seed: int = 0) -> Path:
    """`n` JSONL {"text"} records of about `words` words each (drawn from the tiny corpus with `seed`)."""
    from lora_trainer.tiny_llm import corpus

    rng = random.Random(seed)
    sentences = corpus(seed=seed)[:-4]  # the corpus ends with the special markers
    lines = []
    for _ in range(n):
        text: list[str] = []
        while len(text) < words:
            text += rng.choice(sentences).split()
        lines.append(json.dumps({"text": " ".join(text)}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def trainer_config(args: argparse.Namespace, model: Path, data: Path, root: Path, steps: int) -> dict:
    """What `lora-train --config` would read for this run (snake_case keys)."""
    return {
        "task": "causal-lm", "base_model": str(model), "train_file": str(data), "output_dir": str(root / "out"),
        "work_dir": str(root / "work"), "cache_dir": str(root / "cache"), "max_seq_length": args.seq_len,
        "lora_rank": args.rank, "lora_alpha": 2 * args.rank, "target_modules": TARGET_MODULES,
        "batch_size": args.batch, "max_train_steps": steps, "learning_rate": 1e-4, "lr_scheduler": "constant",
        "seed": 7, "device": "cpu", "log_every": 10,
    }


def run_lora_train(args: argparse.Namespace, model: Path, data: Path, root: Path, steps: int) -> list[float]:
    """Trainer.run in this process; step end times from the `time` column of its logs/metrics.jsonl."""
    from lora_trainer.config import parse_config
    from lora_trainer.signals import StopFlag
    from lora_trainer.train import Trainer

    config = parse_config(trainer_config(args, model, data, root, steps))
    Trainer(config, StopFlag()).run()
    text = (root / "work" / "logs" / "metrics.jsonl").read_text(encoding="utf-8")
    rows = sorted((json.loads(line) for line in text.splitlines() if line.strip()), key=lambda r: r["step"])
    return [float(r["time"]) for r in rows if "loss" in r]


def run_trl(args: argparse.Namespace, model: Path, data: Path, root: Path, steps: int) -> list[float]:
    """trl.SFTTrainer on the same model, records, LoRA and batch; step end times from a callback."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    times: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, *_: object, **__: object) -> None:
            times.append(time.time())

    records = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines() if line.strip()]
    sft = SFTConfig(
        output_dir=str(root / "trl"), per_device_train_batch_size=args.batch, max_steps=steps, learning_rate=1e-4,
        lr_scheduler_type="constant", weight_decay=0.01, max_grad_norm=1.0, seed=7, use_cpu=True, bf16=False,
        fp16=False, report_to="none", save_strategy="no", logging_steps=10, disable_tqdm=True,
        dataloader_num_workers=0, max_length=args.seq_len, packing=False, dataset_text_field="text",
        gradient_checkpointing=False,  # TRL turns it on by default; lora-train and bare run without it
    )
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32),
        args=sft, train_dataset=Dataset.from_list(records), processing_class=AutoTokenizer.from_pretrained(model),
        peft_config=LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=TARGET_MODULES,
                               task_type="CAUSAL_LM"),
        callbacks=[StepClock()],
    )
    shape = next(iter(trainer.get_train_dataloader()))["input_ids"].shape
    assert tuple(shape) == (args.batch, args.seq_len), f"TRL batches are {tuple(shape)}, not batch x seq-len"
    trainer.train()
    return times


def run_bare(args: argparse.Namespace, model: Path, data: Path, root: Path, steps: int) -> list[float]:
    """The per-step work of LoRA training on pre-tokenized batches, and nothing else."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    texts = [json.loads(line)["text"] for line in data.read_text(encoding="utf-8").splitlines() if line.strip()]
    ids = tok(texts, truncation=True, max_length=args.seq_len, return_tensors="pt").input_ids
    torch.manual_seed(7)
    net = get_peft_model(AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32),
                         LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                    target_modules=TARGET_MODULES, task_type="CAUSAL_LM"))
    net.train()
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, foreach=False)
    times: list[float] = []
    for step in range(steps):
        rows = [(step * args.batch + j) % len(ids) for j in range(args.batch)]
        batch = ids[rows]
        net(input_ids=batch, attention_mask=torch.ones_like(batch), labels=batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=False)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.time())
    return times


RUNNERS: dict[str, Callable[[argparse.Namespace, Path, Path, Path, int], list[float]]] = {
    "lora-train": run_lora_train, "trl": run_trl, "bare": run_bare,
}


def steady_tokens_per_second(times: list[float], warmup: int, tokens_per_step: int) -> float:
    """Tokens/s over steps warmup+1..N (times[i] is when step i+1 ended)."""
    return (len(times) - warmup) * tokens_per_step / (times[-1] - times[warmup - 1])


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def machine() -> dict:
    """Where the numbers were taken."""
    cpuinfo = Path("/proc/cpuinfo")
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                  if line.startswith("model name")), "") if cpuinfo.exists() else platform.processor()
    versions = {}
    for name in ("transformers", "peft", "trl", "accelerate", "datasets"):
        try:
            versions[name] = __import__(name).__version__
        except Exception as exc:  # a broken install is worth recording, not fatal
            versions[name] = f"unavailable ({type(exc).__name__})"
    return {"cpu_cores": os.cpu_count(), "cpu_model": model, "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, **versions}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions of each variant (interleaved)")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of the steady rate")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--records", type=int, default=64)
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--only", default=",".join(VARIANTS), help="variants to run (comma-separated)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    variants = [v for v in VARIANTS if v in args.only.split(",")]
    torch.set_num_threads(args.torch_threads)
    tokens_per_step = args.batch * args.seq_len
    rates: dict[str, list[float]] = {v: [] for v in variants}
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-llm-") as tmp:
        root = Path(tmp)
        model = build_model(root / "model", MODEL_SHAPE)
        data = write_long_texts(root / "train.jsonl", args.records, words=2 * args.seq_len)
        n_params = sum(t.numel() for t in load_file(str(model / "model.safetensors")).values())
        print(f"model {n_params / 1e6:.2f}M parameters, {args.records} records, batch {args.batch} x "
              f"{args.seq_len} tokens, {args.steps} steps (warm-up {args.warmup}), {args.reps} reps", flush=True)
        for variant in variants:  # untimed: lazy imports and first-call costs land here
            t0 = time.monotonic()
            RUNNERS[variant](args, model, data, root / f"warm-{variant}", args.warmup + 2)
            print(f"  untimed warm-up {variant} ({time.monotonic() - t0:.0f}s)", flush=True)
        for rep in range(args.reps):
            for variant in variants[rep % len(variants):] + variants[:rep % len(variants)]:
                times = RUNNERS[variant](args, model, data, root / f"{variant}-{rep}", args.steps)
                assert len(times) == args.steps, f"{variant}: {len(times)} step times for {args.steps} steps"
                rates[variant].append(steady_tokens_per_second(times, args.warmup, tokens_per_step))
                print(f"  rep {rep} {variant:<11} {rates[variant][-1]:8.0f} tokens/s", flush=True)
    medians = {v: statistics.median(r) for v, r in rates.items()}
    ratios: dict[str, dict] = {}
    for ref, target in (("trl", TARGET_VS_TRL), ("bare", TARGET_VS_BARE)):
        if ref in rates and "lora-train" in rates:
            paired = [a / b for a, b in zip(rates["lora-train"], rates[ref], strict=True)]
            ratio = statistics.median(paired)
            ratios[f"lora-train/{ref}"] = {"paired": paired, "median_paired": ratio,
                                           "ratio_of_medians": medians["lora-train"] / medians[ref],
                                           "target": target, "pass": ratio >= target}
    print()
    for v in variants:
        print(f"{v:<11} median {medians[v]:8.0f} tokens/s  (runs: {', '.join(f'{r:.0f}' for r in rates[v])})")
    for name, r in ratios.items():
        print(f"{name:<20} {r['median_paired']:.3f} (paired {min(r['paired']):.3f}-{max(r['paired']):.3f}; "
              f"ratio of medians {r['ratio_of_medians']:.3f})  target >= {r['target']}  {verdict(r['pass'])}")
    result = {
        "benchmark": "llm", "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)), "seconds": round(time.time() - started, 1),
        "load_average_after": os.getloadavg(), "machine": machine(),
        "settings": {**{k: v for k, v in vars(args).items() if k != "out"}, "model_shape": MODEL_SHAPE,
                     "model_parameters": n_params, "tokens_per_step": tokens_per_step,
                     "target_modules": TARGET_MODULES},
        "tokens_per_second": rates, "median_tokens_per_second": medians, "ratios": ratios,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
