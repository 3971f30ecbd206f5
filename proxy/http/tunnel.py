"""Relay raw bytes both ways after a ``101 Switching Protocols`` (WebSocket and other Upgrades).

All tunnels of a process share one relay thread and one selector (``TunnelRelay``): the worker
thread that served the upgrade hands the two sockets over and goes back to the pool, so tunnels never
starve the pool, and an idle tunnel costs two sockets and two small objects, no thread.

A tunnel ends when either side closes (what is still buffered for the other side is sent first, then
both are closed, RFC 6455 §7.1.1 has the server close the TCP connection first), when nothing moves
for ``idle_timeout`` (``server.tunnel_timeout``), or ``graceful_timeout`` after a drain began.
Reloads do not touch tunnels: they never look at routes or upstreams again.

Sockets are non-blocking inside the relay. TLS sockets need two extra cares: a read may need more
bytes first (``SSLWantReadError``) and decrypted bytes can sit inside OpenSSL where epoll cannot see
them, so a read drains ``pending()`` before waiting again. Backpressure: while one side has unsent
bytes, the relay stops reading from the other (at most ``CHUNK`` bytes buffered per direction).
"""

from __future__ import annotations

import logging
import selectors
import socket
import ssl
import threading
import time
from collections import deque

from core.wakeup import WakePipe

log = logging.getLogger("pyproxy.tunnel")

CHUNK = 64 * 1024
SWEEP_INTERVAL = 0.5  # seconds between checks of idle timeouts and the drain deadline
MAX_READS_PER_EVENT = 16  # bounds the time one busy TLS socket can hold the relay thread
IDLE_SWEEPS = 10  # sweeps with no tunnel before the thread ends (a stopped proxy keeps none running)
_WOULD_BLOCK = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


class _End:
    """One side of a tunnel: its socket and the bytes waiting to be written to it."""

    __slots__ = ("sock", "fd", "tunnel", "peer", "outbuf", "eof", "registered", "sent")

    def __init__(self, sock: socket.socket, tunnel: "_Tunnel"):
        self.sock = sock
        self.fd = sock.fileno()
        self.tunnel = tunnel
        self.peer: _End | None = None
        self.outbuf = b""
        self.eof = False  # this side closed (or failed): nothing more to read from it
        self.registered = 0  # the selector events currently asked for
        self.sent = 0  # bytes written to this side (the client's count goes to the access log)


class _Tunnel:
    __slots__ = ("conn", "client", "upstream", "idle_timeout", "last_activity", "closed", "record",
                 "release_slot")

    def __init__(self, conn, upstream_sock: socket.socket, idle_timeout: float, now: float, record=None,
                 release_slot=None):
        self.conn = conn
        self.record = record  # the upgrade request's RequestRecord: observed when the tunnel closes
        self.release_slot = release_slot  # gives the upstream server's slot back when the tunnel closes
        self.client = _End(conn.sock, self)
        self.upstream = _End(upstream_sock, self)
        self.client.peer, self.upstream.peer = self.upstream, self.client
        self.idle_timeout = idle_timeout
        self.last_activity = now
        self.closed = False


class TunnelRelay:
    """One thread and one selector for every tunnel of the process (started on the first tunnel)."""

    def __init__(self, app, clock=time.monotonic):
        self.app = app
        self.clock = clock
        self._selector = selectors.DefaultSelector()
        self._wakeup = WakePipe()
        self._selector.register(self._wakeup.read_fd, selectors.EVENT_READ, None)
        self._incoming: deque[_Tunnel] = deque()
        self._tunnels: set[_Tunnel] = set()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._drain_deadline: float | None = None
        self._hot: set[_End] = set()  # TLS ends whose decrypted bytes wait in OpenSSL (epoll cannot see them)

    @property
    def open_count(self) -> int:
        return len(self._tunnels) + len(self._incoming)

    # -- called from a worker thread ---------------------------------------------------------
    def start_tunnel(self, conn, upstream_sock: socket.socket, client_leftover: bytes,
                     idle_timeout: float, record=None, release_slot=None) -> None:
        """Hand over a connection in TUNNEL state and its upstream socket; returns at once. When the
        tunnel closes, ``record`` (the upgrade request's) goes to the app's observers and
        ``release_slot()`` gives the upstream server's slot back."""
        try:
            for sock in (conn.sock, upstream_sock):
                sock.settimeout(0.0)  # non-blocking (settimeout: a TLS socket keeps it that way)
        except OSError as exc:  # one side is already gone: there is nothing to relay
            log.debug("tunnel from %s not started: %s", conn.peer, exc)
            upstream_sock.close()
            conn.close()
            self._report(record, 0, release_slot)
            return
        tunnel = _Tunnel(conn, upstream_sock, idle_timeout, self.clock(), record, release_slot)
        tunnel.upstream.outbuf = client_leftover  # bytes the client sent right after its request
        self.app.tunnel_opened()
        self._incoming.append(tunnel)
        self._ensure_thread()
        self._wakeup.wake()

    def _ensure_thread(self) -> None:
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="pyproxy-tunnels", daemon=True)
                self._thread.start()

    # -- the relay thread ----------------------------------------------------------------------
    def _run(self) -> None:
        next_sweep = self.clock() + SWEEP_INTERVAL
        idle_sweeps = 0
        while True:
            for key, mask in self._selector.select(0 if self._hot else SWEEP_INTERVAL):
                if key.data is None:
                    self._accept_incoming()
                else:
                    self._guarded(self._on_event, key.data, mask)
            for end in list(self._hot):
                self._hot.discard(end)
                if not end.tunnel.closed:
                    self._read(end)
                    self._settle(end.tunnel)
            if self.clock() >= next_sweep:
                self._sweep()
                next_sweep = self.clock() + SWEEP_INTERVAL
                idle_sweeps = 0 if self._tunnels else idle_sweeps + 1
                if idle_sweeps >= IDLE_SWEEPS and self._end_thread_if_idle():
                    return

    def _end_thread_if_idle(self) -> bool:
        """End the relay thread when no tunnel is open or on its way; the next tunnel starts a new one.
        Under the start lock: a tunnel queued before this look keeps the thread, one queued after
        finds no thread and starts one."""
        with self._start_lock:
            if self._tunnels or self._incoming:
                return False
            self._thread = None
            return True

    def _guarded(self, step, end: _End, *args) -> None:
        """One broken tunnel must never stop the relay thread for all the others."""
        try:
            step(end, *args)
        except Exception:
            log.exception("tunnel from %s failed; closing it", end.tunnel.conn.peer)
            if not end.tunnel.closed:
                self._close(end.tunnel)

    def _accept_incoming(self) -> None:
        self._wakeup.drain()
        while self._incoming:
            tunnel = self._incoming.popleft()
            self._tunnels.add(tunnel)
            self._flush(tunnel.upstream)
            self._read(tunnel.client)  # TLS: bytes may already sit decrypted inside OpenSSL
            self._read(tunnel.upstream)
            self._settle(tunnel)

    def _on_event(self, end: _End, mask: int) -> None:
        tunnel = end.tunnel
        if tunnel.closed:
            return
        tunnel.last_activity = self.clock()
        if mask & selectors.EVENT_WRITE:
            self._flush(end)
            if not end.outbuf:
                self._read(end.peer)  # reading was paused for this buffer; resume (TLS may hold bytes)
        if mask & selectors.EVENT_READ:
            self._read(end)
        self._settle(tunnel)

    def _read(self, end: _End) -> None:
        """Read while the peer's buffer is empty; what arrives goes straight out to the peer."""
        peer = end.peer
        for _ in range(MAX_READS_PER_EVENT):
            if end.eof or peer.outbuf:
                return
            try:
                data = end.sock.recv(CHUNK)
            except _WOULD_BLOCK:
                return
            except OSError as exc:  # reset, TLS alert, or a socket core closed at shutdown
                log.debug("tunnel read failed: %s", exc)
                data = b""
            if not data:
                end.eof = True
                return
            peer.outbuf = data
            self._flush(peer)
            pending = getattr(end.sock, "pending", None)
            if pending is None or not pending():
                return  # nothing hidden inside OpenSSL: epoll tells us about the rest
        self._hot.add(end)  # still more inside OpenSSL: come back after serving the others

    def _flush(self, end: _End) -> None:
        if not end.outbuf:
            return
        try:
            sent = end.sock.send(end.outbuf)
        except _WOULD_BLOCK:
            return  # TLS: retried later with the same buffer, as OpenSSL requires
        except OSError as exc:
            log.debug("tunnel write failed: %s", exc)
            end.outbuf = b""
            end.eof = end.peer.eof = True  # nobody left to deliver to: end the tunnel
            return
        end.outbuf = end.outbuf[sent:]
        end.sent += sent

    def _settle(self, tunnel: _Tunnel) -> None:
        """Close a finished tunnel, or register the events each side now waits for."""
        if tunnel.closed:
            return
        client, upstream = tunnel.client, tunnel.upstream
        finished = [end for end in (client, upstream) if end.eof]
        if finished and not any(end.outbuf for end in (client, upstream) if not end.eof):
            self._close(tunnel)
            return
        for end in (client, upstream):
            wanted = 0
            if not end.eof and not end.peer.outbuf:
                wanted |= selectors.EVENT_READ
            if end.outbuf:
                wanted |= selectors.EVENT_WRITE
            self._register(end, wanted)

    def _register(self, end: _End, events: int) -> None:
        if events == end.registered:
            return
        if end.registered and events:
            self._selector.modify(end.fd, events, end)
        elif events:
            self._selector.register(end.fd, events, end)
        else:
            self._selector.unregister(end.fd)
        end.registered = events

    def _close(self, tunnel: _Tunnel) -> None:
        tunnel.closed = True
        self._tunnels.discard(tunnel)
        # Counted closed before the sockets close: whoever sees the close also sees the count drop
        # (the drain, /status, a test), never a tunnel that is gone but still counted.
        self.app.tunnel_closed()
        for end in (tunnel.client, tunnel.upstream):
            if end.registered:
                try:
                    self._selector.unregister(end.fd)
                except (KeyError, ValueError, OSError):  # the fd was already closed at shutdown
                    pass
                end.registered = 0
        try:
            tunnel.upstream.sock.close()
        except OSError:
            pass
        tunnel.conn.close()
        self._report(tunnel.record, tunnel.client.sent, tunnel.release_slot)

    def _report(self, record, relayed_to_client: int, release_slot) -> None:
        if release_slot is not None:
            release_slot()
        if record is not None:
            record.bytes_sent += relayed_to_client
            record.duration = time.monotonic() - record.started  # the handler's clock for `started`
            self.app.observe(record)

    def _sweep(self) -> None:
        """Idle timeouts, and the drain: tunnels get graceful_timeout after it began, then close."""
        now = self.clock()
        if self._drain_deadline is None and self.app.draining():
            self._drain_deadline = now + self.app.settings.graceful_timeout
        draining_over = self._drain_deadline is not None and now >= self._drain_deadline
        for tunnel in list(self._tunnels):
            if draining_over:
                log.info("closing tunnel from %s: graceful timeout", tunnel.conn.peer)
                self._close(tunnel)
            elif now - tunnel.last_activity > tunnel.idle_timeout:
                log.debug("tunnel from %s idle for %.0fs: closing", tunnel.conn.peer, tunnel.idle_timeout)
                self._close(tunnel)
