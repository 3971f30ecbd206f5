"""Active health checks and passive ejection, from the pure policy to a proxy with real backends.

The shared pieces are the ``backends`` and ``observed_proxy`` fixtures (tests/conftest.py),
``config_document`` and ``served_by`` (tests/support/proxy.py) and ``FlakyBackend``
(tests/support/backends.py: a backend that can answer 500 on its health path, hang there, or die and
come back on the same port).
"""

from __future__ import annotations

import ssl
import threading
import time
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from proxy.config.schema import HealthConfig, parse_config
from proxy.serve.app import Application
from proxy.serve.supervisor import Supervisor
from proxy.upstream.discovery import Target, discovery_key
from proxy.upstream.health import CheckResult, HealthChecker, HealthPolicy, apply_health, probe
from tests.support.backends import close_with_rst
from tests.support.client import raw_client
from tests.support.faulty_upstream import BODY, FIN, HANG, HEAD, LOOP, RST, sleep, write
from tests.support.proxy import DEADLINE, FAST_HEALTH, config_document, served_by
from tests.support.timing import wait_for


# -- the pure policy ---------------------------------------------------------------------------------

def test_policy_starts_up_and_goes_down_after_exactly_unhealthy_after_failures():
    policy = HealthPolicy(healthy_after=2, unhealthy_after=3)
    assert policy.up
    assert policy.record(False, "status 500") is None
    assert policy.record(False, "status 500") is None
    up, reason = policy.record(False, "status 503")
    assert up is False and "3 consecutive checks failed" in reason and "status 503" in reason
    assert policy.record(False, "again") is None  # already down: no second change


def test_policy_pass_between_failures_resets_the_count():
    policy = HealthPolicy(healthy_after=1, unhealthy_after=2)
    for _ in range(5):
        assert policy.record(False, "x") is None
        assert policy.record(True, "ok") is None
    assert policy.up


def test_policy_comes_back_after_healthy_after_passes_and_a_failure_restarts_the_count():
    policy = HealthPolicy(healthy_after=2, unhealthy_after=1)
    assert policy.record(False, "refused") == (False, "1 consecutive checks failed, last: refused")
    assert policy.record(True, "") is None
    assert policy.record(False, "refused") is None
    assert policy.record(True, "") is None
    assert policy.record(True, "") == (True, "2 consecutive checks passed")
    assert policy.up


# -- one probe -----------------------------------------------------------------------------------------

def test_probe_passes_on_2xx_and_fails_on_500_with_the_status(backends):
    (backend,) = backends("a")
    health = HealthConfig(timeout=1.0)
    result = probe("127.0.0.1", backend.port, health, host_header=backend.address)
    assert result.ok and result.status == 200 and result.error is None and result.latency_ms >= 0
    backend.health_status = 500
    result = probe("127.0.0.1", backend.port, health, host_header=backend.address)
    assert not result.ok and result.status == 500 and result.error == "status 500 (expected 2xx)"


def test_probe_honours_an_explicit_expect_status_list(backends):
    (backend,) = backends("a")
    backend.health_status = 204
    health = HealthConfig(timeout=1.0, expect_status=frozenset({200}))
    assert not probe("127.0.0.1", backend.port, health, host_header=backend.address).ok
    health = HealthConfig(timeout=1.0, expect_status=frozenset({200, 204}))
    assert probe("127.0.0.1", backend.port, health, host_header=backend.address).ok


def test_probe_of_a_hanging_server_fails_at_its_timeout(backends):
    (backend,) = backends("a")
    backend.hang_health = True
    started = time.monotonic()
    result = probe("127.0.0.1", backend.port, HealthConfig(timeout=0.2), host_header=backend.address)
    elapsed = time.monotonic() - started
    assert not result.ok and result.error == "timed out after 0.2s"
    assert 0.15 <= elapsed < 2.0


def test_probe_of_a_closed_port_fails_with_the_socket_error(backends):
    (backend,) = backends("a")
    backend.kill()
    result = probe("127.0.0.1", backend.port, HealthConfig(timeout=1.0), host_header=backend.address)
    assert not result.ok and result.status is None and "refused" in result.error.lower()


# -- the checker in a running proxy --------------------------------------------------------------------

def _two_server_proxy(backends, observed_proxy, health=FAST_HEALTH, **upstream):
    a, b = backends("a", "b")
    proxy = observed_proxy(config_document({"web": {"servers": [a.address, b.address], "health": health,
                                                    **upstream}}))
    wait_for(lambda: all(s["last_check"] for s in proxy.status()["upstreams"]["web"]["servers"]),
             what="a first check of every server")
    return proxy, a, b


def test_server_that_dies_is_taken_out_and_comes_back_when_revived(backends, observed_proxy):
    proxy, a, b = _two_server_proxy(backends, observed_proxy)
    assert served_by(proxy, 10) == {"a": 5, "b": 5}
    b.kill()
    wait_for(lambda: proxy.state("web", b.address) == "down", what="b down")
    status = proxy.server_status("web", b.address)
    assert "consecutive checks failed" in status["reason"] and status["last_check"]["ok"] is False
    assert served_by(proxy, 10) == {"a": 10}
    b.revive()
    wait_for(lambda: proxy.state("web", b.address) == "up", what="b back up")
    assert "consecutive checks passed" in proxy.server_status("web", b.address)["reason"]
    assert served_by(proxy, 10) == {"a": 5, "b": 5}


def test_health_path_answering_500_takes_the_server_out(backends, observed_proxy):
    proxy, a, b = _two_server_proxy(backends, observed_proxy)
    b.health_status = 500
    wait_for(lambda: proxy.state("web", b.address) == "down", what="b down")
    status = proxy.server_status("web", b.address)
    assert "status 500 (expected 2xx)" in status["reason"]
    assert status["last_check"]["status"] == 500 and status["since_seconds"] >= 0
    assert served_by(proxy, 6) == {"a": 6}
    b.health_status = 200
    wait_for(lambda: proxy.state("web", b.address) == "up", what="b back up")


def test_health_check_hanging_past_its_timeout_fails_and_never_blocks_traffic(backends, observed_proxy):
    health = {**FAST_HEALTH, "interval": "200ms", "timeout": "100ms"}
    proxy, a, b = _two_server_proxy(backends, observed_proxy, health=health)
    b.hang_health = True
    wait_for(lambda: proxy.state("web", b.address) == "down", what="b down")
    assert "timed out after 0.1s" in proxy.server_status("web", b.address)["reason"]
    started = time.monotonic()
    assert served_by(proxy, 6) == {"a": 6}
    assert time.monotonic() - started < 2.0
    b.hang_health = False
    b.release.set()
    wait_for(lambda: proxy.state("web", b.address) == "up", what="b back up")


def test_all_servers_down_answers_503_at_once(backends, observed_proxy):
    proxy, a, b = _two_server_proxy(backends, observed_proxy)
    a.health_status = b.health_status = 503
    wait_for(lambda: all(s["state"] == "down" for s in proxy.status()["upstreams"]["web"]["servers"]),
             what="every server down")
    started = time.monotonic()
    response = requests.get(proxy.url + "/", timeout=DEADLINE)
    assert response.status_code == 503 and "no server available" in response.text
    assert time.monotonic() - started < 1.0
    traffic_before = a.get("traffic") + b.get("traffic")
    assert traffic_before == 0


def test_a_server_failing_its_first_checks_goes_down(backends, observed_proxy):
    a, b = backends("a", "b")
    b.health_status = 500  # unhealthy from the start: servers start up, then fail their way out
    proxy = observed_proxy(config_document({"web": {"servers": [a.address, b.address], "health": FAST_HEALTH}}))
    wait_for(lambda: proxy.state("web", b.address) == "down", what="b down")
    assert b.get("health") >= FAST_HEALTH["unhealthy_after"]


def test_checker_follows_a_reload(backends, observed_proxy):
    proxy, a, b = _two_server_proxy(backends, observed_proxy)
    b.health_status = 500
    wait_for(lambda: proxy.state("web", b.address) == "down", what="b down")
    # Without [health] a server the checks had taken out gets traffic again.
    document = config_document({"web": {"servers": [a.address, b.address]}})
    proxy.reload(document)
    wait_for(lambda: proxy.state("web", b.address) == "up", what="b up once checks are off")
    assert proxy.server_status("web", b.address)["reason"] == "active health checks disabled"
    # A server added by a reload is checked too.
    (c,) = backends("c")
    c.health_status = 500
    document = config_document({"web": {"servers": [a.address, c.address], "health": FAST_HEALTH}})
    proxy.reload(document)
    wait_for(lambda: proxy.state("web", c.address) == "down", what="c down")
    assert proxy.state("web", a.address) == "up"


def test_verdicts_reach_listeners_and_apply_health_feeds_another_process(backends, observed_proxy):
    proxy, a, b = _two_server_proxy(backends, observed_proxy)
    heard = []
    proxy.process.observability.checker.listeners.append(lambda *change: heard.append(change))
    worker_app = Application(proxy.app.config)  # what a worker process would hold
    b.health_status = 500
    wait_for(lambda: heard, what="a verdict")
    upstream, address, up, reason = heard[0]
    assert (upstream, address, up) == ("web", b.address, False) and "status 500" in reason
    assert apply_health(worker_app, upstream, address, up, reason)
    worker_servers = {s.address: s for s in worker_app.runtime.upstreams["web"].servers}
    assert worker_servers[b.address].state == "down" and worker_servers[a.address].state == "up"
    assert not apply_health(worker_app, "nope", address, True, "x")
    verdicts = proxy.process.observability.checker.verdicts()
    assert ("web", b.address, False) in [(u, ad, up) for u, ad, up, _ in verdicts]


def test_checker_run_once_with_no_health_tables_starts_nothing(backends):
    (a,) = backends("a")
    app = Application(parse_config(config_document({"web": {"servers": [a.address]}}), "test.toml"))
    checker = HealthChecker(app)
    assert checker.run_once() == 1.0
    assert a.get("health") == 0 and checker.verdicts() == []


# -- passive ejection, end to end ----------------------------------------------------------------------

def test_passive_ejection_takes_a_dead_server_out_and_lets_it_back_after_fail_timeout(backends, observed_proxy):
    a, b = backends("a", "b")
    b.kill()
    proxy = observed_proxy(config_document({"web": {"servers": [a.address, b.address], "retries": 1,
                                                    "passive": {"max_fails": 1, "fail_timeout": "300ms"}}}))
    assert served_by(proxy, 4) == {"a": 4}  # the refused attempt is retried on a
    status = proxy.server_status("web", b.address)
    assert status["state"] == "down" and status["reason"].startswith("ejected:")
    assert status["failures_total"] == 1
    b.revive()
    wait_for(lambda: proxy.state("web", b.address) == "up", what="ejection to expire")
    wait_for(lambda: "b" in served_by(proxy, 2), what="b to get traffic again")


# -- a server killed under traffic ------------------------------------------------------------------------

def test_server_killed_under_traffic_costs_no_get(backends, observed_proxy):
    a, b, c = backends("a", "b", "c")
    proxy = observed_proxy(config_document({"web": {
        "servers": [a.address, b.address, c.address], "retries": 2, "health": FAST_HEALTH,
        "passive": {"max_fails": 1, "fail_timeout": "10s"}}}))
    results = {"ok": 0, "failed": [], "after_kill": 0}
    lock = threading.Lock()
    killed = threading.Event()

    def client():
        with requests.Session() as session:
            for _ in range(150):  # bounded
                try:
                    response = session.get(proxy.url + "/", timeout=DEADLINE)
                    outcome = response.status_code
                except requests.RequestException as exc:
                    outcome = repr(exc)
                with lock:
                    if outcome == 200:
                        results["ok"] += 1
                    else:
                        results["failed"].append(outcome)
                    results["after_kill"] += killed.is_set()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(4)]
    for thread in threads:
        thread.start()
    wait_for(lambda: b.get("traffic") >= 20, what="traffic to reach b")
    b.kill()
    killed.set()
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads)
    # Failures are at most the requests in flight on the killed server, and none that a retry
    # could have saved. A GET whose server dies before answering is retried (0 failures); one whose
    # response had started streaming to the client cannot be (responses are never buffered), so a
    # truncated body, at most one per client thread, is the only failure allowed.
    truncated = [f for f in results["failed"] if "IncompleteRead" in str(f)]
    assert results["failed"] == truncated and len(truncated) <= len(threads), results["failed"]
    assert results["ok"] + len(truncated) == 600
    assert results["after_kill"] > 100  # the kill really happened under traffic
    served_after = b.get("traffic")
    wait_for(lambda: proxy.state("web", b.address) == "down", what="b down")
    assert served_by(proxy, 10).keys() <= {"a", "c"} and b.get("traffic") == served_after


# -- reloads that rebuild a server; passive checks counting within fail_timeout -------------------------
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


def test_passive_checks_count_failures_within_fail_timeout_whatever_succeeds_between(make_raw_backend, make_backend,
                                                                                     make_proxy):
    """docs/configuration.md: "max_fails failed attempts within fail_timeout". A server failing every other
    request was never taken out: each success forgot the failures counted so far. (A steady second
    server takes every other turn: passive checks never eject the only server of an upstream.)"""
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
    steady = make_backend()
    proxy = make_proxy({"web": [backend.address, steady.address]},
                       upstream_options={"retries": 0, "passive": {"max_fails": 3, "fail_timeout": "30s"}})
    statuses = [requests.get(proxy.url + "/", timeout=DEADLINE).status_code for _ in range(14)]
    assert statuses[0:10:2] == [502, 200, 502, 200, 502]  # the third failure within 30 s takes it out
    assert statuses[1:10:2] == [200] * 5 and statuses[10:] == [200] * 4  # then the steady one takes all
    assert len(calls) == 5


# -- the health checker against misbehaving servers ----------------------------------------------
GET = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"


def _probe(upstream, timeout: float):
    health = HealthConfig(path="/healthz", interval=1.0, timeout=timeout, expect_status=frozenset(range(200, 300)),
                          healthy_after=1, unhealthy_after=1)
    return probe("127.0.0.1", upstream.port, health, host_header=upstream.address)


@pytest.mark.parametrize("then", [FIN, HANG])
def test_health_probe_answered_with_101_fails_at_once(upstreams, then):
    """Bug: the probe took 101 for an interim response and waited for a final one; the parser
    ignores EOF once switched, so after the server closed the probe spun on recv() returning b""
    (a whole CPU) until its timeout, then reported a timeout instead of the status."""
    upstream = upstreams([HEAD, write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: Upgrade\r\n\r\n"),
                          then])
    started = time.monotonic()
    result = _probe(upstream, timeout=3.0)
    assert time.monotonic() - started < 1.5
    assert (result.ok, result.status) == (False, 101)


# -- whose fault a timeout is ----------------------------------------------------------------------
def test_client_that_stops_reading_a_response_is_not_an_upstream_failure(upstreams, make_proxy):
    """Bug: a client taking nothing of a Content-Length body for send_timeout made the splice's write
    time out, which was reported as "upstream body stalled" and counted against the server: with
    passive checks, a few slow clients took a healthy server out."""
    size = 64 * 1024 * 1024  # far past what the socket buffers between them hold
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size
    upstream = upstreams([HEAD, write(answer), write(b"x" * size), HANG])
    proxy = make_proxy({"web": [upstream.address]}, server={"send_timeout": "300ms"},
                       upstream_options={"read_timeout": "5s", "passive": {"max_fails": 1, "fail_timeout": "10s"}})
    server = proxy.app.runtime.upstreams["web"].servers[0]
    with raw_client(proxy) as raw:
        raw.send(GET)
        assert raw.read_head().startswith(b"HTTP/1.1 200")
        # now read nothing: the proxy gives up on this client after send_timeout
        wait_for(lambda: server.active_requests == 0, timeout=10, what="the exchange abandoned")
    snapshot = server.snapshot()
    assert (snapshot["state"], snapshot["failures_total"]) == ("up", 0)


def test_client_resetting_mid_upload_is_not_an_upstream_failure(upstreams, make_proxy):
    """Bug: a client cancelling a large upload (reset) made the body's splice fail, which was
    reported as "sending the body upstream failed" and counted against the server: with passive
    checks, a few cancelled uploads took a healthy server out."""
    upstream = upstreams([HEAD, BODY, write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"), LOOP])
    proxy = make_proxy({"web": [upstream.address]},
                       upstream_options={"read_timeout": "5s", "passive": {"max_fails": 1, "fail_timeout": "10s"}})
    server = proxy.app.runtime.upstreams["web"].servers[0]
    sock = proxy.connect()
    sock.sendall(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10000000\r\n\r\n" + b"x" * 100_000)
    wait_for(lambda: upstream.executions == 1, what="the head forwarded")
    close_with_rst(sock)
    wait_for(lambda: server.active_requests == 0, timeout=10, what="the exchange abandoned")
    snapshot = server.snapshot()
    assert (snapshot["state"], snapshot["failures_total"]) == ("up", 0)


def test_upstream_reset_mid_length_body_counts_against_the_server(upstreams, make_proxy):
    """The other side of the same splice: an upstream resetting mid-body was taken for a gone client
    (the OSError names no side), so passive checks never counted it. The client sees an abort."""
    upstream = upstreams([HEAD, write(b"HTTP/1.1 200 OK\r\nContent-Length: 10000000\r\n\r\n" + b"x" * 1000),
                          sleep(0.05), RST])
    proxy = make_proxy({"web": [upstream.address]}, upstream_options={"read_timeout": "5s"})
    server = proxy.app.runtime.upstreams["web"].servers[0]
    with raw_client(proxy) as raw:
        raw.send(GET)
        assert raw.read_head().startswith(b"HTTP/1.1 200")
        with pytest.raises(ConnectionError):
            raw.read_exact(10_000_000)
    wait_for(lambda: server.active_requests == 0, timeout=10, what="the exchange abandoned")
    assert server.snapshot()["failures_total"] == 1


def test_a_reload_that_shortens_the_interval_brings_the_next_check_forward():
    """Bug: a check scheduled under the old interval kept its time, so lowering interval from 1h to
    5s by a reload (the server unchanged) left the next check up to an hour away."""
    document = config_document({"web": {"servers": ["127.0.0.1:9"], "health": {**FAST_HEALTH, "interval": "1h"}}})
    app = Application(parse_config(document, "test.toml"))
    now = [0.0]
    checker = HealthChecker(app, clock=lambda: now[0])
    checker._executor = held = _HeldChecks()
    checker.run_once()
    now[0] = 400.0  # past the first check's jitter (at most 10% of the hour)
    checker.run_once()
    (target, upstream_config), = held.held
    checker.record_result(target, CheckResult(0.0, True, 1.0, 200), upstream_config.health)  # next: ~1h on
    app.reload(parse_config(config_document({"web": {"servers": ["127.0.0.1:9"],
                                                     "health": {**FAST_HEALTH, "interval": "5s"}}}), "test.toml"))
    checker.run_once()
    now[0] += 6.0  # past 5 s + 10% jitter
    checker.run_once()
    assert len(held.held) == 2


class _TlsBackend:
    """An HTTPS backend whose certificate can be replaced (new handshakes get the new one)."""

    def __init__(self, cert):
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format, *args):  # noqa: A002 - quiet
                pass

            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        cert.configure_cert(self.context)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.socket = self.context.wrap_socket(self.server.socket, server_side=True)
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_reload_trusts_a_rotated_tls_ca_file_for_traffic_and_checks(observed_proxy, tmp_path):
    """docs/configuration.md: tls_ca is "re-read on every reload". It was only validated: unchanged
    servers kept the pool's TLS context, and the checker its cached one, so after a backend moved to a
    certificate from a new CA (and tls_ca to that CA) every new connection failed verification (502)
    and the checks took the server down."""
    trustme = pytest.importorskip("trustme")
    old_ca, new_ca = trustme.CA(), trustme.CA()
    ca_file = tmp_path / "upstream-ca.pem"
    old_ca.cert_pem.write_to_path(str(ca_file))
    backend = _TlsBackend(old_ca.issue_cert("127.0.0.1"))
    try:
        document = config_document({"web": {"servers": [f"https://{backend.address}"], "tls_ca": str(ca_file),
                                             "keepalive": 0,  # every request on a new connection
                                             # Checks between the backend's swap and the reload fail:
                                             # they must not take the server down meanwhile.
                                             "health": {**FAST_HEALTH, "unhealthy_after": 1000}}})
        proxy = observed_proxy(document)

        def checked_since(moment: float):
            """The last check, if it started after ``moment`` (a wall clock time)."""
            last = proxy.server_status("web", backend.address).get("last_check")
            return last if last and last["checked_at"] - last["latency_ms"] / 1000 > moment else None
        assert requests.get(proxy.url + "/", timeout=DEADLINE).status_code == 200
        assert wait_for(lambda: checked_since(0.0), timeout=DEADLINE, what="a first check")["ok"]
        new_ca.issue_cert("127.0.0.1").configure_cert(backend.context)  # the backend's new certificate
        new_ca.cert_pem.write_to_path(str(ca_file))
        proxy.reload(document)  # the same config: only the file changed
        reloaded = time.time()
        assert requests.get(proxy.url + "/", timeout=DEADLINE).status_code == 200
        assert wait_for(lambda: checked_since(reloaded), timeout=DEADLINE, what="a check after the reload")["ok"]
        assert proxy.state("web", backend.address) == "up"
    finally:
        backend.stop()


def test_a_server_rebuilt_while_its_up_is_announced_is_checked_again_not_left_down():
    """A check passed and its "up" was being announced (set on the old Server) while a reload rebuilt
    that server (weight change): the successor was built down from its predecessor, and its target
    inherited "up", so nothing ever announced "up" again: the server stayed down for good, whatever
    its checks said. Now such a server is checked at once, as a joining one is."""
    health = {**FAST_HEALTH, "healthy_after": 1, "unhealthy_after": 1}
    document = config_document({"web": {"servers": ["127.0.0.1:9"], "health": health}})
    app = Application(parse_config(document, "test.toml"))
    now = [0.0]
    checker = HealthChecker(app, clock=lambda: now[0])
    checker._executor = held = _HeldChecks()
    app.reload_listeners.append(checker._on_reload)
    checker.run_once()
    now[0] = 1.0
    checker.run_once()
    (target, upstream_config), = held.held
    checker.record_result(target, CheckResult(0.0, False, 1.0, None, "refused"), upstream_config.health)
    (old_server,) = app.runtime.upstreams["web"].servers
    assert not old_server.healthy
    now[0] = 2.0
    checker.run_once()
    (target, upstream_config) = held.held[-1]
    old_runtime = app.runtime
    reloaded = parse_config(config_document({"web": {"servers": [{"address": "127.0.0.1:9", "weight": 2}],
                                                     "health": health}}), "test.toml")
    with checker._emit_lock:  # the passing check's announcement waits here, its count already "up"
        passed = threading.Thread(target=checker.record_result,
                                  args=(target, CheckResult(0.0, True, 1.0, 200), upstream_config.health))
        passed.start()
        wait_for(lambda: target.policy.up, what="the check's verdict counted")
        reload = threading.Thread(target=app.reload, args=(reloaded,))
        reload.start()
        wait_for(lambda: app.runtime is not old_runtime, what="the reload's new servers in place")
    passed.join(DEADLINE)
    reload.join(DEADLINE)
    assert not passed.is_alive() and not reload.is_alive()
    (server,) = app.runtime.upstreams["web"].servers
    assert server is not old_server and server.weight == 2
    (rebuilt_target, upstream_config) = held.held[-1]  # the reload's round checks it at once
    assert rebuilt_target.server is server
    checker.record_result(rebuilt_target, CheckResult(0.0, True, 1.0, 200), upstream_config.health)
    assert server.healthy and server.state == "up", server.snapshot()


def test_an_address_that_left_dns_and_came_back_between_two_rounds_is_checked_before_traffic():
    """An address gone from DNS and back before the checker's next round joins again (down until a
    check passes), but its new target inherited the old one's "up" by address: nothing announced it
    up again, and it stayed down for good whatever its checks said."""
    health = {**FAST_HEALTH, "healthy_after": 1, "unhealthy_after": 1}
    config = parse_config(config_document({"web": {"servers": [{"address": "api.test:9", "discover": "a"}],
                                                   "health": health}}), "test.toml")
    app = Application(config)
    key = discovery_key("web", config.upstreams["web"].servers[0])
    first, second = Target(0, "127.0.0.2", 9, 1, "api.test"), Target(0, "127.0.0.3", 9, 1, "api.test")
    app.apply_discovered(key, (first, second))  # the first answer: both up
    now = [0.0]
    checker = HealthChecker(app, clock=lambda: now[0])
    checker._executor = held = _HeldChecks()
    checker.run_once()
    app.apply_discovered(key, (first,))
    app.apply_discovered(key, (first, second))  # back before the checker looked again
    rejoined = app.runtime.upstreams["web"].servers[1]
    assert rejoined.address == "127.0.0.3:9" and not rejoined.healthy
    checker.run_once()
    (target, upstream_config), = [check for check in held.held if check[0].server is rejoined]
    assert rejoined.state == "down"  # no traffic before its check
    checker.record_result(target, CheckResult(0.0, True, 1.0, 200), upstream_config.health)
    assert rejoined.state == "up", rejoined.snapshot()


class _PausingStates(dict):
    """Application.admin_states, read by a reload between building its new servers and putting them in
    place: the reload waits there until the test lets it go."""

    def __init__(self):
        super().__init__()
        self.reached, self.go_on = threading.Event(), threading.Event()

    def items(self):
        self.reached.set()
        self.go_on.wait(DEADLINE)
        return super().items()


class _SignallingLock:
    """The application's reload lock, telling the test when ``waiter`` waits for it."""

    def __init__(self, lock):
        self.lock, self.waiter, self.waiting = lock, None, threading.Event()

    def __enter__(self):
        if threading.current_thread() is self.waiter:
            self.waiting.set()
        self.lock.acquire()

    def __exit__(self, *exc):
        self.lock.release()


def test_a_worker_verdict_arriving_during_its_reload_reaches_the_rebuilt_server():
    """A worker applies its supervisor's verdicts (control link thread) while its own reload runs (loop
    thread). An "up" applied after the reload copied a rebuilt server's health from its predecessor,
    but before the new servers were in place, reached only the old object: the rebuilt one stayed
    down in that worker (the supervisor replays only the down verdicts after a reload)."""
    health = {**FAST_HEALTH, "healthy_after": 1, "unhealthy_after": 1}
    app = Application(parse_config(config_document({"web": {"servers": ["127.0.0.1:9"], "health": health}}),
                                   "test.toml"))
    assert apply_health(app, "web", "127.0.0.1:9", False, "refused", announce=False)
    app._reload_lock = lock = _SignallingLock(app._reload_lock)
    app.admin_states = states = _PausingStates()
    reloaded = parse_config(config_document({"web": {"servers": [{"address": "127.0.0.1:9", "weight": 2}],
                                                     "health": health}}), "test.toml")
    reload = threading.Thread(target=app.reload, args=(reloaded,))
    reload.start()
    try:
        assert states.reached.wait(DEADLINE), "the reload never reached its swap"
        verdict = lock.waiter = threading.Thread(target=apply_health,
                                                 args=(app, "web", "127.0.0.1:9", True, "passed", False))
        verdict.start()
        wait_for(lambda: lock.waiting.is_set() or not verdict.is_alive(), what="the verdict applied or waiting")
    finally:
        states.go_on.set()
    reload.join(DEADLINE)
    verdict.join(DEADLINE)
    assert not reload.is_alive() and not verdict.is_alive()
    (server,) = app.runtime.upstreams["web"].servers
    assert server.weight == 2 and server.healthy and server.state == "up", server.snapshot()


class _HeldLink:
    """A worker's control link that records what it was sent; the first health verdict sent from
    ``replayer`` waits for the test first (a replay preempted between reading a verdict and sending it)."""

    def __init__(self):
        self.sent, self.replayer = [], None
        self.replay_reached, self.replay_go_on = threading.Event(), threading.Event()

    def send(self, message: dict) -> bool:
        if message.get("op") == "health" and threading.current_thread() is self.replayer \
                and not self.replay_reached.is_set():
            self.replay_reached.set()
            self.replay_go_on.wait(DEADLINE)
        self.sent.append(message)
        return True


def test_a_verdict_replayed_to_a_worker_never_undoes_a_newer_one():
    """The supervisor replays the down verdicts to a worker that starts or reloads. A replay that read
    "down", then sent it after the checker had announced "up" to every worker, left that worker with
    the server down for good (no later verdict would come while it stays up)."""
    health = {**FAST_HEALTH, "healthy_after": 1, "unhealthy_after": 1}
    config = parse_config(config_document({"web": {"servers": ["127.0.0.1:9"], "health": health},
                                           }, server={"workers": 2}), "test.toml")
    supervisor = Supervisor(config, None, [{}])
    now = [0.0]
    supervisor.checker = checker = HealthChecker(supervisor.app, clock=lambda: now[0])
    checker._executor = held = _HeldChecks()
    checker.listeners.append(supervisor._broadcast_health)
    link = _HeldLink()
    supervisor.slots[0] = worker = types.SimpleNamespace(link=link)
    try:
        checker.run_once()
        now[0] = 1.0
        checker.run_once()
        (target, upstream_config) = held.held[-1]
        checker.record_result(target, CheckResult(0.0, False, 1.0, None, "refused"), upstream_config.health)
        now[0] = 2.0
        checker.run_once()
        (target, upstream_config) = held.held[-1]
        checker._emit_lock = lock = _SignallingLock(checker._emit_lock)
        before_replay = len(link.sent)
        replay = link.replayer = threading.Thread(target=supervisor._replay_verdicts, args=(worker,))
        replay.start()
        assert link.replay_reached.wait(DEADLINE), "the replay sent no verdict"
        passed = lock.waiter = threading.Thread(target=checker.record_result,
                                                args=(target, CheckResult(0.0, True, 1.0, 200), upstream_config.health))
        passed.start()
        wait_for(lambda: lock.waiting.is_set() or not passed.is_alive(), what="the up announced or waiting")
    finally:
        link.replay_go_on.set()
    replay.join(DEADLINE)
    passed.join(DEADLINE)
    assert not replay.is_alive() and not passed.is_alive()
    verdicts = [message["up"] for message in link.sent[before_replay:] if message.get("op") == "health"]
    assert verdicts == [False, True]  # the worker applies them in this order: it ends with the server up
    supervisor._wakeup.close()


def test_a_tls_context_built_across_a_reload_is_not_kept_after_it(monkeypatch):
    """A reload forgets the checks' TLS contexts, so tls_ca is read again (a rotated CA file). A check
    that was building one from the file as it was before the reload stored it in the table the reload
    had just emptied: every later check trusted the old CA, failed against the new certificate, and
    took a good server down, until the next reload."""
    document = config_document({"web": {"servers": ["https://127.0.0.1:9"], "health": FAST_HEALTH}})
    app = Application(parse_config(document, "test.toml"))
    checker = HealthChecker(app)
    checker._executor = _HeldChecks()
    upstream_config = app.runtime.upstreams["web"].config
    built, reached, go_on = [], threading.Event(), threading.Event()

    def build_context(upstream):  # stands in for reading the CA file: the nth build is context n
        built.append(len(built) + 1)
        if built == [1]:
            reached.set()
            go_on.wait(DEADLINE)
        return built[-1]

    monkeypatch.setattr("proxy.upstream.health.upstream_tls_context", build_context)
    check = threading.Thread(target=checker._tls_context, args=(upstream_config,))
    check.start()
    try:
        assert reached.wait(DEADLINE)
        checker._on_reload(app.config, app.config)  # the CA file rotated; the reload forgets contexts
    finally:
        go_on.set()
    check.join(DEADLINE)
    assert not check.is_alive()
    assert checker._tls_context(upstream_config) == 2  # built from the file as it is now
