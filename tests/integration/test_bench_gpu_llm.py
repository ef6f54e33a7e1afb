"""bench/gpu/llm.py runs end to end (smoke: `--device cpu --tiny`; the real run needs a GPU machine).

Behaviours:
- the script builds its model from a preset with random weights, trains it with `lora-train` (the
  Trainer, task causal-lm) and with the bare peft loop, and writes a results JSON with the command,
  positive tokens/s for both variants, a peak memory per run, the ratio and its verdict;
- asked for CUDA where there is none, it exits 2 with one line saying how to smoke-run it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu" / "llm.py"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def test_cpu_smoke_run_writes_results(tmp_path: Path) -> None:
    out = tmp_path / "llm_gpu.json"
    run = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--steps", "3", "--warmup", "1",
                          "--reps", "1", "--batch", "2", "--out", str(out)],
                         capture_output=True, text=True, env=ENV, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert "--tiny" in result["command"] and result["settings"]["tokens_per_step"] == 2 * 64
    for variant in ("lora-train", "bare"):
        assert len(result["tokens_per_second"][variant]) == 1 and result["tokens_per_second"][variant][0] > 0
        assert result["peak_memory_mib"][variant][0] > 0
    assert result["ratio_lora_train_to_bare"]["pass"] == (result["ratio_lora_train_to_bare"]["median_paired"] >= 0.95)
    assert "lora-train/bare" in run.stdout and "results in" in run.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_one_line() -> None:
    run = subprocess.run([sys.executable, str(SCRIPT), "--steps", "2"], capture_output=True, text=True, env=ENV,
                         timeout=300)
    assert run.returncode == 2 and run.stderr.strip().count("\n") == 0 and "--device cpu --tiny" in run.stderr
