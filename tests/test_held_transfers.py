"""Held transfers attacked from outside: peers that trickle, reset or vanish while the server's
transfer relay carries their transfer, and what the proxy then logs, counts and keeps."""

from __future__ import annotations

import hashlib
import http.client
import socket
import threading

from tests.support.backends import consume_and_digest
from tests.support.proxy import CLIENT_TIMEOUT
from tests.support.timing import wait_for

TRICKLE_PIECE = 1024
TRICKLE_GAP = 0.04
MAX_TRICKLE_PIECES = 250  # 10 s of trickling at most: the bound of every trickle loop


def held(proxy) -> int:
    return proxy.process.server.connection_counts().get("held", 0)


def read_response(sock: socket.socket, method: str = "GET") -> tuple[int, bytes]:
    response = http.client.HTTPResponse(sock, method=method)
    response.begin()
    return response.status, response.read()


def test_a_trickled_chunked_upload_leaves_the_worker(make_backend, make_proxy):
    # A client sending one small chunk every 40 ms never lets a read wait out the patience: without
    # a budget it would keep a worker for the whole upload.
    backend = make_backend().route("/upload", consume_and_digest)
    proxy = make_proxy({"web": [backend.address]})
    piece = b"a" * TRICKLE_PIECE
    chunk = b"%x\r\n%s\r\n" % (len(piece), piece)
    seen_held = threading.Event()
    sent = 0
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=CLIENT_TIMEOUT) as sock:
        sock.sendall(b"POST /upload HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(MAX_TRICKLE_PIECES):
            sock.sendall(chunk)
            sent += 1
            if held(proxy) == 1 and proxy.process.pool.busy == 0:
                seen_held.set()
                break
            seen_held.wait(TRICKLE_GAP)
        sock.sendall(b"0\r\n\r\n")
        status, answer = read_response(sock, "POST")
    assert seen_held.is_set(), "the trickled upload kept a worker to the end"
    whole = piece * sent
    assert status == 200
    assert answer == f"{len(whole)} {hashlib.sha256(whole).hexdigest()}".encode()
