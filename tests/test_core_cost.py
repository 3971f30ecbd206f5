"""scripts/core-cost's server: core's SocketServer with a trivial handler, as the script measures it.
A smoke test that it still fits core's API: keep-alive requests and a closing one are answered."""

from __future__ import annotations

import contextlib
import select
import signal
import socket
import subprocess
import sys
from pathlib import Path

from tests.support.client import RawClient

REPO = Path(__file__).resolve().parent.parent
TIMEOUT_S = 10.0
REQUEST = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
CLOSING_REQUEST = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


def test_the_measured_server_answers_keep_alive_and_closing_requests():
    child = subprocess.Popen([sys.executable, str(REPO / "scripts" / "core-cost"), "--serve"], cwd=REPO,
                             stdout=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([child.stdout], [], [], TIMEOUT_S)
        assert ready, "the server never printed its port"
        port = int(child.stdout.readline())  # printed once it listens
        with contextlib.closing(socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S)) as sock:
            client = RawClient(sock)
            for _ in range(3):  # the connection is parked and re-armed between requests
                client.send(REQUEST)
                assert client.read_response().status == 200
            client.send(CLOSING_REQUEST)
            answer = client.read_response()
            assert answer.status == 200 and answer.header("Connection") == "close"
            assert client.at_eof()  # and then closed
    finally:
        child.send_signal(signal.SIGTERM)
        child.wait(TIMEOUT_S)
