"""Time in tests: a clock the test advances by hand, and bounded polling for a condition."""

from __future__ import annotations

import contextlib
import threading
import time


class FakeClock:
    """A monotonic clock the test advances by hand."""

    def __init__(self, start: float = 1000.0):
        self.now = start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds

    @contextlib.contextmanager
    def frozen(self):
        """Block every reader of the clock until the block ends (orders a race deterministically)."""
        with self._lock:
            yield


WAIT_DEFAULT = 15.0  # a bound, not an expectation: on a busy CI machine a reload can take seconds


def wait_for(predicate, timeout: float = WAIT_DEFAULT, interval: float = 0.01, what: str = "condition",
             on_timeout=None):
    """Poll ``predicate`` until it returns a truthy value; AssertionError after ``timeout``, with
    ``on_timeout()`` (say, the proxy's log) attached when given. Passing tests return as soon as the
    condition holds, so the bound only decides how long a failure takes to report."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            detail = f"\n{on_timeout()}" if on_timeout is not None else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {what}{detail}")
        time.sleep(interval)
