"""Defaults and limits that keep a valid-looking config and a busy proxy reliable: the health check
timeout follows a short interval, the admin listener is bounded, the only server of an upstream is
never ejected by passive checks, and the thread pool's idle timeout is a config key."""
from __future__ import annotations

import logging
import socket
import threading

import pytest
import requests

from core import ThreadPool
from core.socket_server import bind_listener
from proxy.config.schema import ConfigError, parse_config
from proxy.config.starter import STARTER_CONFIG
from proxy.observe.admin import ADMIN_IDLE_TIMEOUT, MAX_ADMIN_CONNECTIONS, AdminServer, AdminSources
from proxy.upstream.balancing import Upstream
from proxy.upstream.servers import Server
from tests.support.proxy import DEADLINE, proxy_config_dict
from tests.support.timing import FakeClock, wait_for


def config_with_health(health: dict) -> dict:
    return {"routes": [{"upstream": "web"}],
            "upstreams": {"web": {"servers": ["127.0.0.1:3000"], "health": health}}}


# --- health check timeout defaults to the interval when that is shorter -----------------------

def test_a_short_interval_alone_is_accepted_and_lowers_the_timeout():
    config = parse_config(config_with_health({"interval": "300ms"}), "proxy.toml")
    health = config.upstreams["web"].health
    assert (health.interval, health.timeout) == (0.3, 0.3)


def test_a_long_interval_keeps_the_two_second_timeout():
    config = parse_config(config_with_health({"interval": "10s"}), "proxy.toml")
    assert config.upstreams["web"].health.timeout == 2.0


def test_an_explicit_timeout_longer_than_the_interval_is_still_refused():
    with pytest.raises(ConfigError) as caught:
        parse_config(config_with_health({"interval": "300ms", "timeout": "1s"}), "proxy.toml")
    assert caught.value.problems == [
        "proxy.toml: upstreams.web.health.timeout: must not exceed interval (1s > 300ms)"]


def test_the_starter_says_the_timeout_follows_a_shorter_interval():
    timeout_line = next(line for line in STARTER_CONFIG.splitlines() if line.startswith("# timeout"))
    assert "interval" in timeout_line


# --- the admin listener: bounded connections, bounded waits ------------------------------------

@pytest.fixture
def admin_server():
    """A factory for started AdminServers on 127.0.0.1 port 0; all are stopped at teardown."""
    started = []

    def start(sources: AdminSources | None = None, **options) -> AdminServer:
        server = AdminServer(None, sources or AdminSources(), sock=bind_listener("127.0.0.1", 0), **options)
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def admin_url(server: AdminServer, path: str) -> str:
    host, port = server.address[:2]
    return f"http://{host}:{port}{path}"


def connect(server: AdminServer) -> socket.socket:
    return socket.create_connection(server.address[:2], timeout=DEADLINE)


def closed_by_server(sock: socket.socket) -> bool:
    """True once the server ended the connection (EOF or reset); the read waits at most DEADLINE."""
    return closed_within(sock, DEADLINE)


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """Did the server end the connection (EOF or reset) within ``seconds``? (Expects no data.)"""
    sock.settimeout(seconds)
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_idle_and_slow_admin_connections_past_the_limit_neither_block_healthz_nor_add_threads(admin_server):
    server = admin_server()
    threads_before = threading.active_count()
    clients = [connect(server) for _ in range(MAX_ADMIN_CONNECTIONS + 8)]
    try:
        for slow in clients[::2]:
            slow.sendall(b"GET /heal")  # half a request line, never finished
        # Connected after every idle one, so it is accepted after them: at the limit.
        response = requests.get(admin_url(server, "/healthz"), timeout=DEADLINE)
        assert (response.status_code, response.text) == (200, "ok\n")
        wait_for(lambda: threading.active_count() - threads_before <= MAX_ADMIN_CONNECTIONS,
                 what=f"at most {MAX_ADMIN_CONNECTIONS} admin connection threads",
                 on_timeout=lambda: f"{threading.active_count() - threads_before} threads")
        assert closed_by_server(clients[0]), "the connection waiting longest was not closed to make room"
    finally:
        for client in clients:
            client.close()


def test_an_admin_connection_that_never_finishes_its_request_head_is_closed(admin_server):
    clock = FakeClock()
    server = admin_server(clock=clock)
    slow = connect(server)
    try:
        slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # and a byte now and then, never the end
        # A later request is accepted after it, so the slow one is registered by now.
        assert requests.get(admin_url(server, "/healthz"), timeout=DEADLINE).status_code == 200
        slow.sendall(b"X")
        clock.advance(ADMIN_IDLE_TIMEOUT + 1)
        assert closed_by_server(slow)
    finally:
        slow.close()


def test_an_idle_keep_alive_admin_connection_is_closed_after_the_idle_timeout(admin_server):
    clock = FakeClock()
    server = admin_server(clock=clock)
    client = connect(server)
    try:
        client.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        while not answer.endswith(b"\r\n\r\nok\n"):
            piece = client.recv(1024)
            assert piece, f"closed before the whole answer: {answer!r}"
            answer += piece
        assert answer.startswith(b"HTTP/1.1 200 ")

        # The handler starts the idle wait just after its answer went out: move the clock past the
        # timeout until the connection is closed (once the wait has started, one step is enough).
        def closed_after_a_step() -> bool:
            clock.advance(ADMIN_IDLE_TIMEOUT + 1)
            return closed_within(client, 0.3)

        wait_for(closed_after_a_step, timeout=DEADLINE, what="the idle admin connection to be closed")
    finally:
        client.close()


def test_when_every_admin_connection_is_busy_a_new_one_gets_503_at_once(admin_server):
    release = threading.Event()
    entered = threading.Semaphore(0)

    def slow_status() -> dict:
        entered.release()
        release.wait(DEADLINE)
        return {"routes": [], "upstreams": {}}

    server = admin_server(AdminSources(status=[slow_status]), max_connections=2)
    answers = []
    busy = [threading.Thread(target=lambda: answers.append(
        requests.get(admin_url(server, "/status"), timeout=DEADLINE).status_code)) for _ in range(2)]
    for thread in busy:
        thread.start()
    try:
        for _ in busy:
            assert entered.acquire(timeout=DEADLINE)
        response = requests.get(admin_url(server, "/healthz"), timeout=DEADLINE)
        assert (response.status_code, response.text) == (503, "503 admin listener busy\n")
    finally:
        release.set()
        for thread in busy:
            thread.join(DEADLINE)
    assert answers == [200, 200]


def test_a_flood_of_refused_admin_connections_logs_a_few_lines_not_one_each(admin_server, caplog):
    """Bug: every connection refused with "503 admin listener busy" logged a warning of its own, so
    a client holding the admin threads and reconnecting in a loop filled the proxy's log."""
    release = threading.Event()
    entered = threading.Semaphore(0)

    def slow_status() -> dict:
        entered.release()
        release.wait(DEADLINE)
        return {"routes": [], "upstreams": {}}

    server = admin_server(AdminSources(status=[slow_status]), max_connections=1)
    busy = threading.Thread(target=lambda: requests.get(admin_url(server, "/status"), timeout=DEADLINE))
    busy.start()
    try:
        assert entered.acquire(timeout=DEADLINE)
        with caplog.at_level(logging.WARNING, logger="pyproxy.admin"):
            for _ in range(50):
                assert requests.get(admin_url(server, "/healthz"), timeout=DEADLINE).status_code == 503
    finally:
        release.set()
        busy.join(DEADLINE)
    refusals = [r for r in caplog.records if "admin connection limit" in r.getMessage()]
    assert 1 <= len(refusals) <= 10, len(refusals)


# --- passive checks never eject the only server of an upstream ---------------------------------

def test_failures_do_not_eject_the_only_server_of_an_upstream():
    clock = FakeClock()
    only = Server("127.0.0.1", 9001, max_fails=1, fail_timeout=10, clock=clock)
    upstream = Upstream("web", [only], "round_robin")
    for _ in range(5):
        only.record_failure("connection refused")
    assert (only.state, only.failures_total) == ("up", 5)
    assert upstream.pick_server("10.0.0.1") is only


def test_failures_still_eject_a_server_that_has_company():
    clock = FakeClock()
    first, second = (Server("127.0.0.1", port, max_fails=1, fail_timeout=10, clock=clock) for port in (9001, 9002))
    upstream = Upstream("web", [first, second], "round_robin")
    first.record_failure("connection refused")
    assert first.state == "down"
    picked = [upstream.pick_server("10.0.0.1") for _ in range(3)]
    assert picked == [second] * 3


def test_active_health_checks_still_take_the_only_server_down():
    only = Server("127.0.0.1", 9001, max_fails=1, fail_timeout=10, clock=FakeClock())
    upstream = Upstream("web", [only], "round_robin")
    only.set_health(False, "3 consecutive checks failed")
    assert upstream.pick_server("10.0.0.1") is None


def test_a_reload_that_leaves_one_server_ends_its_ejection():
    clock = FakeClock()
    first, second = (Server("127.0.0.1", port, max_fails=1, fail_timeout=10, clock=clock) for port in (9001, 9002))
    Upstream("web", [first, second], "round_robin")
    first.record_failure("connection refused")
    assert first.state == "down"
    reloaded = Upstream("web", [first], "round_robin")  # a reload keeps the Server object of an unchanged server
    assert first.state == "up"
    assert reloaded.pick_server("10.0.0.1") is first


def test_a_blip_on_the_only_server_is_one_502_not_fail_timeout_of_503s(backends, make_proxy):
    (only,) = backends("only")
    proxy = make_proxy({"web": [only.address]},
                       upstream_options={"retries": 0, "passive": {"max_fails": 1, "fail_timeout": "30s"}})
    assert requests.get(proxy.url + "/", timeout=DEADLINE).status_code == 200
    only.kill()
    assert requests.get(proxy.url + "/", timeout=DEADLINE).status_code == 502
    only.revive()  # same port
    assert requests.get(proxy.url + "/", timeout=DEADLINE).status_code == 200


# --- server.thread_idle_timeout: how long a thread above min_threads idles before it exits -----

def test_thread_idle_timeout_parses_as_a_duration_and_defaults_to_30s():
    base = {"routes": [{"upstream": "web"}], "upstreams": {"web": {"servers": ["127.0.0.1:3000"]}}}
    assert parse_config(base, "proxy.toml").server.thread_idle_timeout == 30.0
    configured = parse_config({**base, "server": {"thread_idle_timeout": "1.5s"}}, "proxy.toml")
    assert configured.server.thread_idle_timeout == 1.5


@pytest.mark.parametrize("value, problem", [
    (0, "0 is too short (must be more than 0)"),
    ("soon", '"soon" is not a valid duration'),
])
def test_a_bad_thread_idle_timeout_names_the_key(value, problem):
    data = {"server": {"thread_idle_timeout": value}, "routes": [{"upstream": "web"}],
            "upstreams": {"web": {"servers": ["127.0.0.1:3000"]}}}
    with pytest.raises(ConfigError) as caught:
        parse_config(data, "proxy.toml")
    (line,) = caught.value.problems
    assert line.startswith(f"proxy.toml: server.thread_idle_timeout: {problem}")


def test_the_starter_sets_thread_idle_timeout_to_its_default():
    assert 'thread_idle_timeout = "30s"' in STARTER_CONFIG


def grow_to(pool: ThreadPool, threads: int) -> None:
    """Make the pool run ``threads`` threads at once, then let them all go idle."""
    gate = threading.Event()
    started = threading.Semaphore(0)

    def blocked() -> None:
        started.release()
        gate.wait(DEADLINE)

    for _ in range(threads):
        assert pool.submit(blocked)
    for _ in range(threads):
        assert started.acquire(timeout=DEADLINE)
    gate.set()
    wait_for(lambda: pool.counts()["busy"] == 0, what="the tasks to finish")


def test_resize_gives_a_running_pool_a_new_thread_idle_timeout():
    clock = FakeClock()
    pool = ThreadPool(min_threads=1, max_threads=4, idle_timeout=30.0, clock=clock, grow_after=0.0)
    try:
        grow_to(pool, 4)
        pool.resize(1, 4, idle_timeout=5.0)
        clock.advance(4.0)
        pool.wake_idle()
        wait_for(lambda: len(pool._idle) == 4, what="nudged threads back on the idle stack")
        assert pool.threads == 4  # idle 4 s of 5: nobody retires yet
        clock.advance(2.0)
        pool.wake_idle()
        wait_for(lambda: pool.threads == 1, what="threads above min_threads to retire", on_timeout=pool.counts)
    finally:
        pool.shutdown(timeout=DEADLINE)


def test_thread_idle_timeout_reaches_the_pool_at_start_and_on_reload(make_backend, make_proxy):
    backend = make_backend()
    proxy = make_proxy({"web": [backend.address]}, server={"thread_idle_timeout": "2s"})
    assert proxy.process.pool.idle_timeout == 2.0
    document = proxy_config_dict({"web": [backend.address]},
                                 server={"listen": f"127.0.0.1:{proxy.port}", "thread_idle_timeout": "45s"})
    proxy.process.reload(parse_config(document, "test.toml"))
    assert proxy.process.pool.idle_timeout == 45.0
    assert requests.get(proxy.url + "/", timeout=DEADLINE).status_code == 200


def test_check_says_passive_checks_spare_the_only_server():
    from proxy.routing.table import routing_table_lines
    document = proxy_config_dict({"solo": ["127.0.0.1:3000"], "pair": ["127.0.0.1:4000", "127.0.0.1:4001"]},
                                 routes=[{"path": "/", "upstream": "solo"}, {"path": "/b", "upstream": "pair"}])
    for name in ("solo", "pair"):
        document["upstreams"][name]["passive"] = {"max_fails": 3, "fail_timeout": "10s"}
    lines = routing_table_lines(parse_config(document, "proxy.toml"))
    assert "       passive: off (the only server is never taken out)" in lines
    assert "       passive: out for 10s after 3 failures within 10s" in lines
