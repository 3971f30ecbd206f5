"""The proxy as a subprocess, ``python -m proxy.serve.cli -c FILE``: signals reach a real process and
its memory and worker processes can be read from /proc.

    with named_backends("a") as (a,), running_proxy(tmp_path, proxy_config(free_port(), a.address)) as run:
        run.url, run.port, run.proc, run.log(), run.signal(signal.SIGHUP), run.rewrite(new_text)

With ``server.workers`` > 1, ``children`` lists the worker PIDs (/proc) and ``admin_status`` reads the
supervisor's merged /status. Every wait is a readiness poll with a deadline.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from proxy.config.schema import load_config
from tests.support.ports import free_port, port_open
from tests.support.timing import wait_for

REPO = Path(__file__).resolve().parent.parent.parent
START_TIMEOUT = 10.0   # the proxy must accept connections within this
EXIT_TIMEOUT = 15.0    # and exit within this after the last signal
MAX_SPREAD_REQUESTS = 600  # fresh-connection requests sent at most until every worker has served one


def proxy_config(port: int, upstream_address: str, *, graceful: str = "10s", workers: int = 1,
                 admin_port: int | None = None, extra_routes: str = "") -> str:
    """TOML text: one upstream "app" behind a catch-all route (plus ``extra_routes``)."""
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
        config = load_config(self.config_path)
        self.port = config.server.listen[0].port
        self.admin_port = config.admin.listen.port if config.admin is not None else None
        self.proc = subprocess.Popen([sys.executable, "-m", "proxy.serve.cli", "-c", str(self.config_path), *args],
                                     cwd=REPO, stdout=subprocess.DEVNULL, stderr=self._log)
        wait_for(self._accepting, START_TIMEOUT, what="the proxy to accept connections")
        # The port accepts before the loop runs; signal handlers are installed just before it does. A
        # request answered means the loop runs, so a signal from here on is handled, not fatal.
        wait_for(self._answers, START_TIMEOUT, what="the proxy to answer", on_timeout=self.log)
        if self.admin_port is not None:
            # With workers, the supervisor binds [admin] after it forked them: a worker may answer first.
            wait_for(lambda: port_open(self.admin_port), START_TIMEOUT, what="the admin listener",
                     on_timeout=self.log)

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


@contextlib.contextmanager
def running_proxy(tmp_path, config_text, *args):
    run = ProxyRun(tmp_path, config_text, *args)
    try:
        yield run
    finally:
        run.close()


# -- traffic -----------------------------------------------------------------------------------------
def answered_by(url: str) -> str:
    """The name of the ``NamedBackend`` that answered a GET of ``url`` (which must be a 200)."""
    response = requests.get(url, timeout=5)
    assert response.status_code == 200, response.text
    return response.headers["X-Backend"]


class Load:
    """``clients`` keep-alive sessions sending GETs until stopped (bounded by ``max_seconds``)."""

    def __init__(self, url: str, clients: int = 4, max_seconds: float = 20.0):
        self.url = url
        self.results: list[tuple[float, str]] = []  # (when the request started, backend name or "ERROR: ...")
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._deadline = time.monotonic() + max_seconds
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]
        for thread in self._threads:
            thread.start()

    def _client(self) -> None:
        with requests.Session() as session:
            while not self._stop.is_set() and time.monotonic() < self._deadline:
                started = time.monotonic()
                try:
                    response = session.get(self.url, timeout=5)
                    outcome = response.headers.get("X-Backend", f"ERROR: {response.status_code}")
                    if response.status_code != 200:
                        outcome = f"ERROR: {response.status_code}"
                except requests.RequestException as exc:
                    outcome = f"ERROR: {exc}"
                with self._lock:
                    self.results.append((started, outcome))

    def outcomes(self) -> list[str]:
        with self._lock:
            return [outcome for _, outcome in self.results]

    def outcomes_started_since(self, moment: float) -> list[str]:
        """Outcomes of the requests that started at ``moment`` (time.monotonic()) or later: a request
        already in flight then is left out, wherever it ended up."""
        with self._lock:
            return [outcome for started, outcome in self.results if started >= moment]

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


# -- worker processes ------------------------------------------------------------------------------
def children(pid: int) -> set[int]:
    """Live child PIDs of ``pid`` (Linux /proc, CONFIG_PROC_CHILDREN)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return {int(p) for p in path.read_text().split()} if path.exists() else set()


def admin_status(admin_port: int) -> dict:
    """The admin listener's /status (with workers: the supervisor's view merged over them)."""
    response = requests.get(f"http://127.0.0.1:{admin_port}/status", timeout=5)
    response.raise_for_status()
    return response.json()


def spread_requests(url: str, admin_port: int, workers: int) -> dict[int, int]:
    """Fresh connections, 16 at a time, until each of ``workers`` served some (the kernel picks the
    accepting process, so it takes a burst); returns {pid: requests_total}."""
    def one(_):
        with requests.Session() as session:  # one connection per request
            return session.get(url, timeout=5).status_code

    per_pid: dict[int, int] = {}
    with ThreadPoolExecutor(16) as pool:
        for _ in range(MAX_SPREAD_REQUESTS // 64):
            assert set(pool.map(one, range(64))) == {200}
            per_pid = {w["pid"]: w["requests_total"] for w in admin_status(admin_port)["workers"]}
            if len(per_pid) == workers and all(per_pid.values()):
                break
    return per_pid


def replaced(admin_port: int, victim: int) -> bool:
    pids = [w["pid"] for w in admin_status(admin_port)["workers"]]
    return len(pids) == 2 and victim not in pids


WORKERS = 2


def workers_config(backend_address: str, graceful: str = "10s"):
    port, admin_port = free_port(), free_port()
    return port, admin_port, proxy_config(port, backend_address, workers=WORKERS, admin_port=admin_port,
                                          graceful=graceful)


def ready_workers(run) -> int:
    return run.log().count(") ready")


def proc_status(pid: int, field: str) -> int:
    """A number from /proc/PID/status: "VmRSS", "VmHWM" (KiB), "Threads"."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{pid}/status")
