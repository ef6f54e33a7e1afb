"""The fencing number across runs (lora_trainer.checkpoint.fence_attempt), table-driven.

A run is one LoRATrainingJob (its uid); the operator numbers attempts 1, 2, ... per job. The
fence continues from the output's newest recorded attempt when a run first claims, and keeps that
offset for the run's later attempts; so a re-applied job's pods outrank the deleted job's, and
within a run a later attempt outranks an earlier one (which then exits 73 at its next check).
"""

from __future__ import annotations

import pytest

from lora_trainer.checkpoint import Claim, fence_attempt

OLD = [Claim(1, "old", 1), Claim(2, "old", 2), Claim(3, "old", 3)]


@pytest.mark.parametrize(("claims", "newest", "run", "attempt", "fence"), [
    ([], 0, "new", 1, 1),                                   # a fresh output: the attempt itself
    ([], 0, "new", 3, 3),                                   # attempts 1-2 never claimed
    (OLD, 3, "new", 1, 4),                                  # re-applied: continues after the old run
    (OLD, 5, "new", 1, 6),                                  # manifests/latest.json newer than any claim
    (OLD + [Claim(4, "new", 1)], 4, "new", 2, 5),           # the new run's next attempt
    (OLD + [Claim(4, "new", 1)], 4, "new", 1, 4),           # the same attempt again (a retried claim)
    (OLD + [Claim(4, "new", 1), Claim(5, "new", 2)], 5, "new", 1, 4),  # a stale pod: 4 < 5, fenced out
    (OLD + [Claim(4, "new", 1)], 4, "old", 3, 3),           # the deleted job's pod: 3 < 4, fenced out
    (OLD + [Claim(4, "new", 1)], 4, "old", 4, 4),           # its next attempt cannot pass the new run
    ([Claim(1), Claim(2)], 2, "new", 1, 3),                 # claims made without a run (by hand)
    ([Claim(7, "a", 1), Claim(9, "b", 1)], 9, "a", 2, 8),   # run a was overtaken by b: 8 < 9, fenced out
])
def test_fence_attempt(claims: list[Claim], newest: int, run: str, attempt: int, fence: int) -> None:
    assert fence_attempt(claims, newest, run, attempt) == fence


def test_within_a_run_later_attempts_always_outrank_earlier_ones() -> None:
    claims = [*OLD, Claim(4, "new", 1)]
    fences = [fence_attempt(claims, 4, "new", n) for n in range(1, 6)]
    assert fences == sorted(fences) and len(set(fences)) == 5 and min(fences) > 3
