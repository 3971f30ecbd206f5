"""Black-box audit of load balancing, health checks and retries, against a real proxy on 127.0.0.1.

Regression tests for the bugs the audit found, plus a few checks of contract points nothing else
covered end to end (how many servers a failing request tries, ip_hash under a health flap).
"""

from __future__ import annotations

import socket

import pytest
import requests

from proxy.serve.app import Application
from proxy.config.schema import parse_config
from proxy.upstream.health import CheckResult, HealthChecker
from tests.support.ports import free_port
from tests.support.proxy import DEADLINE, FAST_HEALTH, config_document, served_by
from tests.support.timing import wait_for

pytestmark = pytest.mark.timeout(30)


def _read_then_reset(peer):
    head, _ = peer.read_request()
    if head:
        peer.reset()  # the request arrived; not one response byte goes back


@pytest.mark.parametrize("method,retries,servers_tried", [
    ("GET", 1, 2),      # `retries` further servers, no more
    ("GET", 5, 3),      # never the same server twice, even with retries to spare
    ("DELETE", 0, 1),   # retries = 0: one attempt
    ("PUT", 2, 3),      # idempotent with a (kept) body: repeated
    ("POST", 2, 1),     # CONFIG.md: a POST whose bytes may have reached a server is never sent twice
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


@pytest.mark.parametrize("policy", ["round_robin", "least_connections"])
def test_a_dead_server_is_tried_first_by_its_share_of_requests_not_by_all(make_backend, make_proxy, policy):
    """[dead, live], no passive checks: the retry's pick took the live server's round-robin turn, so the
    next request started at the dead one again: every request paid a failed connect (a whole
    connect_timeout for a blackholed server) instead of every second one."""
    live = make_backend()
    proxy = make_proxy({"web": [f"127.0.0.1:{free_port()}", live.address]},
                       upstream_options={"retries": 1, "policy": policy})
    with requests.Session() as session:
        for _ in range(10):
            assert session.get(proxy.url + "/", timeout=DEADLINE).status_code == 200
    dead, alive = proxy.app.runtime.upstreams["web"].servers
    assert dead.failures_total == 5 and alive.requests_total == 10, (dead.snapshot(), alive.snapshot())


def _get_from(proxy, source_ip: str) -> str:
    """GET / from a given loopback source address (all of 127/8 is local); the body names the backend."""
    port = int(proxy.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE, source_address=(source_ip, 0)) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        data = b""
        for _ in range(100):  # bounded: Connection: close ends the answer
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return body.decode()


def test_ip_hash_moves_only_the_clients_of_a_server_that_goes_down_and_brings_them_back(backends, observed_proxy):
    a, b, c = backends("a", "b", "c")
    proxy = observed_proxy(config_document({"web": {"servers": [a.address, b.address, c.address],
                                                    "policy": "ip_hash", "health": FAST_HEALTH}}))
    clients = [f"127.0.0.{i}" for i in range(2, 32)]
    before = {ip: _get_from(proxy, ip) for ip in clients}
    assert set(before.values()) == {"a", "b", "c"}, before  # 30 clients over 3 servers: each has some
    assert before == {ip: _get_from(proxy, ip) for ip in clients}  # sticky
    b.health_status = 500
    wait_for(lambda: proxy.state("web", b.address) == "down", what="b down")
    during = {ip: _get_from(proxy, ip) for ip in clients}
    assert {ip for ip in clients if during[ip] != before[ip]} == {ip for ip in clients if before[ip] == "b"}
    b.health_status = 200
    wait_for(lambda: proxy.state("web", b.address) == "up", what="b up")
    assert {ip: _get_from(proxy, ip) for ip in clients} == before


def test_reload_that_rebuilds_a_down_server_keeps_it_down(backends, observed_proxy):
    """A weight change makes the reload build a new Server: it must not start "up" and take traffic
    while the checker knows it fails (before the fix: up until unhealthy_after more failed checks,
    i.e. 15 s of traffic to a dead server with the defaults)."""
    a, b = backends("a", "b")
    proxy = observed_proxy(config_document({"web": {"servers": [a.address, b.address], "health": FAST_HEALTH}}))
    b.health_status = 500
    wait_for(lambda: proxy.state("web", b.address) == "down", what="b down")
    slow = {**FAST_HEALTH, "interval": "5s", "unhealthy_after": 3}  # no new verdict during the test
    proxy.reload(config_document({"web": {"servers": [a.address, {"address": b.address, "weight": 2}],
                                          "health": slow}}))
    status = proxy.server_status("web", b.address)
    assert status["weight"] == 2 and status["state"] == "down", status
    assert served_by(proxy, 6) == {"a": 6}
    b.health_status = 200
    proxy.reload(config_document({"web": {"servers": [a.address, {"address": b.address, "weight": 3}],
                                          "health": FAST_HEALTH}}))
    wait_for(lambda: proxy.state("web", b.address) == "up", what="b back after healthy_after passes")
    wait_for(lambda: "b" in served_by(proxy, 4), what="b to get traffic again")


def _upgrade_then_echo_until_eof(peer):
    if not peer.read_head():
        return
    peer.send(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
    for _ in range(1000):  # bounded: ends when the proxy closes the tunnel
        data = peer.sock.recv(65536)
        if not data:
            return
        peer.send(data)


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
    backend = make_raw_backend(_upgrade_then_echo_until_eof)
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


class _HeldChecks:
    """Stands in for the checker's probe threads: holds each submitted check so the test decides when it ends."""

    def __init__(self):
        self.held = []

    def submit(self, check, target, upstream_config):
        self.held.append((target, upstream_config))


def test_a_check_that_ends_after_a_reload_rebuilt_its_server_announces_nothing():
    """A check in flight while a reload rebuilt its server (weight change) used to announce its verdict
    when it ended: listeners apply verdicts by address, so workers took the successor down while the
    checker's successor target stayed "up" and never announced "up" again (stuck down)."""
    health = {**FAST_HEALTH, "unhealthy_after": 1}
    document = config_document({"web": {"servers": ["127.0.0.1:9"], "health": health}})
    app = Application(parse_config(document, "test.toml"))
    now = [0.0]
    checker = HealthChecker(app, clock=lambda: now[0])
    checker._executor = held = _HeldChecks()
    heard = []
    checker.listeners.append(lambda *change: heard.append(change))
    checker.run_once()  # creates the target, due within 10% of the interval
    now[0] = 1.0
    checker.run_once()
    (old_target, upstream_config), = held.held
    app.reload(parse_config(config_document({"web": {"servers": [{"address": "127.0.0.1:9", "weight": 2}],
                                                     "health": health}}), "test.toml"))
    checker.run_once()  # the rebuilt server gets a successor target
    checker.record_result(old_target, CheckResult(0.0, False, 1.0, None, "refused"), upstream_config.health)
    assert heard == []
    (server,) = app.runtime.upstreams["web"].servers
    assert server.state == "up" and [up for *_, up, _ in checker.verdicts()] == [True]


def test_passive_checks_count_failures_within_fail_timeout_whatever_succeeds_between(make_raw_backend, make_proxy):
    """CONFIG.md: "max_fails failed attempts within fail_timeout". A server failing every other
    request was never taken out: each success forgot the failures counted so far."""
    calls = []

    def every_other_fails(peer):
        head, _ = peer.read_request()
        if not head:
            return
        calls.append(head)
        if len(calls) % 2:
            peer.reset()
        else:
            peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")

    backend = make_raw_backend(every_other_fails)
    proxy = make_proxy({"web": [backend.address]},
                       upstream_options={"retries": 0, "passive": {"max_fails": 3, "fail_timeout": "30s"}})
    statuses = [requests.get(proxy.url + "/", timeout=DEADLINE).status_code for _ in range(8)]
    assert statuses[:5] == [502, 200, 502, 200, 502]  # the third failure within 30 s takes it out
    assert statuses[5:] == [503] * 3 and len(calls) == 5


def _served_for(proxy, forwarded_for: str) -> str:
    response = requests.get(proxy.url + "/", headers={"X-Forwarded-For": forwarded_for}, timeout=DEADLINE)
    assert response.status_code == 200, response.text
    return response.text


@pytest.mark.parametrize("trusted, spread", [(["127.0.0.1"], True), (["10.0.0.0/8"], False)],
                         ids=["behind-a-trusted-proxy", "from-an-untrusted-peer"])
def test_ip_hash_keys_on_the_client_a_trusted_proxy_forwarded_for(backends, observed_proxy, trusted, spread):
    """Behind a load balancer every request comes from its address: ip_hash sent every client to one
    server. With trusted_proxies set (nginx's set_real_ip_from), it hashes the rightmost untrusted
    X-Forwarded-For hop; from an untrusted peer the header is ignored (a client cannot pick its server)."""
    a, b, c = backends("a", "b", "c")
    proxy = observed_proxy(config_document({"web": {"servers": [a.address, b.address, c.address],
                                                    "policy": "ip_hash"}},
                                           server={"trusted_proxies": trusted}))
    clients = [f"203.0.113.{i}" for i in range(1, 31)]
    chosen = {ip: _served_for(proxy, f"{ip}, 127.0.0.1") for ip in clients}  # the last hop: trusted, skipped
    assert chosen == {ip: _served_for(proxy, ip) for ip in clients}  # sticky per client
    assert (len(set(chosen.values())) == 3) is spread, chosen
