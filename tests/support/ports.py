"""Ports on 127.0.0.1: one nobody listens on, and whether one accepts connections."""

from __future__ import annotations

import socket
import threading
from collections import deque

_recent: deque[int] = deque(maxlen=64)  # the kernel may hand a freed port out again at once
_recent_lock = threading.Lock()


def free_port() -> int:
    """A port on 127.0.0.1 with nothing listening: connecting is refused, and a proxy started soon
    after can bind it (for subprocesses, which cannot be handed a bound socket). Never one of the
    last ports it returned, so two calls in a row give two ports (a listen and an admin address)."""
    for _ in range(100):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
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
