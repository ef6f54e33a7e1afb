"""`lora-train` with two training processes (gloo on CPU, tiny SD): training, SIGTERM, world size.

Behaviours tested:
- a 2-process run trains: finite losses every step, final LoRA files, every checkpoint recording
  world size 2 and holding rank 1's RNG state, the ranks' weights equal at every checkpoint;
- SIGTERM to the launcher reaches both ranks: they stop after the same step, rank 0 commits it,
  the launcher exits 75 with rank 0's termination message, and the resumed run's final weights and
  losses are sha256-/bit-equal to the uninterrupted 2-process run's;
- resuming a 2-process checkpoint with one process is refused (exit 65, both sizes named), and
  with allow_world_size_change it trains to the end;
- a bad input with 2 processes: the launcher exits with the documented code of the rank that knew
  why (65, its one-line message), not the other rank's collective error (1) or death;
- the same loop serves causal-lm: a packed text run of 2 processes stopped by SIGTERM resumes to
  final adapter weights and losses equal to its uninterrupted 2-process run's (`make chaos` only).
- the SIGTERM test runs at checkpoint.everySteps auto, where each rank times its own steps and rank
  0's decision holds for both (a rank snapshotting alone would wait for the other forever).

The reference is the session's 2-process run (tests/support/ddp.py); deadlines are multiples of it.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
from pathlib import Path

import pytest

from lora_trainer import contract
from lora_trainer.checkpoint import Manifest
from lora_trainer.errors import EXIT_DATAERR, EXIT_PREEMPTED
from lora_trainer.storage import open_store
from lora_trainer.tiny_llm import build_tiny_llm, write_tiny_jsonl
from lora_trainer.train import read_losses
from tests.e2e.chaos import KillPlan, manifests, read_result, reference_run, run_attempt
from tests.e2e.deadlines import FUNC_ONLY, set_deadline
from tests.support.ddp import LOCAL, DdpReference, ddp_config, ddp_env

pytestmark = FUNC_ONLY


@pytest.fixture(autouse=True)
def deadline(request: pytest.FixtureRequest, ddp_reference: DdpReference) -> float:
    return set_deadline(request, ddp_reference.ref.deadline(2))


def test_two_processes_train(ddp_reference: DdpReference) -> None:
    out = ddp_reference.out
    losses = read_losses((out / "logs/metrics.jsonl").read_text())
    assert sorted(losses) == list(range(1, 9)) and all(math.isfinite(v) for v in losses.values())
    assert (out / contract.FINAL_WEIGHTS).is_file() and (out / contract.FINAL_WEIGHTS_KOHYA).is_file()
    found = manifests(open_store(str(out), LOCAL))
    assert sorted(found) == [2, 4, 6, 8]
    for m in found.values():
        assert m.world_size == 2 and {"rng-rank1.safetensors", "rng-rank1.json"} <= set(m.files)
    assert not list(out.glob("rank-*")), "only rank 0 writes the output"
    log = (out.parent / "trainer.log").read_text()
    assert "drifted from rank 0" not in log and "rank 1 of 2 (local rank 1) joined" not in log  # rank 1 logs no info


def test_sigterm_reaches_every_rank_and_resumes_exactly(ddp_reference: DdpReference, tmp_path: Path) -> None:
    # At checkpoint.everySteps auto, where each rank times its own steps and rank 0's decision holds for
    # both: the result must not depend on where checkpoints fell.
    config = {**ddp_config(ddp_reference.model, ddp_reference.data, tmp_path / "out", tmp_path / "cache"),
              "save_steps": "auto", "min_save_steps": 2, "max_save_steps": 3}
    env, ref = ddp_env(), ddp_reference.ref
    plan = KillPlan("step", signal.SIGTERM, step=3)
    first = run_attempt(config, env, tmp_path / "a1", plan=plan, draw=lambda plan, watch: None, timeout=ref.deadline(1))
    assert first.killed and first.code == EXIT_PREEMPTED, (first.code, first.timed_out)
    message = json.loads((tmp_path / "a1" / "termination.json").read_text())
    assert message["reason"] == "Preempted" and message["step"] >= 3, message
    committed = manifests(open_store(config["output_dir"], LOCAL))
    assert message["step"] in committed, (message, sorted(committed))  # the agreed stop step, committed
    assert committed[message["step"]].world_size == 2
    second = run_attempt(config, env, tmp_path / "a2", timeout=ref.deadline(1))
    assert second.code == 0 and second.log.resumed and second.log.start_step == message["step"]
    assert read_result(open_store(config["output_dir"], LOCAL)) == (ref.weights_sha256, ref.losses)


def test_world_size_change_refused_unless_allowed(ddp_reference: DdpReference, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(ddp_reference.out, out)  # the 2-process run's checkpoints, from step 4 on removed
    for name in ("step-000000006", "step-000000008"):
        shutil.rmtree(out / "checkpoints" / name)
    (out / contract.LATEST_FILE).unlink()
    config = ddp_config(ddp_reference.model, ddp_reference.data, out, tmp_path / "cache")
    one = ddp_env(1)
    refused = run_attempt(config, one, tmp_path / "a1", timeout=ddp_reference.ref.deadline(1))
    assert refused.code == EXIT_DATAERR, refused.code
    message = json.loads((tmp_path / "a1" / "termination.json").read_text())
    assert message["reason"] == "ResumeRefused"
    assert "made by 2 training process(es), this run has 1" in message["message"], message
    assert "allow_world_size_change" in message["message"]
    allowed = run_attempt({**config, "allow_world_size_change": True}, one, tmp_path / "a2",
                          timeout=ddp_reference.ref.deadline(1))
    assert allowed.code == 0 and allowed.log.start_step == 4, (allowed.code, allowed.log.start_step)
    m = Manifest.model_validate_json((out / "checkpoints/step-000000008/MANIFEST.json").read_text())
    assert m.world_size == 1 and "rng-rank1.json" not in m.files


def test_bad_input_exits_with_the_telling_rank_code(ddp_reference: DdpReference, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    config = ddp_config(ddp_reference.model, tmp_path / "empty", tmp_path / "out", tmp_path / "cache")
    a = run_attempt(config, ddp_env(), tmp_path / "a1", timeout=ddp_reference.ref.deadline(1))
    assert a.code == EXIT_DATAERR, a.code
    message = json.loads((tmp_path / "a1" / "termination.json").read_text())
    assert message["reason"] == "InvalidDataset" and "no usable captioned images" in message["message"]
    assert "exits by rank {0: 65, 1: " in (tmp_path / "a1" / "trainer.log").read_text()  # 1: its error, or killed


@pytest.mark.slow  # `make chaos`: the same loop as the SD tests above, which run by default
def test_causal_lm_two_processes_resume_exactly(tmp_path: Path) -> None:
    model, data = build_tiny_llm(tmp_path / "model"), write_tiny_jsonl(tmp_path / "train.jsonl", "messages", 48, seed=1)

    def config(out: Path) -> dict:
        return {"task": "causal-lm", "base_model": str(model), "train_file": str(data), "output_dir": str(out),
                "max_seq_length": 64, "packing": True, "lora_rank": 4, "batch_size": 2, "max_train_steps": 8,
                "learning_rate": 1e-3, "save_steps": "auto", "min_save_steps": 2, "max_save_steps": 3,
                "keep_last": 0, "seed": 5, "log_every": 1,
                "cache_dir": str(tmp_path / "cache"), "preemption_grace_seconds": 20}

    env = ddp_env()
    ref = reference_run(config(tmp_path / "ref"), env, tmp_path / "ref-run", LOCAL)
    out = tmp_path / "out"
    first = run_attempt(config(out), env, tmp_path / "a1", plan=KillPlan("step", signal.SIGTERM, step=4),
                        draw=lambda plan, watch: None, timeout=ref.deadline(1))
    assert first.killed and first.code == EXIT_PREEMPTED, (first.code, first.timed_out)
    second = run_attempt(config(out), env, tmp_path / "a2", timeout=ref.deadline(1))
    assert second.code == 0 and second.log.resumed and second.log.start_step >= 4
    store = open_store(str(out), LOCAL)
    assert store.exists("adapter_model.safetensors")
    assert read_result(store) == (ref.weights_sha256, ref.losses)
    assert {m.world_size for m in manifests(store).values()} == {2}
