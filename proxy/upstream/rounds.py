"""A background thread that runs rounds: the health checker's scheduler and the DNS discovery loop.

``run_once`` does one round and returns the seconds until the next is due; ``kick`` runs the next
round at once (a reload, a check that finished). A round that raises is logged with its traceback
and the loop carries on after ``idle_wait``: one bad round must never stop checks or lookups.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable


class RoundLoop:
    def __init__(self, run_once: Callable[[], float], name: str, what: str, idle_wait: float,
                 log: logging.Logger):
        self._run_once = run_once
        self._name = name
        self._what = what  # "health check round": how a failed round is logged
        self._idle_wait = idle_wait
        self._log = log
        self._stop = threading.Event()
        self._kick = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def kick(self) -> None:
        self._kick.set()

    def stop(self) -> None:
        self._stop.set()
        self._kick.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                wait = self._run_once()
            except Exception:  # the loop must outlive one bad round; the traceback says why
                self._log.exception("%s failed", self._what)
                wait = self._idle_wait
            self._kick.wait(wait)
            self._kick.clear()
