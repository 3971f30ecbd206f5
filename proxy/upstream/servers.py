"""State of one upstream server: health, passive ejection, request counters.

Health *state* lives here; health *policy* (when to probe, how many passes make a
server healthy) lives in the active checker, which only calls `set_health()`
(as in Caddy's `hosts.go` / `healthchecks.go`).

Passive checks follow nginx's `max_fails` / `fail_timeout`: `max_fails` failed
attempts within `fail_timeout` seconds take the server out for `fail_timeout`.
Successes in between do not forgive them (nginx clears its count only once
`fail_timeout` has passed since the last failure): a server failing every other
request is taken out (docs/configuration.md, [upstreams.NAME.passive]). As in nginx, the only server of an
upstream is never ejected (there is nowhere else to send its traffic, so ejecting
it would turn a blip into fail_timeout of 503s): its Upstream turns ejection off
with `set_sole_server(True)`. Active health checks still take it down.

Every counter is changed under one small lock per server. Nothing logs while
holding it: the locked sections return the messages to log and the caller logs
them after releasing the lock (docs/development.md: "No I/O under a lock").
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Callable

from proxy.config.units import format_address

LOG = logging.getLogger("pyproxy.health")

# nginx's default fail_timeout is 10s (ngx_http_upstream_module, "server" directive).
DEFAULT_FAIL_TIMEOUT = 10.0
INITIAL_REASON = "initial"
EJECTION_EXPIRED_REASON = "ejection expired"
SLOW_START_FLOOR = 0.1  # a server in slow start begins at this share of its weight
# The operator's say over a server (the runtime API), apart from what the checks say: "draining" takes
# no new requests (those in flight, tunnels and health checks go on), "disabled" gets no traffic and no
# health checks (HAProxy's "drain" and "maint" admin states).
ENABLED, DRAINING, DISABLED = "enabled", "draining", "disabled"
ADMIN_STATES = (ENABLED, DRAINING, DISABLED)

Clock = Callable[[], float]
LogEvents = list[tuple[int, str, tuple]]


def _validate(port: int, weight: int, max_connections: int, max_fails: int, fail_timeout: float) -> None:
    if not 1 <= port <= 65535:
        raise ValueError(f"port must be 1-65535, got {port}")
    if weight < 1:
        raise ValueError(f"weight must be at least 1, got {weight}")
    if max_connections < 0:
        raise ValueError(f"max_connections must be 0 (unlimited) or more, got {max_connections}")
    if max_fails < 0:
        raise ValueError(f"max_fails must be 0 (off) or more, got {max_fails}")
    if fail_timeout <= 0:
        raise ValueError(f"fail_timeout must be positive, got {fail_timeout}")


class Server:
    """One upstream server. Identity semantics: two Server objects are never equal."""

    def __init__(self, host: str, port: int, weight: int = 1, max_connections: int = 0, tls: bool = False,
                 max_fails: int = 0, fail_timeout: float = DEFAULT_FAIL_TIMEOUT,
                 failure_statuses: frozenset[int] = frozenset(), clock: Clock = time.monotonic,
                 name: str = "", priority: int = 0) -> None:
        _validate(port, weight, max_connections, max_fails, fail_timeout)
        self._host = host
        self._name = name          # the DNS name it was discovered under ("" for a configured address)
        self._priority = priority  # SRV priority: the upstream uses the lowest group with a server up
        self._port = port
        # "host:port", as logs and the access log name it: a plain attribute, as the handler reads it per
        # request (a property would be a call). Never reassigned.
        self.address = format_address(host, port)
        self._weight = weight
        self._max_connections = max_connections
        self._tls = tls
        self._max_fails = max_fails
        self._fail_timeout = float(fail_timeout)
        # passive.statuses: answers that count as failures. A plain attribute, so that a caller can skip
        # record_response() (a call per request) while it is empty, as it usually is.
        self.failure_statuses = frozenset(failure_statuses)
        self._clock = clock
        self._lock = threading.Lock()
        # Everything below is guarded by _lock (reads outside it are advisory only).
        self._healthy = True
        self._health_reason = INITIAL_REASON
        self._ejected_until: float | None = None
        self._eject_reason = ""
        self._recent_failures: collections.deque[float] = collections.deque()
        self._sole_server = False  # the only server of its upstream: passive checks never eject it
        # max_ejected_percent: the upstream's EjectionCap keeps this server serving although its checks
        # say down (it would take more than the allowed share out). Set by the cap, under this lock.
        self._held_in = False
        self._cap: "EjectionCap | None" = None
        self._slow_start = 0.0  # seconds over which a server that became available ramps up; 0 = off
        self._ejection_listener: "Callable[[Server, float, str], None] | None" = None
        self._ramp_start: float | None = None  # when it last became available; None = never ramps
        self._active = 0
        self._requests_total = 0
        self._failures_total = 0
        self._is_up = True
        self._state_reason = INITIAL_REASON
        self._state_since = clock()
        self._admin_state = ENABLED
        self._admin_out = False  # draining or disabled: one flag for the hot path to read
        self._predecessor: "Server | None" = None  # the object a reload rebuilt this one from (see below)

    # -- identity and configuration (immutable) --------------------------------

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        return self._port

    @property
    def weight(self) -> int:
        return self._weight

    @property
    def name(self) -> str:
        return self._name

    @property
    def priority(self) -> int:
        return self._priority

    @property
    def tls(self) -> bool:
        return self._tls

    @property
    def max_connections(self) -> int:
        return self._max_connections

    @property
    def max_fails(self) -> int:
        return self._max_fails

    @property
    def fail_timeout(self) -> float:
        return self._fail_timeout

    def __repr__(self) -> str:
        return f"Server({self.address!r}, weight={self._weight})"

    # -- slow start -----------------------------------------------------------------

    def set_slow_start(self, seconds: float) -> None:
        """The upstream's slow_start (0 = off): after this server becomes available (it starts, is
        added by a reload, or recovers), its effective weight ramps from 10% to 100% over ``seconds``."""
        self._slow_start = float(seconds)

    @property
    def slow_start(self) -> float:
        return self._slow_start

    def start_slow_start(self) -> None:
        """A server added to a running upstream (by a reload) ramps up from now. Servers of the first
        config do not: they all start together, and ramping every one would change nothing."""
        self._ramp_start = self._clock()

    def counts_in_flight_of(self, predecessor: "Server") -> None:
        """A reload rebuilt this server (a new weight, say); requests still running hold the old object.
        Until they finish, /status, /metrics and ``ctl drain --wait`` count them here too, or a drained
        server would look idle while it still serves them. Reporting only: limits count their own."""
        self._predecessor = predecessor

    def _predecessor_in_flight(self) -> int:
        predecessor = self._predecessor
        if predecessor is None:
            return 0
        active = predecessor.snapshot()["active_requests"]  # its own predecessors' included
        if active == 0:
            self._predecessor = None  # all finished: let the old object go
        return active

    def effective_weight(self) -> float:
        """The weight policies use: ``weight``, scaled down while the server is in its slow start.

        Lock-free: a policy asks this for every server on every pick. The ramp starts when the server
        last came back up (a recovery restarts it), or when a reload added it.
        """
        remaining = self._slow_start_remaining(self._clock())
        if remaining <= 0:
            return self._weight
        ramped = 1.0 - remaining / self._slow_start
        # In 1% steps: servers that came up together weigh exactly the same at (almost) any moment, so
        # least_connections still sees their ties (a float read a microsecond later would break them).
        factor = round(SLOW_START_FLOOR + (1.0 - SLOW_START_FLOOR) * ramped, 2)
        return self._weight * factor

    def _slow_start_remaining(self, now: float) -> float:
        ramp_start = self._ramp_start
        if self._slow_start <= 0 or ramp_start is None or not self._is_up:
            return 0.0
        return max(0.0, ramp_start + self._slow_start - now)

    # -- counters (read-only) ---------------------------------------------------

    @property
    def active_requests(self) -> int:
        return self._active

    @property
    def requests_total(self) -> int:
        return self._requests_total

    @property
    def failures_total(self) -> int:
        return self._failures_total

    # -- selection ----------------------------------------------------------------

    def available(self) -> bool:
        """May a policy pick this server now? Lock-free hint; try_acquire() decides for real."""
        if self._admin_out:
            return False
        if not self._held_in:
            if not self._healthy:
                return False
            ejected_until = self._ejected_until  # read once: another thread may clear it
            if ejected_until is not None and self._clock() < ejected_until:
                return False
        return self._max_connections == 0 or self._active < self._max_connections

    def try_acquire(self, even_if_down: bool = False) -> bool:
        """Atomically claim a request slot if available. The caller must release() it.

        ``even_if_down``: all_down = "try_all" sends traffic to servers the checks took out; only
        max_connections still counts then.
        """
        events: LogEvents = []
        with self._lock:
            if self._ejected_until is not None:
                events = self._expire_ejection_locked(self._clock())
            # available(), decided under the lock (inline: it runs per request). even_if_down overrules
            # the checks, never the operator.
            acquired = (not self._admin_out
                        and (even_if_down or self._held_in or (self._healthy and self._ejected_until is None))
                        and (self._max_connections == 0 or self._active < self._max_connections))
            if acquired:
                self._active += 1
                self._requests_total += 1
        if events:  # rare (an ejection just ended): no call per request
            self._after(events)
        return acquired

    def release(self) -> None:
        """Give back a slot taken by try_acquire(); refuses to go below zero."""
        with self._lock:
            unmatched = self._active == 0
            if not unmatched:
                self._active -= 1
        if unmatched:
            LOG.warning("server %s: release() without a matching try_acquire(); ignored", self.address)

    # -- passive checks -------------------------------------------------------------

    def record_failure(self, reason: str) -> None:
        """A request to this server failed (refused, reset, timed out, garbage)."""
        now = self._clock()
        with self._lock:
            events = self._expire_ejection_locked(now)
            self._failures_total += 1
            was_ejected = self._ejected_until is not None
            events += self._count_failure_locked(now, reason)
            ejected_now = not was_ejected and self._ejected_until is not None
        self._after(events)
        listener = self._ejection_listener
        if ejected_now and listener is not None:
            listener(self, self._fail_timeout, reason)

    def set_ejection_listener(self, listener: "Callable[[Server, float, str], None] | None") -> None:
        """Called with (server, seconds, reason) when this process's passive checks eject the server, so
        worker processes can tell each other (a server's state is the same in every worker)."""
        self._ejection_listener = listener

    def eject_for(self, seconds: float, reason: str) -> bool:
        """Another process ejected this server: take it out here too, for ``seconds``. The only server of
        an upstream is never ejected, and an ejection in force is left as it is. True if it took effect."""
        now = self._clock()
        with self._lock:
            events = self._expire_ejection_locked(now)
            applied = not self._sole_server and self._ejected_until is None and self._max_fails > 0
            if applied:
                self._recent_failures.clear()
                self._ejected_until = now + seconds
                self._eject_reason = reason
                self._settle_locked(now, "")
                # DEBUG: the process that ejected it logged it, and the supervisor says it spread.
                events.append((logging.DEBUG, "server %s ejected in another worker: %s", (self.address, reason)))
        self._after(events)
        return applied

    def record_response(self, status: int | None) -> None:
        """A request got an answer: with passive.statuses set, a listed status (a 500, say) counts as a
        failure towards max_fails, like a refused connection. Other answers change nothing."""
        if status in self.failure_statuses:
            self.record_failure(f"answered {status}")

    def set_sole_server(self, sole: bool) -> None:
        """Is this the only server of its upstream? Then failures no longer eject it, and an
        ejection in force (from a config that listed more servers) ends now."""
        with self._lock:
            self._sole_server = sole
            events: LogEvents = []
            if sole and self._ejected_until is not None:
                self._recent_failures.clear()
                self._ejected_until = None
                self._settle_locked(self._clock(), "the only server left in its upstream")
                events.append((logging.INFO, "server %s back: it is the only server of its upstream",
                               (self.address,)))
        self._after(events)

    # -- max_ejected_percent ------------------------------------------------------------------

    def attach_cap(self, cap: "EjectionCap | None") -> None:
        """The upstream's EjectionCap (None: no cap), told of every up/down change of this server."""
        with self._lock:
            self._cap = cap
            if cap is None:
                self._held_in = False

    def out_since(self) -> float | None:
        """When the checks took this server out (whatever the cap does), or None while they say up."""
        now = self._clock()
        with self._lock:
            events = self._expire_ejection_locked(now)
            since = None if self._is_up else self._state_since
        _log(events)  # not _after: the cap asks this from recompute(), holding its own lock
        return since

    def set_held_in(self, held: bool, cap: "EjectionCap") -> tuple[bool, str]:
        """The decision of ``cap``. Returns (changed, the reason the checks give for taking it out).
        Ignored unless ``cap`` is this server's cap now: one that a rebuild of the upstream replaced may
        still be deciding on what it saw, after the new cap decided."""
        with self._lock:
            if cap is not self._cap:
                return False, self._state_reason
            changed = held != self._held_in
            self._held_in = held
            return changed, self._state_reason

    # -- active checks ----------------------------------------------------------------

    def set_health(self, up: bool, reason: str, announce: bool = True) -> bool:
        """Record the active checker's verdict. Returns True if the health flag changed.

        ``announce=False``: a worker applying its supervisor's verdict, which the supervisor has
        logged already; the change is logged at debug level, so it shows once, not once per process.
        """
        now = self._clock()
        with self._lock:
            events = self._expire_ejection_locked(now)
            changed = up != self._healthy
            if changed:
                self._healthy = up
                self._health_reason = reason
                self._settle_locked(now, reason)
                events.append((logging.INFO if announce else logging.DEBUG, "server %s is %s: %s",
                               (self.address, "healthy" if up else "unhealthy", reason)))
        self._after(events)
        return changed

    # -- the operator's admin state ------------------------------------------------------------

    @property
    def admin_state(self) -> str:
        """ENABLED, DRAINING or DISABLED: set by the runtime API, whatever the health checks say."""
        return self._admin_state

    def set_admin_state(self, state: str) -> str:
        """Drain, disable or enable this server. Returns the state it had. Requests in flight are not
        touched: they finish and release their slots as usual."""
        if state not in ADMIN_STATES:
            raise ValueError(f"admin state must be one of {', '.join(ADMIN_STATES)}, got {state!r}")
        with self._lock:
            previous = self._admin_state
            self._admin_state = state
            self._admin_out = state != ENABLED
            if previous != ENABLED and state == ENABLED:
                self._ramp_start = self._clock()  # slow start: back in rotation, it ramps up as after a recovery
        return previous

    @property
    def healthy(self) -> bool:
        """The active checker's verdict alone (passive ejection aside)."""
        return self._healthy

    # -- reporting ---------------------------------------------------------------------

    @property
    def state(self) -> str:
        """"up" or "down" (down if unhealthy or ejected, unless max_ejected_percent keeps it serving).
        Busy servers are still "up"."""
        return self._refreshed(lambda: "up" if self._is_up or self._held_in else "down")

    @property
    def state_reason(self) -> str:
        return self._refreshed(lambda: self._state_reason)

    @property
    def state_since(self) -> float:
        """Clock time of the last up/down change."""
        return self._refreshed(lambda: self._state_since)

    def snapshot(self) -> dict:
        """A consistent copy of the state for /status."""
        inherited = self._predecessor_in_flight()
        return self._refreshed(lambda: {
            "address": self.address,
            "state": "up" if self._is_up or self._held_in else "down",
            "reason": f"would be ejected: {self._state_reason}" if self._held_in else self._state_reason,
            "would_eject": self._held_in,
            "admin_state": self._admin_state,
            "slow_start_remaining": round(self._slow_start_remaining(self._clock()), 3),
            "since": self._state_since,
            "weight": self._weight,
            "active_requests": self._active + inherited,
            "requests_total": self._requests_total,
            "failures_total": self._failures_total,
        })

    # -- internals (all *_locked methods require self._lock) ---------------------------

    def _after(self, events: LogEvents) -> None:
        """After the lock is released: log, and let the cap look again (every up/down change logs)."""
        _log(events)
        cap = self._cap
        if events and cap is not None:
            cap.recompute()

    def _refreshed(self, read):
        """Expire a lapsed ejection, then read under the lock."""
        now = self._clock()
        with self._lock:
            events = self._expire_ejection_locked(now)
            value = read()
        self._after(events)
        return value

    def _count_failure_locked(self, now: float, reason: str) -> LogEvents:
        if self._max_fails == 0 or self._sole_server or self._ejected_until is not None:
            return []
        failures = self._recent_failures
        failures.append(now)
        while failures and now - failures[0] >= self._fail_timeout:
            failures.popleft()
        if len(failures) < self._max_fails:
            return []
        failures.clear()
        self._ejected_until = now + self._fail_timeout
        self._eject_reason = reason
        self._settle_locked(now, "")
        return [(logging.INFO, "server %s ejected: %s", (self.address, reason))]

    def _expire_ejection_locked(self, now: float) -> LogEvents:
        ejected_until = self._ejected_until
        if ejected_until is None or now < ejected_until:
            return []
        self._ejected_until = None
        # The server came back at ejected_until, whenever we happen to notice.
        self._settle_locked(ejected_until, EJECTION_EXPIRED_REASON)
        return [(logging.INFO, "server %s ejection expired", (self.address,))]

    def _settle_locked(self, when: float, reason_if_up: str) -> None:
        """Recompute up/down and its reason after any change of health or ejection."""
        is_up = self._healthy and self._ejected_until is None
        if is_up != self._is_up:
            self._is_up = is_up
            self._state_since = when
            if is_up:
                self._state_reason = reason_if_up
                self._ramp_start = when  # slow start: back after being out, it ramps up again
        if not is_up:
            # Ejection outranks health while it lasts; after it, the health reason shows.
            self._state_reason = (f"ejected: {self._eject_reason}" if self._ejected_until is not None
                                  else self._health_reason)


def _log(events: LogEvents) -> None:
    for level, message, args in events:
        LOG.log(level, message, *args)


class EjectionCap:
    """max_ejected_percent: passive and active checks never take more than this share of an upstream's
    servers out at once (Envoy's outlier detection has the same cap). The servers that went out first
    stay out; any beyond the share keep serving, shown as ``would_eject``, until room frees up.

    Every process applies the same verdicts in the same order, so each reaches the same decision. Lock
    order: the cap's lock, then a server's (a server calls ``recompute`` only after releasing its own).
    """

    def __init__(self, upstream_name: str, servers, percent: int) -> None:
        self._upstream_name = upstream_name
        self._servers = tuple(servers)
        self.max_out = len(self._servers) * percent // 100
        self._lock = threading.Lock()

    def recompute(self) -> None:
        events: LogEvents = []
        with self._lock:
            out = [(since, index, server) for index, server in enumerate(self._servers)
                   if (since := server.out_since()) is not None]
            out.sort(key=lambda item: item[:2])  # first out stays out; the list order breaks ties
            for rank, (_, _, server) in enumerate(out):
                held = rank >= self.max_out
                changed, reason = server.set_held_in(held, self)
                if changed and held:
                    events.append((logging.WARNING, "upstream %s: server %s would be ejected (%s) but "
                                   "max_ejected_percent allows %d of %d servers out: it keeps serving",
                                   (self._upstream_name, server.address, reason, self.max_out,
                                    len(self._servers))))
                elif changed:
                    events.append((logging.INFO, "upstream %s: server %s taken out now that there is room: %s",
                                   (self._upstream_name, server.address, reason)))
            out_servers = {id(server) for _, _, server in out}
            for server in self._servers:
                if id(server) not in out_servers:
                    server.set_held_in(False, self)
        _log(events)
