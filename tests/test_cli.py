"""End to end: the real `pyproxy` command as a subprocess, in front of real HTTP backends.

Backends are stdlib ThreadingHTTPServers on port 0 that answer with JSON naming themselves and the
request they saw (the ``json_backends`` fixture); the command helpers are in tests/support/command.py.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

import proxy
from tests.support.command import (EXIT_TIMEOUT, POLL_INTERVAL, REPO, assert_one_line_problem, one_backend_config,
                                   proxy_running, pyproxy_command, run_cli, start_proxy, wait_for_port, write_config)
from tests.support.ports import free_port

ROUTING_CONFIG = """\
[server]
listen = "127.0.0.1:{port}"

[log]
access = "off"

[[routes]]
host = "api.test"
upstream = "api"

[[routes]]
path = "/api"
strip_prefix = true
upstream = "api"

[[routes]]
path = "/web"
upstream = "web"

[upstreams.api]
servers = ["{api}"]

[upstreams.web]
servers = ["{web1}", "{web2}"]
policy = "round_robin"
"""


@pytest.fixture
def routing_setup(tmp_path, json_backends):
    addresses = {"api": json_backends("api"), "web1": json_backends("web1"), "web2": json_backends("web2")}

    def args_for_port(port: int) -> list[str]:
        path = write_config(tmp_path, ROUTING_CONFIG.format(port=port, **addresses))
        return ["-c", str(path)]

    with proxy_running(tmp_path, args_for_port) as running:
        yield running


# ---------------------------------------------------------------------------------------------
# Running from a config file
# ---------------------------------------------------------------------------------------------

def test_routes_by_host(routing_setup):
    seen = routing_setup.get("/anything?x=1", headers={"Host": "API.test:8080"}).json()
    assert seen["name"] == "api" and seen["path"] == "/anything?x=1"
    assert seen["host"].lower() == "api.test:8080"  # preserve_host (host names are case-insensitive)


def test_strip_prefix_forwards_the_rest_of_the_path(routing_setup):
    assert routing_setup.get("/api/users?q=1").json()["path"] == "/users?q=1"
    assert routing_setup.get("/api").json()["path"] == "/"


def test_path_prefix_without_strip_keeps_the_path(routing_setup):
    seen = routing_setup.get("/web/page").json()
    assert seen["name"] in ("web1", "web2")
    assert seen["path"] == "/web/page"


def test_round_robin_alternates_between_the_two_servers(routing_setup):
    names = [routing_setup.get("/web").json()["name"] for _ in range(6)]
    assert sorted(names) == ["web1"] * 3 + ["web2"] * 3
    assert all(a != b for a, b in zip(names, names[1:])), names


@pytest.mark.parametrize("path", ["/", "/apix", "/other/api"])
def test_no_matching_route_is_404(routing_setup, path):
    response = routing_setup.get(path)
    assert response.status_code == 404


def test_sigterm_drains_and_exits_0(tmp_path, json_backends):
    address = json_backends("only")
    running = start_proxy(tmp_path, lambda port: ["--from", f"127.0.0.1:{port}", "--to", address])
    assert running.get("/").status_code == 200
    assert running.terminate() == 0
    assert "Traceback" not in running.stderr()


def test_port_in_use_is_one_line_and_exit_1(tmp_path, json_backends):
    addresses = {"api": json_backends("api"), "web1": json_backends("web1"), "web2": json_backends("web2")}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = write_config(tmp_path, ROUTING_CONFIG.format(port=port, **addresses))
        result = run_cli("-c", str(path))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"pyproxy: cannot listen on 127.0.0.1:{port}: address already in use "
        "(is another proxy or server running there?)")
    assert "Traceback" not in result.stderr


def localhost_address(port: int) -> str:
    """What "localhost" binds to here (127.0.0.1, or ::1 on some systems), written as the config would."""
    host = socket.getaddrinfo("localhost", port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][4][0]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_host_name_listed_beside_its_own_address_is_named_as_the_clash(tmp_path, workers):
    # check cannot see it (it resolves no listen names), so the start must say which key clashes.
    port = free_port()
    text = one_backend_config(f'listen = ["{localhost_address(port)}", "localhost:{port}"]')
    result = run_cli("-c", str(write_config(tmp_path, text)), "--workers", workers)
    assert_one_line_problem(result, f"pyproxy: cannot listen on localhost:{port} (server.listen[1]): "
                                    f"the same address as server.listen[0] {localhost_address(port)}")
    assert "another proxy" not in result.stderr and "listening on" not in result.stderr


@pytest.mark.parametrize("workers", ["1", "2"])
def test_an_admin_host_name_on_a_listen_address_is_named_as_the_clash(tmp_path, workers):
    port = free_port()
    text = one_backend_config(f'listen = "{localhost_address(port)}"', extra=f'[admin]\nlisten = "localhost:{port}"\n')
    result = run_cli("-c", str(write_config(tmp_path, text)), "--workers", workers)
    assert_one_line_problem(result, f"pyproxy: cannot listen on localhost:{port} (admin.listen): "
                                    f"the same address as server.listen {localhost_address(port)}")
    assert "another proxy" not in result.stderr and "listening on" not in result.stderr


def test_a_route_path_written_with_non_ascii_letters_matches_what_browsers_send(tmp_path, json_backends):
    # Clients send /café as /caf%C3%A9 (RFC 3986 §2.5): a prefix kept as "/café" could never match.
    cafe, rest = json_backends("cafe"), json_backends("rest")

    def args_for_port(port: int) -> list[str]:
        text = one_backend_config(f'listen = "127.0.0.1:{port}"', rest)
        text += f'\n[[routes]]\npath = "/café"\nupstream = "cafe"\n\n[upstreams.cafe]\nservers = ["{cafe}"]\n'
        return ["-c", str(write_config(tmp_path, text))]

    with proxy_running(tmp_path, args_for_port) as running:
        for path in ("/caf%C3%A9/menu", "/caf%c3%a9"):
            assert running.get(path).json()["name"] == "cafe", path
        assert running.get("/cafe").json()["name"] == "rest"


def test_a_proxy_that_only_redirects_runs_without_an_upstream(tmp_path):
    def args_for_port(port: int) -> list[str]:
        text = (f'[server]\nlisten = "127.0.0.1:{port}"\n\n[log]\naccess = "off"\n\n'
                '[[routes]]\nredirect = { to = "https://new.example.com{uri}" }\n')
        return ["-c", str(write_config(tmp_path, text))]

    assert run_cli("check", *args_for_port(1)[1:]).returncode == 0
    with proxy_running(tmp_path, args_for_port) as running:
        response = running.get("/a?b=1", allow_redirects=False)
        assert response.status_code == 308
        assert response.headers["Location"] == "https://new.example.com/a?b=1"


def open_files_limit(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/limits") as limits:
        line = next(line for line in limits if line.startswith("Max open files"))
    soft, hard = line.split()[3:5]
    return int(soft), int(hard)


def test_the_open_files_limit_is_raised_to_the_hard_one_and_a_short_one_is_named(tmp_path):
    # systemd's soft limit is 1024 (hard 524288): with max_connections = 10000 the proxy ran out of
    # descriptors at about 1000 clients. Go raises the soft limit to the hard one for every program.
    _, allowed = resource.getrlimit(resource.RLIMIT_NOFILE)
    hard = 4096 if allowed == resource.RLIM_INFINITY else min(allowed, 4096)
    if hard <= 256:
        pytest.skip("the hard limit on open files here is too low to test raising the soft one")
    port = free_port()
    path = write_config(tmp_path, one_backend_config(f'listen = "127.0.0.1:{port}"'))
    with open(tmp_path / "stderr", "w") as err:
        process = subprocess.Popen(pyproxy_command() + ["-c", str(path)], stdout=subprocess.DEVNULL, stderr=err,
                                   preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)))
    try:
        assert wait_for_port(port, process, time.monotonic() + 15), (tmp_path / "stderr").read_text()
        assert open_files_limit(process.pid) == (hard, hard)
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=EXIT_TIMEOUT) == 0
    assert (f"server.max_connections 10000 may need 20000 open files; the limit here is {hard}"
            in (tmp_path / "stderr").read_text())


# ---------------------------------------------------------------------------------------------
# Config errors
# ---------------------------------------------------------------------------------------------

BAD_CONFIG = """\
[server]
listen = "127.0.0.1:8080"
lisen = 1

[[routes]]
path = "/"
upstream = "ap"

[upstreams.api]
servers = ["127.0.0.1:99999"]
"""


def expected_problems(path: Path) -> list[str]:
    return [
        f"{path}: server.lisen: unknown key (did you mean 'listen'?)",
        f'{path}: routes[0].upstream: upstream "ap" is not defined (did you mean \'api\'?)',
        f'{path}: upstreams.api.servers[0]: "127.0.0.1:99999" is not a valid address (port must be 1-65535)',
    ]


@pytest.mark.parametrize("command", [["check", "-c"], ["-c"]], ids=["check", "run"])
def test_invalid_config_lists_every_problem_and_exits_1(tmp_path, command):
    path = write_config(tmp_path, BAD_CONFIG)
    result = run_cli(*command, str(path))
    assert result.returncode == 1
    assert result.stderr.splitlines() == expected_problems(path)
    assert result.stdout == ""


def test_invalid_toml_names_line_and_column(tmp_path):
    path = write_config(tmp_path, "[server\n")
    result = run_cli("check", str(path))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"{path}: line 1, column 8: invalid TOML: Expected ']' at the end of a table declaration"]


def test_missing_config_file_is_one_line(tmp_path):
    path = tmp_path / "nope.toml"
    result = run_cli("-c", str(path))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"{path}: cannot read the config file (No such file or directory)"]


# ---------------------------------------------------------------------------------------------
# check / init / --version
# ---------------------------------------------------------------------------------------------

def test_check_prints_the_routing_table_most_specific_first(tmp_path):
    path = write_config(tmp_path, ROUTING_CONFIG.format(port=8080, api="127.0.0.1:3001",
                                                        web1="127.0.0.1:3002", web2="127.0.0.1:3003"))
    result = run_cli("check", "-c", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"{path}: OK",
        "listen: 127.0.0.1:8080 (1 worker)",
        "admin: off",
        "routes (most specific first):",
        "  1. api.test / -> api (round_robin)",
        "       127.0.0.1:3001  weight 1",
        "       health: not checked",
        "  2. (any host) /api (strip prefix) -> api (round_robin)",
        "       127.0.0.1:3001  weight 1",
        "       health: not checked",
        "  3. (any host) /web -> web (round_robin)",
        "       127.0.0.1:3002  weight 1",
        "       127.0.0.1:3003  weight 1",
        "       health: not checked",
    ]


def test_check_accepts_the_file_as_an_argument_and_defaults_to_proxy_toml(tmp_path):
    assert run_cli("init", cwd=tmp_path).returncode == 0
    by_argument = run_cli("check", "proxy.toml", cwd=tmp_path)
    by_default = run_cli("check", cwd=tmp_path)
    assert by_argument.returncode == by_default.returncode == 0
    assert by_argument.stdout == by_default.stdout
    assert by_default.stdout.startswith("proxy.toml: OK\n")


@pytest.mark.parametrize("example", ["demo.toml", "dev-routing.toml", "production.toml"])
def test_example_configs_pass_check(example):
    result = run_cli("check", "-c", f"configs/{example}")
    assert result.returncode == 0, result.stderr


def test_init_writes_a_config_that_check_accepts(tmp_path):
    path = tmp_path / "starter.toml"
    result = run_cli("init", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == f"wrote {path}"
    assert path.read_text().startswith("# pyproxy configuration")
    checked = run_cli("check", "-c", str(path))
    assert checked.returncode == 0, checked.stderr
    assert "(any host) / -> app (round_robin)" in checked.stdout


def test_init_refuses_to_overwrite_without_force(tmp_path):
    path = tmp_path / "proxy.toml"
    path.write_text("# mine\n")
    result = run_cli("init", str(path))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"{path} already exists; use --force to overwrite it"]
    assert path.read_text() == "# mine\n"
    forced = run_cli("init", "--force", str(path))
    assert forced.returncode == 0, forced.stderr
    assert path.read_text().startswith("# pyproxy configuration")


def test_init_into_a_missing_directory_is_one_line(tmp_path):
    path = tmp_path / "no" / "such" / "proxy.toml"
    result = run_cli("init", str(path))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"cannot write {path}: No such file or directory"]


def test_version():
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout == f"pyproxy {proxy.__version__}\n"


def test_help_shows_both_ways_to_run():
    result = run_cli("--help")
    assert result.returncode == 0
    for text in ("pyproxy -c proxy.toml", "--from", "--to", "--route", "check", "init"):
        assert text in result.stdout


def test_no_arguments_prints_help_and_exits_2():
    result = run_cli()
    assert result.returncode == 2
    assert "Usage:" in result.stdout


# ---------------------------------------------------------------------------------------------
# Without a config file: --from / --to / --route
# ---------------------------------------------------------------------------------------------

def test_from_to_balances_round_robin_across_targets(tmp_path, json_backends):
    first, second = json_backends("one"), json_backends("two")
    args = lambda port: ["--from", f"127.0.0.1:{port}", "--to", first, "--to", second]  # noqa: E731
    with proxy_running(tmp_path, args) as running:
        names = [running.get(f"/some/path?{n}").json()["name"] for n in range(4)]
        assert sorted(names) == ["one", "one", "two", "two"]
        assert all(a != b for a, b in zip(names, names[1:])), names
        assert running.get("/deep/path").json()["path"] == "/deep/path"


def test_route_maps_hosts_and_path_prefixes(tmp_path, json_backends):
    app, api = json_backends("app"), json_backends("api")
    args = lambda port: ["--from", f"127.0.0.1:{port}", "--route", f"app.localhost={app}",  # noqa: E731
                         "--route", f"/api={api}"]
    with proxy_running(tmp_path, args) as running:
        assert running.get("/", headers={"Host": f"app.localhost:{running.port}"}).json()["name"] == "app"
        seen = running.get("/api/users")
        assert seen.json() == {"name": "api", "path": "/api/users", "host": f"127.0.0.1:{running.port}"}
        assert running.get("/elsewhere").status_code == 404
        # the routing table is shown at startup, so the user sees what maps where
        assert "app.localhost / -> " in running.stderr()


def test_route_and_to_together_send_the_rest_to_the_targets(tmp_path, json_backends):
    api, rest = json_backends("api"), json_backends("rest")
    args = lambda port: ["--from", f"127.0.0.1:{port}", "--route", f"/api={api}", "--to", rest]  # noqa: E731
    with proxy_running(tmp_path, args) as running:
        assert running.get("/api/x").json()["name"] == "api"
        assert running.get("/x").json()["name"] == "rest"


@pytest.mark.parametrize("args, problems", [
    (["--from", ":8080", "--route", "/api=127.0.0.1:99999"],
     ['command line: --route /api=127.0.0.1:99999: "127.0.0.1:99999" is not a valid address (port must be 1-65535)']),
    (["--from", ":8080"],
     ["command line: nothing to proxy to: give --to ADDRESS or --route KEY=ADDRESS"]),
    (["--from", "nonsense", "--to", "127.0.0.1:3000"],
     ['command line: --from nonsense: "nonsense" is not a valid address (missing port, e.g. "127.0.0.1:8080")']),
    (["--from", "", "--to", "127.0.0.1:3000"],   # not the default address: an empty variable in a script
     ['command line: --from : "" is not a valid address (missing port, e.g. "127.0.0.1:8080")']),
])
def test_quick_mode_errors_exit_1_naming_the_option(args, problems):
    result = run_cli(*args)
    assert result.returncode == 1
    assert result.stderr.splitlines() == problems


@pytest.mark.parametrize("args, message", [
    (["--route", "app.localhost"], "is not KEY=ADDRESS"),
    (["-c", "proxy.toml", "--to", "127.0.0.1:3000"], "use either -c FILE or --from/--to/--route, not both"),
    (["--to", "127.0.0.1:3000", "--watch"], "--watch needs a config file"),
])
def test_contradictory_command_lines_are_usage_errors(args, message):
    result = run_cli(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------
# scripts/demo_backend.py and scripts/demo
# ---------------------------------------------------------------------------------------------

def test_demo_backend_names_itself_and_keeps_connections_alive():
    process = subprocess.Popen([sys.executable, str(REPO / "scripts" / "demo_backend.py"), "--name", "backend 7",
                                "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready = process.stdout.readline()  # printed once it listens: the readiness signal
        assert ready.startswith("ready http://127.0.0.1:"), ready
        port = int(ready.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            replies = read_responses(sock, 2)
        assert replies[0].startswith(b"HTTP/1.1 200 ")
        assert replies[0].endswith(f"hello from backend 7 (port {port})\n".encode())
        assert replies[1].startswith(b"HTTP/1.1 200 ") and replies[1].endswith(b"\r\n\r\nok\n")
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=EXIT_TIMEOUT) == 0
        process.stdout.close()
        process.stderr.close()


def read_responses(sock: socket.socket, count: int) -> list[bytes]:
    """`count` Content-Length-framed responses from one connection (the demo backend always sends one)."""
    buffer, replies = b"", []
    while len(replies) < count:
        head_end = buffer.find(b"\r\n\r\n")
        if head_end >= 0:
            head = buffer[:head_end].decode("latin-1").lower()
            length = int(head.split("content-length:")[1].split("\r\n")[0])
            total = head_end + 4 + length
            if len(buffer) >= total:
                replies.append(buffer[:total])
                buffer = buffer[total:]
                continue
        chunk = sock.recv(65536)
        assert chunk, "the backend closed the connection: no keep-alive"
        buffer += chunk
    return replies


def free_ports(count: int) -> list[int]:
    """Distinct free ports: all bound at once, then released."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


@pytest.mark.skipif(shutil.which("bash") is None, reason="scripts/demo is a bash script")
@pytest.mark.skipif(sys.prefix == sys.base_prefix, reason="scripts/demo installs into a venv; run the tests from one")
@pytest.mark.timeout(300)
def test_demo_check_shows_both_backends_and_leaves_nothing_running():
    proxy_port, admin_port, port1, port2 = free_ports(4)
    env = dict(os.environ, PYPROXY_VENV=sys.prefix, DEMO_PORTS=f"{proxy_port} {admin_port} {port1} {port2}")
    # generous: a changed pyproject.toml makes the script reinstall the project with pip
    result = subprocess.run([str(REPO / "scripts" / "demo"), "--check"], capture_output=True, text=True,
                            env=env, timeout=240, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"try  curl http://127.0.0.1:{proxy_port}/" in result.stdout
    assert f"hello from backend 1 (port {port1})" in result.stdout
    assert f"hello from backend 2 (port {port2})" in result.stdout
    for port in (proxy_port, admin_port, port1, port2):
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", port)) != 0, f"something still listens on {port}"


def test_certificate_and_key_that_do_not_match_is_a_config_error(tmp_path):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert_a, cert_b = ca.issue_cert("a.test"), ca.issue_cert("b.test")
    cert_a.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    cert_b.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    port = free_port()
    path = write_config(tmp_path, f'''
[server]
listen = [{{ address = "127.0.0.1:{port}", tls_cert = "cert.pem", tls_key = "key.pem" }}]
[[routes]]
upstream = "x"
[upstreams.x]
servers = ["127.0.0.1:1"]
''')
    result = run_cli("-c", str(path))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith(f"{path}: server.listen 127.0.0.1:{port}: tls_cert/tls_key cannot be loaded")


@pytest.mark.skipif(shutil.which("script") is None, reason="needs util-linux 'script' to give the proxy a terminal")
def test_access_log_on_a_terminal_is_coloured_and_aligned(tmp_path, json_backends):
    """`script` runs pyproxy on a pseudo-terminal, as a developer's shell would."""
    import shlex
    target = json_backends("one")
    port = free_port()
    typescript = tmp_path / "terminal.out"
    command = shlex.join(pyproxy_command() + ["--from", f"127.0.0.1:{port}", "--to", target])
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    process = subprocess.Popen(["script", "-qfec", command, str(typescript)], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True, env=env, cwd=REPO)
    try:
        assert wait_for_port(port, process, time.monotonic() + EXIT_TIMEOUT), "proxy did not start"
        assert requests.get(f"http://127.0.0.1:{port}/hello", timeout=10).status_code == 200
        deadline = time.monotonic() + EXIT_TIMEOUT
        while "/hello" not in typescript.read_text(errors="replace") and time.monotonic() < deadline:
            time.sleep(POLL_INTERVAL)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=EXIT_TIMEOUT)
    line = next(l for l in typescript.read_text(errors="replace").splitlines() if "/hello" in l)
    assert "\033[32m200\033[0m" in line  # 2xx in green
    assert f"→ {target}" in line and line.rstrip().endswith("ms")
    assert '"GET /hello HTTP/1.1"' not in line  # not the combined format meant for files and pipes


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
    for value in ("0", "two", "-1", "100000"):
        result = run_cli("-c", str(path), "--workers", value)
        assert result.returncode == 2, result.stderr
        assert "--workers" in result.stderr and "auto" in result.stderr


@pytest.mark.parametrize("workers", ["1", "2"])
def test_access_log_that_cannot_be_opened_stops_the_start_with_one_line(tmp_path, workers):
    # /proc refuses new files even to root, so this holds whoever runs the tests.
    listen = f'listen = "127.0.0.1:{free_port()}"'
    text = one_backend_config(listen, log='access = "/proc/pyproxy-audit.log"')
    path = write_config(tmp_path, text)
    result = run_cli("-c", str(path), "--workers", workers)
    assert_one_line_problem(result, "pyproxy: cannot open the access log /proc/pyproxy-audit.log")
    assert "listening on" not in result.stderr


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
