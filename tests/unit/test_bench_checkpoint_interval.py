"""bench/bench_checkpoint_interval.py: its closed form of lost work agrees with a step-by-step simulation.

Behaviours tested:
- for a handful of gaps between preemptions (shorter than the first stretch, inside a checkpoint,
  after several cycles), `lost` gives the rework and overhead a second-by-second walk through the
  same policy gives;
- on a short trace, auto loses less than a fixed interval far from its own (the bench's claim, small).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "bench_checkpoint_interval.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_checkpoint_interval", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def walk(gap: float, first: int, every: int, commit: float, step: float) -> tuple[float, float]:
    """Rework and overhead of one gap, by walking the policy stretch by stretch."""
    t, progress, overhead, stretch = 0.0, 0.0, 0.0, first
    while True:
        if t + stretch * step + commit > gap:
            return gap - progress - overhead, overhead
        t += stretch * step + commit
        progress += stretch * step
        overhead += commit
        stretch = every


@pytest.mark.parametrize("gap", [3.0, 10.5, 11.9, 12.0, 47.3, 1000.0])
def test_closed_form_matches_a_walk(bench, gap: float) -> None:
    assert bench.lost(np.array([gap]), 10, 30, 2.0, 1.0) == pytest.approx(walk(gap, 10, 30, 2.0, 1.0))


def test_auto_beats_a_far_fixed_interval(bench) -> None:
    row = bench.scenario(4.0, 2.0, 2.0, 500, 1)  # auto: 29 steps
    assert row["auto_interval_steps"] == 29
    assert row["ratios_vs_auto"]["fixed 1000"] > 3.0
