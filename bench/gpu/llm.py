"""GPU benchmark of causal-lm LoRA: tokens/s and peak GPU memory of `lora-train` on a 1-8B Llama in bf16.

Nothing can be downloaded, so the model is a LlamaConfig preset with the shapes of Llama 3.2 1B / 3B or
Llama 3.1 8B (vocabulary 128256 included, so the embedding and LM head cost what the real ones do), its
weights random from a fixed seed, saved in bf16 with save_pretrained beside the tests' tokenizer
(lora_trainer.tiny_llm: every token id it makes is inside the preset's vocabulary). The data are JSONL
`text` records longer than --seq-len tokens, so every step trains exactly batch x seq-len tokens.

Two variants, interleaved (--reps each, after one untimed warm-up run of each):
  lora-train  lora_trainer.train.Trainer in this process (task causal-lm, mixed_precision bf16: the frozen
              base in bf16, LoRA weights in fp32 under autocast; --gradient-checkpointing; --qlora loads the
              base in 4-bit NF4 and needs bitsandbytes), step end times from its logs/metrics.jsonl
  bare        the same model, dtype, autocast and LoRA with peft and torch AdamW, and nothing else
Reported per variant: steady tokens/s (steps after --warmup) and peak GPU memory
(torch.cuda.max_memory_allocated, reset before each run); the ratio lora-train/bare (target >= 0.95).
With `--device cpu` (what the smoke test runs, with --tiny: a 2-layer model) training is fp32 and the
peak is the process's max RSS instead.

    .venv/bin/python bench/gpu/llm.py --size 1b                     # on a GPU machine
    .venv/bin/python bench/gpu/llm.py --size 8b --gradient-checkpointing --batch 2
    .venv/bin/python bench/gpu/llm.py --device cpu --tiny --steps 4 --reps 1 --out /tmp/x.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# As the operator does in a pod: the trainer's default determinism (exact) needs it before cuBLAS starts,
# and the bare loop (run first, in this process) starts cuBLAS (lora_trainer.determinism).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch  # noqa: E402

TARGET_VS_BARE = 0.95
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "results" / "llm_gpu.json"  # bench/results/
# Llama 3.x shapes (config.json of the released models); tiny is for smoke runs on a CPU.
PRESETS: dict[str, dict] = {
    "1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
           "num_key_value_heads": 8, "vocab_size": 128256, "rope_theta": 500000.0},
    "3b": {"hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28, "num_attention_heads": 24,
           "num_key_value_heads": 8, "vocab_size": 128256, "rope_theta": 500000.0},
    "8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "vocab_size": 128256, "rope_theta": 500000.0},
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 512},
}


def build_model(folder: Path, shape: dict, dtype: torch.dtype, device: str, seq_len: int, seed: int = 0) -> int:
    """Save a random-weight LlamaForCausalLM of `shape` (in `dtype`, initialised on `device`) with the tests'
    tokenizer; its parameter count."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_trainer.tiny_llm import build_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(folder, seed)
    assert len(tok) <= shape["vocab_size"], "the tokenizer's ids must fit the preset's vocabulary"
    config = LlamaConfig(max_position_embeddings=max(seq_len, 512), bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
                         **shape)
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(folder, safe_serialization=True)
    n = sum(p.numel() for p in model.parameters())
    del model
    return n


def write_long_texts(path: Path, n: int, words: int, seed: int = 0) -> Path:
    """`n` JSONL {"text"} records of about `words` words each, from the tiny corpus."""
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


def cuda(args: argparse.Namespace) -> bool:
    return args.device == "cuda"


def run_lora_train(args: argparse.Namespace, model: Path, data: Path, root: Path, steps: int) -> list[float]:
    """Trainer.run in this process; step end times from its logs/metrics.jsonl."""
    from lora_trainer.config import parse_config
    from lora_trainer.signals import StopFlag
    from lora_trainer.train import Trainer

    config = parse_config({
        "task": "causal-lm", "base_model": str(model), "train_file": str(data), "output_dir": str(root / "out"),
        "work_dir": str(root / "work"), "cache_dir": str(root / "cache"), "max_seq_length": args.seq_len,
        "lora_rank": args.rank, "lora_alpha": 2 * args.rank, "target_modules": TARGET_MODULES,
        "batch_size": args.batch, "max_train_steps": steps, "learning_rate": 1e-4, "seed": 7,
        "device": args.device, "mixed_precision": "bf16" if cuda(args) else "no",
        "gradient_checkpointing": args.gradient_checkpointing, "load_in_4bit": args.qlora, "log_every": 10,
    })
    Trainer(config, StopFlag()).run()
    text = (root / "work" / "logs" / "metrics.jsonl").read_text(encoding="utf-8")
    rows = sorted((json.loads(line) for line in text.splitlines() if line.strip()), key=lambda r: r["step"])
    return [float(r["time"]) for r in rows if "loss" in r]


def run_bare(args: argparse.Namespace, model: Path, data: Path, root: Path, steps: int) -> list[float]:
    """peft LoRA + torch AdamW with the trainer's precision scheme, and nothing else."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.bfloat16 if cuda(args) else torch.float32
    tok = AutoTokenizer.from_pretrained(model)
    texts = [json.loads(line)["text"] for line in data.read_text(encoding="utf-8").splitlines() if line.strip()]
    ids = tok(texts, truncation=True, max_length=args.seq_len, return_tensors="pt").input_ids.to(args.device)
    torch.manual_seed(7)
    base = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).to(args.device)
    base.requires_grad_(False)
    if args.gradient_checkpointing:
        base.gradient_checkpointing_enable()
        base.enable_input_require_grads()
    net = get_peft_model(base, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                          target_modules=TARGET_MODULES, task_type="CAUSAL_LM"))
    params = [p for p in net.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    net.train()
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    times: list[float] = []
    for step in range(steps):
        batch = ids[[(step * args.batch + j) % len(ids) for j in range(args.batch)]]
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=cuda(args)):
            loss = net(input_ids=batch, attention_mask=torch.ones_like(batch), labels=batch).loss
        loss.float().backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda(args):
            torch.cuda.synchronize()
        times.append(time.time())
    return times


RUNNERS = {"lora-train": run_lora_train, "bare": run_bare}


def peak_memory_mib(args: argparse.Namespace) -> float:
    """Peak GPU memory allocated since the last reset (CUDA), else this process's max RSS."""
    if cuda(args):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine(args: argparse.Namespace) -> dict:
    out = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
           "cpu_cores": os.cpu_count()}
    if cuda(args):
        props = torch.cuda.get_device_properties(0)
        out |= {"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                "cuda": torch.version.cuda}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--size", choices=tuple(PRESETS), default="1b")
    parser.add_argument("--tiny", action="store_true", help="the tiny preset (smoke runs)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sample (default 2048; 64 with --tiny)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--qlora", action="store_true", help="load_in_4bit (bitsandbytes, CUDA)")
    parser.add_argument("--only", default="lora-train,bare")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.tiny:
        args.size = "tiny"
    args.seq_len = args.seq_len or (64 if args.size == "tiny" else 2048)
    if cuda(args) and not torch.cuda.is_available():
        print("bench_llm_gpu: no CUDA device here; run on a GPU machine, or --device cpu --tiny for a smoke run",
              file=sys.stderr)
        return 2
    args.warmup = min(args.warmup, args.steps - 1)
    variants = [v for v in RUNNERS if v in args.only.split(",")]
    tokens_per_step = args.batch * args.seq_len
    rates: dict[str, list[float]] = {v: [] for v in variants}
    peaks: dict[str, list[float]] = {v: [] for v in variants}
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-llm-gpu-") as tmp:
        root = Path(tmp)
        dtype = torch.bfloat16 if cuda(args) else torch.float32
        n_params = build_model(root / "model", PRESETS[args.size], dtype, args.device, args.seq_len)
        data = write_long_texts(root / "train.jsonl", max(64, 4 * args.batch), words=2 * args.seq_len)
        print(f"{args.size}: {n_params / 1e9:.2f}B parameters ({dtype}), batch {args.batch} x {args.seq_len} tokens, "
              f"{args.steps} steps, {args.reps} reps on {args.device}", flush=True)
        for variant in variants:
            RUNNERS[variant](args, root / "model", data, root / f"warm-{variant}", args.warmup + 1)
        for rep in range(args.reps):
            for variant in variants[rep % len(variants):] + variants[:rep % len(variants)]:
                if cuda(args):
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                times = RUNNERS[variant](args, root / "model", data, root / f"{variant}-{rep}", args.steps)
                assert len(times) == args.steps, f"{variant}: {len(times)} step times for {args.steps} steps"
                rate = (len(times) - args.warmup) * tokens_per_step / (times[-1] - times[args.warmup - 1])
                rates[variant].append(rate)
                peaks[variant].append(peak_memory_mib(args))
                print(f"  rep {rep} {variant:<11} {rate:10.0f} tokens/s  peak {peaks[variant][-1]:8.0f} MiB", flush=True)
    medians = {v: statistics.median(r) for v, r in rates.items()}
    result: dict = {
        "benchmark": "llm_gpu", "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)), "seconds": round(time.time() - started, 1),
        "machine": machine(args), "settings": {**{k: v for k, v in vars(args).items() if k != "out"},
                                               "model_shape": PRESETS[args.size], "model_parameters": n_params,
                                               "tokens_per_step": tokens_per_step},
        "tokens_per_second": rates, "median_tokens_per_second": medians,
        "peak_memory_mib": peaks, "peak_memory_kind": "cuda max_memory_allocated" if cuda(args) else "process max RSS",
    }
    for v in variants:
        print(f"{v:<11} median {medians[v]:10.0f} tokens/s, peak {max(peaks[v]):8.0f} MiB")
    if {"lora-train", "bare"} <= set(variants):
        paired = [a / b for a, b in zip(rates["lora-train"], rates["bare"], strict=True)]
        ratio = statistics.median(paired)
        result["ratio_lora_train_to_bare"] = {"paired": paired, "median_paired": ratio, "target": TARGET_VS_BARE,
                                              "pass": ratio >= TARGET_VS_BARE}
        print(f"lora-train/bare {ratio:.3f}  target >= {TARGET_VS_BARE}  {'PASS' if ratio >= TARGET_VS_BARE else 'FAIL'}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
