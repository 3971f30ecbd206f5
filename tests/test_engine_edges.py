"""Engine edge cases: framing corners, interim responses, failures after the response started, retries,
and what clients get from upstreams that misbehave (FaultyUpstream scripts)."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import threading

import pytest
import requests

from proxy.serve.handler import SMALL_BODY_MAX
from tests.support.backends import pattern_sha256, serve_once_then_drop_next, stream_pattern
from tests.support.client import RawClient, raw_client, read_small_answer
from tests.support.faulty_upstream import BODY, FIN, HANG, HEAD, LOOP, RST, sleep, write
from tests.support.ports import free_port
from tests.support.proxy import CLIENT_TIMEOUT, DEADLINE
from tests.support.timing import wait_for

pytestmark = pytest.mark.timeout(30)


def serve_forever(answer: bytes):
    """A raw script answering every request on the connection with the same bytes."""
    def script(peer):
        while True:
            head, _ = peer.read_request()
            if not head:
                return
            peer.send(answer)
    return script


def test_close_delimited_upstream_response_is_rechunked_for_http11(make_raw_backend, make_proxy):
    def script(peer):
        peer.read_request()
        peer.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil close")
        peer.close()
    raw = make_raw_backend(script)
    proxy = make_proxy({"web": [raw.address]})
    with raw_client(proxy) as client:
        client.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        response = client.read_response()
        assert response.framing == "chunked"
        assert response.body == b"until close"
        client.send(b"GET /again HTTP/1.1\r\nHost: a\r\n\r\n")  # the client connection survives
        assert client.read_response().body == b"until close"
    wait_for(lambda: raw.connections == 2, what="a new upstream connection for the second request")


def test_http10_client_close_delimited_response(make_raw_backend, make_proxy):
    def script(peer):
        peer.read_request()
        peer.send(b"HTTP/1.0 200 OK\r\n\r\nold style body")
        peer.close()
    raw = make_raw_backend(script)
    proxy = make_proxy({"web": [raw.address]})
    with raw_client(proxy) as client:
        client.send(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        response = client.read_response()
        assert response.framing == "close"
        assert response.body == b"old style body"


def test_http10_keep_alive_client_gets_length_and_keeps_connection(make_backend, make_proxy):
    backend = make_backend()
    proxy = make_proxy({"web": [backend.address]})
    with raw_client(proxy) as client:
        for path in ("/one", "/two"):
            client.send(f"GET {path} HTTP/1.0\r\nConnection: keep-alive\r\n\r\n".encode())
            response = client.read_response()
            assert response.status == 200
            assert response.header("X-Echo-Path") == path
            assert response.header("Connection").lower() == "keep-alive"


def test_response_hop_by_hop_headers_stripped(make_raw_backend, make_proxy):
    raw = make_raw_backend(serve_forever(
        b"HTTP/1.1 200 OK\r\nConnection: X-Internal\r\nX-Internal: secret\r\nKeep-Alive: timeout=5\r\n"
        b"X-Public: yes\r\nContent-Length: 2\r\n\r\nok"))
    proxy = make_proxy({"web": [raw.address]})
    response = requests.get(proxy.url + "/", timeout=CLIENT_TIMEOUT)
    assert response.headers.get("X-Public") == "yes"
    assert "X-Internal" not in response.headers
    assert "Keep-Alive" not in response.headers


def test_interim_103_relayed_then_final(make_raw_backend, make_proxy):
    raw = make_raw_backend(serve_forever(
        b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ndone"))
    proxy = make_proxy({"web": [raw.address]})
    with raw_client(proxy) as client:
        client.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        response = client.read_response()
        assert response.interim == [103]
        assert response.body == b"done"


def test_trailers_forwarded_to_chunked_client(make_raw_backend, make_proxy):
    raw = make_raw_backend(serve_forever(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n"
        b"3\r\nabc\r\n0\r\nX-Checksum: 42\r\n\r\n"))
    proxy = make_proxy({"web": [raw.address]})
    with raw_client(proxy) as client:
        client.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        head = client.read_head()
        assert b"chunked" in head.lower()
        assert client._read_line() == b"3"
        assert client.read_exact(5) == b"abc\r\n"
        assert client._read_line() == b"0"
        assert client._read_line() == b"X-Checksum: 42"
        assert client._read_line() == b""
        client.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")  # framing intact: the next one parses
        assert client.read_response().body == b"abc"


def test_expect_continue_final_status_without_body(make_raw_backend, make_proxy):
    """The upstream refuses (417) before the body: the client gets it and need not send the body."""
    def script(peer):
        peer.read_head()
        peer.send(b"HTTP/1.1 417 Expectation Failed\r\nContent-Length: 4\r\nConnection: close\r\n\r\nnope")
        peer.close()
    raw = make_raw_backend(script)
    proxy = make_proxy({"web": [raw.address]})
    with raw_client(proxy) as client:
        client.send(b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 10\r\n\r\n")
        response = client.read_response()
        assert response.status == 417
        assert response.body == b"nope"
        assert response.header("Connection") == "close"  # the unread body makes the connection unusable
        assert client.at_eof()


def test_expect_continue_client_sends_body_without_waiting(make_backend, make_proxy):
    backend = make_backend()
    proxy = make_proxy({"web": [backend.address]})
    with raw_client(proxy) as client:
        client.send(b"POST /eager HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\nhello")
        response = client.read_response()
        assert response.status == 200
        assert response.body == b"hello"
        client.send(b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n")
        assert client.read_response().header("X-Echo-Path") == "/next"


def test_upstream_fin_mid_length_body_truncates_and_closes(make_raw_backend, make_proxy):
    def script(peer):
        peer.read_request()
        peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
        peer.close()
    raw = make_raw_backend(script)
    proxy = make_proxy({"web": [raw.address]})
    with raw_client(proxy) as client:
        client.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        with pytest.raises(ConnectionError):
            client.read_response()


def test_upstream_stall_mid_body_truncates_and_closes(make_raw_backend, make_proxy):
    def script(peer):
        peer.read_request()
        peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
        peer.hang()
    raw = make_raw_backend(script)
    proxy = make_proxy({"web": [raw.address]}, upstream_options={"read_timeout": "0.5s"})
    with raw_client(proxy) as client:
        client.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        with pytest.raises(ConnectionError):
            client.read_response()


def test_upstream_stall_mid_chunked_body_truncates_and_closes(make_raw_backend, make_proxy):
    def script(peer):
        peer.read_request()
        peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        peer.hang()
    raw = make_raw_backend(script)
    proxy = make_proxy({"web": [raw.address]}, upstream_options={"read_timeout": "0.5s"})
    with raw_client(proxy) as client:
        client.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        with pytest.raises(ConnectionError):
            client.read_response()


def test_stale_get_retried_even_with_retries_zero(make_raw_backend, make_proxy):
    """The stale keep-alive race is retried on a fresh connection to the same server: that is not
    one of the 'further servers' the retries setting counts."""
    executions = []

    def script(peer):
        head, _ = peer.read_request()
        if not head:
            return
        executions.append(peer.index)
        peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        if peer.read_request()[0]:
            executions.append(peer.index)
            peer.close()
    raw = make_raw_backend(script)
    proxy = make_proxy({"web": [raw.address]}, upstream_options={"retries": 0})
    with requests.Session() as session:
        assert session.get(proxy.url + "/a", timeout=CLIENT_TIMEOUT).status_code == 200
        assert session.get(proxy.url + "/b", timeout=CLIENT_TIMEOUT).status_code == 200
    assert executions == [0, 0, 1]


# -- a 408 on a reused connection: the server was closing it -------------------------------------
IDLE_408 = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 7\r\n\r\ntimeout"


def served_then_408(requests_seen: list, on_fresh: bytes = b"HTTP/1.1 201 Created\r\nContent-Length: 4\r\n\r\nmade"):
    """A raw script: the first connection answers one request, then meets the next with a 408 and
    closes (a server timing its idle keep-alive connection out as the proxy reuses it); later
    connections answer ``on_fresh``. Every (connection, head, body) the server read is recorded."""
    def script(peer):
        head, body = peer.read_request()
        if not head:
            return
        requests_seen.append((peer.index, head.split(b" ")[0], body))
        if peer.index > 0:
            peer.send(on_fresh)
            return
        peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        head, body = peer.read_request()
        if head:
            requests_seen.append((peer.index, head.split(b" ")[0], body))
            peer.send(IDLE_408)
            peer.close()
    return script


@pytest.mark.parametrize("method, body", [("GET", b""), ("PUT", b"doc"), ("POST", b"amount=10")])
def test_a_408_on_a_reused_connection_is_retried_on_a_fresh_one(make_raw_backend, make_proxy, method, body):
    """Bug: a server's 408 on the pooled connection the proxy just reused (it timed the connection
    out as the request went in) reached the client. It says the request was not taken (RFC 9110
    §15.5.9 lets a client repeat it, any method): resent once on a new connection, as HAProxy does."""
    seen = []
    raw = make_raw_backend(served_then_408(seen))
    proxy = make_proxy({"web": [raw.address]}, upstream_options={"retries": 0})
    with raw_client(proxy) as client:
        client.send(b"GET /warm HTTP/1.1\r\nHost: a\r\n\r\n")
        assert client.read_response().status == 200
        client.send(b"%s /doc HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n%s"
                    % (method.encode(), len(body), body))
        response = client.read_response()
    assert (response.status, response.body) == (201, b"made")
    assert seen == [(0, b"GET", b""), (0, method.encode(), body), (1, method.encode(), body)]


def test_a_408_before_the_100_on_a_reused_connection_resends_a_post_whose_body_was_not_sent(
        make_raw_backend, make_proxy):
    """Expect: 100-continue, and the reused connection answers 408 instead of 100: not a byte of the
    POST's body went out, so it goes to a fresh connection, where the server asks for the body."""
    seen = []

    def script(peer):
        head = peer.read_head()
        if peer.index == 0:
            peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            if peer.read_head():
                seen.append((0, b""))
                peer.send(IDLE_408)
            return
        if b"100-continue" in head:
            peer.send(b"HTTP/1.1 100 Continue\r\n\r\n")
            if _read_body_after_head(peer, 5):
                seen.append((peer.index, peer.buffer[:5]))
                peer.send(b"HTTP/1.1 201 Created\r\nContent-Length: 4\r\n\r\nmade")
    raw = make_raw_backend(script)
    proxy = make_proxy({"web": [raw.address]}, upstream_options={"read_timeout": "30s"})
    with raw_client(proxy) as client:
        client.send(b"GET /warm HTTP/1.1\r\nHost: a\r\n\r\n")
        assert client.read_response().status == 200
        client.send(b"POST /pay HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
        client.sock.settimeout(15)
        assert client.read_head() == b"HTTP/1.1 100 Continue\r\n\r\n"
        client.send(b"hello")
        response = client.read_response()
    assert (response.status, response.body) == (201, b"made")
    assert seen == [(0, b""), (1, b"hello")]


def test_a_408_on_a_fresh_connection_reaches_the_client(make_raw_backend, make_proxy):
    """Only a reused connection's 408 means the server was closing it: on the fresh connection of the
    retry it is the server's answer, relayed (and never retried again)."""
    seen = []
    raw = make_raw_backend(served_then_408(seen, on_fresh=IDLE_408))
    proxy = make_proxy({"web": [raw.address]})
    with raw_client(proxy) as client:
        client.send(b"GET /warm HTTP/1.1\r\nHost: a\r\n\r\n")
        assert client.read_response().status == 200
        client.send(b"GET /doc HTTP/1.1\r\nHost: a\r\n\r\n")
        response = client.read_response()
    assert (response.status, response.body) == (408, b"timeout")
    assert [index for index, _, _ in seen] == [0, 0, 1]


def test_a_408_on_a_reused_connection_after_part_of_a_large_body_is_relayed(make_raw_backend, make_proxy):
    """A body too large to keep for a resend, partly sent: the 408 cannot be retried and is relayed."""
    body = b"x" * (SMALL_BODY_MAX + 1)

    def script(peer):
        head, _ = peer.read_request()
        if not head:
            return
        peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        if peer.read_head():
            peer.send(IDLE_408)
            peer.hang()
    raw = make_raw_backend(script)
    proxy = make_proxy({"web": [raw.address]})
    with raw_client(proxy) as client:
        client.send(b"GET /warm HTTP/1.1\r\nHost: a\r\n\r\n")
        assert client.read_response().status == 200
        client.send(b"PUT /big HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        response = client.read_response()
    assert (response.status, response.body) == (408, b"timeout")
    assert raw.connections == 1


def test_post_without_body_not_resent_after_a_reset(make_raw_backend, make_proxy):
    # The server read the POST before it failed: it may have acted on it, so it is never sent again.
    executions = []
    raw = make_raw_backend(serve_once_then_drop_next(executions, reset=True))
    proxy = make_proxy({"web": [raw.address]})
    with requests.Session() as session:
        assert session.get(proxy.url + "/a", timeout=CLIENT_TIMEOUT).status_code == 200
        assert session.post(proxy.url + "/ping", timeout=CLIENT_TIMEOUT).status_code == 502
    assert executions == [b"GET", b"POST"]


def test_large_upload_then_pipelined_request(make_backend, make_proxy):
    backend = make_backend()
    proxy = make_proxy({"web": [backend.address]})
    body = bytes(range(256)) * 1024  # 256 KiB: above the splice threshold
    with raw_client(proxy) as client:
        client.send(b"POST /big HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(body) + body
                    + b"GET /after HTTP/1.1\r\nHost: a\r\n\r\n")
        first = client.read_response()
        assert first.status == 200 and first.body == body
        second = client.read_response()
        assert second.header("X-Echo-Path") == "/after"


def test_client_connection_close_is_honoured(make_backend, make_proxy):
    backend = make_backend()
    proxy = make_proxy({"web": [backend.address]})
    with raw_client(proxy) as client:
        client.send(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        response = client.read_response()
        assert response.header("Connection") == "close"
        assert client.at_eof()
    wait_for(lambda: proxy.pool("web").idle_count == 1, what="upstream connection pooled")


def test_error_responses_carry_request_id(make_proxy):
    proxy = make_proxy({"web": [f"127.0.0.1:{free_port()}"]}, upstream_options={"retries": 0})
    response = requests.get(proxy.url + "/", headers={"X-Request-Id": "trace-1"}, timeout=CLIENT_TIMEOUT)
    assert response.status_code == 502
    assert response.headers["X-Request-Id"] == "trace-1"


def test_absolute_form_target(make_backend, make_proxy):
    backend = make_backend()
    proxy = make_proxy({"web": [backend.address]})
    with raw_client(proxy) as client:
        client.send(b"GET http://app.test/abs?q=1 HTTP/1.1\r\nHost: app.test\r\n\r\n")
        assert client.read_response().status == 200
    assert backend.last.path == "/abs?q=1"


def test_client_disconnect_mid_chunked_response_closes_upstream(make_raw_backend, make_proxy):
    closed = []

    def script(peer):
        peer.read_request()
        peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        try:
            for _ in range(100_000):  # bounded; ends when the proxy closes the connection
                peer.send(b"4000\r\n" + b"z" * 0x4000 + b"\r\n")
        except OSError:
            closed.append(True)
    raw = make_raw_backend(script)
    proxy = make_proxy({"web": [raw.address]})
    with raw_client(proxy) as client:
        client.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        client.read_head()
        client.read_exact(50_000)
    wait_for(lambda: closed, what="the proxy to close the upstream connection")
    assert proxy.pool("web").idle_count == 0


def test_upstream_connection_close_is_not_pooled(make_raw_backend, make_proxy):
    raw = make_raw_backend(serve_forever(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"))
    proxy = make_proxy({"web": [raw.address]})
    with requests.Session() as session:
        for _ in range(3):
            response = session.get(proxy.url + "/", timeout=CLIENT_TIMEOUT)
            assert response.status_code == 200 and response.text == "ok"
            assert "close" not in response.headers.get("Connection", "")  # client side stays alive
    assert proxy.pool("web").idle_count == 0
    assert raw.connections == 3


def test_upstream_extra_bytes_after_body_never_reused(make_raw_backend, make_proxy):
    raw = make_raw_backend(serve_forever(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokGARBAGE"))
    proxy = make_proxy({"web": [raw.address]})
    with requests.Session() as session:
        for _ in range(3):
            response = session.get(proxy.url + "/", timeout=CLIENT_TIMEOUT)
            assert response.status_code == 200 and response.text == "ok"
    assert raw.connections == 3


def test_upstream_101_without_upgrade_request_is_502(make_raw_backend, make_proxy):
    raw = make_raw_backend(serve_forever(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n"))
    proxy = make_proxy({"web": [raw.address]})
    assert requests.get(proxy.url + "/", timeout=CLIENT_TIMEOUT).status_code == 502


def test_upstream_head_too_large_is_502(make_raw_backend, make_proxy):
    raw = make_raw_backend(serve_forever(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 100_000 + b"\r\nContent-Length: 0\r\n\r\n"))
    proxy = make_proxy({"web": [raw.address]})
    assert requests.get(proxy.url + "/", timeout=CLIENT_TIMEOUT).status_code == 502


def test_upstream_content_length_and_chunked_is_502(make_raw_backend, make_proxy):
    raw = make_raw_backend(serve_forever(
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"))
    proxy = make_proxy({"web": [raw.address]})
    response = requests.get(proxy.url + "/", timeout=CLIENT_TIMEOUT)
    # RFC 9112 §6.3 item 3: a possible response-splitting attempt; the proxy refuses it (0c91c38)
    assert response.status_code == 502
    assert raw.connections == 1
    assert proxy.pool("web").idle_count == 0  # that connection is never reused


def test_client_half_close_after_an_answered_request_still_gets_response(make_raw_backend, make_proxy):
    # Half-closing after the request is indistinguishable from leaving (nginx and Go take both for a
    # client gone, logged 499); an answer that is already there when the client's FIN arrives is sent.
    answered = threading.Event()

    def answers_at_once(peer):
        peer.read_request()
        peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc")
        answered.set()
        peer.hang()

    raw = make_raw_backend(answers_at_once)
    proxy = make_proxy({"web": [raw.address]})
    with raw_client(proxy) as client:
        client.send(b"POST /half HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc")
        assert answered.wait(CLIENT_TIMEOUT)
        client.sock.shutdown(socket.SHUT_WR)
        response = client.read_response()
        assert response.status == 200 and response.body == b"abc"


def test_concurrent_clients(make_backend, make_proxy):
    import concurrent.futures
    backend = make_backend()
    proxy = make_proxy({"web": [backend.address]})

    def one(i):
        with requests.Session() as session:
            for j in range(5):
                body = f"{i}-{j}".encode() * 100
                response = session.post(proxy.url + f"/c/{i}/{j}", data=body, timeout=CLIENT_TIMEOUT)
                assert response.content == body
        return True

    with concurrent.futures.ThreadPoolExecutor(16) as executor:
        assert all(executor.map(one, range(16)))
    assert len(backend.requests) == 80
    assert backend.connections <= 16 + 1


@pytest.mark.parametrize("length", [10, 1_000_000])  # small body read whole first, spliced body
def test_slow_request_body_is_408_and_closed(make_backend, make_proxy, length):
    import dataclasses
    backend = make_backend()
    proxy = make_proxy({"web": [backend.address]})
    proxy.app.settings = dataclasses.replace(proxy.app.settings, body_timeout=0.3)
    with raw_client(proxy) as client:
        client.send(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\nabc" % length)
        response = client.read_response()
        assert response.status == 408
        assert response.header("Connection") == "close"
        assert client.at_eof()
    if length <= SMALL_BODY_MAX:  # never forwarded: the upstream did not hear of it at all
        assert backend.connections == 0 and backend.requests == []
    else:  # streamed: the upstream saw the start, and its connection is closed, not pooled
        wait_for(lambda: backend.closed_connections == 1, what="the upstream connection to close")
    assert proxy.pool("web").idle_count == 0


def test_draining_answers_with_connection_close(make_raw_backend, make_proxy):
    # The second request is held at the backend while the drain starts. Starting the drain between two
    # requests instead would race the worker parking the idle connection, which a drain rightly closes.
    second_arrived, release = threading.Event(), threading.Event()
    heads = []  # over every upstream connection

    def script(peer):
        while peer.read_head():
            heads.append(1)
            if len(heads) == 2:
                second_arrived.set()
                release.wait(DEADLINE)
            peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    backend = make_raw_backend(script)
    proxy = make_proxy({"web": [backend.address]})
    with raw_client(proxy) as client:
        client.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        assert client.read_response().header("Connection") is None
        client.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        assert second_arrived.wait(DEADLINE)
        proxy.app.draining_event.set()
        release.set()
        response = client.read_response()
        assert response.status == 200
        assert response.header("Connection") == "close"
        assert client.at_eof()


def test_expect_continue_body_already_sent_to_a_server_that_never_sends_100(make_raw_backend, make_proxy):
    """The client sent head and body together; the server reads the body without a 100 first."""
    def script(peer):
        head, body = peer.read_request()
        peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    raw = make_raw_backend(script)
    proxy = make_proxy({"web": [raw.address]}, upstream_options={"read_timeout": "3s"})
    with raw_client(proxy) as client:
        client.send(b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\nhello")
        client.sock.settimeout(2.5)  # well under read_timeout: waiting it out would be the bug
        response = client.read_response()
        assert response.status == 200
        assert response.body == b"hello"


def test_expect_continue_a_final_response_in_the_same_write_as_the_100_is_relayed(make_raw_backend, make_proxy):
    """A server that sends its 100 and its final response in one write: the final one is already in
    the proxy's hands once the 100 is relayed, and must not be lost waiting for more."""
    def script(peer):
        peer.read_head()
        peer.send(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok")
        while len(peer.buffer) < 5:  # then it takes the body, as a server after a 100 does
            data = peer.sock.recv(65536)
            if not data:
                return
            peer.buffer += data
        peer.hang()
    raw = make_raw_backend(script)
    proxy = make_proxy({"web": [raw.address]}, upstream_options={"read_timeout": "3s"})
    with raw_client(proxy) as client:
        client.send(b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
        client.sock.settimeout(2.5)  # well under read_timeout: waiting it out would be the bug
        assert client.read_head().startswith(b"HTTP/1.1 100 Continue\r\n")
        client.send(b"hello")
        response = client.read_response()
        assert response.status == 201
        assert response.body == b"ok"


def _read_body_after_head(peer, length: int) -> bool:
    """The raw backend's side of a body sent after its head; False if the proxy closed first."""
    while len(peer.buffer) < length:
        data = peer.sock.recv(65536)
        if not data:
            return False
        peer.buffer += data
    return True


def test_expect_continue_the_proxy_says_continue_when_the_server_does_not(make_raw_backend, make_proxy):
    """A server that waits for the body without sending 100 first: a client waiting for a 100 gets one
    from the proxy (as from nginx), instead of both waiting until read_timeout."""
    def script(peer):
        peer.read_head()
        if _read_body_after_head(peer, 5):
            peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n" + peer.buffer[:5])
    raw = make_raw_backend(script)
    proxy = make_proxy({"web": [raw.address]}, upstream_options={"read_timeout": "30s"})
    with raw_client(proxy) as client:
        client.send(b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
        client.sock.settimeout(15)  # well under read_timeout: waiting it out would be the bug
        assert client.read_head() == b"HTTP/1.1 100 Continue\r\n\r\n"
        client.send(b"hello")
        response = client.read_response()
        assert (response.status, response.body, response.interim) == (200, b"hello", [])


def test_expect_continue_a_client_holding_back_its_body_holds_no_worker(make_raw_backend, make_proxy):
    """A client that never sends the body it announced, to a server that never sends 100: the pool's
    only worker goes on serving other clients (the wait for the body is parked)."""
    def script(peer):
        if b"Expect" in peer.read_head():
            peer.hang()  # waits for a body that never comes
        else:
            peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    raw = make_raw_backend(script)
    proxy = make_proxy({"web": [raw.address]}, server={"min_threads": 1, "max_threads": 1},
                       upstream_options={"read_timeout": "30s"})
    with raw_client(proxy) as holding_back, raw_client(proxy) as other:
        holding_back.send(b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
        holding_back.sock.settimeout(15)
        assert holding_back.read_head() == b"HTTP/1.1 100 Continue\r\n\r\n"
        other.sock.settimeout(15)  # the worker held until read_timeout (30 s) would be the bug
        other.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        assert other.read_response().body == b"ok"


def test_expect_continue_a_late_100_from_the_server_is_not_relayed_again(make_raw_backend, make_proxy):
    """The server's own 100 comes after the proxy sent one: the client sees a single 100."""
    client_told = threading.Event()

    def script(peer):
        peer.read_head()
        if not client_told.wait(DEADLINE):
            return
        peer.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        if _read_body_after_head(peer, 5):
            peer.send(b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok")
    raw = make_raw_backend(script)
    proxy = make_proxy({"web": [raw.address]}, upstream_options={"read_timeout": "30s"})
    with raw_client(proxy) as client:
        client.send(b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
        client.sock.settimeout(15)
        assert client.read_head() == b"HTTP/1.1 100 Continue\r\n\r\n"
        client_told.set()
        client.send(b"hello")
        response = client.read_response()
        assert (response.status, response.body, response.interim) == (201, b"ok", [])


@pytest.mark.parametrize("chunked", [False, True])
def test_expect_continue_an_early_answer_after_the_proxys_100_is_relayed(make_raw_backend, make_proxy, chunked):
    """Bug: a server that answered (413) and closed while the body it refused was coming, after the
    proxy had told the client to go on, cost the client a 502 "broken pipe" instead of the 413 (curl
    uploading a large file does exactly this). The plain path relayed such an early answer already."""
    client_told, server_gone = threading.Event(), threading.Event()

    def script(peer):
        peer.read_head()
        if client_told.wait(DEADLINE):  # the proxy said 100 itself: the body is on its way
            peer.send(b"HTTP/1.1 413 Content Too Large\r\nConnection: close\r\nContent-Length: 7\r\n\r\ntoo big")
        peer.close()
        server_gone.set()
    raw = make_raw_backend(script)
    proxy = make_proxy({"web": [raw.address]}, upstream_options={"read_timeout": "30s"})
    piece = b"x" * 65536
    framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % (64 * len(piece))
    with raw_client(proxy) as client:
        client.send(b"POST /upload HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n%s\r\n\r\n" % framing)
        client.sock.settimeout(15)  # well under read_timeout
        assert client.read_head() == b"HTTP/1.1 100 Continue\r\n\r\n"
        client_told.set()
        assert server_gone.wait(DEADLINE)
        data = b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece
        sender = threading.Thread(target=_send_quietly, args=(client.sock, data * 64), daemon=True)
        sender.start()
        response = client.read_response()
        sender.join(DEADLINE)
    assert (response.status, response.body) == (413, b"too big")


def test_stale_connection_put_with_chunked_body_is_replayed(make_raw_backend, make_proxy):
    seen = []

    def script(peer):
        if peer.index == 0:
            if peer.read_head():
                peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                if peer.read_head():
                    peer.reset()  # the race: the PUT reached a connection the server was closing
            return
        if not peer.read_head():
            return
        while b"0\r\n\r\n" not in peer.buffer:  # a fresh connection: read the chunked body
            data = peer.sock.recv(65536)
            if not data:
                return
            peer.buffer += data
        seen.append(peer.buffer)
        peer.send(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
    raw = make_raw_backend(script)
    proxy = make_proxy({"web": [raw.address]})
    with raw_client(proxy) as client:
        client.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        assert client.read_response().status == 200
        client.send(b"PUT /doc HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n")
        assert client.read_response().status == 201
    assert raw.connections == 2
    assert seen == [b"4\r\nabcd\r\n0\r\n\r\n"]


def test_partial_head_past_header_timeout_is_408(make_backend, make_proxy):
    backend = make_backend()
    proxy = make_proxy({"web": [backend.address]}, server={"header_timeout": "0.3s"})
    with raw_client(proxy) as client:
        client.send(b"GET / HTTP/1.1\r\nHost: a\r\n")
        response = client.read_response()
        assert response.status == 408
        assert client.at_eof()


def test_repeated_response_headers_are_all_relayed(make_raw_backend, make_proxy):
    raw = make_raw_backend(serve_forever(b"HTTP/1.1 200 OK\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n"
                                         b"Content-Length: 0\r\n\r\n"))
    proxy = make_proxy({"web": [raw.address]})
    with raw_client(proxy) as client:
        client.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        response = client.read_response()
        assert [v for k, v in response.headers if k.lower() == "set-cookie"] == ["a=1", "b=2"]


def test_client_abort_during_upload_closes_upstream(make_backend, make_proxy):
    backend = make_backend()
    proxy = make_proxy({"web": [backend.address]})
    with raw_client(proxy) as client:
        client.send(b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 1000000\r\n\r\n" + b"u" * 100_000)
        wait_for(lambda: backend.connections == 1, what="the upload to reach the backend")
    wait_for(lambda: backend.closed_connections == 1, what="the upstream connection to close")
    assert proxy.pool("web").idle_count == 0
    assert backend.requests == []  # the backend never saw a complete request


# -- retries: each server at most once, never once response bytes reached the client --------------------
def _read_then_reset(peer):
    head, _ = peer.read_request()
    if head:
        peer.reset()  # the request arrived; not one response byte goes back


@pytest.mark.parametrize("method,retries,servers_tried", [
    ("GET", 1, 2),      # `retries` further servers, no more
    ("GET", 5, 3),      # never the same server twice, even with retries to spare
    ("DELETE", 0, 1),   # retries = 0: one attempt
    ("PUT", 2, 3),      # idempotent with a (kept) body: repeated
    ("POST", 2, 1),     # README: a POST that may have reached a server is never sent twice
])
def test_reset_before_any_response_byte_tries_each_server_at_most_once(make_raw_backend, make_proxy,
                                                                       method, retries, servers_tried):
    raws = [make_raw_backend(_read_then_reset) for _ in range(3)]
    proxy = make_proxy({"web": [r.address for r in raws]}, upstream_options={"retries": retries})
    body = b"payload" if method in ("POST", "PUT") else None
    response = requests.request(method, proxy.url + "/", data=body, timeout=DEADLINE)
    assert response.status_code == 502
    contacted = [r.connections for r in raws]
    assert sum(contacted) == servers_tried and max(contacted) == 1, contacted


def _half_a_response_then_reset(peer):
    head, _ = peer.read_request()
    if head:
        peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        peer.reset()


def test_no_retry_once_response_bytes_reached_the_client(make_raw_backend, make_proxy):
    raws = [make_raw_backend(_half_a_response_then_reset) for _ in range(2)]
    proxy = make_proxy({"web": [r.address for r in raws]}, upstream_options={"retries": 1})
    with proxy.connect() as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        received = b""
        for _ in range(100):  # bounded: the proxy aborts the connection
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += chunk
    assert received.startswith(b"HTTP/1.1 200") and received.endswith(b"partial"), received
    assert sorted(r.connections for r in raws) == [0, 1]  # the other server never saw the request


HEADER_TIMEOUT = 3.0  # long enough that a 408 cannot pass for the "at once" 400


# -- another protocol on the HTTP port: 400 at once, as nginx and HAProxy answer ---------------------
# The parser only judged the request line once the whole head (CRLFCRLF) was in, so a TLS ClientHello,
# an SSH banner or an SMTP greeting sat parked until header_timeout and got a 408.
@pytest.mark.parametrize("opening", [
    b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03",  # TLS ClientHello on a plain-text listener
    b"SSH-2.0-OpenSSH_9.6\r\n",                       # a complete line that is no request line
    b"GET /\x00 HTTP/1.1\r\nHost: a\r\n",               # complete, malformed request line, head unfinished
], ids=["tls-client-hello", "ssh-banner", "nul-in-target"])
def test_a_start_line_that_cannot_become_a_request_is_400_at_once(make_backend, make_proxy, opening):
    backend = make_backend()
    proxy = make_proxy({"web": [backend.address]}, server={"header_timeout": f"{HEADER_TIMEOUT}s"})
    with proxy.connect() as sock:
        sock.settimeout(HEADER_TIMEOUT / 2)  # a 408 after header_timeout fails here with a timeout
        sock.sendall(opening)
        answer = read_small_answer(sock)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:60]
    assert b"Connection: close" in answer
    assert backend.requests == []


# -- a relayed 1xx is not the response: a failure after it still gets a status ----------------------
# Relaying an interim response (103 Early Hints, 100 Continue) marked the response as started, so an
# upstream that then closed or stalled left the client with a cut connection and no final status,
# where a 502/504 can still be sent (RFC 9110 §15.2: 1xx responses precede a final one).
@pytest.mark.parametrize("after_hints, status", [("close", 502), ("hang", 504)])
def test_upstream_failure_after_a_relayed_1xx_is_an_error_status(make_raw_backend, make_proxy, after_hints, status):
    def script(peer):
        if not peer.read_head():
            return
        peer.send(b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n")
        if after_hints == "hang":
            peer.hang()

    backend = make_raw_backend(script)
    proxy = make_proxy({"web": [backend.address]}, upstream_options={"retries": 0, "read_timeout": "500ms"})
    with raw_client(proxy) as raw:
        raw.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        response = raw.read_response()
    assert response.interim == [103]
    assert response.status == status


# -- closing with client bytes unread must not reset away the end of the response ---------------------
# When the proxy closed after a response (Connection: close, HTTP/1.0) while bytes the client sent later
# (a pipelined request, a stray CRLF) sat unread in the socket, close() sent a reset, and the kernel
# threw away the part of the response still in the send buffer: the client read a truncated body (5.7 of
# 8 MB) then ECONNRESET. nginx lingers (lingering_close) in this case; so does the proxy now.
BIG = 16 * 1024 * 1024  # well past loopback socket buffers: the proxy is still sending when the extra comes


@pytest.mark.parametrize("request_head, extra", [
    (b"GET /big HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n"),
    (b"GET /big HTTP/1.0\r\n\r\n", b"\r\n"),
], ids=["connection-close-then-pipelined", "http10-then-stray-crlf"])
def test_unread_client_bytes_at_close_do_not_truncate_the_response(make_backend, make_proxy, request_head, extra):
    backend = make_backend().route("/big", stream_pattern(BIG))
    proxy = make_proxy({"web": [backend.address]})
    with raw_client(proxy) as raw:
        raw.send(request_head)
        head = raw.read_head()
        assert head.startswith(b"HTTP/1.1 200")
        raw.send(extra)  # arrives while the proxy is still relaying the body: unread when it closes
        body = raw.read_exact(BIG)
        assert raw.at_eof()
    assert hashlib.sha256(body).hexdigest() == pattern_sha256(BIG)


# -- misbehaving raw upstreams (FaultyUpstream scripts): what the client gets -------------------------
GET = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"


@pytest.fixture
def start(make_proxy):
    """A proxy in front of one upstream ``address``, 1 s timeouts, other upstream options as given."""
    def factory(address: str, **upstream):
        options = {"read_timeout": "1s", "connect_timeout": "1s", **upstream}
        return make_proxy({"web": [address]}, upstream_options=options)
    return factory


@pytest.mark.parametrize("retries", [0, 1])
def test_a_retry_after_a_server_failed_unanswered_is_logged_only_when_made(upstreams, make_proxy, caplog, retries):
    """Bug: "retrying ... on another server" was logged at info even when no retry followed (retries = 0,
    no other server, or the retry budget said no). Now the line names the server the retry goes to."""
    first, second = upstreams([HEAD, RST]), upstreams([HEAD, RST])
    proxy = make_proxy({"web": [first.address, second.address]},
                       upstream_options={"retries": retries, "read_timeout": "2s"})
    with caplog.at_level(logging.INFO, logger="pyproxy"), raw_client(proxy) as raw:
        raw.send(GET)
        assert raw.read_response().status == 502
    retried = [record.getMessage() for record in caplog.records if record.getMessage().startswith("retrying GET /")]
    assert len(retried) == retries, retried
    if retries:
        assert retried[0].startswith(("retrying GET / on " + first.address, "retrying GET / on " + second.address))


def header_values(head: bytes, name: bytes) -> list[bytes]:
    prefix = name.lower() + b":"
    return [line[len(prefix):].strip() for line in head.split(b"\r\n") if line.lower().startswith(prefix)]


# -- response framing the client relies on -----------------------------------------------------
def test_connection_naming_content_length_never_strips_the_framing(upstreams, start):
    """Bug: "Connection: Content-Length" from upstream made the proxy drop Content-Length (a
    Connection-listed field is hop-by-hop) while keeping the client connection alive: the client
    got a response without framing, and the next response was read as its body (desync)."""
    upstream = upstreams([HEAD, write(b"HTTP/1.1 200 OK\r\nConnection: Content-Length\r\n"
                                      b"Content-Length: 5\r\n\r\nfirst"), LOOP])
    proxy = start(upstream.address)
    with raw_client(proxy) as raw:
        for _ in range(2):
            raw.send(GET)
            response = raw.read_response()
            assert response.framing in ("length", "chunked"), response.head
            assert response.body == b"first"


@pytest.mark.parametrize("fields", [
    b"Content-Length: 5\r\nContent-Length: 5\r\n",
    b"Content-Length: 5, 5\r\n",
])
def test_repeated_content_length_is_relayed_as_one_value(upstreams, start, fields):
    """Bug: identical repeated Content-Length values were relayed as sent; RFC 9110 §8.6 forbids
    forwarding a value that is not a single number (a stricter client rejects, a laxer one guesses)."""
    upstream = upstreams([HEAD, write(b"HTTP/1.1 200 OK\r\n" + fields + b"\r\nhello"), LOOP])
    proxy = start(upstream.address)
    with raw_client(proxy) as raw:
        raw.send(GET)
        response = raw.read_response()
    assert header_values(response.head, b"content-length") == [b"5"]
    assert response.body == b"hello"


@pytest.mark.parametrize("coding", [b"gzip, chunked", b"gzip", b"chunked, chunked", b"identity"])
def test_transfer_coding_other_than_chunked_is_502(upstreams, start, coding):
    """Bug: the proxy decoded only the final chunked (or nothing) and dropped Transfer-Encoding as
    hop-by-hop, so the client took gzip- (or twice-chunked) bytes for the content. nginx answers
    502 "upstream sent unknown Transfer-Encoding"; the proxy does the same."""
    body = b"2\r\nok\r\n0\r\n\r\n" if coding.endswith(b"chunked") else b"okgz"
    upstream = upstreams([HEAD, write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: %b\r\n\r\n%b" % (coding, body)), FIN])
    proxy = start(upstream.address, retries=0)
    with raw_client(proxy) as raw:
        raw.send(GET)
        assert raw.read_response().status == 502
    assert proxy.pool("web").idle_count == 0


def test_transfer_encoding_on_a_head_response_is_no_error(upstreams, start):
    """A HEAD response describes the GET one: its Transfer-Encoding is metadata, not framing."""
    upstream = upstreams([HEAD, write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"), LOOP])
    proxy = start(upstream.address)
    with raw_client(proxy) as raw:
        raw.send(b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n")
        assert raw.read_response("HEAD").status == 200


def test_content_length_is_not_relayed_on_a_204(upstreams, start):
    """Bug: "204 + Content-Length: 5" was relayed as is; RFC 9110 §8.6: a server MUST NOT send
    Content-Length in a 204 (a client trusting it waits for 5 bytes that never come)."""
    upstream = upstreams([HEAD, write(b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n"), LOOP])
    proxy = start(upstream.address)
    with raw_client(proxy) as raw:
        raw.send(GET)
        response = raw.read_response()
    assert response.status == 204
    assert header_values(response.head, b"content-length") == []


# -- an upstream failing mid-body must never look like a complete response ------------------------
def test_an_echoed_request_id_reaches_the_client_once(upstreams, start):
    """Bug: a backend echoing X-Request-Id (a common middleware habit) left the client with two
    copies, ours and its own; ours replaces it, and it is the id the backend was sent."""
    upstream = upstreams([HEAD, write(b"HTTP/1.1 200 OK\r\nX-Request-Id: abc\r\n"
                                      b"Content-Length: 2\r\n\r\nok"), LOOP])
    proxy = start(upstream.address)
    with raw_client(proxy) as raw:
        raw.send(b"GET / HTTP/1.1\r\nHost: a\r\nX-Request-Id: abc\r\n\r\n")
        response = raw.read_response()
    assert header_values(response.head, b"x-request-id") == [b"abc"]
    assert response.body == b"ok"


def _read_to_end(raw: RawClient) -> str:
    """Read until the proxy ends the connection: "eof" (a clean FIN) or "reset"."""
    for _ in range(10_000):  # bounded: each recv has the client timeout
        try:
            if not raw._fill():
                return "eof"
        except ConnectionResetError:
            return "reset"
    raise AssertionError("the proxy never ended the connection")


@pytest.mark.parametrize("failure", [FIN, RST, HANG])
def test_http10_client_sees_a_reset_when_a_chunked_upstream_fails_mid_body(upstreams, start, failure):
    """Bug: an HTTP/1.0 client gets a close-delimited body; when the chunked upstream died or stalled
    mid-body, the proxy closed with a FIN, which is exactly how a whole close-delimited body ends:
    the client took the truncated body for the complete response. A reset is the only signal left."""
    upstream = upstreams([HEAD, write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"),
                          sleep(0.05), failure])
    proxy = start(upstream.address, read_timeout="300ms")
    with raw_client(proxy) as raw:
        raw.send(b"GET / HTTP/1.0\r\nHost: a\r\n\r\n")
        assert _read_to_end(raw) == "reset"


def test_http10_client_complete_close_delimited_body_ends_with_a_clean_close(upstreams, start):
    """The counterpart: a whole body still ends with a FIN, every byte delivered."""
    upstream = upstreams([HEAD, write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
                                      b"0\r\n\r\n"), LOOP])
    proxy = start(upstream.address)
    with raw_client(proxy) as raw:
        raw.send(b"GET / HTTP/1.0\r\nHost: a\r\n\r\n")
        assert _read_to_end(raw) == "eof"
        assert raw.buffer.endswith(b"\r\n\r\nhello")


def test_content_length_is_not_relayed_on_an_interim_response(upstreams, start):
    """Bug: a 1xx was relayed with every end-to-end field, Content-Length included; RFC 9110 §8.6:
    never in a 1xx (a client trusting it would take the final response's first bytes as a body)."""
    upstream = upstreams([HEAD, write(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\nContent-Length: 3\r\n\r\n"
                                      b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"), LOOP])
    proxy = start(upstream.address)
    with raw_client(proxy) as raw:
        raw.send(GET)
        interim = raw.read_head()
        final = raw.read_response()
    assert interim.startswith(b"HTTP/1.1 103")
    assert header_values(interim, b"link") == [b"</a.css>"]
    assert header_values(interim, b"content-length") == []
    assert (final.status, final.body) == (200, b"ok")


# -- an upstream answering before it read the request body ---------------------------------------
def test_early_answer_from_an_upstream_that_stops_reading_is_relayed_not_408(upstreams, start):
    """Bug: the upstream answered 403 after the head and kept the connection open without reading
    the upload. Once the socket buffers filled, the proxy's write to the upstream timed out, and it
    answered 408 "request body not received in time", blaming a client that had sent everything.
    The upstream's answer is relayed instead (as when it closes: test_early_response_during_upload)."""
    upstream = upstreams([HEAD, write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\n\r\nno"), HANG])
    proxy = start(upstream.address, read_timeout="500ms")
    size = 32 * 1024 * 1024  # well past what loopback socket buffers hold
    with raw_client(proxy) as raw:
        raw.send(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % size)
        sender = threading.Thread(target=_send_quietly, args=(raw.sock, b"x" * size), daemon=True)
        sender.start()
        response = raw.read_response()
        sender.join(10)
    assert (response.status, response.body) == (403, b"no")
    assert response.header("Connection") == "close"  # the rest of the body was never read


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:  # the proxy closed after answering: expected
        pass


# -- many open files --------------------------------------------------------------------------------
@pytest.fixture
def high_fds():
    """Hold enough descriptors that the next sockets get numbers past select()'s FD_SETSIZE (1024).
    Yields a function that fills the holes other threads left since (a backend closing a socket):
    call it right before opening the sockets that must be numbered high."""
    held = []

    def fill_holes() -> None:
        for _ in range(2000):  # bounded: the descriptors below 1100 are at most that many
            fd = os.open(os.devnull, os.O_RDONLY)
            held.append(fd)
            if fd >= 1100:
                return

    try:
        fill_holes()
        yield fill_holes
    finally:
        for fd in held:
            os.close(fd)


def test_expect_continue_with_descriptors_past_1024(upstreams, start, high_fds):
    """Bug: waiting for the upstream's 100 Continue used select.select(), which raises ValueError for
    a descriptor >= 1024 (FD_SETSIZE): on a busy proxy every Expect: 100-continue request failed
    outside the error funnel (no answer at all)."""
    upstream = upstreams([HEAD, write(b"HTTP/1.1 100 Continue\r\n\r\n"), BODY, write(b"HTTP/1.1 200 OK\r\n"
                                                                                        b"Content-Length: 2\r\n\r\nok"), LOOP])
    proxy = start(upstream.address)
    numbered_low = []  # held open, so that the next try cannot get the same number
    try:
        for _ in range(20):  # another thread (a stopped proxy's sweeper) may free a low number meanwhile
            high_fds()
            sock = proxy.connect()
            if sock.fileno() > 1024:
                break
            numbered_low.append(sock)
        with contextlib.closing(sock):
            assert sock.fileno() > 1024
            raw = RawClient(sock)
            raw.send(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
            assert raw.read_head().startswith(b"HTTP/1.1 100")
            raw.send(b"body")
            response = raw.read_response()
    finally:
        for low in numbered_low:
            low.close()
    assert (response.status, response.body) == (200, b"ok")
    assert upstream.bodies == [b"body"]


# -- checks of uncovered cases (no bug found) ----------------------------------------------------------
@pytest.mark.parametrize("connection, pooled", [(b"", False), (b"Connection: keep-alive\r\n", True)])
def test_http10_upstream_is_pooled_only_when_it_says_keep_alive(upstreams, start, connection, pooled):
    """RFC 9112 §9.3: an HTTP/1.0 response persists only with "Connection: keep-alive"; reusing one
    that did not say so would send the next request into a closing connection."""
    upstream = upstreams([HEAD, write(b"HTTP/1.0 200 OK\r\n%bContent-Length: 2\r\n\r\nok" % connection), LOOP])
    proxy = start(upstream.address)
    with raw_client(proxy) as raw:
        for _ in range(2):
            raw.send(GET)
            response = raw.read_response()
            assert (response.status, response.body) == (200, b"ok")
            assert response.header("Connection") is None  # the client's connection stays open
    assert upstream.connections == (1 if pooled else 2)


# -- the stale keep-alive race with Expect: 100-continue -----------------------------------------
def test_stale_pooled_connection_put_with_expect_continue_is_retried(upstreams, start):
    """Bug: a PUT with Expect: 100-continue whose pooled connection turned out closed before any
    response byte was a 502: the retry rule wanted the whole body already read (to replay it),
    but none of it had been read or sent yet, so nothing stands in the way of a new connection."""
    first = [HEAD, write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"), HEAD, FIN]
    later = [HEAD, write(b"HTTP/1.1 100 Continue\r\n\r\n"), BODY, write(b"HTTP/1.1 201 Created\r\n"
                                                                         b"Content-Length: 4\r\n\r\nmade"), LOOP]
    upstream = upstreams(lambda index: first if index == 0 else later)
    proxy = start(upstream.address, retries=0)
    body = b"b" * 100_000  # past what the proxy reads whole before contacting the upstream
    with raw_client(proxy) as raw:
        raw.send(GET)
        assert raw.read_response().status == 200
        raw.send(b"PUT /f HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\nExpect: 100-continue\r\n\r\n" % len(body))
        assert raw.read_head().startswith(b"HTTP/1.1 100")
        raw.send(body)
        response = raw.read_response()
    assert (response.status, response.body) == (201, b"made")
    assert upstream.bodies == [body]


def test_http10_client_gets_a_clean_502_when_the_chunked_body_is_bad_before_anything_was_sent(upstreams, start):
    """The reset above is only for a response that started: a bad body caught before the head went
    out is a plain 502, closed with a FIN (a reset could destroy it before the client reads it)."""
    upstream = upstreams([HEAD, write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"), LOOP])
    proxy = start(upstream.address, retries=0)
    with raw_client(proxy) as raw:
        raw.send(b"GET / HTTP/1.0\r\nHost: a\r\n\r\n")
        assert _read_to_end(raw) == "eof"
        assert raw.buffer.startswith(b"HTTP/1.1 502")
