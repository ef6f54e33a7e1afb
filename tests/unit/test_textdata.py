"""Text data for causal-lm (textdata.py), with the tiny BPE tokenizer built here (no downloads).

Behaviours tested: each of the three JSONL shapes becomes ids with the right loss mask (prompt masked,
completion and EOS learned; only assistant turns learned, system/user and template markers masked;
text all learned); a bad line (not JSON, not an object, none of the shapes, wrong types, no assistant
turn, not UTF-8) is exit 65 naming its line; an empty file is 65; truncation, packing, padding and the
eval split are pure and exact; over-long samples give one warning; the stream resumes at a position.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_trainer.errors import EXIT_DATAERR, DatasetError
from lora_trainer.textdata import (
    IGNORE,
    Conversation,
    Example,
    PromptCompletion,
    Text,
    TextStream,
    Tokenize,
    collate,
    length_warning,
    pack,
    parse_line,
    prepare,
    read_records,
    span_labels,
    split_eval,
    truncate,
)
from lora_trainer.tiny_llm import build_tokenizer, write_tiny_jsonl


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"))


def learned_text(tok, example: Example) -> str:
    return tok.decode([i for i, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE])


def test_prompt_completion_learns_the_completion_and_eos_only(tok) -> None:
    example = Tokenize(tok)(PromptCompletion(prompt="Q: the court\nA:", completion=" may end the lease."), 1, "f")
    assert example.input_ids[0] == tok.bos_token_id and example.input_ids[-1] == tok.eos_token_id
    assert learned_text(tok, example) == " may end the lease.</s>"
    n_prompt = len(tok("Q: the court\nA:")["input_ids"])
    assert set(example.labels[:n_prompt]) == {IGNORE}
    assert list(example.labels[n_prompt:]) == list(example.input_ids[n_prompt:])


def test_messages_learn_assistant_turns_only(tok) -> None:
    record = Conversation.model_validate({"messages": [
        {"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "the tenant must pay?"},
        {"role": "assistant", "content": "the rent."}, {"role": "user", "content": "when?"},
        {"role": "assistant", "content": "each month."},
    ]})
    example = Tokenize(tok)(record, 3, "f")
    full = tok.apply_chat_template([m.model_dump() for m in record.messages], tokenize=False)
    assert tok.decode(list(example.input_ids)) == full
    # Each assistant turn's content and its end token are learned; roles, system and user turns are not.
    assert learned_text(tok, example) == "the rent.</s>\neach month.</s>\n"


def test_text_learns_everything(tok) -> None:
    example = Tokenize(tok)(Text(text="the buyer must sign."), 1, "f")
    assert example.labels == example.input_ids
    assert tok.decode(list(example.input_ids)) == "<s>the buyer must sign.</s>"


@pytest.mark.parametrize(
    ("spans", "labels"),
    [([], [IGNORE] * 4), ([(0, 100)], [10, 11, 12, 13]), ([(2, 5)], [IGNORE, 11, 12, IGNORE]),
     ([(0, 2), (5, 7)], [10, IGNORE, IGNORE, 13])],
)
def test_span_labels(spans: list[tuple[int, int]], labels: list[int]) -> None:
    # tokens at chars [0,2) [2,4) [4,5) [5,7)
    assert span_labels([10, 11, 12, 13], [(0, 2), (2, 4), (4, 5), (5, 7)], spans) == labels


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ("{not json", "line 7 is not JSON"),
        ("[1, 2]", "line 7 is a JSON list, not an object"),
        ('{"question": "a", "answer": "b"}', "line 7 has none of the shapes"),
        ('{"prompt": "a"}', "line 7: completion: Field required"),
        ('{"text": 5}', "line 7: text: Input should be a valid string"),
        ('{"text": ""}', "line 7: text: String should have at least 1 character"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "line 7 has no assistant message"),
        ('{"messages": [{"role": "assistant"}]}', "line 7: messages.0.content: Field required"),
        ('{"messages": []}', "line 7: messages: List should have at least 1 item"),
    ],
)
def test_bad_lines_are_65_naming_the_line(line: str, needle: str) -> None:
    with pytest.raises(DatasetError) as info:
        parse_line(line, 7, "train_file")
    assert info.value.exit_code == EXIT_DATAERR
    assert info.value.message.startswith("train_file: ") and needle in info.value.message, info.value.message
    assert "\n" not in info.value.message


def test_read_records_names_the_line_and_refuses_empty(tmp_path: Path) -> None:
    good = json.dumps({"text": "a"})
    path = tmp_path / "d.jsonl"
    path.write_text(f"{good}\n\n{good}\n", encoding="utf-8")
    assert [n for n, _ in read_records(path, "train_file")] == [1, 3]  # blank lines are skipped
    path.write_bytes(f"{good}\n".encode() + b'{"text": "\xff"}\n')
    with pytest.raises(DatasetError, match=r"train_file: line 2 is not UTF-8"):
        read_records(path, "train_file")
    path.write_text(f"{good}\n{good}\n{{oops\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"line 3 is not JSON"):
        read_records(path, "train_file")
    for empty in ("", "\n  \n"):
        path.write_text(empty, encoding="utf-8")
        with pytest.raises(DatasetError, match=r"train_file: .* has no records") as info:
            read_records(path, "train_file")
        assert info.value.exit_code == EXIT_DATAERR


@pytest.mark.parametrize("shape", ["prompt-completion", "messages", "text"])
def test_tiny_jsonl_shapes_parse(shape: str, tmp_path: Path, tok) -> None:
    records = read_records(write_tiny_jsonl(tmp_path / "d.jsonl", shape, 6, seed=1), "train_file")
    prepared = prepare(records, Tokenize(tok), 4096, "train_file")
    assert len(prepared.examples) == 6 and prepared.truncated == 0


def test_truncation_counts_and_skips_what_has_nothing_left(tok) -> None:
    long_prompt = PromptCompletion(prompt="the court " * 40, completion=" yes.")
    records = [(1, Text(text="the notice.")), (2, Text(text="the party " * 30)), (3, long_prompt)]
    prepared = prepare(records, Tokenize(tok), 16, "train_file")
    assert (prepared.truncated, prepared.skipped, len(prepared.examples)) == (2, 1, 2)
    assert all(len(e.input_ids) <= 16 for e in prepared.examples)
    warning = length_warning("train_file", prepared, 3, 16)
    assert warning is not None and "2 of 3 samples are longer than max_seq_length (16 tokens" in warning
    assert "1 had nothing to learn left and were skipped" in warning and "\n" not in warning
    assert length_warning("train_file", prepare(records[:1], Tokenize(tok), 16, "f"), 1, 16) is None


def test_truncate_pack_collate_are_exact() -> None:
    a, b = Example((1, 2, 3), (IGNORE, 2, 3)), Example((4, 5, 6, 7, 8), (4, 5, 6, 7, 8))
    assert truncate(b, 3) == (Example((4, 5, 6), (4, 5, 6)), True)
    assert truncate(a, 3) == (a, False)
    assert pack([a, b], 3) == [Example((1, 2, 3), (IGNORE, 2, 3)), Example((4, 5, 6), (4, 5, 6)),
                               Example((7, 8), (7, 8))]
    batch = collate([a, b], pad_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 3, 0, 0], [4, 5, 6, 7, 8]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch.labels.tolist() == [[IGNORE, 2, 3, IGNORE, IGNORE], [4, 5, 6, 7, 8]]
    assert batch.num_tokens == 8


def test_eval_split_is_seeded_and_disjoint() -> None:
    train, held = split_eval(20, 0.2, seed=3)
    assert len(held) == 4 and sorted(train + held) == list(range(20))
    assert split_eval(20, 0.2, seed=3) == (train, held) and split_eval(20, 0.2, seed=4) != (train, held)
    assert len(split_eval(5, 0.01, seed=0)[1]) == 1  # at least one held out
    with pytest.raises(DatasetError, match="eval_fraction: 0.9 of 1 records leaves none to train on"):
        split_eval(1, 0.9, seed=0)


def test_stream_resumes_at_a_position() -> None:
    examples = [Example((i, i + 1), (i, i + 1)) for i in range(5)]
    whole = TextStream(examples, 0, seed=9)
    batches = [whole.next_samples(2).input_ids.tolist() for _ in range(6)]  # crosses two epochs
    resumed = TextStream(examples, 0, seed=9)
    first = TextStream(examples, 0, seed=9)
    for _ in range(3):
        first.next_samples(2)
    resumed.position = first.position
    assert [resumed.next_samples(2).input_ids.tolist() for _ in range(3)] == batches[3:]
