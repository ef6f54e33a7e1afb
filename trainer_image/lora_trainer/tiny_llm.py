"""A tiny Llama-architecture causal LM and JSONL datasets, built locally with fixed seeds (no downloads).

The model (LlamaConfig: 2 layers, hidden 64, grouped-query attention; about 150K parameters) and a
byte-level BPE tokenizer trained here with the `tokenizers` library on a small built-in corpus, with
BOS/EOS/PAD tokens and a chat template, saved with ``save_pretrained``: the trainer's loading code
reads the folder like any user's model. Seconds to build.

    python -m lora_trainer.tiny_llm PATH                      the model folder
    python -m lora_trainer.tiny_llm --jsonl SHAPE N PATH       a dataset (prompt-completion|messages|text)
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
VOCAB_SIZE = 384
MAX_POSITIONS = 512
SHAPES = ("prompt-completion", "messages", "text")
# Renders each turn as <|role|>, its content and EOS; BOS once. A prefix of a conversation renders to
# a prefix of the whole (what the loss masks rely on).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}"
    "{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

_SUBJECTS = ["the tenant", "the landlord", "the court", "a contract", "the buyer", "the seller", "the patient",
             "the report", "a clause", "the agreement", "the notice", "the party"]
_VERBS = ["must pay", "may end", "shall notify", "can appeal", "will review", "must sign", "may renew",
          "shall deliver", "can refuse", "will record"]
_OBJECTS = ["the rent", "the lease", "within thirty days", "in writing", "the invoice", "the deposit",
            "the findings", "the claim", "before the hearing", "each month"]


def _sentence(rng: random.Random) -> str:
    return f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}."


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    """Sentences the tokenizer is trained on (and the datasets are drawn from)."""
    rng = random.Random(seed)
    return [_sentence(rng) for _ in range(n)] + ["<|system|>", "<|user|>", "<|assistant|>", "0123456789"]


def build_tokenizer(folder: Path, seed: int = 0):
    """Train a byte-level BPE on the corpus and save it as a transformers fast tokenizer with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=[PAD, BOS, EOS], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus(seed=seed), trainer=trainer)
    # BOS in front of plain text, as Llama's tokenizers do (the chat template writes its own).
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, model_max_length=MAX_POSITIONS,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return fast


def build_tiny_llm(folder: Path, seed: int = 0) -> Path:
    """Build and save a tiny LlamaForCausalLM with its tokenizer into `folder` (safetensors)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(folder, seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def tiny_record(shape: str, rng: random.Random) -> dict:
    """One JSONL record of `shape` (prompt-completion, messages or text)."""
    question, answer = _sentence(rng), _sentence(rng)
    if shape == "prompt-completion":
        return {"prompt": f"Q: {question}\nA:", "completion": f" {answer}"}
    if shape == "messages":
        turns = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": question},
                 {"role": "assistant", "content": answer}]
        if rng.random() < 0.5:  # some two-round conversations: two assistant turns to learn
            turns += [{"role": "user", "content": _sentence(rng)}, {"role": "assistant", "content": _sentence(rng)}]
        return {"messages": turns}
    if shape == "text":
        return {"text": " ".join(_sentence(rng) for _ in range(rng.randint(1, 3)))}
    raise ValueError(f"shape: {shape!r}; use one of {', '.join(SHAPES)}")


def write_tiny_jsonl(path: Path, shape: str, n: int, seed: int = 0) -> Path:
    """Write `n` records of one shape (prompt-completion | messages | text) as JSONL, drawn with `seed`."""
    rng = random.Random(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(tiny_record(shape, rng)) for _ in range(n)]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    """Build the tiny model, or a tiny dataset with --jsonl."""
    parser = argparse.ArgumentParser(prog="python -m lora_trainer.tiny_llm")
    parser.add_argument("path", type=Path)
    parser.add_argument("--jsonl", nargs=2, metavar=("SHAPE", "N"), help="write a dataset instead of the model")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.jsonl:
        write_tiny_jsonl(args.path, args.jsonl[0], int(args.jsonl[1]), args.seed)
    else:
        build_tiny_llm(args.path, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
