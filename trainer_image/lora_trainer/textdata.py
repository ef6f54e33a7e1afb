"""Text datasets for causal-LM LoRA: JSONL records -> token ids with loss masks -> exact batches.

Each line of `train_file` (and `eval_file`) is one record of one of three shapes:

    {"prompt": ..., "completion": ...}     loss on the completion (and the EOS after it) only
    {"messages": [{"role", "content"}...]} rendered with the tokenizer's chat template; loss on the
                                           assistant turns only (each turn's content and end token)
    {"text": ...}                          loss on every token

Other keys on a line are ignored. Checks before training (exit 65, DatasetError, naming the line):
a line that is not UTF-8 or not JSON, or none of the shapes (or a shape with wrong types, or
messages without an assistant turn); a file with no records. A sample longer than `max_seq_length`
tokens is truncated (its first tokens kept); they are counted and reported in ONE warning, and a
sample left with nothing to learn (a prompt longer than max_seq_length) is skipped and counted there too.

Choices where the issue is silent:
- prompt and completion are tokenized apart and concatenated (BOS from the tokenizer's own rule in
  front of the prompt, EOS appended), so the mask boundary is exact whatever the BPE merges;
- assistant spans are found by rendering each conversation prefix with the template (prefix with
  `add_generation_prompt`, then with the turn): a template that does not render prefixes as prefixes
  of the whole is refused (exit 65 naming the line);
- `eval_fraction` holds out round(n x fraction) records (at least one) drawn with the seed;
- packing ("wrapped", as TRL's): samples are concatenated in file order and cut into
  `max_seq_length` blocks once, before training; blocks are the stream's samples, so the stream
  position (epoch, index) resumes packed runs exactly. Attention crosses sample boundaries in a block;
- batches are right-padded to their longest sample; padding is never attended to nor learned.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lora_trainer.config import TrainConfig, format_validation_error
from lora_trainer.data import Position, derive_seed, epoch_order
from lora_trainer.dataset import Dataset, Fetch
from lora_trainer.errors import ConfigError, DatasetError, InputMissing
from lora_trainer.paths import shorten

log = logging.getLogger(__name__)

IGNORE = -100  # the label transformers' loss skips
SHAPES = '{"prompt", "completion"}, {"messages": [...]} or {"text"}'


class _Record(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class PromptCompletion(_Record):
    prompt: str
    completion: str


class Message(_Record):
    role: str = Field(min_length=1)
    content: str


class Conversation(_Record):
    messages: list[Message] = Field(min_length=1)


class Text(_Record):
    text: str = Field(min_length=1)


Record = PromptCompletion | Conversation | Text


@dataclass(frozen=True)
class Example:
    """One tokenized sample: ids and labels (IGNORE where no loss is taken), same length."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]


@dataclass(frozen=True)
class TextBatch:
    """One micro-batch: (B, L) ids, attention mask and labels; `num_tokens` real (unpadded) tokens."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    num_tokens: int


def parse_line(text: str, line: int, field: str) -> Record:
    """One JSONL line as a record (pure); DatasetError naming the line when it is none of the shapes."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise DatasetError(f"{field}: line {line} is not JSON ({shorten(str(exc), 80)}); write one JSON object "
                           "per line") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{field}: line {line} is a JSON {type(data).__name__}, not an object; "
                           f"write one of {SHAPES} per line")
    model: type[_Record]
    if "messages" in data:
        model = Conversation
    elif "prompt" in data or "completion" in data:
        model = PromptCompletion
    elif "text" in data:
        model = Text
    else:
        keys = ", ".join(sorted(map(str, data))[:6]) or "no keys"
        raise DatasetError(f"{field}: line {line} has none of the shapes {SHAPES} (found {shorten(keys, 80)}); "
                           "rename its keys")
    try:
        record = model.model_validate(data)
    except ValidationError as exc:
        raise DatasetError(f"{field}: line {line}: {format_validation_error(exc)}") from None
    if isinstance(record, Conversation) and not any(m.role == "assistant" for m in record.messages):
        raise DatasetError(f"{field}: line {line} has no assistant message, so nothing to learn; "
                           "add the assistant's reply or remove the line")
    return record


def read_records(path: Path, field: str) -> list[tuple[int, Record]]:
    """(line number, record) for every non-blank line; DatasetError for a bad line or an empty file."""
    records = []
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise DatasetError(f"{field}: line {number} is not UTF-8 (byte {exc.start}); save the file as "
                                   "UTF-8") from None
            if text.strip():
                records.append((number, parse_line(text, number, field)))
    if not records:
        raise DatasetError(f"{field}: {shorten(str(path))} has no records; write one JSON object per line")
    return records


def span_labels(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """Labels for ids whose characters start inside one of `spans` (char ranges); IGNORE elsewhere (pure)."""
    return [i if any(a <= start < b for a, b in spans) and end > start else IGNORE
            for i, (start, end) in zip(ids, offsets, strict=True)]


def prompt_completion(prompt_ids: list[int], completion_ids: list[int]) -> Example:
    """A prompt (no loss) followed by its completion (loss) (pure)."""
    return Example(tuple(prompt_ids + completion_ids), tuple([IGNORE] * len(prompt_ids) + completion_ids))


def truncate(example: Example, max_len: int) -> tuple[Example, bool]:
    """The first `max_len` tokens, and whether anything was cut (pure)."""
    if len(example.input_ids) <= max_len:
        return example, False
    return Example(example.input_ids[:max_len], example.labels[:max_len]), True


def learnable(example: Example) -> bool:
    """Whether any token after the first is labelled (the first is never predicted) (pure)."""
    return any(label != IGNORE for label in example.labels[1:])


def pack(examples: list[Example], max_len: int) -> list[Example]:
    """Concatenate in order and cut into blocks of `max_len` (the last may be shorter) (pure)."""
    ids = [t for e in examples for t in e.input_ids]
    labels = [t for e in examples for t in e.labels]
    blocks = [Example(tuple(ids[i:i + max_len]), tuple(labels[i:i + max_len])) for i in range(0, len(ids), max_len)]
    return [b for b in blocks if learnable(b)]


def collate(examples: list[Example], pad_id: int) -> TextBatch:
    """Right-pad to the longest example: padding gets attention 0 and label IGNORE (pure)."""
    width = max(len(e.input_ids) for e in examples)
    ids = [list(e.input_ids) + [pad_id] * (width - len(e.input_ids)) for e in examples]
    mask = [[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in examples]
    labels = [list(e.labels) + [IGNORE] * (width - len(e.labels)) for e in examples]
    return TextBatch(torch.tensor(ids), torch.tensor(mask), torch.tensor(labels), sum(map(sum, mask)))


class Tokenize:
    """Records -> Examples with one tokenizer (the base model's)."""

    def __init__(self, tokenizer: Any):
        self.tok = tokenizer
        self.eos = tokenizer.eos_token_id

    def _ids(self, text: str, special: bool) -> list[int]:
        return list(self.tok(text, add_special_tokens=special)["input_ids"])

    def _with_eos(self, ids: list[int]) -> list[int]:
        return ids + [self.eos] if self.eos is not None and (not ids or ids[-1] != self.eos) else ids

    def __call__(self, record: Record, line: int, field: str) -> Example:
        if isinstance(record, Text):
            ids = self._with_eos(self._ids(record.text, True))
            return Example(tuple(ids), tuple(ids))
        if isinstance(record, PromptCompletion):
            return prompt_completion(self._ids(record.prompt, True),
                                     self._with_eos(self._ids(record.completion, False)))
        return self._conversation(record, line, field)

    def _render(self, messages: list[dict], generation: bool) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)

    def _conversation(self, record: Conversation, line: int, field: str) -> Example:
        if not getattr(self.tok, "chat_template", None):
            raise ConfigError(f"{field}: line {line} has messages, but base_model's tokenizer has no chat template; "
                              "use a model with one (tokenizer_config.json chat_template) or prompt/completion lines")
        messages = [m.model_dump() for m in record.messages]
        full = self._render(messages, False)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before, after = self._render(messages[:i], True), self._render(messages[:i + 1], False)
            if not (after.startswith(before) and full.startswith(after)):
                raise DatasetError(f"{field}: line {line}: the chat template does not render this conversation's "
                                   "turns as prefixes of the whole, so assistant turns cannot be masked; "
                                   "use prompt/completion lines or another template")
            spans.append((len(before), len(after)))
        enc = self.tok(full, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        return Example(tuple(ids), tuple(span_labels(ids, [tuple(o) for o in enc["offset_mapping"]], spans)))


@dataclass
class Prepared:
    """Tokenized samples and what the length check found."""

    examples: list[Example]
    truncated: int = 0
    skipped: int = 0
    longest: int = 0


def prepare(records: list[tuple[int, Record]], tokenize: Any, max_len: int, field: str) -> Prepared:
    """Tokenize, truncate and drop samples with nothing left to learn; counts for the one warning."""
    out = Prepared([])
    for line, record in records:
        example = tokenize(record, line, field)
        out.longest = max(out.longest, len(example.input_ids))
        example, cut = truncate(example, max_len)
        out.truncated += cut
        if learnable(example):
            out.examples.append(example)
        else:
            out.skipped += 1
    return out


def length_warning(field: str, prepared: Prepared, total: int, max_len: int) -> str | None:
    """The one warning about over-long samples (pure), or None."""
    if not prepared.truncated:
        return None
    skipped = f"; {prepared.skipped} had nothing to learn left and were skipped" if prepared.skipped else ""
    return (f"{field}: {prepared.truncated} of {total} samples are longer than max_seq_length ({max_len} tokens, "
            f"longest {prepared.longest}) and were truncated{skipped}; raise max_seq_length to keep them whole")


def split_eval(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Record indices for training and for eval: round(n x fraction) (at least 1) held out with the seed (pure)."""
    n_eval = max(1, round(n * fraction))
    if n_eval >= n:
        raise DatasetError(f"eval_fraction: {fraction} of {n} records leaves none to train on; lower it or add records")
    held = set(epoch_order(n, derive_seed(seed, 0xE7A1), 0)[:n_eval])
    return [i for i in range(n) if i not in held], sorted(held)


class TextStream:
    """Serves micro-batches of examples in a fixed order that continues across epochs and resumes exactly."""

    def __init__(self, examples: list[Example], pad_id: int, seed: int):
        self.examples = examples
        self.pad_id = pad_id
        self.seed = seed
        self.position = Position()
        self._order: list[int] = []
        self._order_epoch = -1

    def _order_for(self, epoch: int) -> list[int]:
        if self._order_epoch != epoch:
            self._order = epoch_order(len(self.examples), self.seed, epoch)
            self._order_epoch = epoch
        return self._order

    def advance(self, batch_size: int) -> None:
        """Move past the next `batch_size` examples without reading them (another rank's share)."""
        self.position = self.position.advanced(batch_size, len(self.examples))

    def next_samples(self, batch_size: int) -> TextBatch:
        """The next `batch_size` examples, padded; advances the position."""
        picked = []
        epoch, index = self.position.epoch, self.position.index
        for _ in range(batch_size):
            if index >= len(self.examples):
                epoch, index = epoch + 1, 0
            picked.append(self.examples[self._order_for(epoch)[index]])
            index += 1
        self.position = Position(epoch, index)
        return collate(picked, self.pad_id)


def load_tokenizer(model_dir: Path) -> Any:
    """The base model's tokenizer (transformers AutoTokenizer, local files only)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputMissing(f"base_model: no tokenizer loads from {model_dir} ({shorten(first, 160)}); "
                           "save it beside the model with tokenizer.save_pretrained()") from None


def _examples(records: list[tuple[int, Record]], tokenize: Tokenize, config: TrainConfig, field: str
              ) -> list[Example]:
    prepared = prepare(records, tokenize, config.max_seq_length, field)
    if warning := length_warning(field, prepared, len(records), config.max_seq_length):
        log.warning(warning)
    if not prepared.examples:
        raise DatasetError(f"{field}: none of {len(records)} samples has anything to learn within max_seq_length "
                           f"({config.max_seq_length}); raise max_seq_length")
    return pack(prepared.examples, config.max_seq_length) if config.packing else prepared.examples


def open_dataset(config: TrainConfig, model_dir: Path, fetch: Fetch) -> Dataset:
    """Check and tokenize train_file (and the held-out split) before training; the exact stream over it."""
    records = read_records(fetch("train_file", config.train_file or "", True), "train_file")
    held: list[tuple[int, Record]] = []
    if config.eval_file:
        held = read_records(fetch("eval_file", config.eval_file, True), "eval_file")
    elif config.eval_fraction:
        keep, out = split_eval(len(records), config.eval_fraction, config.seed)
        records, held = [records[i] for i in keep], [records[i] for i in out]
    tokenizer = load_tokenizer(model_dir)
    tokenize = Tokenize(tokenizer)
    train = _examples(records, tokenize, config, "train_file")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    eval_batches = None
    if held:
        examples = _examples(held, tokenize, config, "eval_file" if config.eval_file else "eval_fraction")
        eval_batches = [collate(examples[i:i + config.batch_size], pad_id)
                        for i in range(0, len(examples), config.batch_size)]
    log.info("train_file: %d samples (%d tokens)%s", len(train), sum(len(e.input_ids) for e in train),
             f", {len(held)} held out for eval" if held else "")
    return Dataset(TextStream(train, pad_id, config.seed), len(train), eval_batches)
