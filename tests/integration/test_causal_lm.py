"""The causal-lm task on the tiny Llama (built here from a config, tokenizer trained locally).

Behaviours tested:
- a run on messages data learns (loss goes down), writes the PEFT adapter at the root, intermediate
  adapters under checkpoints/adapter_step_N/, config_backup.yaml with the resolved Llama targets,
  logs with eval_loss every eval_steps (metrics.jsonl and TensorBoard), tokens/s in progress.json;
- the adapter loads with PeftModel.from_pretrained(base, out) and changes the logits; merge: true
  writes a merged model whose logits equal the adapter's;
- a run stopped as on SIGTERM (exit 75) and resumed gives a sha256-equal adapter, with and without packing;
- `lora-train --config` trains prompt/completion data end to end (exit 0);
- bad data is exit 65 naming the line, an empty file 65, load_in_4bit on CPU 78 naming the fix.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lora_trainer import contract
from lora_trainer.config import parse_config
from lora_trainer.errors import EXIT_CONFIG, EXIT_DATAERR, EXIT_PREEMPTED, Preempted, UserError
from lora_trainer.signals import StopFlag
from lora_trainer.tasks.causal_lm import ADAPTER_CONFIG, ADAPTER_WEIGHTS, MERGED_DIR
from lora_trainer.tiny_llm import build_tiny_llm, write_tiny_jsonl
from lora_trainer.train import Trainer, read_losses, read_metric


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llm(tmp_path_factory.mktemp("tiny-llm") / "model")


@pytest.fixture(scope="module")
def chats(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_jsonl(tmp_path_factory.mktemp("chats") / "train.jsonl", "messages", 20, seed=2)


def llm_config(model: Path, data: Path, out: Path, **extra: object):
    base = {
        "task": "causal-lm", "base_model": str(model), "train_file": str(data), "output_dir": str(out),
        "max_seq_length": 128, "lora_rank": 4, "batch_size": 4, "max_train_steps": 12, "learning_rate": 1e-2,
        "save_steps": 4, "keep_last": 0, "seed": 3, "cache_dir": str(out.parent / "cache"), "log_every": 4,
    }
    return parse_config({**base, **extra})


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def trained(tiny_llm: Path, chats: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("llm") / "out"
    Trainer(llm_config(tiny_llm, chats, out, eval_fraction=0.2, eval_steps=4, merge=True)).run()
    return out


def test_trains_and_writes_the_layout(trained: Path) -> None:
    metrics = (trained / "logs/metrics.jsonl").read_text()
    losses = read_losses(metrics)
    assert sorted(losses) == list(range(1, 13))
    assert sum(losses[s] for s in (10, 11, 12)) < 0.98 * sum(losses[s] for s in (1, 2, 3)), losses
    assert sorted(read_metric(metrics, "eval_loss")) == [4, 8, 12]
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, contract.CONFIG_BACKUP, contract.PROGRESS_FILE, "logs/train.log",
                 f"{MERGED_DIR}/config.json", f"{MERGED_DIR}/model.safetensors", f"{MERGED_DIR}/tokenizer.json",
                 *(f"checkpoints/adapter_step_{s}/{f}" for s in (4, 8, 12) for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS))):
        assert (trained / name).is_file(), name
    assert not list(trained.glob("checkpoints/pytorch_lora_weights_step_*"))
    backup = yaml.safe_load((trained / contract.CONFIG_BACKUP).read_text())
    assert backup["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]  # Llama's, resolved
    progress = contract.Progress.model_validate_json((trained / contract.PROGRESS_FILE).read_text())
    assert progress.state == "finished" and progress.tokens_per_second and progress.tokens_per_second > 0
    adapter = json.loads((trained / ADAPTER_CONFIG).read_text())
    assert (adapter["peft_type"], adapter["task_type"], adapter["r"]) == ("LORA", "CAUSAL_LM", 4)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(trained / "logs"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss/eval")] == [4, 8, 12]


def test_adapter_loads_in_peft_and_changes_the_logits(trained: Path, tiny_llm: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 40, 41, 42, 43, 44]])
    base = AutoModelForCausalLM.from_pretrained(tiny_llm).eval()
    with torch.no_grad():
        plain = base(ids).logits
    tuned = PeftModel.from_pretrained(base, str(trained)).eval()
    with torch.no_grad():
        adapted = tuned(ids).logits
    assert (adapted - plain).abs().max() > 1e-3
    merged = AutoModelForCausalLM.from_pretrained(trained / MERGED_DIR).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted, atol=1e-4, rtol=1e-4)


class StopAfter(StopFlag):
    """As if SIGTERM arrived once `steps` optimizer steps were done (the loop asks before each step)."""

    def __init__(self, steps: int) -> None:
        super().__init__()
        self.asked = 0
        self.steps = steps

    @property
    def requested(self) -> bool:
        self.asked += 1
        if self.asked > self.steps:
            self.request()
        return super().requested


@pytest.mark.parametrize("packing", [False, True])
def test_stopped_and_resumed_is_bit_exact(packing: bool, tiny_llm: Path, chats: Path, tmp_path: Path) -> None:
    reference = tmp_path / "ref" / "out"
    Trainer(llm_config(tiny_llm, chats, reference, packing=packing, max_train_steps=8, save_steps=3)).run()
    out = tmp_path / "run" / "out"
    config = llm_config(tiny_llm, chats, out, packing=packing, max_train_steps=8, save_steps=3)
    with pytest.raises(Preempted) as stopped:
        Trainer(config, stop=StopAfter(5)).run()
    assert stopped.value.exit_code == EXIT_PREEMPTED and stopped.value.step == 5
    result = Trainer(config).run()
    assert result.resumed_from == 5
    assert sha(out / ADAPTER_WEIGHTS) == sha(reference / ADAPTER_WEIGHTS)
    ref_losses = read_losses((reference / "logs/metrics.jsonl").read_text())
    assert read_losses((out / "logs/metrics.jsonl").read_text()) == ref_losses


def test_lora_train_cli_trains_prompt_completion(tiny_llm: Path, tmp_path: Path) -> None:
    data = write_tiny_jsonl(tmp_path / "pc.jsonl", "prompt-completion", 8, seed=5)
    config = {"task": "causal-lm", "base_model": str(tiny_llm), "train_file": str(data),
              "output_dir": str(tmp_path / "out"), "max_train_steps": 2, "batch_size": 2,
              "cache_dir": str(tmp_path / "cache"), "lora_target_mlp": True}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    proc = subprocess.run([sys.executable, "-m", "lora_trainer", "--config", str(tmp_path / "c.yaml")],
                          capture_output=True, text=True, env={"PATH": "", "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    adapter = json.loads((tmp_path / "out" / ADAPTER_CONFIG).read_text())
    assert sorted(adapter["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


@pytest.mark.parametrize(
    ("content", "extra", "code", "needle"),
    [
        ('{"text": "ok"}\n{"prompt": "a", "answer": "b"}\n', {}, EXIT_DATAERR, "train_file: line 2: completion"),
        ('{"text": "ok"}\n\nnot json\n', {}, EXIT_DATAERR, "train_file: line 3 is not JSON"),
        ("", {}, EXIT_DATAERR, "has no records"),
        ('{"text": "ok"}\n', {"load_in_4bit": True}, EXIT_CONFIG, "load_in_4bit: 4-bit QLoRA needs a CUDA GPU"),
        ('{"text": "ok"}\n', {"target_modules": ["to_q"]}, EXIT_CONFIG, "target_modules: ['to_q'] match no module"),
    ],
)
def test_bad_input_exit_codes(content: str, extra: dict, code: int, needle: str, tiny_llm: Path,
                              tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text(content, encoding="utf-8")
    with pytest.raises(UserError) as info:
        Trainer(llm_config(tiny_llm, data, tmp_path / "out", device="cpu", **extra)).run()
    assert info.value.exit_code == code and needle in info.value.message, info.value.message
    assert "\n" not in info.value.message
