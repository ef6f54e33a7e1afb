"""bench/gpu/determinism.py's pure parts (the script itself runs end to end with --device cpu:
bench/results/determinism_cpu.json; a GPU run is bench/gpu/README's business).

- the printed table: one line per family, equal/DIFFERENT with the step each kill landed on,
  steps/s, the exact/fast ratio and peak memory; errors and skipped families on their own line;
- the run's trainer config: the check's steps, device and mode over chaos' tiny run, realistic
  activations on CUDA (resolution and batch for images, sequence length for the LLM);
- --steps too short for a kill after the first checkpoint is refused.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu" / "determinism.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_gpu_determinism", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


def row(equal: bool = True) -> dict:
    resume = {"equal": equal, "killed_at_step": 5}
    return {"family": "sd", "exact": {"two_runs_equal": True, "sigterm_resume": resume, "sigkill_resume": resume,
                                      "steps_per_second": 2.0, "peak_memory_mib": 900.0},
            "fast": {"steps_per_second": 2.5, "peak_memory_mib": 880.0}, "exact_speed_vs_fast": 0.8}


def test_table(bench) -> None:
    lines = bench.table([row(), row(equal=False), {"family": "flux", "skipped": "budget of 540s spent"},
                         {"family": "sdxl", "error": "the reference run exited 78"}]).splitlines()
    assert lines[0].split()[:4] == ["family", "2", "runs", "SIGTERM"]
    assert lines[2].split() == ["sd", "equal", "equal@5", "equal@5", "2.00", "2.50", "0.800", "900", "880"]
    assert "DIFFERENT@5" in lines[3]
    assert lines[4] == "flux       budget of 540s spent" and lines[5].endswith("exited 78")


def args(**kw) -> argparse.Namespace:
    base = {"steps": 12, "save_steps": 4, "device": "cpu", "mixed_precision": "bf16", "cuda_resolution": 256,
            "cuda_seq_len": 256}
    return argparse.Namespace(**{**base, **kw})


def test_family_config(bench, tmp_path: Path) -> None:
    image = {"base_model": "m", "train_data_dir": "d", "resolution": 32}
    c = bench.family_config("sd", image, tmp_path, args(), "exact")
    assert (c["max_train_steps"], c["save_steps"], c["device"], c["determinism"], c["resolution"]) == (12, 4, "cpu", "exact", 32)
    assert "mixed_precision" not in c and c["output_dir"] == str(tmp_path / "out")
    g = bench.family_config("sd", image, tmp_path, args(device="cuda"), "fast")
    assert (g["resolution"], g["batch_size"], g["mixed_precision"], g["determinism"]) == (256, 4, "bf16", "fast")
    llm = {"task": "causal-lm", "base_model": "m", "train_file": "t.jsonl", "max_seq_length": 64}
    assert bench.family_config("causal-lm", llm, tmp_path, args(device="cuda"), "exact")["max_seq_length"] == 256


def test_too_few_steps_refused(bench) -> None:
    with pytest.raises(SystemExit) as exc:
        bench.main(["--device", "cpu", "--steps", "5", "--save-steps", "4"])
    assert exc.value.code == 2
