"""Apply a reloaded ``[log]`` table to a running process (SIGHUP, --watch), as nginx's reload does.

- ``level`` takes effect at once (the root logger's level).
- A new ``access`` target or ``format``: the new writer starts, the request observer is swapped, and
  the old writer is stopped, which writes every line it still holds. No line is lost and no request
  waits. The old writer's counts stay in /metrics (its lines were written, or dropped, all the same).
- ``access = "off"`` removes the observer; turning it back on adds one.
"""

from __future__ import annotations

import logging

from .access_log import make_access_log

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

    def __call__(self, old_config, new_config) -> None:
        level_listener(old_config, new_config)
        old, new = old_config.log, new_config.log
        if (old.access, old.format) != (new.access, new.format):
            self._switch_access_log(new)
            log.info("access log is now %s (%s)", new.access, new.format)

    def _switch_access_log(self, log_config) -> None:
        app, services = self.process.app, self.process.services
        retired, fresh = self.access_log, make_access_log(log_config)
        observers = [observer for observer in app.observers if retired is None or observer != retired.observe]
        if fresh is not None:
            fresh.start()
            services.append(fresh)  # stopped (flushed) with the process
            observers.append(fresh.observe)
        # One assignment: a request thread iterates either the old list or the new one, so each
        # request is logged exactly once, by one writer or the other.
        app.observers = observers
        if retired is not None:
            retired.stop()  # writes every line it still holds
            services.remove(retired)
            self.metrics.retire_access_log(retired)
        self.access_log = self.metrics.access_log = fresh
