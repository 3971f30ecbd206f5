"""Retry budgets: retries of an upstream stay a bounded share of its traffic (Envoy's and Finagle's
retry budgets, Linkerd's retry ratio).

Without one, every request to a server that drops connections is sent twice or more: a failing
server doubles the load on the healthy ones just when they are short of capacity (a retry storm).
With ``percent = 20, min_per_second = 3``, a retry is allowed while the retries of the last
``WINDOW`` seconds are fewer than 20% of the requests of those seconds, or fewer than 3 per second
(so a quiet upstream can still retry its occasional failure). A refused retry answers the original
error at once.

Counts live in one slot per clock second, in a ring of ``WINDOW`` slots, under one small lock.
"""

from __future__ import annotations

import threading
import time
from typing import Callable

WINDOW = 10  # seconds of requests and retries the budget looks at


class RetryBudget:
    """Requests and retries of one upstream over the last WINDOW seconds; totals for /metrics."""

    def __init__(self, percent: float, min_per_second: float, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._slots: list[list[int]] = [[-1, 0, 0] for _ in range(WINDOW)]  # [second, requests, retries]
        self.retries_total = 0
        self.exhausted_total = 0
        self.configure(percent, min_per_second)

    def configure(self, percent: float, min_per_second: float) -> None:
        """New limits (a reload); the counts of the window and the totals carry on."""
        self._ratio = percent / 100.0
        self._min_retries = min_per_second * WINDOW

    def count_request(self) -> None:
        second = int(self._clock())  # the clock read outside the lock: it is held for less time
        slot = self._slots[second % WINDOW]
        with self._lock:
            if slot[0] == second:  # _slot_locked() inline: every request counts, and a call costs
                slot[1] += 1
            else:
                self._slot_locked()[1] += 1

    def try_retry(self) -> bool:
        """Spend one retry if the budget allows it now; False (and counted as exhausted) otherwise."""
        with self._lock:
            slot = self._slot_locked()
            requests, retries = self._window_locked()
            allowed = retries < self._ratio * requests or retries < self._min_retries
            if allowed:
                slot[2] += 1
                self.retries_total += 1
            else:
                self.exhausted_total += 1
        return allowed

    def _slot_locked(self) -> list[int]:
        second = int(self._clock())
        slot = self._slots[second % WINDOW]
        if slot[0] != second:
            slot[0], slot[1], slot[2] = second, 0, 0
        return slot

    def _window_locked(self) -> tuple[int, int]:
        oldest = int(self._clock()) - WINDOW + 1
        live = [slot for slot in self._slots if slot[0] >= oldest]
        return sum(slot[1] for slot in live), sum(slot[2] for slot in live)
