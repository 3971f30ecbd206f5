"""Keep-alive connections to one upstream server (urllib3 ``connectionpool``'s discipline).

- checkout: take the most recently used idle connection (the one least likely to have timed out on
  the server), drop those idle past ``keepalive_timeout`` or that the server closed (a one-syscall
  peek); otherwise connect a new one.
- release: only a connection whose response was read to the end and that both sides keep alive
  comes back, and only up to ``keepalive`` idle connections; anything doubtful is closed.
- No I/O under the lock: sockets are closed after the lock is released.
- ``PoolSweeper``: once a second, idle connections past ``keepalive_timeout``, or that the server
  closed, are closed without waiting for the next request to that server (nginx closes them on a
  timer too): otherwise a server that gets no more traffic keeps them open, and a server that closed
  them leaves the proxy holding sockets in CLOSE_WAIT, for ever.
- ``send_proxy_protocol``: a new connection starts with a PROXY header naming the client it was opened
  for, and the server believes it for the connection's whole life. So such a connection is reused only
  for that same client address (HAProxy, too, never shares such a connection between clients), and
  when the pool is full, the least recently used one makes room (many clients, each a little keep-alive).
"""

from __future__ import annotations

import logging
import select
import socket
import ssl
import threading
import time
from typing import Callable, Iterable

from core.connection import set_socket_timeouts

from proxy.config.schema import UpstreamConfig
from proxy.config.units import format_address
from proxy.http.errors import UpstreamConnectError
from proxy.http.proxy_protocol import Origin, build_header
from proxy.upstream.rounds import RoundLoop

log = logging.getLogger("pyproxy.pool")

SWEEP_INTERVAL = 1.0  # seconds between sweeps of idle connections: a keepalive_timeout is kept to about this


def upstream_tls_context(upstream: UpstreamConfig) -> ssl.SSLContext:
    """The client-side TLS context for an upstream's https:// servers (pooled and health checks)."""
    context = ssl.create_default_context(cafile=upstream.tls_ca)
    if not upstream.tls_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["http/1.1"])
    return context


class UpstreamConnection:
    __slots__ = ("sock", "last_used", "requests", "read_timeout", "client", "poller")

    def __init__(self, sock: socket.socket, now: float, read_timeout: float = 60.0, client: str | None = None):
        self.sock = sock
        self.client = client  # with send_proxy_protocol: the client address its PROXY header named
        self.last_used = now
        self.requests = 0  # how many requests this connection carried (0 = fresh)
        self.read_timeout = read_timeout  # what its socket's timeouts were set to
        # Its socket registered for POLLIN: the check before each reuse (checkout) is then one C call.
        self.poller = select.poll()
        self.poller.register(sock, select.POLLIN)

    @property
    def reused(self) -> bool:
        return self.requests > 0

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:  # already closed by the peer; nothing left to release
            pass




def _readable(conns: Iterable[UpstreamConnection]) -> list[UpstreamConnection]:
    """The connections whose socket is readable now (EOF, an error or bytes), or already closed."""
    poller = select.poll()
    by_fd = {}
    for conn in conns:
        fd = conn.sock.fileno()
        if fd < 0:  # closed meanwhile by a checkout that found it unusable
            continue
        by_fd[fd] = conn
        poller.register(fd, select.POLLIN)
    if not by_fd:
        return []
    return [by_fd[fd] for fd, _ in poller.poll(0) if fd in by_fd]


class ServerPool:
    def __init__(self, host: str, port: int, *, keepalive: int = 32, keepalive_timeout: float = 30.0,
                 connect_timeout: float = 5.0, read_timeout: float = 60.0,
                 tls_context: ssl.SSLContext | None = None, tls_server_name: str | None = None,
                 proxy_protocol: str | None = None, clock=time.monotonic):
        self.host, self.port = host, port
        self.keepalive = keepalive
        self.keepalive_timeout = keepalive_timeout
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.tls_context = tls_context
        self.tls_server_name = tls_server_name or host
        self.proxy_protocol = proxy_protocol  # "v1" | "v2": each new connection starts with a PROXY header
        self.clock = clock
        self._idle: list[UpstreamConnection] = []
        self._lock = threading.Lock()
        self._closed = False  # set when a reload dropped this server: nothing comes back in
        self.connects_total = 0

    @property
    def address(self) -> str:
        """"host:port" as the error page names it (IPv6 literals bracketed, RFC 3986 §3.2.2)."""
        return format_address(self.host, self.port)

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    def checkout(self, max_idle: float | None = None, origin: Origin | None = None) -> UpstreamConnection:
        """A pooled connection, or a new one. ``max_idle``: take a pooled one only if it was used that
        recently (a request that must not meet a stale connection). ``origin``: the client connection a
        request comes from, which a pool sending PROXY headers needs (only its own connections fit)."""
        # A loop, not a recursion: after a backend restart every idle connection may be dead, and a
        # pool of about a thousand of them overflowed the stack. Bounded: each turn takes one out.
        while True:
            found = self._take_idle(max_idle, origin.src_ip if origin is not None else None)
            if found is None:
                return self.connect(origin)
            # Readable means EOF, an error or unexpected bytes (either way: unusable). A poll, not a
            # MSG_PEEK recv: a clean socket (the normal answer) then costs no raised and caught
            # BlockingIOError, and TLS sockets, which refuse MSG_PEEK, take the same path. Data, EOF and
            # a reset all make it readable (or POLLERR/POLLHUP, which poll reports unasked).
            if not found.poller.poll(0):
                return found
            found.close()

    def _take_idle(self, max_idle: float | None = None, client: str | None = None) -> UpstreamConnection | None:
        """The most recently used idle connection young enough to try; expired ones are closed."""
        doomed = []
        found = None
        now = self.clock()
        with self._lock:
            if self.proxy_protocol is not None:
                found = self._take_client_idle_locked(client, now, max_idle)
            else:
                while self._idle:
                    candidate = self._idle.pop()
                    if now - candidate.last_used < self.keepalive_timeout:
                        if max_idle is None or now - candidate.last_used < max_idle:
                            found = candidate
                        else:  # the youngest is too old for this request; younger ones do not exist
                            self._idle.append(candidate)
                        break
                    doomed.append(candidate)
            # everything older than the one we took is older still: drop the stale tail too
            if self._idle and now - self._idle[0].last_used >= self.keepalive_timeout:
                doomed.extend(c for c in self._idle if now - c.last_used >= self.keepalive_timeout)
                self._idle = [c for c in self._idle if now - c.last_used < self.keepalive_timeout]
        for conn in doomed:
            conn.close()
        return found

    def _take_client_idle_locked(self, client: str | None, now: float, max_idle: float | None):
        """The most recently used idle connection opened for ``client`` (send_proxy_protocol)."""
        for index in range(len(self._idle) - 1, -1, -1):
            candidate = self._idle[index]
            if candidate.client != client:
                continue
            age = now - candidate.last_used
            if age >= self.keepalive_timeout or (max_idle is not None and age >= max_idle):
                return None  # this client's younger ones do not exist; the stale tail is dropped by the caller
            del self._idle[index]
            return candidate
        return None

    def close_idle_expired(self) -> int:
        """Close the idle connections past keepalive_timeout, and those the server closed or sent bytes on
        (unusable: checkout would drop them too). Returns how many were closed."""
        now = self.clock()
        with self._lock:
            idle = list(self._idle)
            requests_then = {id(conn): conn.requests for conn in idle}  # ids stay unique: ``idle`` holds them
        # The poll outside the lock, and on a poll object of its own: a checkout that takes one of these
        # meanwhile polls that connection's own poller, and one poll object refuses two callers at once.
        unusable = {id(conn) for conn in idle if now - conn.last_used >= self.keepalive_timeout}
        unusable.update(id(conn) for conn in _readable(conn for conn in idle if id(conn) not in unusable))
        if not unusable:
            return 0
        with self._lock:
            # Only those untouched since: one a request took and released meanwhile (readable then, as
            # its response came in) carried one more request, and is as good as any.
            doomed = [conn for conn in self._idle
                      if id(conn) in unusable and conn.requests == requests_then[id(conn)]]
            if doomed:
                doomed_ids = set(map(id, doomed))
                self._idle = [conn for conn in self._idle if id(conn) not in doomed_ids]
        for conn in doomed:
            conn.close()
        return len(doomed)

    def connect(self, origin: Origin | None = None) -> UpstreamConnection:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        except socket.timeout as exc:
            raise UpstreamConnectError(f"connect to {self.host}:{self.port} timed out", status=504,
                                       address=self.address) from exc
        except OSError as exc:
            raise UpstreamConnectError(f"connect to {self.host}:{self.port} failed: {exc.strerror or exc}",
                                       address=self.address,
                                       refused=isinstance(exc, ConnectionRefusedError)) from exc
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.proxy_protocol is not None:  # before anything else, TLS included (as HAProxy sends it)
                sock.sendall(build_header(self.proxy_protocol, origin))
            if self.tls_context is not None:
                sock = self.tls_context.wrap_socket(sock, server_hostname=self.tls_server_name)
            if self.tls_context is not None:
                # Kernel timeouts do not bound TLS reads (CPython retries SSL_read on EAGAIN), so a
                # TLS socket gets a Python-level timeout: a TimeoutError after read_timeout.
                sock.settimeout(self.read_timeout)
            else:
                sock.settimeout(None)  # blocking; kernel-side timeouts below (see core.connection)
                set_socket_timeouts(sock, self.read_timeout, self.read_timeout)
        except ssl.SSLError as exc:
            sock.close()
            raise UpstreamConnectError(f"TLS handshake with {self.host}:{self.port} failed: {exc}") from exc
        except OSError as exc:
            sock.close()
            raise UpstreamConnectError(f"connect to {self.host}:{self.port} failed: {exc}") from exc
        self.connects_total += 1
        return UpstreamConnection(sock, self.clock(), self.read_timeout,
                                  origin.src_ip if origin is not None and self.proxy_protocol else None)

    def release(self, conn: UpstreamConnection, reusable: bool) -> None:
        """Return a connection after a complete exchange; close it if it cannot be trusted."""
        conn.requests += 1
        if reusable and self.keepalive > 0:
            conn.last_used = self.clock()
            evicted = None
            with self._lock:
                idle = self._idle
                room = len(idle) < self.keepalive
                if not room and self.proxy_protocol is not None and idle:
                    evicted = idle.pop(0)  # the least recently used client's makes room
                    room = True
                if room and not self._closed:
                    idle.append(conn)
                    conn = None
            if evicted is not None:
                evicted.close()
            if conn is None:
                return
        conn.close()

    def close_all(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
            self._closed = True
        for conn in idle:
            conn.close()


class PoolSweeper:
    """The service that closes expired idle connections of every pool, on its own thread (a ProxyProcess
    service: start() and stop()). ``pools`` gives the current pools (a reload changes them)."""

    def __init__(self, pools: Callable[[], Iterable[ServerPool]], interval: float = SWEEP_INTERVAL):
        self._pools = pools
        self._interval = interval
        self._loop = RoundLoop(self.run_once, "pyproxy-pool-sweeper", "idle connection sweep", interval, log)

    def start(self) -> None:
        self._loop.start()

    def stop(self) -> None:
        self._loop.stop()

    def run_once(self) -> float:
        for pool in self._pools():
            pool.close_idle_expired()
        return self._interval
