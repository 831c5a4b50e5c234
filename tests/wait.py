"""The one way tests wait: poll a condition until it holds or a deadline passes.

A fixed sleep is either too short on a loaded CI machine or wastes time everywhere else; a
test waits for something it can observe (a route, a key, a pass count) instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class WaitTimeout(AssertionError):
    """The condition did not hold in time; the message says what was awaited."""


def wait_for(
    condition: Callable[[], T], timeout: float = 20.0, what: str = "condition", every: float = 0.05
) -> T:
    """Call ``condition`` until it returns something truthy, and return that value.

    Raises WaitTimeout (an AssertionError, so pytest shows it as a failed check) naming
    ``what`` when ``timeout`` seconds pass first.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise WaitTimeout(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)
