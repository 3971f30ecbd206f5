"""The run's lab: a temporary directory, the shared backends, and one target per proxy.

A target is something wrk points at: `direct` (the first backend port), `nginx`, `haproxy`,
`pyproxy`, and, only when asked for, the calibration relays `relay-threads`, `relay-pool2`,
`relay-lf2`, `relay-loop` (bench_lib/relays.py: bare Python relays, always one process) and
`python-pyproxy` (the asyncio reverse proxy of that name on PyPI, one process, installed into a
throwaway venv in the run's temp dir: it ships a module and a command also named `pyproxy`).
With --workers N > 1, `pyproxy-1w` (pyproxy with one worker) comes along to show what the workers
add. A proxy that does not come up (or cannot be installed) becomes a target with `failure` set,
and the run goes on.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import venv
from dataclasses import dataclass
from pathlib import Path

from . import configs
from .certificate import CertificateFiles
from .procs import ManagedProcess, StartError, start_process, stop_process, wait_until
from .system import free_port, say

READY_TIMEOUT_S = 20.0
PROBE_TIMEOUT_S = 2.0
TARGET_NAMES = ("direct", "nginx", "haproxy", "pyproxy")  # the default run
# Calibration relays: target name -> relays.py --mode. Run only with --targets/--calibrate.
RELAY_MODES = {"relay-threads": "threads", "relay-pool2": "pool2", "relay-lf2": "lf2", "relay-loop": "loop"}
SINGLE_WORKER = "pyproxy-1w"  # pyproxy with --workers 1, beside pyproxy when --workers is above 1
PYTHON_PYPROXY = "python-pyproxy"  # the PyPI reverse proxy of that name, run only when named
PYTHON_PYPROXY_REQUIREMENT = "python-pyproxy"
INSTALL_TIMEOUT_S = 300.0
STATUS_TIMEOUT_S = 5.0
ALL_TARGET_NAMES = TARGET_NAMES + tuple(RELAY_MODES) + (SINGLE_WORKER, PYTHON_PYPROXY)
# Targets that are one process whatever --workers says (the table notes it).
SINGLE_PROCESS = tuple(RELAY_MODES) + (SINGLE_WORKER, PYTHON_PYPROXY)
# Targets given an HTTPS listener (HTTP/2 and HTTP/1.1 over ALPN) when a TLS scenario runs.
TLS_TARGETS = ("nginx", "haproxy", "pyproxy", SINGLE_WORKER)
RELAYS_SCRIPT = Path(__file__).resolve().parent / "relays.py"
CLEANUP_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


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
        # A second Ctrl-C must not cut the cleanup short; it is delivered once we are done.
        signal.pthread_sigmask(signal.SIG_BLOCK, CLEANUP_SIGNALS)
        try:
            for process in reversed(self.processes):
                stop_process(process)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, CLEANUP_SIGNALS)
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
    admin_port: int = 0  # pyproxy with workers: where /status tells each worker's request count
    tls_port: int = 0  # its HTTPS listener, when a TLS scenario runs


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


@dataclass
class TargetFactory:
    """Starts (and restarts) targets, all with the same backends, workers and keep-alive."""
    lab: Lab
    backends: Backends
    tools: dict[str, str]
    workers: int
    keepalive_per_server: int
    repo: Path
    python_pyproxy_venv: Path | None = None  # installed once per run, on first use
    certificate: CertificateFiles | None = None  # set when a TLS scenario runs

    def start(self, name: str) -> Target:
        """Start one target; a target that fails to come up is returned with `failure` set."""
        if name == "direct":  # the backend itself: measured, but not ours to restart
            return Target("direct", self.backends.ports[0], self.backends.process)
        workers = 1 if name in SINGLE_PROCESS else self.workers
        admin_port = free_port() if name == "pyproxy" and workers > 1 else 0
        tls_port = free_port() if self.certificate and name in TLS_TARGETS else 0
        shape = configs.ProxyShape(free_port(), self.backends.ports, workers, self.keepalive_per_server, admin_port,
                                   tls_port, self.certificate if tls_port else None)
        starters = {"nginx": self._nginx, "haproxy": self._haproxy, "pyproxy": self._pyproxy,
                    SINGLE_WORKER: self._pyproxy, PYTHON_PYPROXY: self._python_pyproxy}
        try:
            process = self._relay(name, shape) if is_relay(name) else starters[name](shape, name)
        except (StartError, OSError) as error:
            say(f"{name}: failed to start: {error}")
            return Target(name, shape.port, failure=f"failed to start: {error}")
        return Target(name, shape.port, process, admin_port=admin_port, tls_port=tls_port)

    def restart(self, target: Target) -> Target:
        """A fresh process for a proxy target (direct is returned as it is)."""
        if target.name == "direct" or target.process is None:
            return target
        if target.process in self.lab.processes:
            self.lab.stop(target.process)
        return self.start(target.name)

    def _nginx(self, shape: configs.ProxyShape, name: str) -> ManagedProcess:
        layout = self.lab.layout("nginx")
        layout.config.write_text(configs.nginx_proxy(layout, shape))
        return _start_and_wait(self.lab, "nginx", _nginx_argv(self.tools["nginx"], layout), shape.port)

    def _haproxy(self, shape: configs.ProxyShape, name: str) -> ManagedProcess:
        layout = self.lab.layout("haproxy")
        layout.config.write_text(configs.haproxy(shape))
        # -db: stay in the foreground, no daemon, so the process group is ours to stop.
        argv = [self.tools["haproxy"], "-db", "-f", str(layout.config)]
        return _start_and_wait(self.lab, "haproxy", argv, shape.port)

    def _pyproxy(self, shape: configs.ProxyShape, name: str) -> ManagedProcess:
        layout = self.lab.layout(name)
        layout.config.write_text(configs.pyproxy(shape))
        argv = pyproxy_command(self.repo) + ["-c", str(layout.config), "--workers", str(shape.workers)]
        return _start_and_wait(self.lab, name, argv, shape.port, cwd=self.repo)

    def _python_pyproxy(self, shape: configs.ProxyShape, name: str) -> ManagedProcess:
        """`pyproxy start FILE.json` from its own venv, run in its work dir, away from this repo."""
        if self.python_pyproxy_venv is None:
            self.python_pyproxy_venv = install_python_pyproxy(self.lab.root / "python-pyproxy-venv")
        layout = self.lab.layout(name)
        layout.config.write_text(configs.python_pyproxy(shape))
        argv = [str(self.python_pyproxy_venv / "bin" / "pyproxy"), "start", str(layout.config)]
        return _start_and_wait(self.lab, name, argv, shape.port, cwd=layout.work_dir)

    def _relay(self, name: str, shape: configs.ProxyShape) -> ManagedProcess:
        """One process whatever shape.workers says; keep-alive is the relay's own (see relays.py)."""
        return _start_and_wait(self.lab, name, relay_command(self.repo, RELAY_MODES[name], shape), shape.port)


def is_relay(name: str) -> bool:
    return name in RELAY_MODES


def install_python_pyproxy(venv_dir: Path, requirement: str = PYTHON_PYPROXY_REQUIREMENT) -> Path:
    """A fresh venv with python-pyproxy in it (never this project's environment: both install a
    `pyproxy` module and command). Returns the venv; raises StartError saying why it failed."""
    say(f"installing {requirement} into {venv_dir}")
    try:
        venv.EnvBuilder(with_pip=True, clear=True).create(venv_dir)
    except (OSError, subprocess.CalledProcessError) as error:
        raise StartError(f"cannot create a venv for {requirement}: {error}") from None
    pip = [str(venv_dir / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check", requirement]
    try:
        done = subprocess.run(pip, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise StartError(f"pip install {requirement} took over {INSTALL_TIMEOUT_S:.0f}s") from None
    if done.returncode != 0:
        lines = [line.strip() for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        raise StartError(f"pip install {requirement} failed: {lines[-1] if lines else f'exit {done.returncode}'}")
    if not os.access(venv_dir / "bin" / "pyproxy", os.X_OK):
        raise StartError(f"{requirement} installed no `pyproxy` command")
    return venv_dir


def worker_counts(admin_port: int) -> dict[int, tuple[int, int]] | None:
    """{worker slot: (connections accepted, requests served)} from pyproxy's admin /status, or None
    if it does not answer."""
    connection = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=STATUS_TIMEOUT_S)
    try:
        connection.request("GET", "/status")
        response = connection.getresponse()
        document = json.loads(response.read())
    except (OSError, http.client.HTTPException, ValueError):
        return None
    finally:
        connection.close()
    if response.status != 200 or not isinstance(document.get("workers"), list):
        return None
    return {worker["slot"]: (worker.get("connections_accepted", 0), worker["requests_total"])
            for worker in document["workers"]}


def relay_command(repo: Path, mode: str, shape: configs.ProxyShape) -> list[str]:
    """relays.py under the repo's venv Python if there is one (as pyproxy runs), else ours."""
    upstreams = ",".join(f"127.0.0.1:{port}" for port in shape.backend_ports)
    return [repo_python(repo), str(RELAYS_SCRIPT), "--mode", mode, "--port", str(shape.port),
            "--upstream", upstreams]


def repo_python(repo: Path) -> str:
    venv_python = repo / ".venv" / "bin" / "python"
    return str(venv_python) if os.access(venv_python, os.X_OK) else sys.executable


def pyproxy_command(repo: Path) -> list[str]:
    """`python -m proxy.serve.cli`, to be run with ``repo`` as the working directory: `-m` puts it
    first on sys.path, so the code measured is that checkout's, never whatever an installed `pyproxy`
    entry point (an editable install of another checkout, say) would import."""
    return [repo_python(repo), "-m", "proxy.serve.cli"]


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


def ensure_running(target: Target, factory: TargetFactory) -> Target:
    """Restart a target whose process died since the last scenario."""
    if target.failure or target.process is None or target.process.alive():
        return target
    say(f"{target.name}: {target.process.exit_reason()}; restarting it")
    if target.name == "direct":
        return Target(target.name, target.port, failure=f"backend died: {target.process.exit_reason()}")
    return factory.restart(target)
