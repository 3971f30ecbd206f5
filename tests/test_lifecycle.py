"""Lifecycle of the real ``pyproxy`` command: graceful drain (SIGTERM/SIGINT), hot reload (SIGHUP,
--watch), and the pure parts behind them (Watcher, describe_changes).

The proxy runs as a subprocess (``python -m proxy.serve.cli -c FILE``, tests/support/processes.py) so
signals reach a real process; backends are stdlib HTTP servers in this process. Every wait is a readiness
poll with a deadline.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import threading
import time

import pytest

from core import Connection
from proxy.config.schema import load_config, parse_config
from proxy.serve.runner import ProxyProcess
from proxy.serve.watch import Watcher, describe_changes
from tests.support.backends import SLOW_BODY, named_backends
from tests.support.client import RawClient
from tests.support.command import EXIT_TIMEOUT, READY_TIMEOUT, one_backend_config, pyproxy_command, write_config
from tests.support.ports import free_port, port_open
from tests.support.processes import Load, answered_by, proxy_config, running_proxy, start_slow_request
from tests.support.proxy import CLIENT_TIMEOUT, config_document
from tests.support.timing import FakeClock, wait_for
from tests.support.client import read_response

pytestmark = pytest.mark.timeout(60)


# -- graceful drain ---------------------------------------------------------------------------------

@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_drain_finishes_a_slow_request_then_exits_0(tmp_path, signum):
    with named_backends("a") as (a,), running_proxy(tmp_path, proxy_config(free_port(), a.address)) as run:
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


@pytest.mark.parametrize("workers", [1, 2])
def test_a_sighup_during_the_drain_does_not_open_the_listeners_again(tmp_path, workers):
    """A reload (logrotate's postrotate `kill -HUP`, a deploy) arriving while the proxy drains found
    no listener open, as the drain closes them, and bound every address anew: new clients were
    accepted by a proxy on its way out."""
    with named_backends("a") as (a,), running_proxy(tmp_path, proxy_config(free_port(), a.address, workers=workers)) as run:
        if workers > 1:
            wait_for(lambda: run.log().count(") ready") == workers, what="the workers ready", on_timeout=run.log)
        thread, result = start_slow_request(run.url)
        assert a.slow_entered.wait(5), "the slow request never reached the backend"
        run.signal(signal.SIGTERM)
        wait_for(lambda: not port_open(run.port), what="the listener to close")
        run.signal(signal.SIGHUP)
        wait_for(lambda: "reload ignored: the proxy is draining" in run.log() or "config reloaded" in run.log(),
                 what="the SIGHUP handled", on_timeout=run.log)
        assert not port_open(run.port), run.log()
        assert "listening on" not in run.log().split("draining", 1)[1]
        a.release.set()
        thread.join(10)
        assert result == {"status": 200, "length": SLOW_BODY}
        assert run.wait_exit() == 0


@pytest.mark.parametrize("workers", [1, 2])
def test_reload_and_reopen_signals_to_a_stopping_proxy_never_kill_it(tmp_path, workers):
    """A SIGHUP or SIGUSR1 (a deploy's reload, logrotate's reopen) that reached the proxy after its loop
    had ended, as it exited, met the default action Python puts back at exit and killed it: the exit
    status said "killed by SIGHUP" instead of 0, which a service manager counts as a failure."""
    with named_backends("a") as (a,), running_proxy(tmp_path, proxy_config(free_port(), a.address, workers=workers)) as run:
        if workers > 1:
            wait_for(lambda: run.log().count(") ready") == workers, what="the workers ready", on_timeout=run.log)
        run.signal(signal.SIGTERM)
        deadline = time.monotonic() + EXIT_TIMEOUT
        while run.proc.poll() is None and time.monotonic() < deadline:  # through the drain and the exit
            for signum in (signal.SIGHUP, signal.SIGUSR1):
                run.signal(signum)
            time.sleep(0.001)
        assert run.wait_exit() == 0, run.log()


@pytest.mark.parametrize("workers", [1, 2])
def test_a_reload_signalled_together_with_a_stop_is_ignored(tmp_path, workers):
    """Python runs the handlers of signals that arrive together in signal-number order: a SIGHUP sent
    right behind a SIGTERM was acted on first, and the proxy reloaded on its way out (here it bound
    the new config's address and logged "config reloaded") before it began to drain."""
    port, added = free_port(), free_port()
    with named_backends("a") as (a,):
        text = proxy_config(port, a.address, workers=workers)
        with running_proxy(tmp_path, text) as run:
            if workers > 1:
                wait_for(lambda: run.log().count(") ready") == workers, what="the workers ready", on_timeout=run.log)
            run.rewrite(text.replace(f'listen = "127.0.0.1:{port}"', f'listen = ["127.0.0.1:{port}", "127.0.0.1:{added}"]'))
            run.signal(signal.SIGSTOP)  # both signals wait, and land together once it runs again
            try:
                run.signal(signal.SIGTERM)
                run.signal(signal.SIGHUP)
            finally:
                run.signal(signal.SIGCONT)
            assert run.wait_exit() == 0, run.log()
            log = run.log()
            assert "reload ignored: the proxy is draining" in log
            assert "config reloaded" not in log and str(added) not in log, log


@pytest.mark.parametrize("workers", [1, 2])
def test_a_reload_whose_new_address_is_taken_keeps_the_old_config(tmp_path, workers):
    """Bug: the reload logged "cannot listen on", then "config reloaded" with "listener added" for the
    address it could not take, and applied the rest. Now, as in nginx, nothing of it is applied."""
    port = free_port()
    with named_backends("a") as (a,), socket.create_server(("127.0.0.1", 0)) as taken, \
            running_proxy(tmp_path, proxy_config(port, a.address, workers=workers)) as run:
        if workers > 1:
            wait_for(lambda: run.log().count(") ready") == workers, what="the workers ready", on_timeout=run.log)
        busy = taken.getsockname()[1]
        newer = proxy_config(port, a.address, workers=workers, extra_routes='[[routes]]\npath = "/new"\nupstream = "app"\n')
        run.rewrite(newer.replace(f'listen = "127.0.0.1:{port}"', f'listen = ["127.0.0.1:{port}", "127.0.0.1:{busy}"]'))
        run.signal(signal.SIGHUP)
        wait_for(lambda: "reload failed, keeping the old config" in run.log(), what="the reload refused",
                 on_timeout=run.log)
        assert f"server.listen[1]: cannot listen on 127.0.0.1:{busy}" in run.log()
        assert "config reloaded" not in run.log() and "listener added" not in run.log(), run.log()
        assert answered_by(run.url) == "a"  # still serving on the old address, the old config
        run.signal(signal.SIGTERM)
        assert run.wait_exit() == 0


def test_keepalive_request_arriving_during_drain_is_served_with_connection_close(tmp_path):
    with named_backends("a") as (a,), running_proxy(tmp_path, proxy_config(free_port(), a.address)) as run:
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
    with named_backends("a") as (a,), running_proxy(tmp_path, proxy_config(free_port(), a.address)) as run:
        client = socket.create_connection(("127.0.0.1", run.port), timeout=5)
        with client:
            client.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            assert read_response(client).startswith(b"HTTP/1.1 200")
            run.signal(signal.SIGTERM)
            assert client.recv(1) == b""  # closed between requests, without waiting for idle_timeout
        assert run.wait_exit() == 0


def test_second_sigint_forces_the_stop(tmp_path):
    config = proxy_config(free_port(), "{backend}", graceful="30s")
    with named_backends("a") as (a,), running_proxy(tmp_path, config.replace("{backend}", a.address)) as run:
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



def test_sighup_swaps_the_upstream_under_load_with_zero_failures(tmp_path):
    port = free_port()
    with named_backends("a", "b") as (a, b), running_proxy(tmp_path, proxy_config(port, a.address)) as run:
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
    with named_backends("a", "b") as (a, b), running_proxy(tmp_path, proxy_config(port, a.address)) as run:
        broken = proxy_config(port, b.address).replace('servers = ["', 'servers = ["nonsense:99999", "')
        run.rewrite(broken)
        run.signal(signal.SIGHUP)
        wait_for(lambda: "reload failed, keeping the old config" in run.log(), what="the reload error",
                 on_timeout=run.log)
        assert "nonsense:99999" in run.log()  # the error names the problem
        assert [answered_by(run.url) for _ in range(5)] == ["a"] * 5
        run.rewrite(proxy_config(port, b.address))  # and a later valid reload still works
        run.signal(signal.SIGHUP)
        wait_for(lambda: answered_by(run.url) == "b", what="the valid reload")


def test_watch_reloads_when_the_file_changes(tmp_path):
    port = free_port()
    with named_backends("a", "b") as (a, b), running_proxy(tmp_path, proxy_config(port, a.address), "--watch") as run:
        assert answered_by(run.url) == "a"
        run.rewrite(proxy_config(port, b.address, extra_routes='[[routes]]\npath = "/b"\nupstream = "app"\n'))
        wait_for(lambda: answered_by(run.url) == "b", timeout=10, what="--watch to reload")
        # The new routes serve as soon as they are in place; the lines saying so are written just after.
        wait_for(lambda: "route added: */b -> app" in run.log(), what="the reload's log", on_timeout=run.log)
        assert f"upstream changed: app (+{b.address} -{a.address})" in run.log()


# -- pure parts ---------------------------------------------------------------------------------------

class FakeStat:
    def __init__(self):
        self.mtime_ns, self.size, self.inode, self.missing = 1, 100, 7, False

    def __call__(self, path):
        if self.missing:
            raise FileNotFoundError(path)
        return os.stat_result((0o644, self.inode, 0, 1, 0, 0, self.size, 0, 0, 0, 0, 0, 0, self.mtime_ns))


def make_watcher(calls):
    stat, clock = FakeStat(), FakeClock(start=100.0)
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


def test_describe_changes_names_what_changed_on_a_kept_listener(tmp_path):
    """A new certificate path or sni list on the same address used to be logged as no change at all."""
    old_file, new_file = tmp_path / "old.toml", tmp_path / "new.toml"
    for name in ("a.crt", "a.key", "b.crt", "b.key"):
        (tmp_path / name).write_text("")
    listen = 'listen = [{ address = "127.0.0.1:8443", tls_cert = "a.crt", tls_key = "a.key" }]'
    old_file.write_text(proxy_config(8080, "127.0.0.1:9001").replace('listen = "127.0.0.1:8080"', listen))
    new_file.write_text(proxy_config(8080, "127.0.0.1:9001").replace('listen = "127.0.0.1:8080"', listen.replace(
        ' }]', ', http2 = false, sni = [{ host = "b.test", tls_cert = "b.crt", tls_key = "b.key" }] }]')
        .replace("a.crt", "b.crt")) + '\n[tls]\ninternal_names = [".test"]\n')
    lines = describe_changes(load_config(old_file), load_config(new_file))
    assert lines == ["listener changed: 127.0.0.1:8443 (tls_cert, sni, http2)", "tls settings changed: internal_names"]


# -- core's drain: the race between "resting" and "a request just arrived" ------------------------------

def test_core_drain_serves_a_resting_connection_whose_request_arrived_before_dispatch():
    """A request that reached an idle connection but was not dispatched yet when the drain began
    must be served (then the connection closed), not closed unanswered."""
    from core import SocketServer, ThreadPool
    from tests.support.echo_server import EchoHandler

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
    from tests.support.proxy import config_document
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


# -- the drain lets requests that are half-way in finish ---------------------------------------------------
# The drains above use complete requests. A head half sent and a small body half
# sent when the drain starts are both held in the selector, not by a thread. They must be answered
# (with Connection: close), not closed as idle keep-alive connections are.
def test_drain_answers_requests_that_were_half_way_in(make_backend, make_proxy):
    backend = make_backend()
    proxy = make_proxy({"web": [backend.address]}, server={"graceful_timeout": "5s"})
    half_head, half_body = proxy.connect(), proxy.connect()
    half_head.sendall(b"GET /h HTTP/1.1\r\nHo")
    half_body.sendall(b"POST /b HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\n\r\nabc")
    wait_for(lambda: proxy.process.server.connection_counts().get("idle", 0) >= 2, what="both parked")
    proxy.process.stop()
    wait_for(proxy.app.draining, what="drain started")
    half_head.sendall(b"st: a\r\n\r\n")
    half_body.sendall(b"def")
    for sock, body in ((half_head, b""), (half_body, b"abcdef")):
        with sock:
            client = RawClient(sock)
            response = client.read_response()
            assert response.status == 200 and response.body == body
            assert response.header("Connection") == "close"
            assert client.at_eof()
    proxy.thread.join(CLIENT_TIMEOUT)
    assert not proxy.thread.is_alive()


# --- "SIGTERM: graceful drain ... then exit 0", however soon after the port opens -------------------

# One process only: with workers, Supervisor.__init__ still runs between the unblock and its own
# handlers (proxy/serve/supervisor.py), so a SIGTERM in that window still kills the supervisor.
@pytest.mark.parametrize("workers", ["1"])
def test_sigterm_right_after_the_port_opens_still_exits_0(tmp_path, workers):
    for _ in range(3):
        port = free_port()
        path = write_config(tmp_path, one_backend_config(f'listen = "127.0.0.1:{port}"'))
        process = subprocess.Popen(pyproxy_command() + ["-c", str(path), "--workers", workers],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + READY_TIMEOUT
            while not port_open(port):  # as fast as a watchdog could: the first moment it accepts
                assert process.poll() is None and time.monotonic() < deadline, "pyproxy did not start"
            process.send_signal(signal.SIGTERM)
            _, stderr = process.communicate(timeout=EXIT_TIMEOUT)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(EXIT_TIMEOUT)
        assert process.returncode == 0, stderr
        assert "Traceback" not in stderr


def test_a_connection_closed_by_the_drain_before_its_worker_starts_is_left_quietly():
    """A drain closes resting connections from the accept loop; one of them may have just been handed
    to a worker again (a request already buffered). The worker finds it closed and lets it go."""
    process = ProxyProcess(parse_config(config_document({"web": {"servers": ["127.0.0.1:9"]}}), "test.toml"),
                           listeners=[])
    client, server_side = socket.socketpair()
    with client:
        conn = Connection(server_side, ("127.0.0.1", 40000))
        client.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        conn.close()  # what the drain's claim of a resting connection does
        process.server.handler(conn)  # raised IllegalTransition (CLOSED -> READING), logged as a traceback
        assert conn.closed


def test_a_reload_after_a_stop_was_asked_for_is_ignored(tmp_path, caplog):
    # A SIGHUP right behind a SIGTERM (one batch of signals, or a supervisor's reload order reaching a
    # worker it just told to stop) came before the drain had begun: the proxy reloaded on its way out,
    # opening the new config's listeners, and a retiring worker reported itself reloaded.
    path = write_config(tmp_path, one_backend_config(f'listen = "127.0.0.1:{free_port()}"'))
    process = ProxyProcess(load_config(path), config_path=str(path))
    try:
        added = free_port()
        kept = next(iter(process.listeners_by_address))
        path.write_text(one_backend_config(f'listen = ["{kept}", "127.0.0.1:{added}"]'))
        process.server.request_shutdown()
        with caplog.at_level(logging.INFO, logger="pyproxy"):
            assert process.reload_from_file() is False
        assert "reload ignored: the proxy is draining" in caplog.text
        assert not port_open(added)
    finally:
        for listener in process.server.listeners:
            process.server.remove_listener(listener)
        process.pool.shutdown(timeout=5)
