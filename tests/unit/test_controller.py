"""Pure bits of the Kopf wiring.

Behaviours tested:
- Kopf's per-event "Handler ... succeeded." lines of the wake-up handlers are dropped; every other
  line (our reconcile logs, failures, other handlers) passes.
"""

from __future__ import annotations

import logging

import pytest

from lora_operator.controller import QuietWakeups


@pytest.mark.parametrize(("message", "kept"), [
    ("Handler 'build_registry.<locals>.pod_event' succeeded.", False),
    ("Handler 'build_registry.<locals>.job_event' succeeded.", False),
    ("Handler 'build_registry.<locals>.job_event' failed with an exception and will try again in 60 seconds: x", True),
    ("Handler 'build_registry.<locals>.configure' succeeded.", True),
    ("attempt 2: Preempted: attempt 1: PreemptionByScheduler: preempted", True),
])
def test_quiet_wakeups(message: str, kept: bool) -> None:
    record = logging.LogRecord("kopf.objects", logging.INFO, __file__, 1, message, None, None)
    assert QuietWakeups().filter(record) is kept
