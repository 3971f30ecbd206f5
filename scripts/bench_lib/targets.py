"""The run's lab: a temporary directory, the shared backends, and one target per proxy.

A target is something wrk points at: `direct` (the first backend port), `nginx`, `haproxy`,
`pyproxy`. A proxy that does not come up becomes a target with `failure` set, and the run goes on.
"""

from __future__ import annotations

import http.client
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import configs
from .procs import ManagedProcess, StartError, start_process, stop_process, wait_until
from .system import free_port, say

READY_TIMEOUT_S = 20.0
PROBE_TIMEOUT_S = 2.0
TARGET_NAMES = ("direct", "nginx", "haproxy", "pyproxy")


class Lab:
    """Owns the temporary directory and every process started; stops them all on exit."""

    def __init__(self, keep_files: bool) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="pyproxy-bench-"))
        os.chmod(self.root, 0o755)  # nginx workers run as an unprivileged user when we are root
        self.keep_files = keep_files
        self.processes: list[ManagedProcess] = []

    def __enter__(self) -> "Lab":
        return self

    def __exit__(self, *exc_info: object) -> None:
        for process in reversed(self.processes):
            stop_process(process)
        if self.keep_files:
            say(f"kept configs and logs in {self.root}")
        else:
            shutil.rmtree(self.root, ignore_errors=True)

    def layout(self, name: str) -> configs.Layout:
        layout = configs.Layout(self.root, name)
        layout.work_dir.mkdir(exist_ok=True)
        return layout

    def start(self, name: str, argv: list[str], cwd: Path | None = None) -> ManagedProcess:
        process = start_process(name, argv, self.root, cwd)
        self.processes.append(process)
        return process

    def stop(self, process: ManagedProcess) -> None:
        stop_process(process)
        self.processes.remove(process)


@dataclass
class Target:
    name: str
    port: int = 0
    process: ManagedProcess | None = None
    failure: str | None = None
    restart: Callable[[], "Target"] | None = field(default=None, repr=False)
    restarts: int = 0


@dataclass(frozen=True)
class Backends:
    ports: list[int]
    process: ManagedProcess


def start_backends(lab: Lab, tools: dict[str, str], workers: int) -> Backends:
    layout = lab.layout("backend")
    www = lab.root / "www"
    www.mkdir()
    configs.write_www(www)
    ports = [free_port(), free_port()]
    while ports[1] == ports[0]:  # bounded in practice: the kernel hands out distinct ports
        ports[1] = free_port()
    layout.config.write_text(configs.backend_nginx(layout, ports, www, workers))
    process = lab.start("backend", _nginx_argv(tools["nginx"], layout))
    for port in ports:
        wait_ready(process, port)
    return Backends(ports, process)


def _nginx_argv(nginx: str, layout: configs.Layout) -> list[str]:
    return [nginx, "-p", str(layout.work_dir), "-e", str(layout.work_dir / "error.log"),
            "-c", str(layout.config)]


def start_target(name: str, lab: Lab, backends: Backends, tools: dict[str, str],
                 workers: int, repo: Path) -> Target:
    """Start one target; never raises for a target that fails to come up."""
    if name == "direct":  # the backend itself: measured but not owned by this target
        return Target("direct", backends.ports[0], backends.process)
    starters = {"nginx": _start_nginx, "haproxy": _start_haproxy, "pyproxy": _start_pyproxy}
    port = free_port()
    try:
        process = starters[name](lab, port, backends.ports, tools, workers, repo)
    except (StartError, OSError) as error:
        say(f"{name}: failed to start: {error}")
        return Target(name, port, failure=f"failed to start: {error}")
    target = Target(name, port, process)
    target.restart = lambda: start_target(name, lab, backends, tools, workers, repo)
    return target


def _start_nginx(lab: Lab, port: int, backend_ports: list[int], tools: dict[str, str],
                 workers: int, repo: Path) -> ManagedProcess:
    layout = lab.layout("nginx")
    layout.config.write_text(configs.nginx_proxy(layout, port, backend_ports, workers))
    return _start_and_wait(lab, "nginx", _nginx_argv(tools["nginx"], layout), port)


def _start_haproxy(lab: Lab, port: int, backend_ports: list[int], tools: dict[str, str],
                   workers: int, repo: Path) -> ManagedProcess:
    layout = lab.layout("haproxy")
    layout.config.write_text(configs.haproxy(port, backend_ports, workers))
    # -db: stay in the foreground, no daemon, so the process group is ours to stop.
    return _start_and_wait(lab, "haproxy", [tools["haproxy"], "-db", "-f", str(layout.config)], port)


def _start_pyproxy(lab: Lab, port: int, backend_ports: list[int], tools: dict[str, str],
                   workers: int, repo: Path) -> ManagedProcess:
    layout = lab.layout("pyproxy")
    layout.config.write_text(configs.pyproxy(port, backend_ports, workers))
    argv = pyproxy_command(repo) + ["-c", str(layout.config), "--workers", str(workers)]
    return _start_and_wait(lab, "pyproxy", argv, port, cwd=repo)


def pyproxy_command(repo: Path) -> list[str]:
    """The repo's venv entry point, else `pyproxy` on PATH, else `python -m proxy.cli`."""
    venv_entry = repo / ".venv" / "bin" / "pyproxy"
    if os.access(venv_entry, os.X_OK):
        return [str(venv_entry)]
    on_path = shutil.which("pyproxy")
    if on_path:
        return [on_path]
    venv_python = repo / ".venv" / "bin" / "python"
    python = str(venv_python) if os.access(venv_python, os.X_OK) else sys.executable
    return [python, "-m", "proxy.cli"]


def _start_and_wait(lab: Lab, name: str, argv: list[str], port: int,
                    cwd: Path | None = None) -> ManagedProcess:
    process = lab.start(name, argv, cwd)
    try:
        wait_ready(process, port)
    except StartError:
        lab.stop(process)
        raise
    return process


def wait_ready(process: ManagedProcess, port: int, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Ready means GET /small answers 200 with the 16-byte body; raise StartError otherwise."""
    last_problem = ["no answer yet"]

    def ready() -> bool:
        if not process.alive():
            return True  # stop polling; reported below
        problem = probe_small(port)
        last_problem[0] = problem or ""
        return problem is None

    wait_until(ready, timeout_s)
    if not process.alive():
        raise StartError(process.exit_reason())
    if last_problem[0]:
        raise StartError(f"not ready on 127.0.0.1:{port} after {timeout_s:.0f}s: {last_problem[0]}")


def probe_small(port: int) -> str | None:
    """None if GET /small works through this port, else what went wrong."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=PROBE_TIMEOUT_S)
    try:
        connection.request("GET", "/small")
        response = connection.getresponse()
        body = response.read()
    except (OSError, http.client.HTTPException) as error:
        return f"{type(error).__name__}: {error}"
    finally:
        connection.close()
    if response.status != 200 or body != configs.SMALL_BODY.encode():
        return f"GET /small returned {response.status} with {len(body)} bytes"
    return None


def ensure_running(target: Target) -> Target:
    """Restart a target whose process died since the last scenario (and count it)."""
    if target.failure or target.process is None or target.process.alive():
        return target
    reason = target.process.exit_reason()
    say(f"{target.name}: {reason}; restarting it")
    if target.restart is None:
        return Target(target.name, target.port, failure=f"died: {reason}")
    restarted = target.restart()
    restarted.restarts = target.restarts + 1
    return restarted
