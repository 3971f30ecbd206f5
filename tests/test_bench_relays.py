"""The bench's calibration relays (scripts/bench_lib/relays.py) and how the harness runs them.

Each relay mode runs as a subprocess (as the bench starts it) between `requests` and two real raw
backends on port 0. The harness parts (target selection, the scenarios they take part in, the
table's ratios) are tested as pure functions. No test in tests/ imported scripts/bench_lib before
this one; it is put on sys.path here, as scripts/bench itself does.
"""

from __future__ import annotations

import importlib.machinery
import json
import importlib.util
import os
import selectors
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import requests

SCRIPTS_DIR = Path(__file__).resolve().parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS_DIR))

from bench_lib import configs, relays, report  # noqa: E402
from bench_lib.configs import SMALL_BODY, ProxyShape  # noqa: E402
from bench_lib.procs import StartError  # noqa: E402
from bench_lib.scenarios import SCENARIOS, Measurement, takes_part, worker_split  # noqa: E402
from bench_lib.targets import RELAY_MODES, install_python_pyproxy, relay_command, worker_counts  # noqa: E402

START_TIMEOUT_S = 5.0
CLIENT_TIMEOUT_S = 5.0
STOP_TIMEOUT_S = 5.0
SMALL_RESPONSE = (f"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {len(SMALL_BODY)}\r\n"
                  f"Connection: keep-alive\r\n\r\n{SMALL_BODY}").encode()
KEEPALIVE_REQUESTS = 5


def serve_small(heads: list[bytes]):
    """A raw backend script: answer every request on the connection with the 16-byte /small."""
    def script(peer) -> None:
        while True:  # bounded by the relay closing the connection (or the backend's socket timeout)
            head, _ = peer.read_request()
            if not head:
                return
            heads.append(head)
            peer.send(SMALL_RESPONSE)
    return script


def start_relay(mode: str, backend_ports: list[int]) -> tuple[subprocess.Popen, int]:
    """The relay on port 0; its first line of output says where it listens."""
    upstreams = ",".join(f"127.0.0.1:{port}" for port in backend_ports)
    process = subprocess.Popen([sys.executable, str(relays.__file__), "--mode", mode, "--port", "0",
                                "--upstream", upstreams], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        ready = selector.select(START_TIMEOUT_S)
    line = process.stdout.readline().decode() if ready else ""
    if "127.0.0.1:" not in line:
        process.kill()
        _, errors = process.communicate(timeout=STOP_TIMEOUT_S)
        pytest.fail(f"relay {mode} did not start: {line!r} {errors.decode()}")
    return process, int(line.rsplit(":", 1)[1])


def get_with_close_raw(port: int) -> tuple[bytes, bool]:
    """(everything received, whether the relay closed the connection after the response)."""
    with socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT_S) as sock:
        sock.sendall(b"GET /small HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        received = b""
        while len(received) < len(SMALL_RESPONSE) * 4:  # bounded: a closed relay sends b""
            chunk = sock.recv(65536)
            if not chunk:
                return received, True
            received += chunk
    return received, False


@pytest.mark.timeout(30)
@pytest.mark.parametrize("mode", sorted(relays.MODES))
def test_relay_keeps_alive_closes_on_request_and_stops_on_sigterm(mode, make_raw_backend):
    heads: list[bytes] = []
    backends = [make_raw_backend(serve_small(heads)), make_raw_backend(serve_small(heads))]
    process, port = start_relay(mode, [backend.port for backend in backends])
    try:
        with requests.Session() as session:
            for _ in range(KEEPALIVE_REQUESTS):
                response = session.get(f"http://127.0.0.1:{port}/small", timeout=CLIENT_TIMEOUT_S)
                assert (response.status_code, response.text) == (200, SMALL_BODY)
            closing = requests.get(f"http://127.0.0.1:{port}/small", headers={"Connection": "close"},
                                   timeout=CLIENT_TIMEOUT_S)
            assert (closing.status_code, closing.text) == (200, SMALL_BODY)
            assert closing.headers["Connection"] == "close"
            received, closed = get_with_close_raw(port)
            assert received.endswith(SMALL_BODY.encode()) and b"\r\nConnection: close\r\n" in received
            assert closed, "the relay must close the connection after a Connection: close request"
            # SIGTERM while the session's keep-alive connection is still open.
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=STOP_TIMEOUT_S) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT_S)
        process.stdout.close()
        process.stderr.close()
    assert len(heads) == KEEPALIVE_REQUESTS + 2
    assert not any(b"close" in head.lower() for head in heads), "Connection: close must not go upstream"
    assert all(backend.connections for backend in backends), "both backends take turns"
    assert sum(backend.connections for backend in backends) < len(heads), "upstream keep-alive"


def test_take_message_waits_for_the_whole_message_at_every_split_point():
    message = b"POST /upload HTTP/1.1\r\nHost: x\r\ncontent-LENGTH:  5\r\n\r\nhello"
    for split in range(len(message)):
        buffer = bytearray(message[:split])
        assert relays.take_message(buffer) is None
        buffer += message[split:] + b"GET / HTTP/1.1\r\n"
        assert relays.take_message(buffer) == message
        assert buffer == b"GET / HTTP/1.1\r\n"


def test_take_message_refuses_an_endless_head():
    with pytest.raises(relays.RelayError):
        relays.take_message(bytearray(b"x" * (relays.MAX_HEAD_BYTES + 1)))


def test_connection_header_is_removed_upstream_and_announced_to_the_client():
    request = b"GET /small HTTP/1.1\r\nHost: x\r\nConnection: Close\r\n\r\n"
    assert relays.asks_close(request)
    assert relays.without_connection(request) == b"GET /small HTTP/1.1\r\nHost: x\r\n\r\n"
    response = b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok"
    assert not relays.asks_close(response)
    assert relays.announcing_close(response) == (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")


def load_bench_script():
    """scripts/bench has no .py suffix, so it is loaded by path (its main() does not run)."""
    loader = importlib.machinery.SourceFileLoader("bench_script", str(SCRIPTS_DIR / "bench"))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    loader.exec_module(module)
    return module


def test_calibrate_adds_the_relays_once_and_they_are_not_default():
    bench = load_bench_script()
    assert bench.parse_args([]).target_list == ["direct", "nginx", "haproxy", "pyproxy"]
    args = bench.parse_args(["--targets", "nginx,relay-loop", "--calibrate"])
    assert args.target_list == ["nginx", "relay-loop", "relay-threads", "relay-pool2", "relay-lf2"]
    assert bench.parse_args(["--targets", "relay-pool2"]).target_list == ["relay-pool2"]


def test_relays_take_part_in_the_small_request_scenarios_only():
    taking_part = [s.key for s in SCENARIOS if takes_part(s, "relay-loop")]
    assert taking_part == ["c50", "c1000", "close"]
    assert all(takes_part(s, "pyproxy") for s in SCENARIOS)


def test_relay_command_uses_the_repo_venv_python_when_there_is_one(tmp_path):
    shape = ProxyShape(8000, [9001, 9002], workers=2, keepalive_per_server=32)
    argv = relay_command(tmp_path, "pool2", shape)
    assert argv[0] == sys.executable
    assert argv[2:] == ["--mode", "pool2", "--port", "8000", "--upstream", "127.0.0.1:9001,127.0.0.1:9002"]
    venv_python = tmp_path / ".venv" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    venv_python.write_text("#!/bin/sh\n")
    os.chmod(venv_python, 0o755)
    assert relay_command(tmp_path, "loop", shape)[0] == str(venv_python)


def test_table_shows_relay_ratios_without_a_goal():
    measurements = [Measurement("c50", "nginx", "req/s", value=80_000.0, errors=0),
                    Measurement("c50", "pyproxy", "req/s", value=8_000.0, errors=0),
                    *(Measurement("c50", name, "req/s", value=20_000.0, errors=0) for name in RELAY_MODES)]
    table = report.render_table(measurements)
    relay_lines = [line for line in table.splitlines() if "relay-" in line and "pyproxy" not in line]
    assert len(relay_lines) == len(RELAY_MODES) and all(line.rstrip().endswith("0.25x") for line in relay_lines), table
    pyproxy_line = next(line for line in table.splitlines() if "pyproxy" in line)
    assert "0.40x relay-pool2" in pyproxy_line and "missed" in pyproxy_line  # goal: 0.7x the bare relay
    assert "--workers 2" in report.calibration_note(measurements, workers=2)
    assert report.calibration_note(measurements[:2], workers=1) is None
    ratios = report.calibration_ratios(measurements)
    assert ratios["relay-loop"]["c50"] == {"vs_nginx": 0.25, "vs_haproxy": None}


# -- workers, pyproxy-1w and python-pyproxy ------------------------------------------------------------

def test_workers_add_pyproxy_with_one_worker_right_after_pyproxy():
    bench = load_bench_script()
    assert bench.parse_args(["--workers", "2", "--targets", "nginx,pyproxy,python-pyproxy"]).target_list == [
        "nginx", "pyproxy", "pyproxy-1w", "python-pyproxy"]
    assert bench.parse_args(["--workers", "1", "--targets", "pyproxy"]).target_list == ["pyproxy"]
    assert bench.parse_args(["--workers", "2", "--targets", "nginx"]).target_list == ["nginx"]


def test_pyproxy_config_gets_an_admin_listener_only_with_an_admin_port():
    shape = ProxyShape(8000, [9001, 9002], workers=2, keepalive_per_server=32)
    assert "[admin]" not in configs.pyproxy(shape)
    with_admin = configs.pyproxy(ProxyShape(8000, [9001, 9002], 2, 32, admin_port=8100))
    assert '[admin]\nlisten = "127.0.0.1:8100"' in with_admin
    assert with_admin.index("[admin]") < with_admin.index("[[routes]]")  # not inside [log]


def test_python_pyproxy_config_routes_everything_to_both_backends():
    shape = ProxyShape(8000, [9001, 9002], workers=2, keepalive_per_server=32)
    config = json.loads(configs.python_pyproxy(shape))
    assert (config["server"]["bind_host"], config["server"]["bind_port"]) == ("127.0.0.1", 8000)
    assert config["routes"] == [{"path": "/", "upstream": {"targets": [{"host": "127.0.0.1", "port": 9001},
                                                                        {"host": "127.0.0.1", "port": 9002}]}}]
    assert config["logging"]["access_log"] is False
    assert configs.Layout(Path("/x"), "python-pyproxy").config.suffix == ".json"  # its loader goes by suffix
    assert configs.Layout(Path("/x"), "pyproxy-1w").config.suffix == ".toml"


@pytest.mark.timeout(120)
def test_a_python_pyproxy_that_cannot_be_installed_says_why(tmp_path):
    missing = tmp_path / "python_pyproxy-0.0.0-py3-none-any.whl"  # pip fails on it without the network
    with pytest.raises(StartError, match="pip install .* failed: .*"):
        install_python_pyproxy(tmp_path / "venv", requirement=str(missing))


def test_worker_split_counts_each_slot_and_a_restarted_worker_from_zero():
    assert worker_split({0: 100, 1: 50}, {0: 160, 1: 90}) == [60, 40]
    assert worker_split({0: 100, 1: 50}, {0: 30, 1: 90}) == [30, 40]  # slot 0 restarted: 30 since
    assert worker_split({0: 100}, None) == []
    assert worker_counts(free_tcp_port()) is None  # nothing listening: no split, no exception


def free_tcp_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_table_shows_what_workers_add_and_how_requests_split():
    measurements = [Measurement("c50", "nginx", "req/s", value=20_000.0, errors=0),
                    Measurement("c50", "pyproxy", "req/s", value=9_000.0, errors=0,
                                details={"connections_per_worker": [26, 24], "requests_per_worker": [5_200, 4_800]}),
                    Measurement("c50", "pyproxy-1w", "req/s", value=6_000.0, errors=0),
                    Measurement("c50", "python-pyproxy", "req/s", value=2_000.0, errors=0)]
    table = report.render_table(measurements)
    header, pyproxy_line = table.splitlines()[0], next(l for l in table.splitlines() if " pyproxy " in l)
    assert header.split()[-4:] == ["÷1", "worker", "per", "worker"]
    assert pyproxy_line.rstrip().endswith("1.50x  conns 52/48%, reqs 52/48%"), table
    assert next(l for l in table.splitlines() if "python-pyproxy" in l).rstrip().endswith("0.10x")
    assert "÷1 worker" not in report.render_table(measurements[:1])  # one worker: the table as before
    assert report.split_text([0, 0]) == "" and report.split_text([1, 3]) == "25/75%"


def test_a_run_where_no_request_finished_says_so():
    stuck = Measurement("c1000", "python-pyproxy", "req/s", value=0.0, errors=0, details={"requests": 0})
    assert "none finished in the run" in report.render_table([stuck])
