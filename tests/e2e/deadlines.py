"""Test deadlines from a reference measured in the same session, not fixed seconds.

pytest-timeout reads a test's closest `timeout` marker when the test function starts if that marker
says `func_only=True`; a fixture that has measured the reference puts one in front of the module's.
The set-up that measures the reference is bounded by its own log going silent (see chaos.py).
"""

from __future__ import annotations

import functools
import subprocess
import sys
import time

import pytest

# For a module whose deadlines come from `set_deadline`: set-up is not timed by pytest-timeout.
FUNC_ONLY = pytest.mark.timeout(func_only=True)


def set_deadline(request: pytest.FixtureRequest, seconds: float) -> float:
    """Give the requesting test `seconds` for its body (pytest-timeout), and return them."""
    request.node.add_marker(pytest.mark.timeout(seconds, func_only=True), append=False)
    return seconds


@functools.cache
def startup_reference(module: str = "lora_operator.controller") -> float:
    """Seconds a fresh interpreter takes to import `module` now: the pace of a process start-up on this
    machine at its present load (measured once per session)."""
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", f"import {module}"], check=True, timeout=STARTUP_REFERENCE_LIMIT)
    return time.monotonic() - started


# Importing the operator takes about 2 s on an idle 2-core machine; this only bounds a hang.
STARTUP_REFERENCE_LIMIT = 600.0
