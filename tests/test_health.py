"""Active health checks and passive ejection, from the pure policy to a proxy with real backends.

The helpers here (FlakyBackend, the ``observed_proxy`` fixture, ``wait_for``) are shared with
test_admin.py and test_access_log.py: a backend that can answer 500 on its health path, hang there,
or die and come back on the same port, and an in-process proxy with a pre-bound admin socket.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from core.socket_server import bind_listener
from proxy.app import Application
from proxy.config import HealthConfig, ListenConfig, parse_config
from proxy.health import HealthChecker, HealthPolicy, apply_health, probe
from proxy.runner import ProxyProcess

DEADLINE = 5.0
HANG_LIMIT = 10.0  # a hanging backend handler gives up after this (tests release it sooner)
FAST_HEALTH = {"path": "/healthz", "interval": "50ms", "timeout": "40ms", "healthy_after": 2, "unhealthy_after": 2}


def wait_for(predicate, timeout: float = DEADLINE, interval: float = 0.01, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# -- a backend that misbehaves on demand ------------------------------------------------------------

class _FlakyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # head and body go in two writes: no 40 ms Nagle/delayed-ACK stall

    def log_message(self, format, *args):  # noqa: A002
        pass

    def do_GET(self):  # noqa: N802
        backend: FlakyBackend = self.server.backend
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            backend.count("health")
            if backend.hang_health:
                backend.release.wait(HANG_LIMIT)
            self._reply(backend.health_status, b"health")
        elif path == "/slow":
            backend.count("slow")
            backend.slow_entered.set()
            backend.release.wait(HANG_LIMIT)
            self._reply(200, b"slow " + backend.name.encode())
        else:
            backend.count("traffic")
            self._reply(200, backend.name.encode())

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length") or 0))  # read and forget: keep-alive stays sane
        self.server.backend.count("traffic")
        self._reply(200, self.server.backend.name.encode())

    def _reply(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _FlakyServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def process_request(self, request, client_address):
        self.backend.track(request)
        super().process_request(request, client_address)

    def handle_error(self, request, client_address):
        pass  # killed connections are what these tests provoke


class FlakyBackend:
    """HTTP backend whose health path can fail (health_status) or hang; kill() and revive() keep the port."""

    def __init__(self, name: str):
        self.name = name
        self.health_status = 200
        self.hang_health = False
        self.release = threading.Event()
        self.slow_entered = threading.Event()
        self.counts = {"health": 0, "traffic": 0, "slow": 0}
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self.port = 0
        self._server = None
        self._thread = None
        self.revive()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def count(self, kind: str) -> None:
        with self._lock:
            self.counts[kind] += 1

    def get(self, kind: str) -> int:
        with self._lock:
            return self.counts[kind]

    def track(self, sock) -> None:
        with self._lock:
            self._sockets.append(sock)

    def revive(self) -> None:
        self._server = _FlakyServer(("127.0.0.1", self.port), _FlakyHandler)
        self._server.backend = self
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02},
                                        daemon=True, name=f"flaky-{self.name}")
        self._thread.start()

    def kill(self) -> None:
        """Stop accepting, close the listener, cut every open connection (as a crash would)."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by the peer
        self._thread.join(DEADLINE)
        self._server = None


@pytest.fixture
def backends():
    made: list[FlakyBackend] = []

    def factory(*names: str) -> list[FlakyBackend]:
        new = [FlakyBackend(name) for name in names]
        made.extend(new)
        return new

    yield factory
    for backend in made:
        backend.release.set()
        backend.kill()


# -- an in-process proxy with an admin listener ----------------------------------------------------

class ObservedProxy:
    def __init__(self, process: ProxyProcess, port: int, admin_port: int):
        self.process = process
        self.url = f"http://127.0.0.1:{port}"
        self.admin_url = f"http://127.0.0.1:{admin_port}"
        self.thread = process.start_in_thread()

    @property
    def app(self):
        return self.process.app

    def status(self) -> dict:
        with urllib.request.urlopen(self.admin_url + "/status", timeout=DEADLINE) as response:
            return json.load(response)

    def server_status(self, upstream: str, address: str) -> dict:
        servers = self.status()["upstreams"][upstream]["servers"]
        return next(s for s in servers if s["address"] == address)

    def state(self, upstream: str, address: str) -> str:
        return self.server_status(upstream, address)["state"]

    def stop(self) -> None:
        self.process.stop(force=True)
        self.thread.join(10)
        assert not self.thread.is_alive(), "proxy did not stop"


def config_document(upstreams: dict, **extra) -> dict:
    """upstreams: name -> upstream table (servers etc.); one catch-all route to the first."""
    document = {
        "server": {"listen": "127.0.0.1:1", "min_threads": 2, "max_threads": 16, "graceful_timeout": "5s"},
        "admin": {"listen": "127.0.0.1:2"},
        "log": {"access": "off", "level": "warning"},
        "upstreams": {name: {"connect_timeout": "1s", "read_timeout": "5s", **table}
                      for name, table in upstreams.items()},
        "routes": [{"path": "/", "upstream": next(iter(upstreams))}],
    }
    for key, value in extra.items():
        document[key] = {**document.get(key, {}), **value} if isinstance(value, dict) else value
    return document


@pytest.fixture
def observed_proxy():
    running: list[ObservedProxy] = []

    def factory(document: dict) -> ObservedProxy:
        config = parse_config(document, "test.toml")
        sock = bind_listener("127.0.0.1", 0)
        admin_sock = bind_listener("127.0.0.1", 0)
        port, admin_port = sock.getsockname()[1], admin_sock.getsockname()[1]
        process = ProxyProcess(config, listeners=[(ListenConfig("127.0.0.1", port), sock)], admin_socket=admin_sock)
        proxy = ObservedProxy(process, port, admin_port)
        running.append(proxy)
        wait_for(lambda: _answers(proxy.admin_url + "/healthz"), what="admin listener")
        return proxy

    yield factory
    for proxy in running:
        proxy.stop()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0):
            return True
    except OSError:
        return False


def served_by(proxy: ObservedProxy, count: int) -> dict[str, int]:
    """Send ``count`` GETs; how many each backend (by body) answered. Every one must be a 200."""
    seen: dict[str, int] = {}
    with requests.Session() as session:
        for _ in range(count):
            response = session.get(proxy.url + "/", timeout=DEADLINE)
            assert response.status_code == 200, response.text
            seen[response.text] = seen.get(response.text, 0) + 1
    return seen


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
    proxy.process.reload(parse_config(document, "test.toml"))
    wait_for(lambda: proxy.state("web", b.address) == "up", what="b up once checks are off")
    assert proxy.server_status("web", b.address)["reason"] == "active health checks disabled"
    # A server added by a reload is checked too.
    (c,) = backends("c")
    c.health_status = 500
    document = config_document({"web": {"servers": [a.address, c.address], "health": FAST_HEALTH}})
    proxy.process.reload(parse_config(document, "test.toml"))
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
    assert results["failed"] == [] and results["ok"] == 600
    assert results["after_kill"] > 100  # the kill really happened under traffic
    served_after = b.get("traffic")
    wait_for(lambda: proxy.state("web", b.address) == "down", what="b down")
    assert served_by(proxy, 10).keys() <= {"a", "c"} and b.get("traffic") == served_after
