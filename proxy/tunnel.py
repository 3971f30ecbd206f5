"""Relay raw bytes both ways after a ``101 Switching Protocols`` (WebSocket and other Upgrades).

The tunnel runs on the worker thread that served the upgrade: a poll loop over the two sockets,
ending when either side closes (the other is then shut down too) or nothing moves for
``tunnel_timeout``. Cost per tunnel: one thread while it lives (see README, "Upgrades").
"""

from __future__ import annotations

import logging
import select
import socket
import time

log = logging.getLogger("pyproxy.tunnel")

CHUNK = 64 * 1024
POLL_SLICE = 1.0  # seconds between checks of the drain deadline and the idle timeout


def run_tunnel(conn, upstream: socket.socket, client_leftover: bytes, idle_timeout: float, app) -> None:
    """Relay until one side closes; then close both. ``conn`` is a core Connection in TUNNEL state."""
    client = conn.sock
    app.tunnel_opened()
    try:
        for sock in (client, upstream):
            sock.settimeout(None)
            sock.setblocking(True)
        if client_leftover:
            upstream.sendall(client_leftover)
        _pump(client, upstream, idle_timeout, app)
    except OSError as exc:
        log.debug("tunnel for %s ended: %s", conn.peer, exc)
    finally:
        app.tunnel_closed()
        for sock in (upstream,):
            try:
                sock.close()
            except OSError:
                pass
        conn.close()


def _pump(client: socket.socket, upstream: socket.socket, idle_timeout: float, app) -> None:
    poller = select.poll()
    peers = {client.fileno(): (client, upstream), upstream.fileno(): (upstream, client)}
    for fd in peers:
        poller.register(fd, select.POLLIN)
    last_activity = time.monotonic()
    drain_deadline = None
    while True:
        events = poller.poll(POLL_SLICE * 1000)
        now = time.monotonic()
        if not events:
            if now - last_activity > idle_timeout:
                log.debug("tunnel idle for %.0fs: closing", idle_timeout)
                return
            if app.draining():
                drain_deadline = drain_deadline or now + app.settings.graceful_timeout
                if now >= drain_deadline:
                    return
            continue
        last_activity = now
        for fd, _mask in events:
            source, dest = peers[fd]
            data = source.recv(CHUNK)
            if not data:
                _half_close(dest)
                return
            dest.sendall(data)


def _half_close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
