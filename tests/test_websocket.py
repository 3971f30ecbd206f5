"""WebSocket (Upgrade) tunnels through the proxy: real websockets client and server on loopback."""

from __future__ import annotations

import contextlib
import os
import socket
import threading

import pytest
import requests
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect
from websockets.sync.server import serve

from proxy.config.schema import parse_config
from proxy.http import tunnel as tunnel_module
from tests.support.backends import upgrade_then_echo
from tests.support.client import raw_client
from tests.support.proxy import CLIENT_TIMEOUT, DEADLINE, proxy_config_dict
from tests.support.timing import wait_for

pytestmark = pytest.mark.timeout(30)

LARGE = 5 * 1024 * 1024


def _echo(ws) -> None:
    try:
        for message in ws:
            ws.send(message)
    except ConnectionClosed:
        pass


@contextlib.contextmanager
def ws_backend(handler=_echo, **kwargs):
    server = serve(handler, "127.0.0.1", 0, max_size=None, **kwargs)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        thread.join(5)


def _port(server) -> int:
    return server.socket.getsockname()[1]


@pytest.fixture
def echo_backend():
    with ws_backend() as server:
        yield server


@pytest.fixture
def proxy(make_proxy, echo_backend):
    return make_proxy({"ws": [f"127.0.0.1:{_port(echo_backend)}"]})


def ws_url(proxy, path: str = "/chat") -> str:
    return f"ws://127.0.0.1:{proxy.port}{path}"


def test_text_and_binary_echo(proxy):
    with connect(ws_url(proxy), open_timeout=CLIENT_TIMEOUT, close_timeout=CLIENT_TIMEOUT) as ws:
        ws.send("hello")
        assert ws.recv(CLIENT_TIMEOUT) == "hello"
        blob = os.urandom(1000)
        ws.send(blob)
        assert ws.recv(CLIENT_TIMEOUT) == blob
        assert proxy.app.open_tunnels == 1


def test_large_frame_both_ways(proxy):
    payload = os.urandom(LARGE)
    with connect(ws_url(proxy), max_size=None, open_timeout=CLIENT_TIMEOUT) as ws:
        ws.send(payload)
        assert ws.recv(CLIENT_TIMEOUT) == payload


def test_close_handshake_completes_and_tunnel_is_released(proxy):
    with connect(ws_url(proxy), open_timeout=CLIENT_TIMEOUT, close_timeout=CLIENT_TIMEOUT) as ws:
        ws.send("x")
        assert ws.recv(CLIENT_TIMEOUT) == "x"
        ws.close(code=1000, reason="bye")
        assert ws.close_code == 1000 and ws.close_reason == "bye"  # the server's close frame came back
    wait_for(lambda: proxy.app.open_tunnels == 0, timeout=5)
    counts = proxy.process.server.connection_counts()
    assert counts["tunnel"] == 0


def test_tunnel_holds_no_worker_thread(proxy):
    with connect(ws_url(proxy), open_timeout=CLIENT_TIMEOUT) as ws:
        ws.send("ping")
        assert ws.recv(CLIENT_TIMEOUT) == "ping"
        wait_for(lambda: proxy.process.pool.counts()["busy"] == 0, timeout=5)
        assert proxy.process.server.connection_counts()["tunnel"] == 1


def test_the_tunnel_thread_ends_when_no_tunnel_is_open_and_comes_back(proxy, monkeypatch):
    """A proxy whose tunnels all closed keeps no relay thread running (a stopped one would otherwise
    leave it behind); the next tunnel starts a new one."""
    monkeypatch.setattr(tunnel_module, "IDLE_SWEEPS", 1)
    relay = proxy.process.server.handler.tunnels
    with connect(ws_url(proxy), open_timeout=CLIENT_TIMEOUT) as ws:
        ws.send("one")
        assert ws.recv(CLIENT_TIMEOUT) == "one"
        first = relay._thread
        assert first is not None and first.is_alive()
    wait_for(lambda: not first.is_alive(), timeout=30)
    assert relay._thread is None
    with connect(ws_url(proxy), open_timeout=CLIENT_TIMEOUT) as ws:
        ws.send("two")
        assert ws.recv(CLIENT_TIMEOUT) == "two"
        assert relay._thread is not None and relay._thread is not first


def test_upgrade_headers_reach_backend(make_proxy):
    seen = {}

    def record(ws):
        seen.update((name.lower(), value) for name, value in ws.request.headers.raw_items())
        _echo(ws)

    with ws_backend(record) as server:
        proxy = make_proxy({"ws": [f"127.0.0.1:{_port(server)}"]})
        with connect(ws_url(proxy, "/sock?x=1"), subprotocols=["chat"], open_timeout=CLIENT_TIMEOUT,
                     additional_headers={"X-Custom": "1"}) as ws:
            ws.send("a")
            assert ws.recv(CLIENT_TIMEOUT) == "a"
    assert seen["upgrade"].lower() == "websocket"
    assert "upgrade" in seen["connection"].lower()
    assert seen["sec-websocket-protocol"] == "chat"
    assert seen["x-custom"] == "1"
    assert seen["x-forwarded-for"] == "127.0.0.1"


def test_backend_refusing_upgrade_is_an_ordinary_response(make_proxy):
    def refuse(connection, request):
        return connection.respond(403, "no sockets for you\n")

    with ws_backend(process_request=refuse) as server:
        proxy = make_proxy({"ws": [f"127.0.0.1:{_port(server)}"]})
        with pytest.raises(InvalidStatus) as caught:
            connect(ws_url(proxy), open_timeout=CLIENT_TIMEOUT)
        assert caught.value.response.status_code == 403
        assert caught.value.response.body == b"no sockets for you\n"
        assert proxy.app.open_tunnels == 0


def test_backend_dropping_mid_tunnel_closes_client(make_proxy):
    dropped = threading.Event()

    def drop_after_first(ws):
        ws.recv()
        ws.socket.shutdown(socket.SHUT_RDWR)  # vanish without a close frame
        dropped.set()

    with ws_backend(drop_after_first) as server:
        proxy = make_proxy({"ws": [f"127.0.0.1:{_port(server)}"]})
        with connect(ws_url(proxy), open_timeout=CLIENT_TIMEOUT, close_timeout=2) as ws:
            ws.send("first")
            assert dropped.wait(CLIENT_TIMEOUT)
            with pytest.raises(ConnectionClosed):
                ws.recv(CLIENT_TIMEOUT)
        wait_for(lambda: proxy.app.open_tunnels == 0, timeout=5)


def test_client_leaving_closes_backend_side(make_proxy):
    backend_saw_close = threading.Event()

    def wait_for_close(ws):
        try:
            for _ in ws:
                pass
        except ConnectionClosed:
            pass
        backend_saw_close.set()

    with ws_backend(wait_for_close) as server:
        proxy = make_proxy({"ws": [f"127.0.0.1:{_port(server)}"]})
        with connect(ws_url(proxy), open_timeout=CLIENT_TIMEOUT, close_timeout=1) as ws:
            wait_for(lambda: proxy.app.open_tunnels == 1, timeout=5)
            ws.socket.shutdown(socket.SHUT_RDWR)  # abrupt: no close frame
            assert backend_saw_close.wait(CLIENT_TIMEOUT)
        wait_for(lambda: proxy.app.open_tunnels == 0, timeout=5)


def test_many_concurrent_tunnels(proxy):
    count = 20
    with contextlib.ExitStack() as stack:
        clients = [stack.enter_context(connect(ws_url(proxy), open_timeout=CLIENT_TIMEOUT)) for _ in range(count)]
        wait_for(lambda: proxy.app.open_tunnels == count, timeout=5)
        for round_ in range(3):
            for index, ws in enumerate(clients):
                ws.send(f"{index}:{round_}")
            for index, ws in enumerate(clients):
                assert ws.recv(CLIENT_TIMEOUT) == f"{index}:{round_}"
        # 20 tunnels, and no worker thread held by any of them
        assert proxy.process.pool.counts()["busy"] == 0
    wait_for(lambda: proxy.app.open_tunnels == 0, timeout=5)


def test_idle_tunnel_closed_after_tunnel_timeout(make_proxy, echo_backend):
    proxy = make_proxy({"ws": [f"127.0.0.1:{_port(echo_backend)}"]}, server={"tunnel_timeout": "0.6s"})
    with connect(ws_url(proxy), open_timeout=CLIENT_TIMEOUT, close_timeout=2) as ws:
        wait_for(lambda: proxy.app.open_tunnels == 1, timeout=5)
        with pytest.raises(ConnectionClosed):
            ws.recv(CLIENT_TIMEOUT)  # nothing moves: the proxy closes the tunnel
        wait_for(lambda: proxy.app.open_tunnels == 0, timeout=5)


def test_tunnel_survives_reload_and_drain_closes_it_after_graceful_timeout(make_proxy, echo_backend):
    proxy = make_proxy({"ws": [f"127.0.0.1:{_port(echo_backend)}"]}, server={"graceful_timeout": "1s"})
    with connect(ws_url(proxy), open_timeout=CLIENT_TIMEOUT, close_timeout=2) as ws:
        ws.send("before")
        assert ws.recv(CLIENT_TIMEOUT) == "before"
        # A reload that drops the upstream entirely: the open tunnel does not care.
        # It keeps graceful_timeout: a reload applies it (the drain below relies on 1s).
        document = proxy_config_dict({"other": ["127.0.0.1:1"]},
                                     server={"listen": f"127.0.0.1:{proxy.port}", "graceful_timeout": "1s"})
        proxy.process.reload(parse_config(document, "test.toml"))
        ws.send("after reload")
        assert ws.recv(CLIENT_TIMEOUT) == "after reload"
        proxy.process.stop()  # graceful: the tunnel may go on for graceful_timeout
        wait_for(lambda: proxy.app.draining(), timeout=5)
        ws.send("during drain")
        assert ws.recv(CLIENT_TIMEOUT) == "during drain"
        with pytest.raises(ConnectionClosed):
            ws.recv(CLIENT_TIMEOUT)  # closed at the graceful deadline
        proxy.thread.join(10)
        assert not proxy.thread.is_alive()
        # The drain's force-close cut the sockets; the tunnel relay's own thread counts the tunnel closed
        # when it sees that, which may come a moment after the serving thread ended.
        wait_for(lambda: proxy.app.open_tunnels == 0, timeout=5, what="the tunnel counted closed")


# -- an open tunnel holds its server slot (max_connections, least_connections) --------------------------
def _open_tunnel(proxy) -> tuple[socket.socket, bytes]:
    sock = proxy.connect()
    sock.sendall(b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            break
        head += chunk
    return sock, head


def test_an_open_websocket_tunnel_holds_its_server_slot_until_it_closes(make_raw_backend, make_proxy):
    """max_connections and least_connections count upgraded connections (nginx frees the peer when the
    upgraded connection ends). Before the fix the slot went back at the hand-off to the tunnel relay:
    with max_connections = 1, any number of tunnels reached the server, and /status said 0 active."""
    backend = make_raw_backend(upgrade_then_echo)
    proxy = make_proxy({"web": [backend.address]}, upstream_options={"max_connections": 1})
    server = proxy.app.runtime.upstreams["web"].servers[0]
    first, head = _open_tunnel(proxy)
    assert head.startswith(b"HTTP/1.1 101"), head
    first.sendall(b"ping")
    assert first.recv(4) == b"ping"
    assert server.active_requests == 1
    second, head = _open_tunnel(proxy)
    assert head.startswith(b"HTTP/1.1 503"), head  # the one allowed connection is the open tunnel
    second.close()
    first.close()
    wait_for(lambda: server.active_requests == 0, what="the slot back when the tunnel closed")
    third, head = _open_tunnel(proxy)
    assert head.startswith(b"HTTP/1.1 101"), head
    third.close()
    wait_for(lambda: server.active_requests == 0, what="the slot back again")


def _upgrade_or_answer(peer):
    head = peer.read_head()
    if b"upgrade: websocket" not in head.lower():
        while head:  # plain keep-alive requests: answer each with this backend's port
            body = str(peer.sock.getsockname()[1]).encode()
            peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            head = peer.read_head()
        return
    peer.buffer = b""
    peer.send(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
    for _ in range(1000):  # bounded: ends when the proxy closes the tunnel
        if not peer.sock.recv(65536):
            return


def test_least_connections_counts_an_open_websocket(make_raw_backend, make_proxy):
    raws = [make_raw_backend(_upgrade_or_answer) for _ in range(2)]
    proxy = make_proxy({"web": [r.address for r in raws]}, upstream_options={"policy": "least_connections"})
    tunnel, head = _open_tunnel(proxy)
    assert head.startswith(b"HTTP/1.1 101"), head
    busy = next(s for s in proxy.app.runtime.upstreams["web"].servers if s.active_requests == 1)
    with requests.Session() as session:
        answered = {session.get(proxy.url + "/", timeout=DEADLINE).text for _ in range(6)}
    assert answered == {str(r.port) for r in raws if r.address != busy.address}
    tunnel.close()


# -- Upgrade in an HTTP/1.0 request is ignored ---------------------------------------------------------
# RFC 9110 §7.8: a server MUST ignore Upgrade in an HTTP/1.0 request, and §15.2: no 1xx to a 1.0 client.
# The proxy forwarded it as an HTTP/1.1 upgrade, so a backend's 101 switched a 1.0 client into a tunnel.
def test_upgrade_in_an_http10_request_is_not_forwarded(make_raw_backend, make_proxy):
    heads = []

    def script(peer):
        head = peer.read_head()
        if not head:
            return
        heads.append(head)
        if b"upgrade" in head.lower():
            peer.send(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
            peer.hang()
        else:
            peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    backend = make_raw_backend(script)
    proxy = make_proxy({"web": [backend.address]})
    with raw_client(proxy) as raw:
        raw.send(b"GET / HTTP/1.0\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
        response = raw.read_response()
        assert raw.at_eof()
    assert response.status == 200 and response.body == b"ok"
    assert len(heads) == 1 and b"upgrade" not in heads[0].lower()


# -- bytes sent right behind an Upgrade request belong to the tunnel -------------------------------------
# A client may send the new protocol's first bytes in the same write as its Upgrade request. They
# stayed in the request parser as if they were a pipelined next request, and were lost: the server
# never saw them and a protocol waiting for them hung.
def test_bytes_sent_with_the_upgrade_request_reach_the_backend(make_raw_backend, make_proxy):
    def script(peer):
        if not peer.read_head():
            return
        peer.send(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
        data = peer.buffer
        while len(data) < 4:
            piece = peer.sock.recv(4 - len(data))
            if not piece:
                return
            data += piece
        peer.send(b"got " + data)

    proxy = make_proxy({"web": [make_raw_backend(script).address]})
    with raw_client(proxy) as client:
        client.send(b"GET /t HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\nping")
        assert client.read_response().status == 101
        assert client.read_exact(8) == b"got ping"


# -- no h2c upgrade through the proxy ---------------------------------------------------------------------
# An "Upgrade: h2c" relayed and answered with 101 made the client's connection an HTTP/2 connection
# straight to the backend: every request on it bypassed the proxy's routing ("h2c smuggling"). RFC 9113
# §3.1 deprecates that upgrade; the request goes on without it and gets an ordinary answer.
def test_h2c_upgrade_is_not_forwarded(make_backend, make_proxy):
    backend = make_backend()
    proxy = make_proxy({"web": [backend.address]})
    with raw_client(proxy) as client:
        client.send(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                    b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n")
        assert client.read_response().status == 200
    names = {name.lower() for name, _ in backend.last.headers}
    assert not names & {"upgrade", "http2-settings"}
    assert backend.last.header("Connection") in (None, "keep-alive")


def test_h2c_among_other_offers_leaves_the_others(make_raw_backend, make_proxy):
    heads = []

    def script(peer):
        heads.append(peer.read_head())
        peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    proxy = make_proxy({"web": [make_raw_backend(script).address]})
    with raw_client(proxy) as client:
        client.send(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: h2c, websocket\r\n\r\n")
        assert client.read_response().status == 200
    assert b"\r\nUpgrade: websocket\r\n" in heads[0]
