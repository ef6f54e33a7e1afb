"""The checkpoint interval from the preemption rate (lora_trainer.interval) and `save_steps: auto`.

Behaviours tested:
- Young's √(2CM) and Daly's refinement: a table of (C, M) against hand-computed values; Daly equals
  Young as C/M → 0, is below it when C is not small, and is M itself once C ≥ 2M;
- the interval in steps: τ over the step time, rounded, held to [min, max]; a rate of 0 (or no step
  time yet) gives max; a huge rate gives min;
- the rate from LORA_PREEMPTION_RATE_PER_HOUR: absent → None, numbers parsed, anything else a
  ConfigError naming the variable;
- Cadence: a fixed save_steps keeps its grid and the last step; unset never saves; auto takes its
  first checkpoint min steps after the start, then the computed interval from the measured commit
  cost and step time, re-evaluated after each commit, put off while the previous commit uploads;
- the config: save_steps takes an int or "auto" (snake or camel case), bad values are refused naming
  save_steps, min/max bounds only with auto and min ≤ max; save_steps and its bounds are not
  training fields, so a changed cadence never refuses a resume.
"""

from __future__ import annotations

import math

import pytest

from lora_trainer.config import config_hash, parse_config
from lora_trainer.contract import ENV_PREEMPTION_RATE
from lora_trainer.errors import ConfigError
from lora_trainer.interval import (
    AUTO,
    Cadence,
    daly_seconds,
    interval_steps,
    mtbf_seconds,
    read_rate,
    young_seconds,
)

BASE = {"base_model": "m", "train_data_dir": "d", "output_dir": "o", "max_train_steps": 10}


@pytest.mark.parametrize(
    ("commit", "mtbf", "young", "daly"),
    [
        (2.0, 3600.0, 120.0, 120.0 * (1 + math.sqrt(2 / 7200) / 3 + (2 / 7200) / 9) - 2.0),  # 119.04
        (10.0, 900.0, math.sqrt(18000), math.sqrt(18000) * (1 + math.sqrt(10 / 1800) / 3 + (10 / 1800) / 9) - 10.0),
        (0.0, 3600.0, 0.0, 0.0),
        (100.0, 50.0, 100.0, 50.0),  # C ≥ 2M: Daly says checkpoint every M
        (5.0, math.inf, math.inf, math.inf),
    ],
)
def test_young_and_daly_table(commit: float, mtbf: float, young: float, daly: float) -> None:
    assert young_seconds(commit, mtbf) == pytest.approx(young)
    assert daly_seconds(commit, mtbf) == pytest.approx(daly)


def test_daly_is_young_when_commits_are_cheap_and_below_it_when_not() -> None:
    assert daly_seconds(0.01, 36000.0) == pytest.approx(young_seconds(0.01, 36000.0), rel=1e-3)
    assert daly_seconds(300.0, 900.0) < 0.9 * young_seconds(300.0, 900.0)


@pytest.mark.parametrize(
    ("commit", "step", "rate", "lo", "hi", "steps"),
    [
        (2.0, 1.0, 1.0, 10, 1000, 119),  # M = 3600 s: τ = 120·(1 + 0.00556 + 0.00003) − 2 = 118.67 s of 1 s steps
        (2.0, 0.5, 1.0, 10, 1000, 237),
        (2.0, 1.0, 4.0, 10, 1000, 59),  # M = 900 s: τ = 60·(1 + 0.0111 + 0.0001) − 2 = 58.67
        (2.0, 1.0, 0.25, 10, 1000, 239),  # M = 14400 s: τ = 240·(1 + 0.00278 + …) − 2 = 238.67
        (2.0, 1.0, 0.0, 10, 1000, 1000),  # no preemptions: the longest interval
        (2.0, 0.0, 1.0, 10, 1000, 1000),  # no step time measured
        (2.0, 1.0, 3600.0, 10, 1000, 10),  # M = 1 s: held to min
        (2.0, 0.001, 1.0, 10, 1000, 1000),  # held to max
        (2.0, 1.0, 1.0, 200, 1000, 200),
    ],
)
def test_interval_steps_table(commit: float, step: float, rate: float, lo: int, hi: int, steps: int) -> None:
    assert interval_steps(commit, step, rate, lo, hi) == steps


def test_mtbf() -> None:
    assert mtbf_seconds(4.0) == 900.0 and mtbf_seconds(0.0) == math.inf


@pytest.mark.parametrize(("raw", "rate"), [(None, None), ("", None), ("0", 0.0), ("0.25", 0.25), (" 4 ", 4.0),
                                           ("1e3", 1000.0)])
def test_read_rate(raw: str | None, rate: float | None) -> None:
    assert read_rate({} if raw is None else {ENV_PREEMPTION_RATE: raw}) == rate


@pytest.mark.parametrize("raw", ["fast", "-1", "nan", "inf", "1e9"])
def test_read_rate_refuses_naming_the_variable(raw: str) -> None:
    with pytest.raises(ConfigError) as info:
        read_rate({ENV_PREEMPTION_RATE: raw})
    assert ENV_PREEMPTION_RATE in str(info.value) and repr(raw) in str(info.value)


def saves(cadence: Cadence, start: int, total: int) -> list[int]:
    return [s for s in range(start + 1, total + 1) if cadence.due(s, total)]


def test_fixed_and_unset_cadence() -> None:
    assert saves(Cadence.start(5, 10, 1000, 0, 0.0), 0, 12) == [5, 10, 12]
    assert saves(Cadence.start(5, 10, 1000, 7, 0.0), 7, 12) == [10, 12]  # a resumed run keeps the grid
    assert saves(Cadence.start(None, 10, 1000, 0, 0.0), 0, 12) == []


def test_auto_cadence_follows_the_measurements() -> None:
    # Steps of 1 s, commits of 2 s, 4 preemptions an hour: 59 steps after the first checkpoint.
    c = Cadence.start(AUTO, 10, 1000, 100, 0.0, attempt=2, rate_per_hour=4.0)
    assert c.next_step == 110 and not c.due(109, 10_000) and c.due(110, 10_000)
    c.saved(110, 10.0, 12.0)
    assert (c.step_seconds, c.commit_seconds, c.next_step) == (1.0, 2.0, 110 + 59)
    # Commits get dearer (8 s, averaged with 2 s: 5 s) and steps slower (2 s, averaged: 1.5 s).
    c.saved(169, 12.0 + 59 * 2.0, 12.0 + 59 * 2.0 + 8.0)
    assert (c.step_seconds, c.commit_seconds) == (1.5, 5.0)
    assert c.next_step == 169 + interval_steps(5.0, 1.5, 4.0, 10, 1000)
    assert c.due(10_000, 10_000)  # the last step, whatever the interval


def test_auto_cadence_waits_for_the_previous_commit() -> None:
    uploaded = False
    c = Cadence.start(AUTO, 3, 1000, 0, 0.0, rate_per_hour=3600.0)  # M = 1 s: every min steps
    c.saved(3, 3.0, 3.5, lambda: uploaded)
    assert c.next_step == 6 and not c.due(6, 100) and not c.due(7, 100)
    uploaded = True
    assert c.due(7, 100)


def test_auto_without_a_rate_uses_the_default() -> None:
    assert Cadence.start(AUTO, 10, 1000, 0, 0.0).rate_per_hour == 0.25


@pytest.mark.parametrize("value", [5, "auto", "12"])
def test_config_save_steps_int_or_auto(value) -> None:
    expected = int(value) if value != "auto" else "auto"
    assert parse_config({**BASE, "save_steps": value}).save_steps == expected
    assert parse_config({**BASE, "saveSteps": value}).save_steps == expected


@pytest.mark.parametrize("value", [0, -3, "banana", "Auto", True, 2.5, 10**8, [5]])
def test_config_bad_save_steps_named(value) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({**BASE, "save_steps": value})
    assert "save_steps:" in str(info.value) and "auto" in str(info.value)


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ({"save_steps": "auto", "min_save_steps": 50, "max_save_steps": 20},
         "min_save_steps: 50 is over max_save_steps (20)"),
        ({"save_steps": 5, "min_save_steps": 3}, "min_save_steps: only with save_steps: auto"),
        ({"max_save_steps": 30}, "max_save_steps: only with save_steps: auto"),
        ({"save_steps": "auto", "min_save_steps": 0}, "min_save_steps"),
    ],
)
def test_config_bounds(extra: dict, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({**BASE, **extra})
    assert words in str(info.value)


def test_cadence_is_not_a_training_field() -> None:
    fixed = parse_config({**BASE, "save_steps": 5})
    auto = parse_config({**BASE, "save_steps": "auto", "min_save_steps": 2, "max_save_steps": 7})
    assert config_hash(fixed) == config_hash(auto) == config_hash(parse_config(BASE))
