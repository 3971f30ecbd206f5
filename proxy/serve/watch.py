"""``--watch``: reload gracefully whenever the config file changes (local development).

Polling, not inotify: stdlib only, works on every filesystem (bind mounts, NFS, editors that replace the
file by renaming a temporary one), and one ``stat`` every half second costs nothing. A change is acted
on once the file has stopped changing for ``settle`` seconds, so an editor's half-written file is not
picked up between two writes (a half-written file that fails validation would only log errors, but a
truncated one may still be valid and briefly drop routes).

``describe_changes`` is also what a SIGHUP reload logs: what an operator wants to see after a reload is
what changed, not only that something did.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from typing import Callable

from proxy.config.schema import Config, RouteConfig

log = logging.getLogger("pyproxy.watch")

POLL_INTERVAL = 0.5  # seconds between stat() calls: a reload within a second of saving the file
SETTLE_TIME = 0.25   # the file must look the same for this long before it is reloaded

CONFIG_KEYS = {"tls_internal": "tls"}  # the config key of a field whose name differs from it

Fingerprint = tuple  # (st_mtime_ns, st_size, st_ino); None while the file is missing


def fingerprint(stat_result) -> Fingerprint:
    # mtime alone misses two saves within the filesystem's timestamp granularity; size and inode
    # catch most of those, and the inode catches editors that rename a new file over the old one.
    return (stat_result.st_mtime_ns, stat_result.st_size, stat_result.st_ino)


class Watcher:
    """Polls ``path`` and calls ``on_change()`` (from the watcher thread) when the file changed.

    ``stat`` and ``clock`` are injectable so tests drive ``check()`` by hand with no thread and no sleep.
    A service: ``start()`` / ``stop()``.
    """

    def __init__(self, path: str, on_change: Callable[[], None], *, interval: float = POLL_INTERVAL,
                 settle: float = SETTLE_TIME, stat=os.stat, clock=time.monotonic):
        self.path = path
        self.on_change = on_change
        self.interval = interval
        self.settle = settle
        self._stat = stat
        self._clock = clock
        self._applied = self._current()  # what the running config was read from
        self._seen = self._applied
        self._seen_at = clock()
        self._missing_logged = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.changes_total = 0

    def _current(self) -> Fingerprint | None:
        try:
            return fingerprint(self._stat(self.path))
        except FileNotFoundError:  # mid-rename, or deleted: wait for it to come back
            return None

    def check(self) -> bool:
        """One poll. True if ``on_change`` was called."""
        current = self._current()
        now = self._clock()
        if current != self._seen:
            self._seen, self._seen_at = current, now
            return False
        if current is None:
            if not self._missing_logged:
                log.warning("%s is missing; keeping the running config", self.path)
                self._missing_logged = True
            return False
        self._missing_logged = False
        if current == self._applied or now - self._seen_at < self.settle:
            return False
        self._applied = current
        self.changes_total += 1
        log.info("%s changed: reloading", self.path)
        self.on_change()
        return True

    # -- service -------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="pyproxy-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check()
            except OSError as exc:  # permissions, a vanished directory: keep watching, say why
                log.warning("cannot watch %s: %s", self.path, exc)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval * 4)


# -- what changed --------------------------------------------------------------------------------

def _route_key(route: RouteConfig) -> tuple:
    return (route.host or "", route.path)


def _route_label(route: RouteConfig) -> str:
    target = f"redirect {route.redirect.status} {route.redirect.to}" if route.redirect else route.upstream
    return f"{route.host or '*'}{route.path} -> {target}"


def describe_changes(old: Config, new: Config) -> list[str]:
    """Human-readable lines: listeners, routes and upstreams added, removed or changed."""
    lines = []
    old_listen = {listen.address for listen in old.server.listen}
    new_listen = {listen.address for listen in new.server.listen}
    lines += [f"listener added: {address}" for address in sorted(new_listen - old_listen)]
    lines += [f"listener removed: {address}" for address in sorted(old_listen - new_listen)]
    lines += _describe_listeners(old, new)
    lines += _describe_routes(old.routes, new.routes)
    lines += _describe_upstreams(old, new)
    changed = [f.name for f in dataclasses.fields(new.server)
               if f.name != "listen" and getattr(old.server, f.name) != getattr(new.server, f.name)]
    if changed:
        lines.append(f"server settings changed: {', '.join(changed)}")
    changed = _changed_fields(old.tls, new.tls)
    if changed:
        lines.append(f"tls settings changed: {', '.join(changed)}")
    if old.log != new.log:
        lines.append(f"log: level {new.log.level}, access {new.log.access} ({new.log.format})")
    return lines


def _describe_listeners(old: Config, new: Config) -> list[str]:
    """A listener kept at its address whose options changed: its certificates, sni, http2..."""
    before = {listen.address: listen for listen in old.server.listen}
    lines = []
    for listen in new.server.listen:
        changed = _changed_fields(before.get(listen.address), listen, skip=("host", "port"))
        if changed:
            lines.append(f"listener changed: {listen.address} ({', '.join(changed)})")
    return lines


def _changed_fields(old, new, skip=()) -> list[str]:
    if old is None or old == new:
        return []
    return [CONFIG_KEYS.get(f.name, f.name) for f in dataclasses.fields(new)
            if f.name not in skip and getattr(old, f.name) != getattr(new, f.name)]


def _describe_routes(old_routes, new_routes) -> list[str]:
    old = {_route_key(route): route for route in old_routes}
    new = {_route_key(route): route for route in new_routes}
    lines = [f"route added: {_route_label(new[key])}" for key in new if key not in old]
    lines += [f"route removed: {_route_label(old[key])}" for key in old if key not in new]
    lines += [f"route changed: {_route_label(old[key])} => {_route_label(new[key])}"
              for key in new if key in old and old[key] != new[key]]
    return lines


def _describe_upstreams(old: Config, new: Config) -> list[str]:
    lines = [f"upstream added: {name}" for name in new.upstreams if name not in old.upstreams]
    lines += [f"upstream removed: {name}" for name in old.upstreams if name not in new.upstreams]
    for name, upstream in new.upstreams.items():
        before = old.upstreams.get(name)
        if before is None or before == upstream:
            continue
        old_servers = {server.address for server in before.servers}
        new_servers = {server.address for server in upstream.servers}
        details = [f"+{address}" for address in sorted(new_servers - old_servers)]
        details += [f"-{address}" for address in sorted(old_servers - new_servers)]
        if not details:
            details.append("settings")
        lines.append(f"upstream changed: {name} ({' '.join(details)})")
    return lines
