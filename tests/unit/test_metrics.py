"""The operator's metrics, decided by pure functions from the status before and after a pass.

Behaviours tested:
- transitions: a preemption, an attempt failure and a job turning Failed each count once, by
  reason; an unchanged status counts nothing;
- resume_seconds: from the preemption (lastAttempt.finishedAt) to the next attempt's first
  reported step; nothing for the preempted attempt's own heartbeat, a non-preemption, or a
  later attempt;
- job_gauges: jobs by phase (no phase = Pending), the checkpoint age of Running jobs only;
- Metrics: the exposition carries the counters after a pass, a resume observed once, and the
  gauges from the jobs it is given.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from prometheus_client import generate_latest

from lora_operator.metrics import Metrics, job_gauges, resume_seconds, transitions
from lora_trainer.contract import Progress
from tests.unit.builders import NOW, make_job, ts

PREEMPTED = {"attempt": 2, "preemptions": 1, "failures": 0, "phase": "Recovering",
             "lastAttempt": {"attempt": 1, "result": "Preempted", "reason": "TerminationByKubelet", "finishedAt": ts(60)}}


@pytest.mark.parametrize(("old", "new", "counted"), [
    ({"attempt": 1, "preemptions": 0, "failures": 0}, PREEMPTED, [("preemption", "TerminationByKubelet")]),
    (PREEMPTED, PREEMPTED, []),
    ({"attempt": 1, "failures": 0}, {"attempt": 1, "failures": 1, "lastAttempt": {"reason": "OOMKilled"}},
     [("attempt_failure", "OOMKilled")]),
    ({"phase": "Running", "failures": 1}, {"phase": "Failed", "reason": "BackoffLimitExceeded", "failures": 2,
                                           "lastAttempt": {"reason": "OOMKilled"}},
     [("attempt_failure", "OOMKilled"), ("job_failure", "BackoffLimitExceeded")]),
    ({"phase": "Failed", "reason": "InvalidSpec"}, {"phase": "Failed", "reason": "InvalidSpec"}, []),
])
def test_transitions(old: dict, new: dict, counted: list) -> None:
    assert transitions(old, new) == counted


def beat(ago: float, state: str = "running") -> Progress:
    return Progress(step=11, total_steps=40, attempt=2, state=state, updated=ts(ago))


@pytest.mark.parametrize(("status", "progress", "seconds"), [
    (PREEMPTED, beat(15), 45.0),                     # preempted 60 s ago, first step 15 s ago
    (PREEMPTED, beat(90), None),                     # the preempted attempt's own heartbeat
    (PREEMPTED, beat(15, "preempted"), None),
    (PREEMPTED, None, None),
    ({**PREEMPTED, "attempt": 3}, beat(15), None),   # a later attempt
    ({**PREEMPTED, "lastAttempt": {**PREEMPTED["lastAttempt"], "result": "Failed"}}, beat(15), None),
])
def test_resume_seconds(status: dict, progress: Progress | None, seconds: float | None) -> None:
    assert resume_seconds(status, progress) == seconds


def test_job_gauges() -> None:
    jobs = [make_job("a", {"phase": "Running", "latestCheckpoint": {"step": 10, "uri": "s3://x", "time": ts(120)}}),
            make_job("b", {"phase": "Running", "startTime": ts(30)}),
            make_job("c", {"phase": "Succeeded", "latestCheckpoint": {"step": 10, "uri": "s3://x", "time": ts(999)}}),
            make_job("d")]
    phases, ages, every = job_gauges(jobs, {("ml", "a"): 50.0}, NOW)
    assert (phases["Running"], phases["Succeeded"], phases["Pending"], phases["Failed"]) == (2, 1, 1, 0)
    assert ages == [("ml", "a", 120.0), ("ml", "b", 30.0)] and every == [("ml", "a", 50.0)]


def test_exposition_after_a_preemption_and_a_resume() -> None:
    jobs = [make_job("a", PREEMPTED)]
    m = Metrics(lambda: jobs, lambda: NOW)
    m.started = NOW - timedelta(hours=1)
    m.observe_pass(("ml", "a"), {"attempt": 1, "preemptions": 0}, PREEMPTED, None, 10)
    m.observe_pass(("ml", "a"), PREEMPTED, PREEMPTED, beat(15), 10)
    m.observe_pass(("ml", "a"), PREEMPTED, PREEMPTED, beat(5), 10)  # the same resume: once
    text = generate_latest(m.registry).decode()
    assert 'lora_operator_preemptions_total{reason="TerminationByKubelet"} 1.0' in text
    assert "lora_operator_resume_seconds_count 1.0" in text and "lora_operator_resume_seconds_sum 45.0" in text
    assert 'lora_operator_jobs{phase="Recovering"} 1.0' in text
