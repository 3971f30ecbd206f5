"""Active health checks: poll each server's health path and take failing servers out.

Health *state* lives on ``Server`` (``set_health``); the *policy* lives here (as in
Caddy's ``healthchecks.go``):

- ``HealthPolicy`` is the pure pass/fail counter of one server: ``unhealthy_after`` consecutive
  failures take it down, ``healthy_after`` consecutive passes bring it back. Servers start up, so a
  server that fails its first ``unhealthy_after`` checks goes down (nginx plus and Caddy do the same:
  traffic flows from the first moment, and passive checks cover the gap until the verdict).
- ``probe`` runs one check over its own short-lived connection (never the traffic pool), bounded by
  ``timeout`` from connect to the end of the response head.
- ``HealthChecker`` is the service: one scheduler thread that hands due checks to a few probe
  threads, so a check hanging until its timeout never delays the others, and never blocks traffic.

Checks run once per proxy. The checker reports each verdict change as
``(upstream_name, server_address, up, reason)`` to ``checker.listeners``; ``apply_health`` applies
one such change to a process's own ``Server`` objects, so a supervisor can run the checker and feed
the verdicts to its worker processes. In single-process mode the checker applies them itself.
"""

from __future__ import annotations

import concurrent.futures
import functools
import logging
import random
import re
import socket
import ssl
import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable

from proxy.config.schema import HealthConfig, UpstreamConfig
from proxy.config.units import describe_expect_status
from proxy.upstream.pool import upstream_tls_context
from proxy.upstream.rounds import RoundLoop
from proxy.upstream.servers import DISABLED
from proxy.http.proxy_protocol import build_header
from proxy.http.http1 import NEED_DATA, Data, EndOfMessage, ProtocolError, ResponseHead, ResponseParser

log = logging.getLogger("pyproxy.health")

JITTER = 0.1            # each interval is stretched or shrunk by up to 10% so servers are not hit in lockstep
MAX_IDLE_WAIT = 1.0     # the scheduler looks at app.runtime at least this often (reloads)
MAX_PROBE_THREADS = 16  # concurrent checks; a hanging check holds one thread for at most `timeout`
READ_SIZE = 16 * 1024
MAX_DRAIN_BYTES = 64 * 1024  # a health body is read (politely) up to this much, then the connection is dropped
MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_MATCH_BYTES = 64 * 1024  # expect_body is looked for within this much of the body
USER_AGENT = "pyproxy-health"

Listener = Callable[[str, str, bool, str], None]


# -- the pure decision ---------------------------------------------------------------------------

class HealthPolicy:
    """Consecutive pass/fail counting for one server. No I/O, no clock, no threads."""

    def __init__(self, healthy_after: int, unhealthy_after: int, up: bool = True):
        self.healthy_after = healthy_after
        self.unhealthy_after = unhealthy_after
        self.up = up
        self.passes = 0
        self.failures = 0

    def record(self, ok: bool, detail: str) -> tuple[bool, str] | None:
        """Count one check result; returns (up, reason) when the verdict changes, else None."""
        if ok:
            self.passes, self.failures = self.passes + 1, 0
            if not self.up and self.passes >= self.healthy_after:
                self.up = True
                return True, f"{self.passes} consecutive checks passed"
        else:
            self.passes, self.failures = 0, self.failures + 1
            if self.up and self.failures >= self.unhealthy_after:
                self.up = False
                return False, f"{self.failures} consecutive checks failed, last: {detail}"
        return None


@dataclass(frozen=True)
class CheckResult:
    """One check: when (wall clock, comparable across processes), verdict, latency, what came back."""

    checked_at: float
    ok: bool
    latency_ms: float
    status: int | None = None
    error: str | None = None

    @property
    def detail(self) -> str:
        return self.error or f"status {self.status}"

    def to_dict(self) -> dict:
        return asdict(self)


# -- one probe -------------------------------------------------------------------------------------

def probe(host: str, port: int, health: HealthConfig, *, host_header: str,
          tls_context: ssl.SSLContext | None = None, proxy_header: bytes = b"",
          clock=time.monotonic, wall_clock=time.time) -> CheckResult:
    """Request health.path on host:port over a fresh connection; the whole head must come within timeout.

    ``health.port`` and ``health.host`` (when set) replace ``port`` and ``host_header``. A redirect is
    never followed: its status is judged like any other (it fails unless expect_status lists it).
    ``proxy_header`` goes first on the connection (an upstream with send_proxy_protocol expects one).
    """
    started = clock()
    deadline = started + health.timeout
    status, body, error = None, b"", None
    try:
        status, body = _fetch(host, health.port or port, _request_bytes(health, health.host or host_header),
                              health.method, tls_context, deadline, clock, want_body=health.expect_body is not None,
                              proxy_header=proxy_header)
    except (TimeoutError, socket.timeout):
        error = f"timed out after {health.timeout:g}s"
    except ProtocolError as exc:
        error = f"invalid response: {exc.reason}"
    except ssl.SSLError as exc:
        error = f"TLS error: {exc.reason or exc}"
    except OSError as exc:
        error = exc.strerror or str(exc) or type(exc).__name__
    latency_ms = round((clock() - started) * 1000, 3)
    if error is None and status not in health.expect_status:
        error = f"status {status} (expected {describe_expect_status(health.expect_status)})"
    if error is None and health.expect_body is not None and not body_matches(health, body):
        shown = f"~{health.expect_body}" if health.expect_body_regex else health.expect_body
        error = f"status {status} but the body does not match {shown!r}"
    return CheckResult(wall_clock(), error is None, latency_ms, status, error)


def _own_proxy_header(upstream: UpstreamConfig, server_port: int) -> bytes:
    """A probe is the proxy's own connection, with no client behind it: v2 LOCAL, v1 UNKNOWN. Only on
    the traffic port: a health.port elsewhere is another listener, which expects none (as in HAProxy)."""
    if not upstream.send_proxy_protocol or (upstream.health.port or server_port) != server_port:
        return b""
    return build_header(upstream.send_proxy_protocol, None)


def body_matches(health: HealthConfig, body: bytes) -> bool:
    """Is expect_body in the first MAX_BODY_MATCH_BYTES of the body (read as latin-1, byte for byte)?"""
    text = body[:MAX_BODY_MATCH_BYTES].decode("latin-1")
    if health.expect_body_regex:
        return _compiled(health.expect_body).search(text) is not None
    return health.expect_body in text


@functools.lru_cache(maxsize=64)
def _compiled(pattern: str) -> re.Pattern:
    return re.compile(pattern)  # validated when the config was loaded


def _request_bytes(health: HealthConfig, host_header: str) -> bytes:
    """The probe's request head; headers from the config replace the default User-Agent and Accept."""
    names = {name.lower() for name, _ in health.headers}
    lines = [f"{health.method} {health.path} HTTP/1.1", f"Host: {host_header}"]
    if "user-agent" not in names:
        lines.append(f"User-Agent: {USER_AGENT}")
    if "accept" not in names:
        lines.append("Accept: */*")
    lines += [f"{name}: {value}" for name, value in health.headers]
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _remaining(deadline: float, clock) -> float:
    left = deadline - clock()
    if left <= 0:
        raise TimeoutError
    return left


def _fetch(host, port, request: bytes, method: str, tls_context, deadline, clock,
           want_body: bool, proxy_header: bytes = b"") -> tuple[int, bytes]:
    """(status, up to MAX_BODY_MATCH_BYTES of the body when want_body, else b"")."""
    sock = socket.create_connection((host, port), timeout=_remaining(deadline, clock))
    try:
        if proxy_header:  # before TLS, as on the pooled connections
            sock.sendall(proxy_header)
        if tls_context is not None:
            sock.settimeout(_remaining(deadline, clock))
            sock = tls_context.wrap_socket(sock, server_hostname=host)
        sock.settimeout(_remaining(deadline, clock))
        sock.sendall(request)
        parser = ResponseParser(method, max_header_bytes=MAX_HEAD_BYTES)
        head = _read_head(sock, parser, deadline, clock)
        if want_body and not parser.switched:
            return head.status, _read_body(sock, parser, deadline, clock)
        _drain_body(sock, parser, deadline, clock)
        return head.status, b""
    finally:
        sock.close()


def _read_head(sock, parser: ResponseParser, deadline, clock) -> ResponseHead:
    while True:
        event = parser.next_event()
        if isinstance(event, ResponseHead):
            if event.status >= 200 or parser.switched:
                return event  # a 101 is final: nothing HTTP follows it (and the check fails on it)
            continue  # RFC 9110 §15.2: 1xx interim responses precede the final one
        if event is NEED_DATA:
            _feed_more(sock, parser, deadline, clock)


def _feed_more(sock, parser: ResponseParser, deadline, clock) -> None:
    """One read within the deadline, fed to the parser (its end of stream too)."""
    sock.settimeout(_remaining(deadline, clock))
    data = sock.recv(READ_SIZE)
    if data:
        parser.feed(data)
    else:
        parser.feed_eof()


def _read_body(sock, parser: ResponseParser, deadline, clock) -> bytes:
    """The body up to MAX_BODY_MATCH_BYTES, within the deadline (a slow body times the check out)."""
    body = bytearray()
    while len(body) < MAX_BODY_MATCH_BYTES:
        event = parser.next_event()
        if isinstance(event, EndOfMessage):
            break
        if isinstance(event, Data):
            body += event.data
        elif event is NEED_DATA:
            _feed_more(sock, parser, deadline, clock)
    return bytes(body[:MAX_BODY_MATCH_BYTES])


def _drain_body(sock, parser: ResponseParser, deadline, clock) -> None:
    """Read the (small) body so the backend sees a clean close, not a reset; give up quietly."""
    if parser.switched:
        return  # not HTTP any more: nothing to drain (the parser would wait forever, even past EOF)
    drained = 0
    try:
        while drained <= MAX_DRAIN_BYTES:
            event = parser.next_event()
            if isinstance(event, EndOfMessage):
                return
            if event is NEED_DATA:
                sock.settimeout(_remaining(deadline, clock))
                data = sock.recv(READ_SIZE)
                if not data:
                    parser.feed_eof()
                    continue
                drained += len(data)
                parser.feed(data)
    except (OSError, ProtocolError) as exc:
        log.debug("health body not drained: %s", exc)


# -- applying verdicts -----------------------------------------------------------------------------

def apply_health(app, upstream_name: str, address: str, up: bool, reason: str, announce: bool = True) -> bool:
    """Apply one verdict to this process's servers. True if a server with that address exists.

    A worker passes ``announce=False``: its supervisor, which ran the check, logged the change.
    Under the application's reload lock: a reload (on another thread) copies each rebuilt server's
    health from its predecessor, so a verdict must land before that copy or after the swap, never between.
    """
    with app.reload_lock:
        upstream = app.runtime.upstreams.get(upstream_name)
        if upstream is None:
            return False
        found = False
        for server in upstream.servers:
            if server.address == address:
                server.set_health(up, reason, announce)
                found = True
    return found


def _checked(server) -> bool:
    """A server the operator disabled gets no health checks; its last verdict stays until it is
    enabled again, and the first check after that is due at once."""
    return server.admin_state != DISABLED


# -- the service -----------------------------------------------------------------------------------

class _Target:
    """Checker state for one server, carried across reloads by Server object identity."""

    __slots__ = ("upstream_name", "server", "policy", "next_due", "in_flight", "last")

    def __init__(self, upstream_name, server, health: HealthConfig, next_due: float, up: bool = True):
        self.upstream_name = upstream_name
        self.server = server
        self.policy = HealthPolicy(health.healthy_after, health.unhealthy_after, up)
        self.next_due = next_due
        self.in_flight = False
        self.last: CheckResult | None = None


class HealthChecker:
    """Runs active checks for every upstream with a [health] table, following reloads."""

    def __init__(self, app, clock=time.monotonic, wall_clock=time.time, rng: random.Random | None = None,
                 apply_locally: bool = True, max_threads: int = MAX_PROBE_THREADS):
        self.app = app
        self.clock = clock
        self.wall_clock = wall_clock
        self.rng = rng or random.Random()
        self.apply_locally = apply_locally
        self.listeners: list[Listener] = []  # called with (upstream, address, up, reason) on each change
        self._max_threads = max_threads
        self._targets: dict[tuple[str, int], _Target] = {}  # (upstream name, id(server)) -> state
        self._lock = threading.Lock()
        self._emit_lock = threading.Lock()  # verdicts announced one at a time: see _emit
        self._round_lock = threading.Lock()  # one round at a time: the scheduler's, or a reload's
        self._loop = RoundLoop(self.run_once, "pyproxy-health-scheduler", "health check round", MAX_IDLE_WAIT, log)
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._tls_contexts: dict[tuple, ssl.SSLContext] = {}

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(self._max_threads, thread_name_prefix="pyproxy-health")
        self.app.reload_listeners.append(self._on_reload)
        self._loop.start()

    def stop(self) -> None:
        self._loop.stop()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        if self._on_reload in self.app.reload_listeners:
            self.app.reload_listeners.remove(self._on_reload)

    def _on_reload(self, old_config, new_config) -> None:
        # Sync now, in the reloading thread: a server rebuilt by the reload (new weight, ...) must take
        # over its predecessor's verdict before traffic reaches it, not after the next wait.
        self._tls_contexts = {}  # tls_ca is read again on a reload (a rotated CA file)
        self.run_once()
        self._loop.kick()  # and let the scheduler recompute its wait

    # -- reporting ---------------------------------------------------------------------------------
    def last_check(self, upstream_name: str, address: str) -> dict | None:
        """The latest check of that server as a dict (CheckResult fields), or None."""
        with self._lock:
            for target in self._targets.values():
                if target.upstream_name == upstream_name and target.server.address == address and target.last:
                    return target.last.to_dict()
        return None

    def verdicts(self) -> list[tuple[str, str, bool, str]]:
        """Current (upstream, address, up, reason) of every checked server: replay for a new worker,
        in the order the servers went down (as they were announced, for max_ejected_percent)."""
        with self._lock:
            targets = list(self._targets.values())
        targets.sort(key=lambda t: t.server.out_since() or 0.0)
        return [(t.upstream_name, t.server.address, t.policy.up, t.server.state_reason) for t in targets]

    def replay_verdicts(self, send: Listener) -> None:
        """``send`` each of ``verdicts()`` while no new verdict is announced: a replay that read one and
        sent it after a newer one went out would undo the newer one in the process it replays to."""
        with self._emit_lock:
            for verdict in self.verdicts():
                send(*verdict)

    # -- the loop (proxy.upstream.rounds) -----------------------------------------------------------
    def run_once(self) -> float:
        """Sync targets with app.runtime, start every due check; returns seconds until the next is due."""
        with self._round_lock:
            now = self.clock()
            due = self._sync_targets(now)
            for target, upstream_config in due:
                self._submit(target, upstream_config)
        with self._lock:
            waits = [t.next_due - now for t in self._targets.values() if not t.in_flight and _checked(t.server)]
        return min([MAX_IDLE_WAIT, *waits]) if waits else MAX_IDLE_WAIT

    def _sync_targets(self, now: float) -> list[tuple[_Target, UpstreamConfig]]:
        runtime = self.app.runtime
        wanted: dict[tuple[str, int], tuple] = {}
        for name, upstream in runtime.upstreams.items():
            health = upstream.config.health
            if health is None:
                continue
            for server in upstream.servers:
                wanted[(name, id(server))] = (server, upstream.config)
        due, dropped, kept_down = [], [], []
        with self._lock:
            for key in list(self._targets):
                if key not in wanted:
                    dropped.append(self._targets.pop(key))
            predecessors = {(t.upstream_name, t.server.address): t for t in dropped}
            for key, (server, upstream_config) in wanted.items():
                health = upstream_config.health
                target = self._targets.get(key)
                if target is None:
                    first = now + self.rng.uniform(0, JITTER) * health.interval
                    if not server.healthy:  # it joined down (new from DNS): check it now, not an interval later
                        first = now
                    target = self._targets[key] = _Target(key[0], server, health, first, up=server.healthy)
                    predecessor = predecessors.pop((key[0], server.address), None)
                    reason = self._inherit(target, predecessor) if predecessor is not None else None
                    if reason is not None:
                        kept_down.append((target, reason))
                target.policy.healthy_after = health.healthy_after
                target.policy.unhealthy_after = health.unhealthy_after
                if target.next_due > now + health.interval * (1 + JITTER):
                    # A reload shortened the interval: the check scheduled under the old one is too far off.
                    target.next_due = now + health.interval * self.rng.uniform(1 - JITTER, 1 + JITTER)
                if not target.in_flight and target.next_due <= now and _checked(server):
                    target.in_flight = True
                    due.append((target, upstream_config))
        for target in dropped:
            self._forget(target, runtime)
        for target, reason in kept_down:
            self._emit(target, False, reason)
        return due

    @staticmethod
    def _inherit(target: _Target, predecessor: _Target) -> str | None:
        """A reload rebuilt this server (its weight or the upstream's limits changed): keep the checker's
        count and verdict, so a server known to be down does not start "up" and take traffic until it
        fails ``unhealthy_after`` checks again. Returns the reason to announce it down, if it is.

        Unless the verdict says up and the new server was built down: its address left DNS and came
        back between two rounds (joining, so checked first), or the reload copied its predecessor's
        health while an "up" was still being announced. Inherited, that "up" would never be said again
        and the server would stay down for good: it is checked now, as a joining server is."""
        last = f", last check: {predecessor.last.detail}" if predecessor.last else ""
        target.last = predecessor.last
        if predecessor.policy.up and not target.server.healthy:
            target.policy.up = False  # no count yet, and due now (a server that is not healthy)
            return "rebuilt down: waiting for its next health check"
        target.policy.up = predecessor.policy.up
        target.policy.passes, target.policy.failures = predecessor.policy.passes, predecessor.policy.failures
        target.next_due = predecessor.next_due
        return None if target.policy.up else f"still down after a reload{last}"

    def _forget(self, target: _Target, runtime) -> None:
        """A server no longer checked (removed, or its upstream lost [health]) must not stay down."""
        upstream = runtime.upstreams.get(target.upstream_name)
        still_served = upstream is not None and any(s is target.server for s in upstream.servers)
        if still_served and not target.policy.up:
            self._emit(target, True, "active health checks disabled")

    def _submit(self, target: _Target, upstream_config: UpstreamConfig) -> None:
        try:
            self._executor.submit(self._check, target, upstream_config)
        except RuntimeError:  # the executor shut down under us: we are stopping
            with self._lock:
                target.in_flight = False

    def _check(self, target: _Target, upstream_config: UpstreamConfig) -> None:
        health = upstream_config.health
        server = target.server
        try:
            result = probe(server.host, server.port, health, host_header=server.address,
                           tls_context=self._tls_context(upstream_config) if server.tls else None,
                           proxy_header=_own_proxy_header(upstream_config, server.port),
                           clock=self.clock, wall_clock=self.wall_clock)
        except Exception as exc:  # a probe bug must count as a failed check, not kill the checker
            log.exception("health check of %s crashed", server.address)
            result = CheckResult(self.wall_clock(), False, 0.0, None, f"check crashed: {exc!r}")
        self.record_result(target, result, health)

    def record_result(self, target: _Target, result: CheckResult, health: HealthConfig) -> None:
        with self._lock:
            target.last = result
            target.in_flight = False
            target.next_due = self.clock() + health.interval * self.rng.uniform(1 - JITTER, 1 + JITTER)
            # A check that outlived a reload which dropped its target must not announce a verdict: its
            # address may now belong to a successor with its own count, and listeners (the workers)
            # apply verdicts by address, so a late "down" would stick while the successor says "up".
            current = self._targets.get((target.upstream_name, id(target.server))) is target
            change = target.policy.record(result.ok, result.detail) if current else None
        if not result.ok:
            log.debug("health check of %s failed: %s", target.server.address, result.detail)
        if change is not None:
            self._emit(target, *change)
        self._loop.kick()  # recompute the wait: this target is due again at a new time

    def _emit(self, target: _Target, up: bool, reason: str) -> None:
        # Checks finish on several threads. One at a time here, so every listener (each worker) hears the
        # verdicts in the order they were applied locally: max_ejected_percent keeps the servers that
        # went out first, and must pick the same ones in every process.
        with self._emit_lock:
            if self.apply_locally:
                target.server.set_health(up, reason)  # logs the change at info, with the reason
            else:
                log.info("upstream %s server %s is %s: %s", target.upstream_name, target.server.address,
                         "up" if up else "down", reason)
            for listener in self.listeners:
                try:
                    listener(target.upstream_name, target.server.address, up, reason)
                except Exception:  # one broken listener must not stop the others hearing the verdict
                    log.exception("health listener %r failed", listener)

    def _tls_context(self, upstream_config: UpstreamConfig) -> ssl.SSLContext:
        key = (upstream_config.tls_verify, upstream_config.tls_ca)
        contexts = self._tls_contexts  # once: one built while a reload empties the table goes with the old one
        context = contexts.get(key)
        if context is None:
            context = contexts[key] = upstream_tls_context(upstream_config)
        return context
