"""The admin listener on a running proxy: /healthz (and draining), /status, /metrics; merging processes."""

from __future__ import annotations

import os
import re
import signal
import socket
import struct
import threading
import time

import pytest
import requests

from proxy.observe.admin import AdminSources, SourceFailed
from proxy.observe.status import merge_status
from tests.support.backends import FlakyBackend, named_backends
from tests.support.ports import free_port
from tests.support.processes import admin_status, children, proxy_config, running_proxy
from tests.support.proxy import DEADLINE, FAST_HEALTH, config_document, scrape, served_by
from tests.support.timing import wait_for

REQUIRED_FAMILIES = {"pyproxy_requests": "counter", "pyproxy_request_duration_seconds": "histogram",
                     "pyproxy_upstream_up": "gauge", "pyproxy_upstream_active_requests": "gauge",
                     "pyproxy_client_connections": "gauge"}


def value(families: dict, family: str, sample: str, **labels) -> float:
    found = [s.value for s in families[family].samples
             if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (sample, labels)
    return found[0]


def test_healthz_answers_ok(backends, observed_proxy):
    (a,) = backends("a")
    proxy = observed_proxy(config_document({"web": {"servers": [a.address]}}))
    response = requests.get(proxy.admin_url + "/healthz", timeout=DEADLINE)
    assert (response.status_code, response.text) == (200, "ok\n")


def test_healthz_turns_503_while_draining_and_the_request_in_flight_finishes(backends, observed_proxy):
    (a,) = backends("a")
    proxy = observed_proxy(config_document({"web": {"servers": [a.address]}}))
    outcome = {}

    def slow_client():
        outcome["response"] = requests.get(proxy.url + "/slow", timeout=DEADLINE)

    client = threading.Thread(target=slow_client, daemon=True)
    client.start()
    assert a.slow_entered.wait(DEADLINE)
    proxy.process.server.request_shutdown()
    wait_for(lambda: requests.get(proxy.admin_url + "/healthz", timeout=DEADLINE).status_code == 503,
             what="/healthz to say draining")
    assert requests.get(proxy.admin_url + "/healthz", timeout=DEADLINE).text == "draining\n"
    assert requests.get(proxy.admin_url + "/status", timeout=DEADLINE).json()["draining"] is True
    a.release.set()
    client.join(DEADLINE)
    assert outcome["response"].status_code == 200 and outcome["response"].text == "slow a"


def test_status_shows_upstreams_servers_counters_and_routes(backends, observed_proxy):
    a, b = backends("a", "b")
    document = config_document({"web": {"servers": [a.address, b.address], "policy": "least_connections",
                                         "health": FAST_HEALTH},
                                "api": {"servers": [a.address]}})
    document["routes"] = [{"path": "/", "upstream": "web"}, {"path": "/api", "upstream": "api"}]
    proxy = observed_proxy(document)
    served_by(proxy, 6)
    # A server is released just after its response went out: let the last one settle first.
    wait_for(lambda: all(s["active_requests"] == 0 for s in proxy.status()["upstreams"]["web"]["servers"]),
             what="every request released")
    status = proxy.status()
    web = status["upstreams"]["web"]
    assert web["policy"] == "least_connections" and web["health"]["path"] == "/healthz"
    assert [s["address"] for s in web["servers"]] == [a.address, b.address]
    assert sum(s["requests_total"] for s in web["servers"]) == 6
    for server in web["servers"]:
        assert server["state"] == "up" and server["active_requests"] == 0 and server["failures_total"] == 0
        assert {"reason", "since_seconds", "weight", "last_check"} <= server.keys()
    wait_for(lambda: all(s["last_check"] for s in proxy.status()["upstreams"]["web"]["servers"]), what="checks")
    check = proxy.status()["upstreams"]["web"]["servers"][0]["last_check"]
    assert check["ok"] is True and check["status"] == 200 and check["age_seconds"] >= 0
    assert status["upstreams"]["api"]["servers"][0]["last_check"] is None  # no [health] there
    assert status["routes"][0] == {"host": None, "path": "/api", "upstream": "api", "strip_prefix": False}
    assert status["processes"] == 1 and status["draining"] is False


def test_metrics_parse_and_count_proxied_requests_but_not_admin_requests(backends, observed_proxy):
    a, b = backends("a", "b")
    proxy = observed_proxy(config_document({"web": {"servers": [a.address, b.address]}}))
    served_by(proxy, 5)
    assert requests.get(proxy.url + "/healthz", timeout=DEADLINE).status_code == 200  # proxied: a backend path
    # Each request is counted (and its server released) just after its response went out.
    settled = lambda families: (  # noqa: E731
        value(families, "pyproxy_requests", "pyproxy_requests_total", upstream="web", code="200") == 6
        and value(families, "pyproxy_upstream_active_requests", "pyproxy_upstream_active_requests",
                  upstream="web", server=a.address) == 0)
    wait_for(lambda: settled(scrape(proxy)), what="the last request counted")
    first = scrape(proxy)
    for name, kind in REQUIRED_FAMILIES.items():
        assert first[name].type == kind, name
    assert value(first, "pyproxy_requests", "pyproxy_requests_total", upstream="web", code="200") == 6
    assert value(first, "pyproxy_request_duration_seconds", "pyproxy_request_duration_seconds_count",
                 upstream="web") == 6
    assert value(first, "pyproxy_upstream_up", "pyproxy_upstream_up", upstream="web", server=b.address) == 1
    assert value(first, "pyproxy_upstream_active_requests", "pyproxy_upstream_active_requests",
                 upstream="web", server=a.address) == 0
    assert {s.labels["state"] for s in first["pyproxy_client_connections"].samples} >= {"idle", "processing"}
    requests.get(proxy.admin_url + "/status", timeout=DEADLINE)
    second = scrape(proxy)
    assert value(second, "pyproxy_requests", "pyproxy_requests_total", upstream="web", code="200") == 6


def test_unknown_path_is_404_and_other_methods_405(backends, observed_proxy):
    (a,) = backends("a")
    proxy = observed_proxy(config_document({"web": {"servers": [a.address]}}))
    assert requests.get(proxy.admin_url + "/nope", timeout=DEADLINE).status_code == 404
    response = requests.post(proxy.admin_url + "/status", data=b"x", timeout=DEADLINE)
    assert response.status_code == 405 and response.headers["Allow"] == "GET, HEAD"
    head = requests.head(proxy.admin_url + "/metrics", timeout=DEADLINE)
    assert head.status_code == 200 and head.content == b"" and int(head.headers["Content-Length"]) > 0


def test_admin_answers_while_every_proxy_thread_is_busy(backends, observed_proxy):
    (a,) = backends("a")
    document = config_document({"web": {"servers": [a.address]}},
                               server={"min_threads": 1, "max_threads": 2})
    proxy = observed_proxy(document)
    clients = [threading.Thread(target=requests.get, args=(proxy.url + "/slow",), kwargs={"timeout": DEADLINE},
                                daemon=True) for _ in range(2)]
    for client in clients:
        client.start()
    wait_for(lambda: a.get("slow") == 2, what="both proxy threads held by slow requests")
    # Answered while both slow requests are still held (they wait for a.release): the admin
    # listener does not need a proxy thread.
    status = requests.get(proxy.admin_url + "/status", timeout=DEADLINE).json()
    families = scrape(proxy)
    assert status["upstreams"]["web"]["servers"][0]["active_requests"] == 2
    assert value(families, "pyproxy_upstream_active_requests", "pyproxy_upstream_active_requests",
                 upstream="web", server=a.address) == 2
    a.release.set()
    for client in clients:
        client.join(DEADLINE)


# -- merging several processes (what a supervisor serves) --------------------------------------------

def _server(address, state="up", requests_total=0, checked_at=None, reason=""):
    last = None if checked_at is None else {"checked_at": checked_at, "ok": state == "up"}
    return {"address": address, "state": state, "reason": reason, "since_seconds": 1.0,
            "active_requests": 1, "requests_total": requests_total, "failures_total": 0, "last_check": last}


def _status(servers, draining=False):
    return {"processes": 1, "draining": draining, "routes": [{"path": "/"}],
            "upstreams": {"web": {"policy": "round_robin", "servers": servers}},
            "client_connections": {"idle": 2}, "threads": {"busy": 1}, "open_tunnels": 0}


def test_merge_status_sums_counters_and_a_server_down_anywhere_is_down():
    one = _status([_server("a:1", requests_total=3, checked_at=10.0), _server("b:1", requests_total=1)])
    two = _status([_server("a:1", requests_total=4), _server("b:1", "down", 2, checked_at=20.0, reason="ejected: x")],
                  draining=True)
    merged = merge_status([one, two])
    a, b = merged["upstreams"]["web"]["servers"]
    assert (a["requests_total"], a["active_requests"], a["state"]) == (7, 2, "up")
    assert a["last_check"]["checked_at"] == 10.0
    assert (b["state"], b["reason"], b["requests_total"]) == ("down", "ejected: x", 3)
    assert b["last_check"]["checked_at"] == 20.0
    assert merged["processes"] == 2 and merged["draining"] is True
    assert merged["client_connections"] == {"idle": 4} and merged["routes"] == [{"path": "/"}]
    assert one["upstreams"]["web"]["servers"][0]["requests_total"] == 3  # inputs untouched


def test_admin_sources_skip_a_failing_process_and_fail_when_none_answers():
    def broken():
        raise ConnectionError("worker restarting")

    sources = AdminSources(status=[broken, lambda: _status([_server("a:1")])])
    assert sources.status_document()["processes"] == 1
    with pytest.raises(SourceFailed, match="no status source answered"):
        AdminSources(status=[broken]).status_document()


# -- [admin].listen on reload -------------------------------------------------------------------------

def _reload_admin(proxy, address: str, upstream_address: str) -> None:
    proxy.reload(config_document({"web": {"servers": [upstream_address]}}, admin={"listen": address}))


def _healthz(port: int) -> int | None:
    try:
        return requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code
    except requests.ConnectionError:
        return None


def test_reload_moves_the_admin_listener(backends, observed_proxy):
    (a,) = backends("a")
    proxy = observed_proxy(config_document({"web": {"servers": [a.address]}}))
    old_port = int(proxy.admin_url.rsplit(":", 1)[1])
    new_port = free_port()
    _reload_admin(proxy, f"127.0.0.1:{new_port}", a.address)
    assert _healthz(new_port) == 200
    assert _healthz(old_port) is None  # closed
    assert proxy.process.observability.admin.address[1] == new_port
    assert requests.get(proxy.url + "/", timeout=DEADLINE).status_code == 200  # traffic untouched


def test_a_taken_admin_address_keeps_the_old_listener(backends, observed_proxy, caplog):
    (a,) = backends("a")
    proxy = observed_proxy(config_document({"web": {"servers": [a.address]}}))
    old_port = int(proxy.admin_url.rsplit(":", 1)[1])
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        _reload_admin(proxy, f"127.0.0.1:{taken}", a.address)
    assert "cannot move the admin listener" in caplog.text
    assert _healthz(old_port) == 200


# -- the admin listener ---------------------------------------------------------------------------------

def admin_exchange(proxy, data: bytes) -> bytes:
    port = int(proxy.admin_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as sock:
        sock.sendall(data)
        received = b""
        while received.count(b"HTTP/1.1 ") < 2 and b"Connection: close" not in received:
            piece = sock.recv(65536)
            if not piece:
                break
            received += piece
        return received


@pytest.mark.parametrize("first", [
    b"POST /status HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
    b"GET /healthz HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
])
def test_an_admin_request_body_is_not_read_as_the_next_request(observed_proxy, first):
    """Bug: the admin listener never read request bodies, and kept the connection: a POST's body
    ("hello") was parsed as the start of the next request, so a pipelined GET /healthz got
    "501 Unsupported method ('helloGET')". A small body is now read and dropped."""
    backend = FlakyBackend("a")
    proxy = observed_proxy(config_document({"web": {"servers": [backend.address]}}))
    try:
        answer = admin_exchange(proxy, first + b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
        statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", answer)
        assert statuses[1:] == [b"200"] and statuses[0] in (b"405", b"200"), answer
    finally:
        backend.kill()



@pytest.mark.parametrize("method", [b"PURGE", b"PROPFIND", b"get"])
def test_a_method_http_server_does_not_know_is_405_on_the_admin_endpoints(observed_proxy, method):
    """Bug: the docs say the admin endpoints take GET and HEAD, other methods 405; a method without
    a do_* handler (PURGE, WebDAV's) got http.server's HTML page "501 Unsupported method ('PURGE')"
    and a closed connection instead. It is now the same plain 405 with Allow as POST or PUT, with
    the connection kept (its body read and dropped)."""
    backend = FlakyBackend("a")
    proxy = observed_proxy(config_document({"web": {"servers": [backend.address]}}))
    try:
        answer = admin_exchange(proxy, method + b" /status HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi"
                                + b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n")
        first, _, rest = answer.partition(b"\r\n\r\n")
        assert first.startswith(b"HTTP/1.1 405 "), answer
        assert b"\r\nAllow: GET, HEAD\r\n" in first + b"\r\n" and b"text/plain" in first, answer
        assert re.findall(rb"HTTP/1\.1 (\d{3}) ", rest) == [b"200"], answer
    finally:
        backend.kill()


@pytest.mark.parametrize("target, expected", [
    (b"http://127.0.0.1/healthz", b"ok\n"),
    (b"HTTP://admin.example:9901/healthz?probe=1", b"ok\n"),
    (b"http://127.0.0.1", b"<!doctype html>"),
])
def test_an_absolute_form_target_reaches_the_endpoint(observed_proxy, target, expected):
    """Bug: RFC 9112 (3.2.2) says a server must accept a request target in absolute form, as a client
    talking through a forward proxy sends it; the admin listener answered "GET http://host/healthz"
    with 404. The scheme and authority are now dropped, as nginx and HAProxy do."""
    backend = FlakyBackend("a")
    proxy = observed_proxy(config_document({"web": {"servers": [backend.address]}}))
    try:
        port = int(proxy.admin_url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as sock:
            sock.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            answer = b"".join(iter(lambda: sock.recv(65536), b""))  # to the close
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ") and body.startswith(expected), answer[:300]
    finally:
        backend.kill()

def test_an_admin_request_with_a_chunked_body_closes_the_connection(observed_proxy):
    backend = FlakyBackend("a")
    proxy = observed_proxy(config_document({"web": {"servers": [backend.address]}}))
    try:
        answer = admin_exchange(proxy, b"PUT /metrics HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                                       b"5\r\nhello\r\n0\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 405 ") and b"Connection: close\r\n" in answer
        assert b"Allow: GET, HEAD\r\n" in answer
    finally:
        backend.kill()


def test_the_admin_debug_log_escapes_control_characters_of_the_request_line(observed_proxy, caplog):
    """Bug: the admin handler's log_message override wrote the client's request line as it came, so a
    path holding a terminal escape sequence reached the debug log raw (http.server's own
    log_message escapes control characters since gh-100001; the override bypassed it)."""
    backend = FlakyBackend("a")
    proxy = observed_proxy(config_document({"web": {"servers": [backend.address]}}))
    try:
        with caplog.at_level("DEBUG", logger="pyproxy.admin"):
            answer = admin_exchange(proxy, b"GET /\x1b[31mred HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 404 ")
            wait_for(lambda: any("red" in r.getMessage() for r in caplog.records), DEADLINE, what="the admin log line")
        (line,) = [r.getMessage() for r in caplog.records if "red" in r.getMessage()]
        assert "\x1b" not in line and "\\x1b[31mred" in line
    finally:
        backend.kill()


def healthz(admin_port: int) -> int:
    try:
        return requests.get(f"http://127.0.0.1:{admin_port}/healthz", timeout=DEADLINE).status_code
    except requests.RequestException:
        return 0


def test_healthz_with_workers_is_503_while_no_worker_serves(tmp_path):
    """Bug: with workers = 2, the supervisor's /healthz said 200 whenever it was not draining, also
    while every worker was dead and being restarted (or backing off after dying young): a load
    balancer kept sending clients to a proxy with nobody to accept them."""
    with named_backends("a") as (backend,):
        port, admin_port = free_port(), free_port()
        config = proxy_config(port, backend.address, workers=2, admin_port=admin_port)
        with running_proxy(tmp_path, config) as run:
            wait_for(lambda: len(admin_status(admin_port)["workers"]) == 2, DEADLINE, what="both workers")
            assert healthz(admin_port) == 200
            saw_503 = False
            for _ in range(4):  # killed young again and again, the workers come back after a growing backoff
                wait_for(lambda: len(children(run.proc.pid)) == 2, 10, what="two workers")
                for pid in children(run.proc.pid):
                    os.kill(pid, signal.SIGKILL)
                deadline = time.monotonic() + 0.4
                while not saw_503 and time.monotonic() < deadline:
                    saw_503 = healthz(admin_port) == 503
                if saw_503:
                    break
            assert saw_503, run.log()
            wait_for(lambda: healthz(admin_port) == 200, 20, what="/healthz 200 once workers are back")
            assert requests.get(run.url + "/", timeout=DEADLINE).status_code == 200


def test_an_admin_client_resetting_mid_answer_is_a_debug_line_not_a_traceback(observed_proxy, caplog, capfd):
    """Bug: a client leaving mid-answer (a dashboard tab closed, a scrape timing out) made
    socketserver print "Exception occurred during processing of request" and a traceback straight to
    stderr, past the logging config and level. Expected socket errors now log at debug."""
    backend = FlakyBackend("a")
    proxy = observed_proxy(config_document({"web": {"servers": [backend.address]}}))
    port = int(proxy.admin_url.rsplit(":", 1)[1])
    try:
        with caplog.at_level("DEBUG", logger="pyproxy.admin"):
            for _ in range(50):  # bounded: a reset usually lands while the answers are written
                sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
                sock.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n" * 20)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()  # a reset, with answers still to come
                if any("went away" in r.getMessage() for r in caplog.records):
                    break
            wait_for(lambda: any("went away" in r.getMessage() for r in caplog.records), DEADLINE,
                     what="a debug line for the client that left")
        assert "Traceback" not in capfd.readouterr().err
    finally:
        backend.kill()


@pytest.mark.parametrize("request_bytes", [
    b"GET /healthz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    b"GET /nope HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    b"GET /" + b"x" * 70000 + b" HTTP/1.1\r\nHost: a\r\n\r\n",  # http.server's own 414
], ids=["healthz", "404", "414"])
def test_the_admin_server_header_says_pyproxy_and_nothing_about_python(observed_proxy, request_bytes):
    """Bug: the admin answers said "Server: pyproxy-admin Python/3.11.x" (http.server's sys_version),
    telling anyone who can reach the port which interpreter and version to aim at."""
    backend = FlakyBackend("a")
    proxy = observed_proxy(config_document({"web": {"servers": [backend.address]}}))
    try:
        head = admin_exchange(proxy, request_bytes).partition(b"\r\n\r\n")[0]
        servers = re.findall(rb"\r\nServer: ([^\r]*)", head)
        assert servers == [b"pyproxy"], head
    finally:
        backend.kill()
