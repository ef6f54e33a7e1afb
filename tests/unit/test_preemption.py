"""The preemption rate the operator tells an `everySteps: auto` job's pods (lora_operator.preemption).

Behaviours tested:
- hours on spot: from status.startTime to status.lastAttempt.finishedAt; 0 without either, or when
  they are garbled or reversed;
- the rate: the pool's for a new job, the job's own with much history, the Gamma-Poisson blend in
  between (a table); a prior of 0 hours takes the job's own rate as soon as it has any;
- the pod: LORA_PREEMPTION_RATE_PER_HOUR only with everySteps auto, from the operator's settings
  and the job's status; the reconcile that counts a preemption tells the next pod the new rate;
- the spec: everySteps takes an int or "auto"; bad values and bounds are refused naming the CRD path.
"""

from __future__ import annotations

import pytest

from lora_operator.pods import build_pod
from lora_operator.preemption import rate_per_hour, spot_hours
from lora_operator.reconcile import CreatePod, Observed, reconcile
from lora_operator.settings import Settings, parse
from lora_operator.spec import SpecError, parse_spec, to_train_config
from lora_trainer.contract import ENV_PREEMPTION_RATE
from tests.unit.builders import MINIMAL_SPEC, NOW, SETTINGS, make_job, make_pod, ts


def history(hours: float, preemptions: int) -> dict:
    return {"startTime": ts(hours * 3600), "preemptions": preemptions,
            "lastAttempt": {"attempt": preemptions, "result": "Preempted", "reason": "Preempted", "finishedAt": ts(0)}}


@pytest.mark.parametrize(
    ("status", "hours"),
    [
        ({}, 0.0),
        ({"startTime": ts(7200)}, 0.0),  # no attempt has ended yet
        (history(2.0, 1), 2.0),
        ({"startTime": "yesterday", "lastAttempt": {"finishedAt": ts(0)}}, 0.0),
        ({"startTime": ts(0), "lastAttempt": {"finishedAt": ts(60)}}, 0.0),  # ended before it started
    ],
)
def test_spot_hours(status: dict, hours: float) -> None:
    assert spot_hours(status) == pytest.approx(hours)


def used(spot_gpu_seconds: float, attempt: int = 2) -> dict:
    return {"usage": {"settled": {"attempt": attempt, "spotGpuSeconds": spot_gpu_seconds, "onDemandGpuSeconds": 9e9}}}


@pytest.mark.parametrize(
    ("status", "gpus", "hours"),
    [
        ({**history(5.0, 1), **used(2 * 3600.0)}, 2, 1.0),  # accounted: 2 GPU-hours on 2 GPUs, not 5 wall hours
        ({**history(5.0, 1), **used(2 * 3600.0)}, 0, 5.0),  # a CPU job has no GPU-seconds: wall hours
        ({**history(5.0, 1), **used(0.0, attempt=0)}, 2, 5.0),  # nothing settled yet: wall hours
    ],
)
def test_spot_hours_from_accounted_gpu_seconds(status: dict, gpus: int, hours: float) -> None:
    assert spot_hours(status, gpus) == pytest.approx(hours)


@pytest.mark.parametrize(
    ("status", "pool", "prior", "rate"),
    [
        ({}, 0.25, 1.0, 0.25),  # a new job: the pool's rate
        (history(1.0, 2), 0.25, 1.0, (2 + 0.25) / 2.0),  # one hour each: halfway
        (history(1000.0, 4000), 0.25, 1.0, (4000 + 0.25) / 1001.0),  # much history: its own (≈ 4/h)
        (history(10.0, 0), 1.0, 1.0, 1.0 / 11.0),  # ten quiet hours pull a 1/h pool down
        (history(0.5, 1), 0.25, 0.0, 2.0),  # no prior: its own rate at once
        ({}, 0.25, 0.0, 0.25),  # no prior and no history: the pool's
    ],
)
def test_rate_table(status: dict, pool: float, prior: float, rate: float) -> None:
    assert rate_per_hour(status, pool, prior) == pytest.approx(rate)


def env(pod: dict) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in pod["spec"]["containers"][0]["env"]}


def test_pod_gets_the_rate_only_with_auto() -> None:
    settings = SETTINGS.model_copy(update={"preemption_rate_per_hour": 2.0, "preemption_rate_prior_hours": 1.0})
    fixed = build_pod(make_job(checkpoint={"everySteps": 10}), 1, settings)
    assert ENV_PREEMPTION_RATE not in env(fixed)
    new = build_pod(make_job(checkpoint={"everySteps": "auto"}), 1, settings)
    assert env(new)[ENV_PREEMPTION_RATE] == "2"
    seen = build_pod(make_job(status=history(3.0, 6), checkpoint={"everySteps": "auto"}), 7, settings)
    assert env(seen)[ENV_PREEMPTION_RATE] == "2"  # (6 + 2) / (3 + 1)
    seen = build_pod(make_job(status=history(3.0, 11), checkpoint={"everySteps": "auto"}), 12, settings)
    assert env(seen)[ENV_PREEMPTION_RATE] == "3.25"


def test_the_preemption_just_counted_is_in_the_next_pods_rate() -> None:
    status = {"phase": "Running", "attempt": 1, "preemptions": 0, "failures": 0, "startTime": ts(3600)}
    job = make_job(status=status, checkpoint={"everySteps": "auto"})
    pod = make_pod(phase="Failed", disruption="PreemptionByScheduler")
    d = reconcile(Observed(job=job, pods=[pod], now=NOW), SETTINGS)
    (create,) = [a for a in d.actions if isinstance(a, CreatePod)]
    assert d.status["preemptions"] == 1
    assert env(create.pod)[ENV_PREEMPTION_RATE] == "0.625"  # (1 + 0.25·1) / (1 h + 1 h)


def test_settings_defaults_and_flags() -> None:
    assert (Settings().preemption_rate_per_hour, Settings().preemption_rate_prior_hours) == (0.25, 1.0)
    s = parse(["--preemption-rate-per-hour", "3", "--preemption-rate-prior-hours", "0"])
    assert (s.preemption_rate_per_hour, s.preemption_rate_prior_hours) == (3.0, 0.0)
    with pytest.raises(ValueError, match="preemption_rate_per_hour"):
        parse(["--preemption-rate-per-hour", "-1"])


def test_spec_every_steps_auto_maps_to_the_trainer() -> None:
    spec = parse_spec({**MINIMAL_SPEC, "checkpoint": {"everySteps": "auto", "minSteps": 5, "maxSteps": 50}})
    config = to_train_config(spec)
    assert (config.save_steps, config.min_save_steps, config.max_save_steps) == ("auto", 5, 50)
    fixed = to_train_config(parse_spec({**MINIMAL_SPEC, "checkpoint": {"everySteps": 20}}))
    assert (fixed.save_steps, fixed.min_save_steps, fixed.max_save_steps) == (20, 10, 1000)


@pytest.mark.parametrize(
    ("checkpoint", "field", "words"),
    [
        ({"everySteps": "often"}, "spec.checkpoint.everySteps", "or 'auto'"),
        ({"everySteps": 0}, "spec.checkpoint.everySteps", "from 1 to"),
        ({"everySteps": True}, "spec.checkpoint.everySteps", "or 'auto'"),
        ({"everySteps": "auto", "minSteps": 90, "maxSteps": 30}, "spec.checkpoint.minSteps", "is over spec.checkpoint.maxSteps"),
        ({"everySteps": 20, "maxSteps": 30}, "spec.checkpoint.maxSteps", "only with spec.checkpoint.everySteps: auto"),
        ({"everySteps": "auto", "minSteps": 0}, "spec.checkpoint.minSteps", "greater than or equal to 1"),
    ],
)
def test_spec_refuses_bad_checkpoint_naming_the_field(checkpoint: dict, field: str, words: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec({**MINIMAL_SPEC, "checkpoint": checkpoint})
    assert info.value.field == field and words in str(info.value), str(info.value)
