"""Lifecycle of the real ``pyproxy`` command: graceful drain (SIGTERM/SIGINT), hot reload (SIGHUP,
--watch), and the pure parts behind them (Watcher, describe_changes).

The proxy runs as a subprocess (``python -m proxy.serve.cli -c FILE``) so signals reach a real process;
backends are stdlib HTTP servers in this process. Every wait is a readiness poll with a deadline.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from proxy.config.schema import load_config
from proxy.serve.watch import Watcher, describe_changes
from tests.core_helpers import wait_for

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT = 10.0   # the proxy must accept connections within this
EXIT_TIMEOUT = 15.0    # and exit within this after the last signal
HOLD_LIMIT = 10.0      # a held backend response is released after this whatever happens
SLOW_BODY = 256 * 1024

pytestmark = pytest.mark.timeout(60)


# -- backends --------------------------------------------------------------------------------------

class _BackendHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # head and body are two writes: Nagle + delayed ACK would add 40 ms

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        backend: Backend = self.server.backend
        backend.count()
        if self.path.startswith("/slow"):
            backend.slow_entered.set()
            backend.release.wait(HOLD_LIMIT)
            body = b"x" * SLOW_BODY
        else:
            body = backend.name.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Backend", backend.name)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args) -> None:  # noqa: A002
        return


class Backend:
    """A keep-alive HTTP/1.1 backend answering its name; /slow holds until ``release`` is set."""

    def __init__(self, name: str):
        self.name = name
        self.requests = 0
        self.slow_entered = threading.Event()
        self.release = threading.Event()
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _BackendHandler)
        self.httpd.daemon_threads = True
        self.httpd.backend = self
        self.port = self.httpd.server_address[1]
        self.address = f"127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()

    def count(self) -> None:
        with self._lock:
            self.requests += 1

    def stop(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@contextlib.contextmanager
def backends(*names):
    started = [Backend(name) for name in names]
    try:
        yield started
    finally:
        for backend in started:
            backend.stop()


# -- the proxy under test ---------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def proxy_config(port: int, upstream_address: str, *, graceful: str = "10s", workers: int = 1,
                 admin_port: int | None = None, extra_routes: str = "") -> str:
    admin = f'[admin]\nlisten = "127.0.0.1:{admin_port}"\n' if admin_port else ""
    return f"""
[server]
listen = "127.0.0.1:{port}"
graceful_timeout = "{graceful}"
workers = {workers}
min_threads = 4

{admin}
[log]
level = "info"
access = "off"

[[routes]]
path = "/"
upstream = "app"
{extra_routes}
[upstreams.app]
servers = ["{upstream_address}"]
"""


class ProxyRun:
    """``python -m proxy.serve.cli -c FILE [args]`` with its stderr in a file the test can read."""

    def __init__(self, tmp_path: Path, config_text: str, *args: str):
        self.config_path = tmp_path / "proxy.toml"
        self.config_path.write_text(config_text)
        self.log_path = tmp_path / "proxy.log"
        self._log = open(self.log_path, "wb")
        self.port = load_config(self.config_path).server.listen[0].port
        self.proc = subprocess.Popen([sys.executable, "-m", "proxy.serve.cli", "-c", str(self.config_path), *args],
                                     cwd=REPO, stdout=subprocess.DEVNULL, stderr=self._log)
        wait_for(self._accepting, START_TIMEOUT, what="the proxy to accept connections")
        # The port accepts before the loop runs; signal handlers are installed just before it does. A
        # request answered means the loop runs, so a signal from here on is handled, not fatal.
        wait_for(self._answers, START_TIMEOUT, what="the proxy to answer", on_timeout=self.log)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accepting(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"proxy exited with {self.proc.returncode}:\n{self.log()}")
        return port_open(self.port)

    def _answers(self) -> bool:
        try:
            return requests.get(self.url + "/ready", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def rewrite(self, config_text: str) -> None:
        """Replace the config atomically (as editors and deploy tools do)."""
        temporary = self.config_path.with_suffix(".tmp")
        temporary.write_text(config_text)
        os.replace(temporary, self.config_path)

    def wait_exit(self, timeout: float = EXIT_TIMEOUT) -> int:
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(EXIT_TIMEOUT)
        self._log.close()


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def running_proxy(tmp_path, config_text, *args):
    run = ProxyRun(tmp_path, config_text, *args)
    try:
        yield run
    finally:
        run.close()


def served_by(url: str) -> str:
    response = requests.get(url, timeout=5)
    assert response.status_code == 200, response.text
    return response.headers["X-Backend"]


class Load:
    """``clients`` keep-alive sessions sending GETs until stopped (bounded by ``max_seconds``)."""

    def __init__(self, url: str, clients: int = 4, max_seconds: float = 20.0):
        self.url = url
        self.results: list[tuple[float, str]] = []  # (time, backend name or "ERROR: ...")
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._deadline = time.monotonic() + max_seconds
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]
        for thread in self._threads:
            thread.start()

    def _client(self) -> None:
        with requests.Session() as session:
            while not self._stop.is_set() and time.monotonic() < self._deadline:
                try:
                    response = session.get(self.url, timeout=5)
                    outcome = response.headers.get("X-Backend", f"ERROR: {response.status_code}")
                    if response.status_code != 200:
                        outcome = f"ERROR: {response.status_code}"
                except requests.RequestException as exc:
                    outcome = f"ERROR: {exc}"
                with self._lock:
                    self.results.append((time.monotonic(), outcome))

    def outcomes(self) -> list[str]:
        with self._lock:
            return [outcome for _, outcome in self.results]

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)

    def failures(self) -> list[str]:
        return [outcome for outcome in self.outcomes() if outcome.startswith("ERROR")]


def start_slow_request(url: str):
    """A GET of /slow on its own thread; returns (thread, result dict)."""
    result: dict = {}

    def run():
        try:
            response = requests.get(url + "/slow", timeout=20)
            result["status"], result["length"] = response.status_code, len(response.content)
        except requests.RequestException as exc:
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


# -- graceful drain ---------------------------------------------------------------------------------

@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_drain_finishes_a_slow_request_then_exits_0(tmp_path, signum):
    with backends("a") as (a,), running_proxy(tmp_path, proxy_config(free_port(), a.address)) as run:
        thread, result = start_slow_request(run.url)
        assert a.slow_entered.wait(5), "the slow request never reached the backend"
        started = time.monotonic()
        run.signal(signum)
        wait_for(lambda: not port_open(run.port), what="the listener to close")
        assert thread.is_alive(), "the in-flight request was cut at the start of the drain"
        a.release.set()
        thread.join(10)
        assert result == {"status": 200, "length": SLOW_BODY}
        assert run.wait_exit() == 0
        assert time.monotonic() - started < 10.0  # graceful_timeout
        assert "draining" in run.log()


def test_keepalive_request_arriving_during_drain_is_served_with_connection_close(tmp_path):
    with backends("a") as (a,), running_proxy(tmp_path, proxy_config(free_port(), a.address)) as run:
        client = socket.create_connection(("127.0.0.1", run.port), timeout=5)
        with client:
            client.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            first = read_response(client)
            assert first.startswith(b"HTTP/1.1 200") and b"connection: close" not in first.lower()
            thread, result = start_slow_request(run.url)  # keeps the drain going
            assert a.slow_entered.wait(5)
            client.sendall(b"GET /second HTTP/1.1\r\nHost: t\r\n")  # half a head: a request in progress
            run.signal(signal.SIGTERM)
            wait_for(lambda: not port_open(run.port), what="the listener to close")
            client.sendall(b"\r\n")  # the request completes during the drain
            second = read_response(client)
            assert second.startswith(b"HTTP/1.1 200"), second
            assert b"connection: close" in second.lower()
            assert client.recv(1) == b""  # then the proxy closes, at the request boundary
        a.release.set()
        thread.join(10)
        assert result["status"] == 200
        assert run.wait_exit() == 0


def test_idle_keepalive_connection_is_closed_by_the_drain(tmp_path):
    with backends("a") as (a,), running_proxy(tmp_path, proxy_config(free_port(), a.address)) as run:
        client = socket.create_connection(("127.0.0.1", run.port), timeout=5)
        with client:
            client.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            assert read_response(client).startswith(b"HTTP/1.1 200")
            run.signal(signal.SIGTERM)
            assert client.recv(1) == b""  # closed between requests, without waiting for idle_timeout
        assert run.wait_exit() == 0


def test_second_sigint_forces_the_stop(tmp_path):
    config = proxy_config(free_port(), "127.0.0.1:1", graceful="30s")
    with backends("a") as (a,), running_proxy(tmp_path, config.replace("127.0.0.1:1", a.address)) as run:
        thread, result = start_slow_request(run.url)
        assert a.slow_entered.wait(5)
        run.signal(signal.SIGINT)
        wait_for(lambda: "draining" in run.log(), what="the drain to start")
        started = time.monotonic()
        run.signal(signal.SIGINT)
        run.wait_exit(timeout=10)
        assert time.monotonic() - started < 5.0  # far below graceful_timeout: it did not wait
        a.release.set()
        thread.join(10)
        assert "status" not in result or result.get("length") != SLOW_BODY


def read_response(sock: socket.socket) -> bytes:
    """One response with a Content-Length body, read from a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


# -- hot reload --------------------------------------------------------------------------------------

def test_sighup_swaps_the_upstream_under_load_with_zero_failures(tmp_path):
    port = free_port()
    with backends("a", "b") as (a, b), running_proxy(tmp_path, proxy_config(port, a.address)) as run:
        load = Load(run.url, clients=6)
        try:
            wait_for(lambda: load.outcomes().count("a") >= 50, what="load on a")
            for target in (b, a, b):  # a few swaps while requests keep flowing
                run.rewrite(proxy_config(port, target.address))
                run.signal(signal.SIGHUP)
                mark = len(load.outcomes())
                wait_for(lambda: load.outcomes()[mark:].count(target.name) >= 50, timeout=10,
                         what=f"traffic to move to {target.name}")
        finally:
            load.stop()
        assert load.failures() == []
        assert load.outcomes()[-20:] == ["b"] * 20  # every client ends on the new server
        assert run.log().count("config reloaded") == 3
        assert "upstream changed: app" in run.log()


def test_invalid_config_on_sighup_keeps_the_old_one_serving(tmp_path):
    port = free_port()
    with backends("a", "b") as (a, b), running_proxy(tmp_path, proxy_config(port, a.address)) as run:
        broken = proxy_config(port, b.address).replace('servers = ["', 'servers = ["nonsense:99999", "')
        run.rewrite(broken)
        run.signal(signal.SIGHUP)
        wait_for(lambda: "reload failed, keeping the old config" in run.log(), what="the reload error",
                 on_timeout=run.log)
        assert "nonsense:99999" in run.log()  # the error names the problem
        assert [served_by(run.url) for _ in range(5)] == ["a"] * 5
        run.rewrite(proxy_config(port, b.address))  # and a later valid reload still works
        run.signal(signal.SIGHUP)
        wait_for(lambda: served_by(run.url) == "b", what="the valid reload")


def test_watch_reloads_when_the_file_changes(tmp_path):
    port = free_port()
    with backends("a", "b") as (a, b), running_proxy(tmp_path, proxy_config(port, a.address), "--watch") as run:
        assert served_by(run.url) == "a"
        run.rewrite(proxy_config(port, b.address, extra_routes='[[routes]]\npath = "/b"\nupstream = "app"\n'))
        wait_for(lambda: served_by(run.url) == "b", timeout=10, what="--watch to reload")
        log = run.log()
        assert "route added: */b -> app" in log
        assert f"upstream changed: app (+{b.address} -{a.address})" in log


# -- pure parts ---------------------------------------------------------------------------------------

class FakeStat:
    def __init__(self):
        self.mtime_ns, self.size, self.inode, self.missing = 1, 100, 7, False

    def __call__(self, path):
        if self.missing:
            raise FileNotFoundError(path)
        return os.stat_result((0o644, self.inode, 0, 1, 0, 0, self.size, 0, 0, 0, 0, 0, 0, self.mtime_ns))


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def make_watcher(calls):
    stat, clock = FakeStat(), FakeClock()
    watcher = Watcher("proxy.toml", lambda: calls.append(clock.now), settle=0.25, stat=stat, clock=clock)
    return watcher, stat, clock


def test_watcher_fires_once_the_file_has_settled():
    calls = []
    watcher, stat, clock = make_watcher(calls)
    assert not watcher.check()  # nothing changed
    stat.mtime_ns, stat.size = 2, 120
    assert not watcher.check()  # changed, not settled yet
    clock.now += 0.1
    stat.size = 130  # still being written
    assert not watcher.check()
    clock.now += 0.2
    assert not watcher.check()  # 0.2s stable < settle
    clock.now += 0.1
    assert watcher.check() and calls == [pytest.approx(100.4)]
    clock.now += 5
    assert not watcher.check()  # fires once per change
    assert watcher.changes_total == 1


def test_watcher_sees_a_rename_with_the_same_size_and_mtime_and_waits_out_a_missing_file():
    calls = []
    watcher, stat, clock = make_watcher(calls)
    stat.missing = True
    for _ in range(3):
        clock.now += 1
        assert not watcher.check()
    stat.missing, stat.inode = False, 8  # an editor renamed a new file over the old one
    assert not watcher.check()
    clock.now += 1
    assert watcher.check() and len(calls) == 1


def test_describe_changes_lists_routes_upstreams_and_listeners(tmp_path):
    old_file, new_file = tmp_path / "old.toml", tmp_path / "new.toml"
    old_file.write_text(proxy_config(8080, "127.0.0.1:9001") + '\n[upstreams.gone]\nservers = ["127.0.0.1:9009"]\n')
    new_file.write_text(proxy_config(8081, "127.0.0.1:9002", extra_routes='[[routes]]\npath = "/api"\nupstream = "api"\n')
                        + '\n[upstreams.api]\nservers = ["127.0.0.1:9003"]\n')
    lines = describe_changes(load_config(old_file), load_config(new_file))
    assert lines == [
        "listener added: 127.0.0.1:8081",
        "listener removed: 127.0.0.1:8080",
        "route added: */api -> api",
        "upstream added: api",
        "upstream removed: gone",
        "upstream changed: app (+127.0.0.1:9002 -127.0.0.1:9001)",
    ]
    assert describe_changes(load_config(old_file), load_config(old_file)) == []


def test_describe_changes_names_the_server_settings_that_changed(tmp_path):
    old_file, new_file = tmp_path / "old.toml", tmp_path / "new.toml"
    old_file.write_text(proxy_config(8080, "127.0.0.1:9001"))
    new_file.write_text(proxy_config(8080, "127.0.0.1:9001").replace(
        "[server]\n", '[server]\nidle_timeout = "5s"\nmax_connections = 7\n', 1))
    lines = describe_changes(load_config(old_file), load_config(new_file))
    assert lines == ["server settings changed: max_connections, idle_timeout"]


# -- core's drain: the race between "resting" and "a request just arrived" ------------------------------

def test_core_drain_serves_a_resting_connection_whose_request_arrived_before_dispatch():
    """A request that reached an idle connection but was not dispatched yet when the drain began
    must be served (then the connection closed), not closed unanswered."""
    from core import SocketServer, ThreadPool
    from tests.core_helpers import EchoHandler

    server = SocketServer(EchoHandler(), listeners=[("127.0.0.1", 0)],
                          pool=ThreadPool(min_threads=1, max_threads=2), graceful_timeout=5.0)
    client = socket.create_connection(server.addresses[0][:2], timeout=5)
    with client:
        wait_for(lambda: server._poll_once(0.05) or server.connection_count == 1, what="the accept")
        client.sendall(b"hello\n")  # arrives; the loop does not poll again before the drain
        wait_for(lambda: server._request_pending(next(iter(server._connections.values()))),
                 what="the bytes to reach the server socket")
        server.request_shutdown()
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()  # goes straight into the drain
        assert client.recv(64) == b"hello\n"
        assert client.recv(1) == b""  # and closed after it
        thread.join(10)
        assert server.stopped.is_set()


def test_a_failing_reload_listener_is_logged_and_the_others_still_run(caplog):
    from proxy.serve.app import Application
    from proxy.config.schema import parse_config
    from tests.conftest import config_document
    config = parse_config(config_document({"web": {"servers": ["127.0.0.1:9"]}}), "test.toml")
    app = Application(config)
    heard = []

    def broken(old, new):
        raise RuntimeError("listener bug")

    app.reload_listeners[:] = [broken, lambda old, new: heard.append(new)]
    newer = parse_config(config_document({"web": {"servers": ["127.0.0.1:10"]}}), "test.toml")
    with caplog.at_level(logging.ERROR, logger="pyproxy.app"):
        app.reload(newer)  # does not raise: the reload itself went through
    assert heard == [newer] and app.config is newer
    assert "reload listener" in caplog.text and "listener bug" in caplog.text
    app.close()
