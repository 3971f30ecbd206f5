"""Run wrk with --latency and parse its report."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field

# wrk prints sizes with binary multiples (its format_binary) and times as us/ms/s/m/h.
SIZE_UNITS = {"B": 1, "KB": 1024, "MB": 1024 ** 2, "GB": 1024 ** 3, "TB": 1024 ** 4}
TIME_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
# Beyond the run itself: wrk's connection setup and its final report.
WRK_GRACE_S = 30


class WrkError(RuntimeError):
    """wrk failed or printed something we cannot read."""


@dataclass
class WrkResult:
    requests: int
    requests_per_sec: float
    transfer_per_sec: float  # bytes read per second (headers included)
    p50_ms: float | None
    p99_ms: float | None
    socket_errors: dict[str, int] = field(default_factory=dict)
    non_2xx: int = 0

    @property
    def errors(self) -> int:
        return sum(self.socket_errors.values()) + self.non_2xx


def run_wrk(wrk: str, url: str, connections: int, duration_s: float, timeout: str,
            headers: tuple[str, ...] = (), script: str | None = None, threads: int = 1) -> WrkResult:
    argv = [wrk, f"-t{threads}", f"-c{connections}", f"-d{duration_s:g}s", "--latency",
            f"--timeout={timeout}"]
    for header in headers:
        argv += ["-H", header]
    if script:
        argv += ["-s", script]
    argv.append(url)
    try:
        done = subprocess.run(argv, capture_output=True, timeout=duration_s + WRK_GRACE_S, check=False)
    except subprocess.TimeoutExpired as error:
        raise WrkError(f"wrk did not finish within {duration_s + WRK_GRACE_S:.0f}s") from error
    output = done.stdout.decode(errors="replace")
    if done.returncode != 0:
        detail = (done.stderr.decode(errors="replace") or output).strip()
        raise WrkError(f"wrk exited with {done.returncode}: {detail[-300:]}")
    return parse_wrk_output(output)


def parse_wrk_output(text: str) -> WrkResult:
    rate = _search(r"^Requests/sec:\s+([\d.]+)", text)
    transfer = re.search(r"^Transfer/sec:\s+([\d.]+)(\w+)", text, re.MULTILINE)
    total = _search(r"^\s*(\d+) requests in", text)
    if rate is None or transfer is None or total is None:
        raise WrkError(f"unexpected wrk output: {text.strip()[-300:]}")
    return WrkResult(
        requests=int(total),
        requests_per_sec=float(rate),
        transfer_per_sec=float(transfer.group(1)) * SIZE_UNITS.get(transfer.group(2), 1),
        p50_ms=_percentile_ms("50", text),
        p99_ms=_percentile_ms("99", text),
        socket_errors=_socket_errors(text),
        non_2xx=int(_search(r"Non-2xx or 3xx responses:\s+(\d+)", text) or 0),
    )


def _search(pattern: str, text: str) -> str | None:
    match = re.search(pattern, text, re.MULTILINE)
    return match.group(1) if match else None


def _percentile_ms(percent: str, text: str) -> float | None:
    match = re.search(rf"^\s+{percent}%\s+([\d.]+)(us|ms|s|m|h)\s*$", text, re.MULTILINE)
    return float(match.group(1)) * TIME_UNITS_MS[match.group(2)] if match else None


def _socket_errors(text: str) -> dict[str, int]:
    """wrk prints this line only when some socket error happened."""
    match = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if not match:
        return {}
    counts = dict(zip(("connect", "read", "write", "timeout"), map(int, match.groups())))
    return {kind: count for kind, count in counts.items() if count}
