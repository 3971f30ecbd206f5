"""Rules of one exchange that protect the backend and the client: a request that is not idempotent is
never sent twice, a 101 must switch to a protocol the client offered, and a client that leaves while
its request waits for the backend is noticed at once (499) without counting against the server."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import requests

from tests.support.backends import serve_once_then_drop_next
from tests.support.client import raw_client
from tests.support.proxy import CLIENT_TIMEOUT
from tests.support.timing import wait_for


def test_a_bodyless_post_on_a_connection_that_dies_is_not_sent_again(make_raw_backend, make_proxy):
    executions = []
    raw = make_raw_backend(serve_once_then_drop_next(executions))
    proxy = make_proxy({"web": [raw.address]})
    with requests.Session() as session:
        assert session.get(proxy.url + "/warm", timeout=CLIENT_TIMEOUT).status_code == 200
        response = session.post(proxy.url + "/launch", timeout=CLIENT_TIMEOUT)  # no body
    assert response.status_code == 502
    assert executions == [b"GET", b"POST"]  # the backend read it once; it was not resent
    assert raw.connections == 1


def test_a_post_after_a_quiet_spell_goes_on_a_new_connection(make_backend, make_proxy):
    backend = make_backend()
    proxy = make_proxy({"web": [backend.address]})
    pool = proxy.pool("web")
    clock = [1000.0]
    pool.clock = lambda: clock[0]
    with requests.Session() as session:
        assert session.get(proxy.url + "/warm", timeout=CLIENT_TIMEOUT).status_code == 200
        wait_for(lambda: pool.idle_count == 1, what="the connection back in the pool")
        clock[0] += 5.0  # idle for 5 s: a server may be closing it right now
        assert session.post(proxy.url + "/pay", data=b"x", timeout=CLIENT_TIMEOUT).status_code == 200
        assert backend.connections == 2  # the POST did not take the old connection
        assert session.get(proxy.url + "/again", timeout=CLIENT_TIMEOUT).status_code == 200
    assert backend.connections == 2  # a GET still reuses pooled connections


def _answer_101(protocol: str):
    def script(peer):
        peer.read_head()
        peer.send(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: "
                  + protocol.encode() + b"\r\n\r\n")
        peer.hang()
    return script


UPGRADE_REQUEST = (b"GET /ws HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                   b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")


def test_a_switch_to_a_protocol_the_client_did_not_offer_is_a_502(make_raw_backend, make_proxy):
    raw = make_raw_backend(_answer_101("h2c"))
    proxy = make_proxy({"web": [raw.address]})
    with raw_client(proxy) as client:
        client.send(UPGRADE_REQUEST)
        assert client.read_response().status == 502


def test_a_switch_to_the_offered_protocol_is_tunnelled(make_raw_backend, make_proxy):
    raw = make_raw_backend(_answer_101("WebSocket"))  # protocol names compare case-insensitively
    proxy = make_proxy({"web": [raw.address]})
    with raw_client(proxy) as client:
        client.send(UPGRADE_REQUEST)
        assert client.read_response().status == 101


def test_a_client_leaving_while_the_backend_thinks_is_a_499(make_raw_backend, make_proxy):
    got_request = threading.Event()
    upstream_closed = threading.Event()

    def slow_backend(peer):
        peer.read_head()
        got_request.set()
        peer.sock.settimeout(10)
        try:
            if peer.sock.recv(1) == b"":  # the proxy gave the connection up
                upstream_closed.set()
        except OSError:
            upstream_closed.set()

    raw = make_raw_backend(slow_backend)
    proxy = make_proxy({"web": [raw.address]}, upstream_options={"read_timeout": "30s"})
    records = []
    proxy.app.observers.append(records.append)
    client = socket.create_connection(("127.0.0.1", proxy.port), timeout=CLIENT_TIMEOUT)
    client.sendall(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
    assert got_request.wait(CLIENT_TIMEOUT)
    started = time.monotonic()
    client.close()
    assert upstream_closed.wait(5), "the proxy kept waiting on the backend for a client that left"
    wait_for(lambda: records, what="the request logged")
    assert records[0].status == 499
    assert time.monotonic() - started < 5
    server = proxy.app.runtime.upstreams["web"].servers[0]
    assert server.available()  # a client leaving is not the server's failure
    wait_for(lambda: server.active_requests == 0, what="the server slot released")


# -- the hang-up watch: no system call for a fast answer, a shutdown for a client gone ---------------------
def test_the_hangup_watch_shuts_the_upstream_down_only_for_a_client_gone_after_an_interval():
    from core.hangup_watch import HangupWatch
    from tests.support.timing import FakeClock

    clock = FakeClock()
    watch = HangupWatch(interval=0.5, clock=clock, run_thread=False)
    upstream, server = socket.socketpair()
    client, client_peer = socket.socketpair()
    with upstream, server, client:
        fast = watch.watch(client, upstream)
        assert watch.unwatch(fast) is False  # answered at once: never looked at

        waiting = watch.watch(client, upstream)
        client_peer.close()
        watch.check()  # hung up, but it has not waited an interval yet
        assert not waiting.gone
        clock.advance(0.6)
        watch.check()
        assert waiting.gone and watch.unwatch(waiting) is True
        server.settimeout(CLIENT_TIMEOUT)
        assert server.recv(1) == b""  # the upstream side saw the shutdown

    alive_client, alive_peer = socket.socketpair()
    other, other_peer = socket.socketpair()
    with alive_client, alive_peer, other, other_peer:
        alive = watch.watch(alive_client, other)
        clock.advance(5)
        watch.check()
        assert watch.unwatch(alive) is False  # a client still there is left alone
