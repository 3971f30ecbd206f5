"""Ports on 127.0.0.1: one nobody listens on, and whether one accepts connections."""

from __future__ import annotations

import random
import socket
import threading
from collections import deque
from pathlib import Path

_recent: deque[int] = deque(maxlen=64)  # the kernel may hand a freed port out again at once
_recent_lock = threading.Lock()


def _ports_outside_the_ephemeral_range() -> range | None:
    """Ports below the kernel's ephemeral range: no outgoing connection's local port is taken from
    them, so a port picked there cannot be taken by a client socket before the proxy binds it."""
    try:
        first = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return range(10000, first) if first - 10000 >= 5000 else None


_QUIET_PORTS = _ports_outside_the_ephemeral_range()


def _candidate() -> int:
    if _QUIET_PORTS is not None:
        return random.choice(_QUIET_PORTS)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_port() -> int:
    """A port on 127.0.0.1 with nothing listening: connecting is refused, and a proxy started soon
    after can bind it (for subprocesses, which cannot be handed a bound socket). Never one of the
    last ports it returned, so two calls in a row give two ports (a listen and an admin address)."""
    for _ in range(100):
        port = _candidate()
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:  # in use
                continue
        with _recent_lock:
            if port not in _recent:
                _recent.append(port)
                return port
    raise RuntimeError("no fresh port in 100 tries")


def port_open(port: int) -> bool:
    """True if something accepts connections on 127.0.0.1:port."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False
