"""More hostile or slow clients than pool threads, each doing one slow pattern at once: the workers
are released while they wait, and a normal client is still answered (not queued behind them, nor
refused because the pool's queue filled up)."""

from __future__ import annotations

import re
import socket

import pytest

from tests.support.client import RawClient
from tests.support.proxy import CLIENT_TIMEOUT
from tests.support.timing import wait_for

pytestmark = pytest.mark.timeout(180)

HOSTILE = 300
BATCH = 50  # connections opened at once: fewer than the pool's queue (64), which refuses the rest
THREADS = {"max_threads": 4, "min_threads": 1}
BODY_SIZE = 100_000


def answer_with_body_length(peer) -> None:
    """Reads each request's Content-Length body, answers its length; never sends 100 Continue."""
    for _ in range(10):  # bounded: a test sends a request or two per connection
        head, body = peer.read_request()
        if not head:
            return
        text = str(len(body)).encode()
        peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(text), text))


def connect(proxy) -> socket.socket:
    return socket.create_connection(("127.0.0.1", proxy.port), timeout=CLIENT_TIMEOUT)


def normal_request(proxy):
    with connect(proxy) as sock:
        client = RawClient(sock)
        client.send(b"POST /normal HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi")
        return client.read_response()


def test_expect_continue_clients_beyond_the_threads_do_not_hold_the_pool(make_raw_backend, make_proxy):
    """Bug: a request with Expect: 100-continue whose server sends no 100 (most wait for the body)
    held a worker for the whole second before the proxy sent its own 100. 300 such uploads with 4
    threads filled the pool and its queue: a normal client was refused with a reset, and the others
    waited over a minute. The second is now waited in the relay, on the server's socket."""
    backend = make_raw_backend(answer_with_body_length)
    proxy = make_proxy({"web": [backend.address]}, server=THREADS)
    socks, clients = [], []
    try:
        for _ in range(HOSTILE // BATCH):
            batch = []
            for _ in range(BATCH):
                sock = connect(proxy)
                socks.append(sock)
                sock.sendall(b"POST /up HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n"
                             b"Content-Length: %d\r\n\r\n" % BODY_SIZE)
                batch.append(RawClient(sock))
            # Each costs a worker a short patience, then waits without one (it held one a second).
            wait_for(lambda: proxy.process.pool.busy == 0 and not proxy.process.pool.queued, CLIENT_TIMEOUT,
                     what="the batch's workers released")
            for client in batch:  # every one is told to go on, by the proxy: the server sent no 100
                assert client.read_head().startswith(b"HTTP/1.1 100 Continue\r\n")
            clients += batch
        wait_for(lambda: proxy.process.pool.busy == 0, CLIENT_TIMEOUT, what="workers released")
        response = normal_request(proxy)  # the 300 are all waiting for their bodies
        assert (response.status, response.body) == (200, b"2")
        for client in clients[-BATCH:]:  # then their bodies arrive whole (the last batch's: the
            client.send(b"x" * BODY_SIZE)  # backend gives up on the first ones after a few seconds)
            response = client.read_response()
            assert (response.status, response.body) == (200, str(BODY_SIZE).encode())
    finally:
        for sock in socks:
            sock.close()
