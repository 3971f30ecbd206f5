"""The real ``pyproxy`` command, run as a user would: ``run_cli`` for a command that exits
(``pyproxy check``, a refused start), ``proxy_running`` for a proxy that serves until the block ends.

The proxy listens on a port picked by binding port 0 and closing it (a subprocess cannot be handed a
socket portably); if another process takes it in between, the proxy exits with "address already in
use" and the start is retried once on a new port.

    def args_for_port(port):
        return ["-c", str(write_config(tmp_path, one_backend_config(f'listen = "127.0.0.1:{port}"', backend)))]

    with proxy_running(tmp_path, args_for_port) as running:
        running.get("/"), running.stderr(), running.process
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

from tests.support.ports import free_port
from tests.support.processes import REPO

READY_TIMEOUT = 15.0   # seconds for a subprocess to start answering
EXIT_TIMEOUT = 15.0    # seconds for a subprocess to exit after SIGTERM or on its own
POLL_INTERVAL = 0.02


def pyproxy_command() -> list[str]:
    """The installed console script next to this interpreter, else the module."""
    script = shutil.which("pyproxy", path=os.path.dirname(sys.executable))
    return [script] if script else [sys.executable, "-m", "proxy.serve.cli"]


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(pyproxy_command() + list(args), capture_output=True, text=True,
                          timeout=EXIT_TIMEOUT, cwd=cwd or REPO)


def wait_for_port(port: int, process: subprocess.Popen, deadline: float) -> bool:
    """True once 127.0.0.1:port accepts; False if the process exits first. Bounded by deadline."""
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(POLL_INTERVAL)
    raise AssertionError(f"nothing answered on port {port} within {READY_TIMEOUT}s")


# -- the proxy as a subprocess ------------------------------------------------------------------
class CommandProxy:
    def __init__(self, process: subprocess.Popen, port: int, log_dir: Path):
        self.process = process
        self.port = port
        self.log_dir = log_dir
        self.session = requests.Session()

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def get(self, path: str, **kwargs) -> requests.Response:
        return self.session.get(self.url(path), timeout=10, **kwargs)

    def stderr(self) -> str:
        return (self.log_dir / "stderr").read_text()

    def terminate(self) -> int:
        """SIGTERM (graceful drain) and the exit code."""
        self.session.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=EXIT_TIMEOUT)
            raise AssertionError("pyproxy did not exit within the graceful timeout after SIGTERM")


def start_proxy(tmp_path: Path, args_for_port) -> CommandProxy:
    """Start `pyproxy <args_for_port(port)>` and wait until it accepts; one retry on EADDRINUSE."""
    for attempt in range(2):
        port = free_port()
        log_dir = tmp_path / f"proxy-{attempt}"
        log_dir.mkdir()
        # Files, not pipes: an access log nobody reads must not fill a pipe and block the proxy.
        with open(log_dir / "stdout", "w") as out, open(log_dir / "stderr", "w") as err:
            process = subprocess.Popen(pyproxy_command() + args_for_port(port), stdout=out, stderr=err,
                                       cwd=tmp_path)
        running = CommandProxy(process, port, log_dir)
        if wait_for_port(port, process, time.monotonic() + READY_TIMEOUT):
            return running
        process.wait(timeout=EXIT_TIMEOUT)
        if "address already in use" not in running.stderr():
            raise AssertionError(f"pyproxy exited with {process.returncode}:\n{running.stderr()}")
    raise AssertionError("two free ports were taken before pyproxy could bind them")


@contextlib.contextmanager
def proxy_running(tmp_path: Path, args_for_port):
    running = start_proxy(tmp_path, args_for_port)
    try:
        yield running
    finally:
        code = running.terminate()
        assert code == 0, running.stderr()
        assert "Traceback" not in running.stderr(), running.stderr()


def write_config(tmp_path: Path, text: str, name: str = "proxy.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# -- config text and what a refused one prints ----------------------------------------------------------
BACKEND_ROUTE = """\
[[routes]]
path = "/"
upstream = "web"

[upstreams.web]
servers = ["{backend}"]
"""


def one_backend_config(server: str, backend: str = "127.0.0.1:3000", log: str = 'access = "off"',
                       extra: str = "") -> str:
    """TOML text: ``server`` lines under [server], ``log`` under [log], ``extra`` tables, one route."""
    return f"[server]\n{server}\n\n[log]\n{log}\n\n{extra}\n{BACKEND_ROUTE.format(backend=backend)}"


def assert_one_line_problem(result, *fragments: str) -> None:
    """Exit 1, no traceback, and every fragment on the error output."""
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


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
