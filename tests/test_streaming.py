"""Responses stream through the proxy as bytes arrive: the client reads event 1 before event 2 exists.

The backend sends its first piece, then waits on an Event the test sets only after the client has
read that piece through the proxy. A proxy that buffered (until a size, or the end of the body)
would deadlock here and the client read would time out.
"""

from __future__ import annotations

import threading

import pytest
import requests

from tests.support.proxy import CLIENT_TIMEOUT

pytestmark = pytest.mark.timeout(30)

EVENT_1 = b"id: 1\ndata: first\n\n"
EVENT_2 = b"id: 2\ndata: second\n\n"
SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class TwoStepBackend:
    """A raw backend script: head + first piece, wait for the test's go, then the rest."""

    def __init__(self, framing: str):
        self.framing = framing
        self.go = threading.Event()
        self.sent_second = threading.Event()

    def __call__(self, peer) -> None:
        peer.read_request()
        if self.framing == "chunked":
            peer.send(SSE_HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + _chunk(EVENT_1))
        elif self.framing == "length":
            peer.send(SSE_HEAD + b"Content-Length: %d\r\n\r\n" % (len(EVENT_1) + len(EVENT_2)) + EVENT_1)
        else:  # close-delimited (RFC 9112 §6.3 rule 8)
            peer.send(SSE_HEAD + b"Connection: close\r\n\r\n" + EVENT_1)
        if not self.go.wait(CLIENT_TIMEOUT):
            return  # the test never saw event 1: it fails on its own read
        if self.framing == "chunked":
            peer.send(_chunk(EVENT_2) + b"0\r\n\r\n")
        else:
            peer.send(EVENT_2)
        self.sent_second.set()
        if self.framing == "close":
            peer.close()
        else:
            peer.read_head()  # keep-alive: wait until the proxy closes or reuses the connection


def _read_exactly(raw, count: int) -> bytes:
    data = b""
    while len(data) < count:
        piece = raw.read(count - len(data))
        if not piece:
            break
        data += piece
    return data


@pytest.mark.parametrize("framing", ["chunked", "length", "close"])
def test_first_event_arrives_before_the_second_is_sent(make_proxy, make_raw_backend, framing):
    script = TwoStepBackend(framing)
    backend = make_raw_backend(script)
    proxy = make_proxy({"events": [backend.address]})
    with requests.get(proxy.url + "/events", stream=True, timeout=CLIENT_TIMEOUT,
                      headers={"Accept": "text/event-stream"}) as response:
        assert response.status_code == 200
        assert response.headers["Content-Type"] == "text/event-stream"
        first = _read_exactly(response.raw, len(EVENT_1))
        assert first == EVENT_1
        assert not script.sent_second.is_set()  # we really read it before the second existed
        script.go.set()
        assert _read_exactly(response.raw, len(EVENT_2)) == EVENT_2


def test_sse_lines_with_iter_lines(make_proxy, make_raw_backend):
    script = TwoStepBackend("chunked")
    proxy = make_proxy({"events": [make_raw_backend(script).address]})
    with requests.get(proxy.url + "/events", stream=True, timeout=CLIENT_TIMEOUT) as response:
        lines = response.iter_lines(chunk_size=1)
        assert next(lines) == b"id: 1"
        assert next(lines) == b"data: first"
        script.go.set()
        rest = [line for line in lines if line]
        assert rest == [b"id: 2", b"data: second"]
