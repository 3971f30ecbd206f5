"""Ports on 127.0.0.1: one nobody listens on, and whether one accepts connections."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port on 127.0.0.1 with nothing listening: connecting is refused, and a proxy started soon
    after can bind it (for subprocesses, which cannot be handed a bound socket)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_open(port: int) -> bool:
    """True if something accepts connections on 127.0.0.1:port."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False
