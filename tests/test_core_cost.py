"""scripts/core-cost's server: core's SocketServer with a trivial handler, as the script measures it.
A smoke test that it still fits core's API: keep-alive requests and a closing one are answered."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TIMEOUT_S = 10.0
REQUEST = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
CLOSING_REQUEST = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


def read_response(sock: socket.socket) -> bytes:
    """One response of the script's server: a head and its 16-byte body."""
    data = b""
    while not (b"\r\n\r\n" in data and len(data.split(b"\r\n\r\n", 1)[1]) >= 16):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def test_the_measured_server_answers_keep_alive_and_closing_requests():
    child = subprocess.Popen([sys.executable, str(REPO / "scripts" / "core-cost"), "--serve"], cwd=REPO,
                             stdout=subprocess.PIPE, text=True)
    try:
        port = int(child.stdout.readline())  # printed once it listens
        with contextlib.closing(socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S)) as sock:
            for _ in range(3):  # the connection is parked and re-armed between requests
                sock.sendall(REQUEST)
                assert read_response(sock).startswith(b"HTTP/1.1 200 OK\r\n")
            sock.sendall(CLOSING_REQUEST)
            answer = read_response(sock)
            assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and b"Connection: close" in answer
            assert sock.recv(1) == b""  # and then closed
    finally:
        child.send_signal(signal.SIGTERM)
        child.wait(TIMEOUT_S)
