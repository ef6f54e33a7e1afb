"""`save_steps: auto` in a real run of the tiny trainer: checkpoints fall at the Young/Daly cadence.

Behaviours tested:
- with LORA_PREEMPTION_RATE_PER_HOUR set, the trainer says it uses that rate; its first checkpoint
  comes `min_save_steps` after the start; each later one comes exactly where the previous decision
  said (`next checkpoint at step N`), or later only when the log says it was put off while the
  previous commit uploaded; the last step is checkpointed;
- each decision's interval is `interval_steps` of the commit cost and step time it logged (to the
  rounding of the logged figures), held to the bounds;
- every checkpoint the log announces is committed in the output (keep_last 0 keeps them all).

The rate is high on purpose (a preemption every 2 s) so that the interval of a tiny model's
sub-second steps and commits lands between the bounds and several decisions fit in 16 steps.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from lora_trainer.config import parse_config
from lora_trainer.contract import ENV_PREEMPTION_RATE
from lora_trainer.interval import interval_steps
from lora_trainer.train import Trainer

RATE = 1800.0  # per hour: M = 2 s
DECISION = re.compile(
    r"step (\d+): checkpoint interval auto: commit ([\d.e+-]+)s, step ([\d.e+-]+)s, ([\d.e+-]+) preemptions/h -> "
    r"(\d+) steps \(bounds (\d+)\.\.(\d+)\); next checkpoint at step (\d+)( \(this one was put off)?")


def test_auto_interval_commits_at_the_computed_cadence(tiny_sd: Path, tiny_data: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv(ENV_PREEMPTION_RATE, str(RATE))
    caplog.set_level(logging.INFO, logger="lora_trainer.interval")
    out, total, low, high = tmp_path / "out", 16, 2, 1000
    config = parse_config({
        "base_model": str(tiny_sd), "train_data_dir": str(tiny_data), "output_dir": str(out), "resolution": 32,
        "lora_rank": 4, "batch_size": 2, "max_train_steps": total, "learning_rate": 1e-3, "seed": 7,
        "save_steps": "auto", "min_save_steps": low, "max_save_steps": high, "keep_last": 0,
        "cache_dir": str(tmp_path / "cache"), "log_every": 4,
    })
    Trainer(config).run()

    text = caplog.text
    assert f"checkpoint interval auto at {RATE:g} preemptions/h (from the operator); first checkpoint at step {low}" in text
    decisions = [m.groups() for m in DECISION.finditer(text)]
    taken = [int(d[0]) for d in decisions]
    assert len(decisions) >= 2 and taken[0] == low and taken[-1] == total, text
    for (step, commit, step_s, rate, steps, lo, hi, nxt, _), (later, *_, put_off) in zip(
            decisions, decisions[1:], strict=False):
        assert (float(rate), int(lo), int(hi)) == (RATE, low, high)
        assert int(nxt) == int(step) + int(steps)
        # The logged figures have 4 significant digits: the interval they give may round one step apart.
        assert abs(int(steps) - interval_steps(float(commit), float(step_s), RATE, low, high)) <= 1, (commit, step_s)
        if int(later) == total:
            assert int(later) <= int(nxt) or put_off
        elif put_off:
            assert int(later) > int(nxt)
        else:
            assert int(later) == int(nxt)
    committed = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*")
                       if (p / "MANIFEST.json").is_file())
    assert committed == taken
