"""Host preparation: tool installation, file-descriptor limits, free ports, machine facts."""

from __future__ import annotations

import os
import platform
import resource
import shutil
import socket
import subprocess
import sys

# Command → Debian package that provides it (wrk, nginx-light, haproxy).
TOOL_PACKAGES = {"wrk": "wrk", "nginx": "nginx-light", "haproxy": "haproxy", "h2load": "nghttp2-client",
                 "openssl": "openssl"}
# nginx and haproxy live in sbin, which is not always on a non-root PATH.
EXTRA_PATH = ("/usr/sbin", "/sbin", "/usr/local/sbin")
# Enough for 10,000 idle client sockets plus the harness's own, and for wrk at c=1000.
WANTED_FD_LIMIT = 65536
APT_TIMEOUT_S = 900


class ToolError(RuntimeError):
    """A required tool is missing and could not be installed."""


def say(message: str) -> None:
    """Progress goes to stderr so stdout carries only the table (or JSON)."""
    print(f"bench: {message}", file=sys.stderr, flush=True)


def find_tool(name: str) -> str | None:
    path = os.environ.get("PATH", "") + os.pathsep + os.pathsep.join(EXTRA_PATH)
    return shutil.which(name, path=path)


def ensure_tools(names: list[str]) -> dict[str, str]:
    """Return {name: path}, installing missing tools with apt-get (and saying so)."""
    missing = [name for name in names if find_tool(name) is None]
    if missing:
        _apt_install([TOOL_PACKAGES[name] for name in missing])
    found = {name: find_tool(name) for name in names}
    still_missing = [name for name, path in found.items() if path is None]
    if still_missing:
        raise ToolError(f"missing after install attempt: {', '.join(still_missing)}")
    return found  # type: ignore[return-value]


def _apt_install(packages: list[str]) -> None:
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        raise ToolError(f"please install {' '.join(packages)} (needs apt-get as root)")
    say(f"installing {' '.join(packages)} with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", *packages]
    if _run_quietly(install, env) != 0:
        say("apt-get install failed; running apt-get update and retrying")
        _run_quietly(["apt-get", "update", "-q"], env)
        if _run_quietly(install, env) != 0:
            raise ToolError(f"apt-get install {' '.join(packages)} failed")


def _run_quietly(argv: list[str], env: dict[str, str]) -> int:
    done = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          timeout=APT_TIMEOUT_S, check=False)
    if done.returncode != 0:
        say(f"{' '.join(argv[:2])}: {done.stderr.decode(errors='replace').strip()[-300:]}")
    return done.returncode


def raise_fd_limit(wanted: int = WANTED_FD_LIMIT) -> int:
    """Raise RLIMIT_NOFILE for this process (children inherit it); return the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < wanted:
        try:  # root may raise the hard limit too (up to fs.nr_open)
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            return wanted
        except (ValueError, OSError):
            wanted = hard
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        return wanted
    return soft


def free_port() -> int:
    """A port the kernel considers free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def machine_facts() -> dict[str, object]:
    return {
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "fd_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            models = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    except OSError:  # not Linux: the model is only informative
        models = []
    return models[0] if models else (platform.processor() or "unknown")


def tool_version(argv: list[str]) -> str:
    """First line of a tool's version output, for the JSON record."""
    try:
        done = subprocess.run(argv, capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"unknown ({error})"
    text = (done.stdout or done.stderr).decode(errors="replace").strip()
    return text.splitlines()[0] if text else "unknown"
