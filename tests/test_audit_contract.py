"""Contract audit (shared/CONFIG.md): the real `pyproxy` command, run as a user would, where it
once broke the contract. Each test names what CONFIG.md promises.

Real processes and sockets on 127.0.0.1; readiness by polling the port; every wait bounded.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

import pytest

from tests.support.command import EXIT_TIMEOUT, READY_TIMEOUT, proxy_running, pyproxy_command, run_cli, write_config
from tests.support.ports import free_port

BACKEND_ROUTE = """\
[[routes]]
path = "/"
upstream = "web"

[upstreams.web]
servers = ["{backend}"]
"""


def one_backend_config(server: str, backend: str = "127.0.0.1:3000", log: str = 'access = "off"',
                       extra: str = "") -> str:
    return f"[server]\n{server}\n\n[log]\n{log}\n\n{extra}\n{BACKEND_ROUTE.format(backend=backend)}"


def assert_one_line_problem(result, *fragments: str) -> None:
    """Exit 1, no traceback, and every fragment on the error output."""
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


# --- "pyproxy -c proxy.toml --workers N overrides server.workers" (server.workers takes "auto") --

def test_workers_auto_on_the_command_line_runs_one_worker_per_cpu(tmp_path, json_backends):
    backend = json_backends("web")
    cpus = len(os.sched_getaffinity(0))

    def args_for_port(port: int) -> list[str]:
        text = one_backend_config(f'listen = "127.0.0.1:{port}"', backend)
        return ["-c", str(write_config(tmp_path, text)), "--workers", "auto"]

    with proxy_running(tmp_path, args_for_port) as running:
        assert running.get("/").json()["name"] == "web"
        if cpus > 1:
            assert f"with {cpus} workers" in running.stderr()


def test_workers_on_the_command_line_still_refuses_nonsense(tmp_path):
    path = write_config(tmp_path, one_backend_config('listen = "127.0.0.1:1"'))
    for value in ("0", "two", "-1"):
        result = run_cli("-c", str(path), "--workers", value)
        assert result.returncode == 2, result.stderr
        assert "--workers" in result.stderr and "auto" in result.stderr


# --- log.access: "a file path"; a config error "never shows a traceback" --------------------------

def test_access_log_path_that_is_a_directory_is_a_config_problem(tmp_path):
    (tmp_path / "logs").mkdir()
    path = write_config(tmp_path, one_backend_config('listen = "127.0.0.1:1"', log='access = "logs"'))
    assert_one_line_problem(run_cli("check", "-c", str(path)), "log.access", "is a directory")
    assert_one_line_problem(run_cli("-c", str(path)), "log.access", "is a directory")


@pytest.mark.parametrize("workers", ["1", "2"])
def test_access_log_that_cannot_be_opened_stops_the_start_with_one_line(tmp_path, workers):
    # /proc refuses new files even to root, so this holds whoever runs the tests.
    listen = f'listen = "127.0.0.1:{free_port()}"'
    text = one_backend_config(listen, log='access = "/proc/pyproxy-audit.log"')
    path = write_config(tmp_path, text)
    result = run_cli("-c", str(path), "--workers", workers)
    assert_one_line_problem(result, "pyproxy: cannot open the access log /proc/pyproxy-audit.log")
    assert "listening on" not in result.stderr


# --- duplicate listen addresses are a config problem, not "address already in use" at start -------

@pytest.mark.parametrize("first, second", [
    ("0.0.0.0:{port}", "127.0.0.1:{port}"),
    ("[::]:{port}", "127.0.0.1:{port}"),
    ("[::]:{port}", "[::1]:{port}"),
    ("127.0.0.1:{port}", "0.0.0.0:{port}"),
    (":{port}", "[::1]:{port}"),
])
def test_overlapping_listen_addresses_fail_check(tmp_path, first, second):
    port = 18931
    listen = f'listen = ["{first.format(port=port)}", "{second.format(port=port)}"]'
    result = run_cli("check", "-c", str(write_config(tmp_path, one_backend_config(listen))))
    assert_one_line_problem(result, f"server.listen[1]: {second.format(port=port)} is listed twice")


def test_admin_on_a_port_the_wildcard_listener_holds_fails_check(tmp_path):
    text = one_backend_config('listen = "0.0.0.0:18932"', extra='[admin]\nlisten = "127.0.0.1:18932"\n')
    result = run_cli("check", "-c", str(write_config(tmp_path, text)))
    assert_one_line_problem(result, "admin.listen: 127.0.0.1:18932 clashes with server.listen 0.0.0.0:18932")


@pytest.mark.parametrize("listen", [
    '["127.0.0.1:18933", "[::1]:18933"]',
    '["0.0.0.0:18933", "[::1]:18933"]',
    '["127.0.0.1:18933", "127.0.0.2:18933"]',
])
def test_listen_addresses_that_can_share_a_port_pass_check(tmp_path, listen):
    result = run_cli("check", "-c", str(write_config(tmp_path, one_backend_config(f"listen = {listen}"))))
    assert result.returncode == 0, result.stderr


# --- durations: a number of seconds or "250ms"/"5s"/"2m"; one that breaks the proxy is refused -----

def test_absurdly_long_durations_are_config_problems(tmp_path):
    text = one_backend_config('listen = "127.0.0.1:1"\ngraceful_timeout = 1e12\nidle_timeout = "99999999h"')
    text += 'connect_timeout = 1e12\n'
    result = run_cli("check", "-c", str(write_config(tmp_path, text)))
    assert_one_line_problem(result, "server.graceful_timeout: 1000000000000.0 is too long",
                            'server.idle_timeout: "99999999h" is too long', "upstreams.web.connect_timeout")


def test_a_year_long_duration_is_accepted_and_the_proxy_forwards(tmp_path, json_backends):
    backend = json_backends("web")

    def args_for_port(port: int) -> list[str]:
        text = one_backend_config(f'listen = "127.0.0.1:{port}"\nidle_timeout = "8760h"', backend)
        text += 'connect_timeout = 31536000\nread_timeout = "8760h"\n'
        return ["-c", str(write_config(tmp_path, text))]

    with proxy_running(tmp_path, args_for_port) as running:
        response = running.get("/")
        assert response.status_code == 200 and response.json()["name"] == "web"
        assert "Traceback" not in running.stderr()



# --- "1 for ... an address the proxy cannot listen on" (README): [admin].listen too ------------------

@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_taken_admin_address_stops_the_start_with_one_line(tmp_path, workers):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        admin_port = taken.getsockname()[1]
        text = one_backend_config(f'listen = "127.0.0.1:{free_port()}"',
                                  extra=f'[admin]\nlisten = "127.0.0.1:{admin_port}"\n')
        result = run_cli("-c", str(write_config(tmp_path, text)), "--workers", workers)
    assert_one_line_problem(result, f"pyproxy: cannot listen on 127.0.0.1:{admin_port} (admin.listen): "
                                    "address already in use")
    assert "listening on" not in result.stderr


# --- "pyproxy check: exit 0 if valid": what the proxy refuses to start with, check refuses too ------

UPSTREAM_WITH_CA = """\
[[routes]]
upstream = "web"

[upstreams.web]
servers = ["https://127.0.0.1:3000"]
tls_ca = "ca.pem"
"""


def test_a_tls_ca_file_without_certificates_is_a_config_problem(tmp_path):
    (tmp_path / "ca.pem").write_text("not a certificate\n")
    text = f'[server]\nlisten = "127.0.0.1:{free_port()}"\n[log]\naccess = "off"\n{UPSTREAM_WITH_CA}'
    path = write_config(tmp_path, text)
    expected = f"{path}: upstreams.web.tls_ca: {tmp_path / 'ca.pem'} holds no usable PEM certificate"
    assert_one_line_problem(run_cli("check", "-c", str(path)), expected)
    assert_one_line_problem(run_cli("-c", str(path)), expected)


def test_check_refuses_a_certificate_and_key_that_do_not_match_as_the_run_does(tmp_path):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    ca.issue_cert("a.test").cert_chain_pems[0].write_to_path(str(tmp_path / "a.crt"))
    ca.issue_cert("b.test").private_key_pem.write_to_path(str(tmp_path / "b.key"))
    listen = f'listen = [{{ address = "127.0.0.1:{free_port()}", tls_cert = "a.crt", tls_key = "b.key" }}]'
    path = write_config(tmp_path, one_backend_config(listen))
    for command in (["check", "-c", str(path)], ["-c", str(path)]):
        assert_one_line_problem(run_cli(*command), f"{path}: server.listen ", "tls_cert/tls_key cannot be loaded")


# --- "SIGHUP ... Invalid: keep serving with the old config and log the errors" ----------------------

def wait_for_log(running, text: str, timeout: float = 10.0) -> str:
    """The proxy's stderr once it holds text; fails at once if the proxy exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = running.stderr()
        if text in seen:
            return seen
        assert running.process.poll() is None, f"pyproxy exited with {running.process.returncode}:\n{seen}"
        time.sleep(0.05)
    raise AssertionError(f"{text!r} did not appear within {timeout}s:\n{running.stderr()}")


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
            while not port_accepts(port):  # as fast as a watchdog could: the first moment it accepts
                assert process.poll() is None and time.monotonic() < deadline, "pyproxy did not start"
            process.send_signal(signal.SIGTERM)
            _, stderr = process.communicate(timeout=EXIT_TIMEOUT)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(EXIT_TIMEOUT)
        assert process.returncode == 0, stderr
        assert "Traceback" not in stderr


def port_accepts(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


# --- a config file saved "UTF-8 with BOM" (Notepad and others) reads like any other ----------------

def test_a_byte_order_mark_at_the_start_of_the_file_is_accepted(tmp_path):
    path = tmp_path / "proxy.toml"
    path.write_bytes(b"\xef\xbb\xbf" + one_backend_config('listen = "127.0.0.1:1"').encode())
    result = run_cli("check", "-c", str(path))
    assert result.returncode == 0, result.stderr
    assert f"{path}: OK" in result.stdout
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"\xef\xbb\xbf[server]\nlisten = \xff\n")
    assert_one_line_problem(run_cli("check", "-c", str(bad)), f"{bad}: not valid UTF-8 text")


# --- max_header_bytes: "request line + headers; past it 431 (414 for the line alone)" ---------------

def status_of(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=EXIT_TIMEOUT) as sock:
        sock.sendall(request)
        return sock.recv(64).split(b"\r\n", 1)[0]


def test_a_request_line_longer_than_a_small_max_header_bytes_is_414(tmp_path, json_backends):
    backend = json_backends("web")

    def args_for_port(port: int) -> list[str]:
        text = one_backend_config(f'listen = "127.0.0.1:{port}"\nmax_header_bytes = "2KiB"', backend)
        return ["-c", str(write_config(tmp_path, text))]

    with proxy_running(tmp_path, args_for_port) as running:
        long_line = b"GET /" + b"a" * 3000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
        big_headers = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 3000 + b"\r\n\r\n"
        assert status_of(running.port, big_headers) == b"HTTP/1.1 431 Request Header Fields Too Large"
        assert status_of(running.port, long_line) == b"HTTP/1.1 414 Request-URI Too Long"
