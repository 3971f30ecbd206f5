"""The operator's admin state of a server (enabled / draining / disabled) without sockets: the server and
balancer honouring it, a reload carrying it, the [admin] token keys, and how /status and /metrics show it.
The runtime API and ``pyproxy ctl`` against real processes are in test_runtime_api.py."""

from __future__ import annotations

import logging
import socket

import pytest
import requests

from core.socket_server import bind_listener

from proxy.config.schema import ConfigError, parse_config
from proxy.observe.admin import AdminServer, AdminSources
from proxy.observe.metrics import render_prometheus
from proxy.observe.runtime_api import RuntimeApi
from proxy.observe.status import merge_status
from proxy.serve.app import Application, UnknownServer
from proxy.upstream.balancing import Upstream
from proxy.upstream.servers import Server
from tests.support.timing import FakeClock


FLOOD = 100  # refused writes in a row


@pytest.fixture
def clock():
    return FakeClock()


def config(servers=("127.0.0.1:3001", "127.0.0.1:3002"), **admin):
    data = {"routes": [{"upstream": "web"}], "upstreams": {"web": {"servers": list(servers)}}}
    if admin:
        data["admin"] = admin
    return parse_config(data, "proxy.toml")


# -- the server and the balancer ------------------------------------------------------------------------

@pytest.mark.parametrize("state", ["draining", "disabled"])
def test_a_server_taken_out_by_the_operator_takes_no_new_request(clock, state):
    server = Server("127.0.0.1", 3001, clock=clock)
    assert server.try_acquire()
    assert server.set_admin_state(state) == "enabled"
    assert not server.available()
    assert not server.try_acquire()
    assert not server.try_acquire(even_if_down=True)  # all_down = "try_all" overrules checks, not the operator
    assert server.active_requests == 1
    server.release()  # the request in flight finishes as usual
    assert server.active_requests == 0
    assert server.set_admin_state("enabled") == state
    assert server.available() and server.try_acquire()


def test_enable_returns_to_what_the_checks_say(clock):
    server = Server("127.0.0.1", 3001, clock=clock)
    server.set_admin_state("disabled")
    server.set_health(False, "check failed")
    server.set_admin_state("enabled")
    assert not server.available() and server.state == "down"
    server.set_health(True, "check passed")
    assert server.available()


def test_unknown_admin_state_is_refused(clock):
    with pytest.raises(ValueError, match="admin state must be one of enabled, draining, disabled"):
        Server("127.0.0.1", 3001, clock=clock).set_admin_state("paused")


@pytest.mark.parametrize("policy", ["round_robin", "least_connections", "random", "ip_hash"])
def test_every_policy_skips_a_draining_server(clock, policy):
    a, b = Server("127.0.0.1", 3001, clock=clock), Server("127.0.0.1", 3002, clock=clock)
    upstream = Upstream("web", [a, b], policy)
    a.set_admin_state("draining")
    for index in range(50):
        picked = upstream.pick_server(f"10.0.0.{index}")
        assert picked is b
        picked.release()


def test_try_all_fails_open_past_a_drained_server_only_to_the_others(clock):
    a, b = Server("127.0.0.1", 3001, clock=clock), Server("127.0.0.1", 3002, clock=clock)
    upstream = Upstream("web", [a, b], "round_robin", all_down="try_all")
    a.set_admin_state("draining")
    b.set_health(False, "check failed")
    picks = [upstream.pick_server("10.0.0.1") for _ in range(4)]
    assert picks == [b] * 4  # b is down but the operator left it in; a is drained


# -- the application: lookups and reloads -----------------------------------------------------------

def test_unknown_upstream_or_server_is_named():
    app = Application(config())
    with pytest.raises(UnknownServer, match="no upstream named 'api'"):
        app.set_admin_state("api", "127.0.0.1:3001", "draining")
    with pytest.raises(UnknownServer, match="upstream 'web' has no server '127.0.0.1:9'"):
        app.set_admin_state("web", "127.0.0.1:9", "draining")


def test_a_reload_keeps_the_state_of_servers_that_remain_and_forgets_removed_ones():
    app = Application(config(("127.0.0.1:3001", "127.0.0.1:3002", "127.0.0.1:3003")))
    app.set_admin_state("web", "127.0.0.1:3001", "draining")
    app.set_admin_state("web", "127.0.0.1:3003", "disabled")
    rebuilt = parse_config({"routes": [{"upstream": "web"}], "upstreams": {"web": {"servers": [
        {"address": "127.0.0.1:3001", "weight": 2}, "127.0.0.1:3002"]}}}, "proxy.toml")
    old_first = app.runtime.upstreams["web"].servers[0]
    app.reload(rebuilt)
    first, second = app.runtime.upstreams["web"].servers
    assert first is not old_first  # a new weight: a new Server object, with the state carried over
    assert (first.admin_state, second.admin_state) == ("draining", "enabled")
    assert app.admin_states == {("web", "127.0.0.1:3001"): "draining"}
    app.reload(config(("127.0.0.1:3001", "127.0.0.1:3002", "127.0.0.1:3003")))
    assert [s.admin_state for s in app.runtime.upstreams["web"].servers] == ["draining", "enabled", "enabled"]


# -- the [admin] token keys -----------------------------------------------------------------------------

def test_token_keys(tmp_path, monkeypatch):
    monkeypatch.delenv("PYPROXY_ADMIN_TOKEN", raising=False)
    assert config(listen="127.0.0.1:9901").admin.token is None
    assert config(token="abc-123").admin.token == "abc-123"
    assert "abc-123" not in repr(config(token="abc-123").admin)
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    assert config(token_file=str(token_file)).admin.token == "from-file"
    monkeypatch.setenv("PYPROXY_ADMIN_TOKEN", "from-env")
    assert config().admin is None  # no [admin] table: no admin listener, no token
    assert config(listen="127.0.0.1:9901").admin.token == "from-env"
    assert config(token="abc-123").admin.token == "abc-123"  # the config's own key wins


def test_token_problems_name_the_key(tmp_path, monkeypatch):
    def problems(**admin):
        with pytest.raises(ConfigError) as caught:
            config(**admin)
        return caught.value.problems

    empty = tmp_path / "empty"
    empty.write_text("\n")
    assert problems(token="") == ['proxy.toml: admin.token: expected a non-empty string, got ""']
    assert problems(token="two words") == ["proxy.toml: admin.token: must be 1-4096 visible ASCII characters, "
                                           "without spaces (it is sent as an Authorization header)"]
    assert problems(token="a", token_file=str(empty)) == ['proxy.toml: admin: give "token" or "token_file", not both']
    assert problems(token_file=str(tmp_path / "missing"))[0].startswith(
        f'proxy.toml: admin.token_file: "{tmp_path / "missing"}" does not exist')
    assert problems(token_file=str(empty)) == [f"proxy.toml: admin.token_file ({empty}): expected a non-empty "
                                               'string, got ""']
    monkeypatch.setenv("PYPROXY_ADMIN_TOKEN", "bad\ttoken")
    assert problems(listen="127.0.0.1:9901")[0].startswith("proxy.toml: admin.token (from PYPROXY_ADMIN_TOKEN): must be")


def test_tls_on_the_admin_listener_is_refused_not_served_as_plain_http(tmp_path):
    # The admin listener serves plain HTTP: TLS keys on it were accepted (and `pyproxy check` said
    # "(TLS)") while the bearer token went over the network in clear text.
    (tmp_path / "c.pem").write_text("cert")
    (tmp_path / "k.pem").write_text("key")
    cert, key = str(tmp_path / "c.pem"), str(tmp_path / "k.pem")
    for listen, keys in (({"address": "0.0.0.0:9901", "tls_cert": cert, "tls_key": key}, ("tls_cert", "tls_key")),
                         ({"address": "0.0.0.0:9901", "tls": "internal"}, ("tls",))):
        with pytest.raises(ConfigError) as caught:
            config(listen=listen, token="abc-123")
        assert caught.value.problems == [
            f"proxy.toml: admin.listen.{key}: the admin listener serves plain HTTP (no TLS): keep it on "
            "loopback or a private network, or put a TLS-terminating proxy in front of it" for key in keys]


# -- /status, /metrics and the API's view -----------------------------------------------------------------

def status_of(state):
    return {"upstreams": {"web": {"policy": "round_robin", "servers": [
        {"address": "127.0.0.1:3001", "state": "up", "reason": "", "admin_state": state, "active_requests": 2,
         "requests_total": 5, "failures_total": 0}]}}, "routes": []}


def test_merged_status_shows_a_drain_any_worker_applied_and_sums_active_requests():
    merged = merge_status([status_of("enabled"), status_of("draining")])
    server = merged["upstreams"]["web"]["servers"][0]
    assert (server["admin_state"], server["active_requests"]) == ("draining", 4)


def test_api_view_of_an_upstream():
    class Sources:
        def status_document(self):
            return merge_status([status_of("draining"), status_of("draining")])

    answer = RuntimeApi(Sources()).get("/upstreams/web")
    assert answer.status == 200
    assert answer.document["servers"][0] == {
        "address": "127.0.0.1:3001", "state": "draining", "admin_state": "draining", "health": "up", "reason": "",
        "active_requests": 4,
        "requests_total": 10, "failures_total": 0, "weight": 1, "last_check": None}


def test_api_state_is_the_health_state_while_the_operator_leaves_a_server_enabled():
    class Sources:
        def status_document(self):
            return merge_status([status_of("enabled")])

    server = RuntimeApi(Sources()).get("/upstreams/web").document["servers"][0]
    assert (server["state"], server["admin_state"], server["health"]) == ("up", "enabled", "up")


def test_metrics_show_the_admin_state():
    snapshot = {"processes": 1, "buckets": [0.1], "requests": [], "durations": {}, "retries": [],
                "client_connections": {}, "threads": {}, "open_tunnels": 0, "access_log": {},
                "servers": [{"upstream": "web", "server": "127.0.0.1:3001", "up": 1, "admin_state": "disabled",
                             "active": 0, "requests": 0, "failures": 0}]}
    text = render_prometheus(snapshot)
    assert 'pyproxy_upstream_admin_state{upstream="web",server="127.0.0.1:3001",state="disabled"} 1' in text
    assert 'pyproxy_upstream_admin_state{upstream="web",server="127.0.0.1:3001",state="enabled"} 0' in text


def test_try_all_never_fails_open_to_servers_the_operator_took_out(clock, caplog):
    a, b = Server("127.0.0.1", 3001, clock=clock), Server("127.0.0.1", 3002, clock=clock)
    upstream = Upstream("web", [a, b], "round_robin", all_down="try_all")
    a.set_admin_state("draining")
    b.set_admin_state("disabled")
    assert upstream.pick_server("10.0.0.1") is None
    assert not upstream.failing_open and "every server is down" not in caplog.text


# -- refused writes in the log ----------------------------------------------------------------------------

@pytest.fixture
def admin_with_token(clock):
    """A real admin listener on port 0 whose writes need "right-token" (they change nothing)."""
    sources = AdminSources(token=lambda: "right-token", set_server_state=lambda upstream, address, state: "enabled")
    server = AdminServer(None, sources, sock=bind_listener("127.0.0.1", 0), clock=clock, idle_timeout=1e9)
    server.start()
    yield f"http://127.0.0.1:{server.address[1]}"
    server.stop()


def refused_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]


def test_a_flood_of_refused_writes_logs_a_few_lines_and_a_count(admin_with_token, clock, caplog):
    path = admin_with_token + "/upstreams/web/servers/127.0.0.1:3001/drain"
    with caplog.at_level(logging.WARNING, "pyproxy.admin"), requests.Session() as session:
        for _ in range(FLOOD):
            assert session.post(path, headers={"Authorization": "Bearer guess"}, timeout=10).status_code == 401
        assert 1 <= len(refused_lines(caplog)) <= FLOOD // 10
        clock.advance(3600)
        assert session.post(path, headers={"Authorization": "Bearer guess"}, timeout=10).status_code == 401
    assert any(line.endswith("more such lines were left out in the last 60s") for line in
               [r.getMessage() for r in caplog.records])


def test_a_refused_path_is_logged_without_its_control_characters(admin_with_token, caplog):
    host, port = admin_with_token.removeprefix("http://").split(":")
    with caplog.at_level(logging.WARNING, "pyproxy.admin"), socket.create_connection((host, int(port)), 10) as sock:
        sock.sendall(b"POST /upstreams/web/servers/\x1b[2J\x1b]0;owned\x07/drain HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Length: 0\r\nConnection: close\r\n\r\n")
        answer = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 401 ")
    [line] = refused_lines(caplog)
    assert "\x1b" not in line and "\x07" not in line
    assert "\\x1b[2J" in line


def read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    for _ in range(1000):  # bounded: the answer is a few hundred bytes
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def test_a_path_that_is_no_server_action_is_404_not_405():
    class Sources:
        set_server_state = None

        @staticmethod
        def token():
            return "right-token"

        @staticmethod
        def status_document():
            return merge_status([status_of("enabled")])

    api = RuntimeApi(Sources())
    for answer in (api.post("/upstreams/web/nodes/127.0.0.1:3001/drain", "Bearer right-token", b"", "peer"),
                   api.get("/upstreams/web/nodes/127.0.0.1:3001/drain")):
        assert answer.status == 404, answer
        assert answer.document == {"error": "no such path /upstreams/web/nodes/127.0.0.1:3001/drain; try "
                                            "/upstreams/NAME or POST /upstreams/NAME/servers/ADDRESS/ACTION"}
    on_a_read = api.post("/upstreams/web", "Bearer right-token", b"", "peer")
    assert (on_a_read.status, on_a_read.headers) == (405, {"Allow": "GET, HEAD"})
    on_a_write = api.get("/upstreams/web/servers/127.0.0.1:3001/drain")
    assert (on_a_write.status, on_a_write.headers) == (405, {"Allow": "POST"})


@pytest.mark.parametrize("request_head, status", [
    (b"POST /upstreams/web/servers/127.0.0.1:3001/drain HTTP/1.1\r\nAuthorization: Bearer right-token\r\n", b"400"),
    (b"GET /healthz HTTP/1.1\r\n", b"200"),
])
def test_a_content_length_of_non_ascii_digits_is_answered_not_a_traceback(admin_with_token, caplog,
                                                                           request_head, status):
    # "²" is a digit to str.isdigit() but not to int(): the handler raised and the client got nothing.
    host, port = admin_with_token.removeprefix("http://").split(":")
    with caplog.at_level(logging.WARNING, "pyproxy.admin"), socket.create_connection((host, int(port)), 10) as sock:
        sock.sendall(request_head + b"Host: x\r\nContent-Length: \xb2\r\n\r\n")
        answer = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 " + status + b" "), answer
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_rebuilt_server_counts_the_requests_on_the_one_it_replaces_until_they_finish():
    app = Application(config())
    old_first = app.runtime.upstreams["web"].servers[0]
    assert old_first.try_acquire()
    app.reload(parse_config({"routes": [{"upstream": "web"}], "upstreams": {"web": {"servers": [
        {"address": "127.0.0.1:3001", "weight": 2}, "127.0.0.1:3002"]}}}, "proxy.toml"))
    first = app.runtime.upstreams["web"].servers[0]
    assert first is not old_first
    assert first.snapshot()["active_requests"] == 1
    app.reload(parse_config({"routes": [{"upstream": "web"}], "upstreams": {"web": {"servers": [
        {"address": "127.0.0.1:3001", "weight": 3}, "127.0.0.1:3002"]}}}, "proxy.toml"))
    assert app.runtime.upstreams["web"].servers[0].snapshot()["active_requests"] == 1  # two reloads on
    old_first.release()
    assert app.runtime.upstreams["web"].servers[0].snapshot()["active_requests"] == 0


def test_the_runtime_api_answers_json_when_no_process_gives_its_status():
    # With workers, every one of them restarting: /status is a plain 503, but the API's answers are
    # JSON ({"error": ...}), and ctl shows that reason.
    def restarting() -> dict:
        raise ConnectionError("worker restarting")

    sources = AdminSources(status=[restarting], token=lambda: "right-token")
    server = AdminServer(None, sources, sock=bind_listener("127.0.0.1", 0))
    server.start()
    try:
        answer = requests.get(f"http://127.0.0.1:{server.address[1]}/upstreams/web", timeout=10)
    finally:
        server.stop()
    assert answer.status_code == 503
    assert answer.headers["Content-Type"].startswith("application/json")
    assert answer.json() == {"error": "no status source answered"}
