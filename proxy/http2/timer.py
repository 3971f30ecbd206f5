"""One thread per process that runs a callback when a deadline passes: the timeouts of HTTP/2 streams
parked while they wait on their client (proxy/http2/session.py, ``H2Session.park``), which no
thread watches otherwise. The thread runs only while deadlines are pending and ends when none is."""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from typing import Callable

log = logging.getLogger("pyproxy.http2")


class DeadlineTimer:
    def __init__(self, clock: Callable[[], float] = time.monotonic, name: str = "pyproxy-h2-deadlines"):
        self.clock = clock
        self.name = name
        self._due: list = []  # (deadline, sequence, callback), earliest first
        self._sequence = itertools.count()  # ties never compare callbacks
        self._changed = threading.Condition()
        self._running = False

    def add(self, deadline: float, callback: Callable[[], None]) -> None:
        """Run ``callback()`` on the timer's thread once ``deadline`` (by ``clock``) has passed."""
        with self._changed:
            heapq.heappush(self._due, (deadline, next(self._sequence), callback))
            if not self._running:
                self._running = True
                threading.Thread(target=self._run, name=self.name, daemon=True).start()
            elif self._due[0][0] == deadline:
                self._changed.notify()  # a new earliest deadline: wake up sooner

    @property
    def pending(self) -> int:
        return len(self._due)

    def _run(self) -> None:
        while True:
            with self._changed:
                if not self._due:
                    self._running = False
                    return
                deadline, _, callback = self._due[0]
                left = deadline - self.clock()
                if left > 0:
                    self._changed.wait(left)
                    continue
                heapq.heappop(self._due)
            try:
                callback()
            except Exception:  # one stream's failure never stops the timeouts of the others
                log.exception("HTTP/2 stream deadline callback failed")
