"""One thread per process that runs a callback when a deadline passes: the timeouts of HTTP/2 streams
parked while they wait on their client (proxy/http2/session.py, ``H2Session.park``), which no
thread watches otherwise. The thread runs only while deadlines are pending and ends when none is. A
deadline whose stream is done is cancelled: its callback (and with it the stream and its connection's
state) is let go at once, not kept until the deadline passes."""

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
        self._due: list = []  # [deadline, sequence, callback or None once cancelled], earliest first
        self._sequence = itertools.count()  # ties never compare callbacks
        self._cancelled = 0  # entries of ``_due`` cancelled, not dropped yet
        self._changed = threading.Condition()
        self._running = False

    def add(self, deadline: float, callback: Callable[[], None]) -> list:
        """Run ``callback()`` on the timer's thread once ``deadline`` (by ``clock``) has passed. The
        entry returned is what ``cancel`` takes."""
        entry = [deadline, next(self._sequence), callback]
        with self._changed:
            heapq.heappush(self._due, entry)
            if not self._running:
                self._running = True
                threading.Thread(target=self._run, name=self.name, daemon=True).start()
            elif self._due[0] is entry:
                self._changed.notify()  # a new earliest deadline: wake up sooner
        return entry

    def cancel(self, entry: list) -> None:
        """The callback is not wanted any more (a no-op once it ran). The entries cancelled are dropped
        once they are half of them, so that a flood of short waits leaves nothing behind."""
        with self._changed:
            if entry[2] is None:
                return
            entry[2] = None
            self._cancelled += 1
            if self._cancelled * 2 > len(self._due):
                self._due = [kept for kept in self._due if kept[2] is not None]
                heapq.heapify(self._due)
                self._cancelled = 0
                self._changed.notify()  # maybe nothing left: the thread ends

    @property
    def pending(self) -> int:
        """Callbacks still to run."""
        return len(self._due) - self._cancelled

    def _run(self) -> None:
        while True:
            with self._changed:
                if not self._due:
                    self._running = False
                    return
                deadline, _, callback = self._due[0]
                if callback is None:  # cancelled
                    heapq.heappop(self._due)
                    self._cancelled -= 1
                    continue
                left = deadline - self.clock()
                if left > 0:
                    self._changed.wait(left)
                    continue
                heapq.heappop(self._due)[2] = None  # run: a later cancel is a no-op
            try:
                callback()
            except Exception:  # one stream's failure never stops the timeouts of the others
                log.exception("HTTP/2 stream deadline callback failed")
