"""A reload applies every [server] setting a running process can take, and says which ones need a
restart; SIGUSR1 (and SIGHUP) reopen the access log file for log rotation; an access log that cannot be
opened on reload keeps the old writer; a SIGTERM while the supervisor starts stops it cleanly.

Real processes (``python -m proxy.serve.cli``) where signals matter, an in-process ProxyProcess elsewhere;
every wait is a readiness poll with a deadline.
"""

from __future__ import annotations

import logging
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest
import requests

from core import connection as core_connection
from proxy.config.schema import ServerSettings, parse_config
from proxy.serve.runner import server_changes
from tests.support.backends import named_backends
from tests.support.command import one_backend_config, proxy_running, wait_for_log, write_config
from tests.support.ports import free_port
from tests.support.processes import REPO, running_proxy
from tests.support.proxy import DEADLINE, config_document, proxy_config_dict
from tests.support.timing import wait_for

pytestmark = pytest.mark.timeout(60)

CLOSE_WAIT = 5.0  # the old limits were 10 s: a connection closed within this saw the new one
OLD_LIMITS = {"idle_timeout": "10s", "header_timeout": "10s", "graceful_timeout": "10s"}


def config_text(port: int, backend: str, *, workers: int = 1, access: str = "off", **server) -> str:
    settings = {"workers": workers, "min_threads": 2, **OLD_LIMITS, **server}
    lines = "\n".join(f"{key} = {value!r}".replace("'", '"') for key, value in settings.items())
    return f"""
[server]
listen = "127.0.0.1:{port}"
{lines}

[log]
level = "info"
access = "{access}"

[[routes]]
path = "/"
upstream = "app"

[upstreams.app]
servers = ["{backend}"]
"""


def keepalive_request(port: int, path: str = "/") -> socket.socket:
    """A connection that sent one request and read its answer; left open (keep-alive)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=CLOSE_WAIT + 5)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    head, _, body = read_head(sock).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    while len(body) < length:
        body += sock.recv(length - len(body))
    return sock


def read_head(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def closed_by_server(sock: socket.socket, within: float) -> float | None:
    """Seconds until the server closed ``sock`` (EOF), or None if it stayed open ``within`` seconds."""
    started = time.monotonic()
    sock.settimeout(within)
    try:
        data = sock.recv(1)
    except TimeoutError:
        return None
    except ConnectionResetError:
        data = b""
    return time.monotonic() - started if data == b"" else None


def log_lines(path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def paths_logged(path) -> list[str]:
    """The request paths in a combined-format access log, /ready probes left out."""
    paths = [line.split('"')[1].split()[1] for line in log_lines(path)]
    return [p for p in paths if p != "/ready"]


# -- [server] settings on SIGHUP --------------------------------------------------------------------

def test_sighup_applies_idle_timeout_max_connections_and_graceful_timeout(tmp_path):
    with named_backends("a") as (a,):
        port = free_port()
        with running_proxy(tmp_path, config_text(port, a.address)) as run:
            idle = keepalive_request(port)
            run.rewrite(config_text(port, a.address, workers=3, idle_timeout="1s", max_connections=1,
                                    graceful_timeout="1s"))
            run.signal(signal.SIGHUP)
            wait_for(lambda: "config reloaded" in run.log(), what="the reload", on_timeout=run.log)

            # idle_timeout 1s: a keep-alive connection open since before the reload closes
            assert closed_by_server(idle, CLOSE_WAIT) is not None, run.log()
            idle.close()

            # max_connections 1: one request in flight, the next client is refused with 503
            busy = socket.create_connection(("127.0.0.1", port), timeout=CLOSE_WAIT + 5)
            busy.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
            assert a.slow_entered.wait(CLOSE_WAIT)
            with socket.create_connection(("127.0.0.1", port), timeout=CLOSE_WAIT) as refused:
                refused.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                assert read_head(refused).startswith(b"HTTP/1.1 503"), run.log()

            # graceful_timeout 1s: the held request is cut after 1 s, not 10
            run.signal(signal.SIGTERM)
            assert run.wait_exit(timeout=CLOSE_WAIT) == 0
            busy.close()
            # what a running process cannot take is said, not silently dropped
            assert "WARNING pyproxy: needs a restart: server.workers (1 -> 3)" in run.log()


def test_sighup_with_workers_applies_idle_timeout_in_every_worker_and_warns_once(tmp_path):
    with named_backends("a") as (a,):
        port = free_port()
        with running_proxy(tmp_path, config_text(port, a.address, workers=2)) as run:
            wait_for(lambda: run.log().count(") ready") == 2, what="both workers ready", on_timeout=run.log)
            # the kernel spreads fresh connections over both workers' accept loops
            idle = [keepalive_request(port) for _ in range(8)]
            run.rewrite(config_text(port, a.address, workers=4, idle_timeout="1s"))
            run.signal(signal.SIGHUP)
            wait_for(lambda: run.log().count(") reloaded") == 2, what="every worker reloaded", on_timeout=run.log)
            for sock in idle:
                assert closed_by_server(sock, CLOSE_WAIT) is not None, run.log()
                sock.close()
            assert run.log().count("needs a restart: server.workers (2 running -> 4)") == 1
            assert run.log().count("server settings changed: workers, idle_timeout") == 1  # the supervisor's
            assert "needs a restart: server.cpu_affinity" not in run.log()


def test_sighup_changing_workers_under_the_workers_option_says_the_option_decides(tmp_path):
    """Bug: with --workers 2, a file going from 1 to 3 workers logged "needs a restart: server.workers
    (1 -> 3)": two were running, and --workers keeps deciding after a restart too."""
    with named_backends("a") as (a,):
        port = free_port()
        with running_proxy(tmp_path, config_text(port, a.address, workers=1), "--workers", "2") as run:
            wait_for(lambda: run.log().count(") ready") == 2, what="both workers ready", on_timeout=run.log)
            run.rewrite(config_text(port, a.address, workers=3))
            run.signal(signal.SIGHUP)
            wait_for(lambda: run.log().count(") reloaded") == 2, what="every worker reloaded", on_timeout=run.log)
            assert run.log().count("server.workers changed (1 -> 3), but --workers 2 decides the count") == 1
            assert "needs a restart: server.workers" not in run.log()


def reload_server(proxy, address: str, **server) -> None:
    document = proxy_config_dict({"web": [address]}, server={"listen": f"127.0.0.1:{proxy.port}", **server})
    proxy.process.reload(parse_config(document, "test.toml"))


def test_reload_resizes_the_thread_pool_both_ways(make_backend, make_proxy):
    backend = make_backend()
    proxy = make_proxy({"web": [backend.address]})
    pool = proxy.process.pool
    reload_server(proxy, backend.address, min_threads=6, max_threads=8)
    wait_for(lambda: pool.threads >= 6, what="min_threads raised to 6", on_timeout=pool.counts)
    assert requests.get(proxy.url + "/", timeout=DEADLINE).status_code == 200
    reload_server(proxy, backend.address, min_threads=1, max_threads=2)
    wait_for(lambda: pool.threads <= 2, what="threads above max_threads 2 retired", on_timeout=pool.counts)
    assert (pool.min_threads, pool.max_threads) == (1, 2)
    assert requests.get(proxy.url + "/", timeout=DEADLINE).status_code == 200


def test_reload_applies_header_timeout_to_silent_connections(make_backend, make_proxy):
    backend = make_backend()
    proxy = make_proxy({"web": [backend.address]})  # header_timeout 5s
    reload_server(proxy, backend.address, header_timeout="1s")
    with proxy.connect() as silent:
        waited = closed_by_server(silent, 4.0)  # the reaper's old limit was 5 s
    assert waited is not None


def _kernel_read_timeout(sock: socket.socket) -> float:
    seconds, micros = struct.unpack("ll", sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16))
    return seconds + micros / 1e6


def test_new_connections_start_with_the_header_timeout_and_a_reload_passes_the_new_one_on(
        make_backend, make_proxy, monkeypatch):
    """The handler's first read timeout on a new connection is header_timeout: the listener passes it
    on, so the first request sets no socket option (one system call less per connection)."""
    backend = make_backend()
    proxy = make_proxy({"web": [backend.address]})  # header_timeout 5s
    [listener] = proxy.process.server.listeners
    assert _kernel_read_timeout(listener.sock) == 5.0
    options = []  # socket options set on client connections (upstream ones get theirs when they open)
    original = core_connection.set_socket_timeout

    def recording(sock, option, value):
        if sock.getsockname()[1] == proxy.port and sock is not listener.sock:  # an accepted one
            options.append(option)
        original(sock, option, value)
    monkeypatch.setattr(core_connection, "set_socket_timeout", recording)
    assert requests.get(proxy.url + "/", headers={"Connection": "close"}, timeout=DEADLINE).status_code == 200
    assert options == []
    reload_server(proxy, backend.address, header_timeout="5.1s")  # not a sum that subtracts back exactly
    assert _kernel_read_timeout(listener.sock) == 5.1
    assert requests.get(proxy.url + "/", headers={"Connection": "close"}, timeout=DEADLINE).status_code == 200
    assert options == []


# -- the access log ---------------------------------------------------------------------------------

def test_an_access_log_that_cannot_be_opened_keeps_the_old_writer_with_one_error_line(
        tmp_path, backends, observed_proxy, caplog):
    (a,) = backends("a")
    path = tmp_path / "access.log"
    proxy = observed_proxy(config_document({"web": {"servers": [a.address]}}, log={"access": str(path)}))
    switch = next(listener for listener in proxy.app.reload_listeners if type(listener).__name__ == "LogSwitch")
    running = switch.access_log
    # Passes validation (its directory exists) yet open() fails, even as root: a dangling symlink.
    unopenable = tmp_path / "dangling.log"
    unopenable.symlink_to(tmp_path / "no-such-directory" / "access.log")
    with caplog.at_level(logging.INFO):
        proxy.reload(config_document({"web": {"servers": [a.address]}}, log={"access": str(unopenable)}))
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and str(unopenable) in errors[0].getMessage(), caplog.text
    assert errors[0].exc_info is None and "Traceback" not in caplog.text
    assert not any("access log is now" in r.getMessage() for r in caplog.records)
    assert switch.access_log is running and running.observe in proxy.app.observers
    assert requests.get(proxy.url + "/after", timeout=DEADLINE).status_code == 200
    wait_for(lambda: "/after" in paths_logged(path), what="the line in the old file")


def rotate_and_check(run, path, signum: int, *, workers: int = 1) -> None:
    """Rename the log, signal, and see the next request land in a new file at the same path."""
    assert requests.get(run.url + "/one", timeout=DEADLINE).status_code == 200
    wait_for(lambda: "/one" in paths_logged(path), what="/one logged", on_timeout=run.log)
    rotated = path.with_name(path.name + ".1")
    path.rename(rotated)
    assert requests.get(run.url + "/two", timeout=DEADLINE).status_code == 200  # still the open file
    # Logged after its answer went out: waited for, or the signal could come before the line is queued
    # (and the line then rightly goes to the new file).
    wait_for(lambda: "/two" in paths_logged(rotated), what="/two in the rotated file", on_timeout=run.log)
    reopened_before = run.log().count("reopened")
    run.signal(signum)
    wait_for(path.exists, what="a new file at the log's path", on_timeout=run.log)  # created by the reopen
    if workers > 1:  # and every worker reopened, not just the first
        wait_for(lambda: run.log().count("reopened") - reopened_before == workers, what="every worker reopened",
                 on_timeout=run.log)
    assert requests.get(run.url + "/three", timeout=DEADLINE).status_code == 200
    wait_for(lambda: "/three" in paths_logged(path), what="/three in the new file", on_timeout=run.log)
    assert paths_logged(path) == ["/three"]
    assert paths_logged(rotated) == ["/one", "/two"]


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGHUP], ids=["usr1", "hup-unchanged-file"])
def test_a_signal_reopens_the_access_log_after_rotation(tmp_path, signum):
    with named_backends("a") as (a,):
        path = tmp_path / "access.log"
        port = free_port()
        with running_proxy(tmp_path, config_text(port, a.address, access=str(path))) as run:
            rotate_and_check(run, path, signum)
            run.signal(signal.SIGTERM)
            assert run.wait_exit() == 0


def test_sigusr1_with_workers_reopens_the_access_log_in_every_worker(tmp_path):
    with named_backends("a") as (a,):
        path = tmp_path / "access.log"
        port = free_port()
        with running_proxy(tmp_path, config_text(port, a.address, workers=2, access=str(path))) as run:
            wait_for(lambda: run.log().count(") ready") == 2, what="both workers ready", on_timeout=run.log)
            rotate_and_check(run, path, signal.SIGUSR1, workers=2)
            # fresh connections reach both workers: each writes to the new file now
            for _ in range(20):
                with requests.Session() as session:
                    assert session.get(run.url + "/more", timeout=DEADLINE).status_code == 200
            wait_for(lambda: paths_logged(path).count("/more") == 20, what="every /more in the new file",
                     on_timeout=run.log)
            assert paths_logged(path.with_name(path.name + ".1")) == ["/one", "/two"]
            run.signal(signal.SIGTERM)
            assert run.wait_exit() == 0


# -- a stop while the supervisor starts -------------------------------------------------------------

BIG_UPSTREAMS = 2000  # x 10 servers: the supervisor's Application takes ~0.1 s to build


def big_workers_config(port: int) -> str:
    upstreams = "\n".join(
        f'[upstreams.u{i}]\nservers = [{", ".join(f"{chr(34)}127.0.0.1:{20000 + j}{chr(34)}" for j in range(10))}]'
        for i in range(BIG_UPSTREAMS))
    return f"""
[server]
listen = "127.0.0.1:{port}"
workers = 2

[log]
level = "info"
access = "off"

[[routes]]
path = "/"
upstream = "u0"

{upstreams}
"""


def test_sigterm_while_the_supervisor_starts_exits_0(tmp_path):
    config_path = tmp_path / "proxy.toml"
    config_path.write_text(big_workers_config(free_port()))
    proc = subprocess.Popen([sys.executable, "-m", "proxy.serve.cli", "-c", str(config_path)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        seen = []
        for line in proc.stderr:  # ends at EOF: the process exited
            seen.append(line.decode(errors="replace"))
            if "listening on" in seen[-1]:  # printed just before the supervisor is built
                proc.send_signal(signal.SIGTERM)
                break
        assert proc.wait(30) == 0, "".join(seen) + proc.stderr.read().decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stderr.close()


def test_restart_only_settings_are_named_with_their_old_and_new_values():
    old = ServerSettings(workers=2, cpu_affinity="auto", idle_timeout=10.0)
    new = ServerSettings(workers=4, cpu_affinity=(0, 1), idle_timeout=1.0)
    assert server_changes(old, new) == ["server.workers (2 -> 4)", "server.cpu_affinity (auto -> [0, 1])"]
    assert server_changes(old, old) == []


# --- "SIGHUP ... Invalid: keep serving with the old config and log the errors" ----------------------

def test_sighup_with_an_unloadable_tls_ca_keeps_serving(tmp_path, json_backends):
    backend = json_backends("web")
    (tmp_path / "ca.pem").write_text("not a certificate\n")
    secure = '[upstreams.secure]\nservers = ["https://127.0.0.1:1"]\n'
    config_path = {}

    def args_for_port(port: int) -> list[str]:
        text = one_backend_config(f'listen = "127.0.0.1:{port}"', backend) + secure
        config_path["path"] = write_config(tmp_path, text)
        return ["-c", str(config_path["path"])]

    with proxy_running(tmp_path, args_for_port) as running:
        # A forwarded answer means the loop runs, so its SIGHUP handler is in place (the port alone
        # accepts as soon as it is bound, before the handlers are).
        assert running.get("/").json()["name"] == "web"
        path = config_path["path"]
        path.write_text(path.read_text() + 'tls_ca = "ca.pem"\n')
        running.process.send_signal(signal.SIGHUP)
        wait_for_log(running, "reload failed")
        assert running.get("/").json()["name"] == "web"
