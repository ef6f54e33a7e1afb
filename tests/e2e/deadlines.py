"""Test deadlines from a reference measured in the same session, not fixed seconds.

pytest-timeout reads a test's closest `timeout` marker when the test function starts if that marker
says `func_only=True`; a fixture that has measured the reference puts one in front of the module's.
The set-up that measures the reference is bounded by its own log going silent (see chaos.py).
"""

from __future__ import annotations

import pytest

# For a module whose deadlines come from `set_deadline`: set-up is not timed by pytest-timeout.
FUNC_ONLY = pytest.mark.timeout(func_only=True)


def set_deadline(request: pytest.FixtureRequest, seconds: float) -> float:
    """Give the requesting test `seconds` for its body (pytest-timeout), and return them."""
    request.node.add_marker(pytest.mark.timeout(seconds, func_only=True), append=False)
    return seconds
