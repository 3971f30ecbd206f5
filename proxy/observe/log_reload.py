"""Apply a reloaded ``[log]`` table to a running process (SIGHUP, --watch), as nginx's reload does.

- ``level`` takes effect at once (the root logger's level).
- A new ``access`` target or ``format``: the new writer starts, the request observer is swapped, and
  the old writer is stopped on a thread of its own, which writes every line it still holds (a stalled
  destination holds up that thread, not the reload). No line is lost and no request waits. The old
  writer's counts stay in /metrics (its lines were written, or dropped, all the same).
- ``access = "off"`` removes the observer; turning it back on adds one.
- A new access log file that cannot be opened: one error line, the old writer keeps writing (a later
  reload tries again).
- The same ``access`` file: it is reopened (as SIGUSR1 does), so logrotate's ``kill -HUP`` works too.
"""

from __future__ import annotations

import logging
import threading
from types import SimpleNamespace

from proxy.observe.access_log import make_access_log

log = logging.getLogger("pyproxy.log")


def apply_log_level(level: str) -> None:
    logging.getLogger().setLevel(getattr(logging, level.upper(), logging.INFO))


def level_listener(old_config, new_config) -> None:
    """An Application reload listener for processes without an access log (the supervisor)."""
    if old_config.log.level != new_config.log.level:
        apply_log_level(new_config.log.level)
        log.info("log level is now %s", new_config.log.level)


class LogSwitch:
    """The reload listener of a serving process: its log level and its access log writer."""

    def __init__(self, process, metrics, access_log):
        self.process = process
        self.metrics = metrics
        self.access_log = access_log  # the running writer, or None for access = "off"
        running = process.app.config.log
        self.running = (running.access, running.format)  # what the writer does, whatever the file says
        self._retired_lock = threading.Lock()

    def __call__(self, old_config, new_config) -> None:
        level_listener(old_config, new_config)
        new = new_config.log
        if (new.access, new.format) != self.running:
            if self._switch_access_log(new):
                log.info("access log is now %s (%s)", new.access, new.format)
        elif self.access_log is not None:
            self.access_log.reopen()

    def _switch_access_log(self, log_config) -> bool:
        """False (logged) if the new target cannot be opened: the running writer stays."""
        app, services = self.process.app, self.process.services
        retired, fresh = self.access_log, make_access_log(log_config)
        if fresh is not None:
            try:
                fresh.start()
            except OSError as exc:
                keeping = "it stays off" if retired is None else f"still writing to {self.running[0]}"
                log.error("cannot open the access log %s: %s; %s", log_config.access, exc.strerror or exc,
                          keeping)
                return False
        observers = [observer for observer in app.observers if retired is None or observer != retired.observe]
        if fresh is not None:
            services.append(fresh)  # stopped (flushed) with the process
            observers.append(fresh.observe)
        # One assignment: a request thread iterates either the old list or the new one, so each
        # request is logged exactly once, by one writer or the other.
        app.observers = observers
        if retired is not None:
            services.remove(retired)
            counted = SimpleNamespace(written=retired.written, dropped=retired.dropped)
            with self._retired_lock:  # now, as /metrics swaps writers: the totals never dip nor double
                self.metrics.replace_access_log(fresh, counted)
            # A writer stuck on its destination (a FIFO nobody reads) may take STOP_TIMEOUT to give up:
            # that wait is its own thread's, not the reload's (with SIGHUP, the accept loop's).
            threading.Thread(target=self._retire, args=(retired, fresh, counted),
                             name="pyproxy-access-log-retire", daemon=True).start()
        else:
            self.metrics.replace_access_log(fresh)
        self.access_log = fresh
        self.running = (log_config.access, log_config.format)
        return True

    def _retire(self, retired, fresh, counted: SimpleNamespace) -> None:
        stopped = retired.stop()  # writes every line it still holds
        if stopped and fresh is not None:
            fresh.adopt(retired)  # and the few a request thread hands it after that
        self._count_retired(SimpleNamespace(written=retired.written - counted.written,
                                            dropped=retired.dropped - counted.dropped))

    def _count_retired(self, counts: SimpleNamespace) -> None:
        with self._retired_lock:  # a reload's thread and an earlier reload's retiring thread add up
            self.metrics.retire_access_log(counts)
