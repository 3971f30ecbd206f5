"""Run h2load (nghttp2's load generator) for the TLS scenarios and read its report.

h2load prints throughput and request counts but no percentiles, so each run also writes its
per-request log (--log-file: start time, status, microseconds to the end of the response) and
p50/p99 are taken from that.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

H2LOAD_GRACE_S = 30  # beyond the run itself: connection setup and the final report


class H2loadError(RuntimeError):
    """h2load failed or printed something we cannot read."""


@dataclass
class H2loadResult:
    requests: int
    requests_per_sec: float
    p50_ms: float | None
    p99_ms: float | None
    failed: int
    errored: int
    non_2xx: int
    protocol: str  # what ALPN settled on: "h2" or "http/1.1"

    @property
    def errors(self) -> int:
        return self.failed + self.errored + self.non_2xx


def run_h2load(h2load: str, url: str, connections: int, streams: int, duration_s: float,
               http1: bool = False, warmup_s: float = 0.0) -> H2loadResult:
    """`connections` TLS connections, each with `streams` requests in flight (HTTP/2), or
    `connections` HTTP/1.1 connections without pipelining when http1 is set."""
    with tempfile.TemporaryDirectory(prefix="h2load-") as scratch:
        log_file = Path(scratch) / "requests.log"
        argv = [h2load, f"-c{connections}", f"-m{1 if http1 else streams}", "-t1",
                f"--duration={duration_s:g}", f"--log-file={log_file}"]
        if warmup_s > 0:
            argv.append(f"--warm-up-time={warmup_s:g}")
        if http1:
            argv.append("--h1")
        argv.append(url)
        try:
            done = subprocess.run(argv, capture_output=True, text=True,
                                  timeout=duration_s + warmup_s + H2LOAD_GRACE_S)
        except subprocess.TimeoutExpired:
            raise H2loadError(f"h2load did not finish within {duration_s + warmup_s + H2LOAD_GRACE_S:.0f}s") from None
        if done.returncode != 0:
            lines = (done.stderr + done.stdout).strip().splitlines()
            raise H2loadError(f"h2load exited {done.returncode}: {lines[-1] if lines else ''}")
        result = parse_report(done.stdout)
        result.p50_ms, result.p99_ms = latency_percentiles(log_file)
        return result


def parse_report(text: str) -> H2loadResult:
    finished = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", text)
    counts = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, "
                       r"(\d+) failed, (\d+) errored", text)
    statuses = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text)
    protocol = re.search(r"Application protocol: (\S+)", text)
    if not (finished and counts and statuses):
        if "No protocol negotiated" in text or "No protocol negotiated" in text.lower():
            raise H2loadError("no protocol negotiated (the target offers no h2 over ALPN)")
        raise H2loadError("cannot read h2load's report: " + " | ".join(text.strip().splitlines()[-3:]))
    if int(counts.group(2)) == 0:
        raise H2loadError("no request completed: " + " | ".join(text.strip().splitlines()[-3:]))
    non_2xx = sum(int(statuses.group(i)) for i in (2, 3, 4))
    return H2loadResult(requests=int(counts.group(2)), requests_per_sec=float(finished.group(1)),
                        p50_ms=None, p99_ms=None, failed=int(counts.group(4)), errored=int(counts.group(5)),
                        non_2xx=non_2xx, protocol=protocol.group(1) if protocol else "?")


def latency_percentiles(log_file: Path) -> tuple[float | None, float | None]:
    """p50 and p99 in ms from h2load's per-request log (third column: microseconds)."""
    try:
        lines = log_file.read_text().splitlines()
    except OSError:
        return None, None
    durations = sorted(int(fields[2]) for fields in (line.split("\t") for line in lines)
                       if len(fields) >= 3 and fields[2].isdigit())
    if not durations:
        return None, None

    def percentile(fraction: float) -> float:
        return durations[min(len(durations) - 1, int(fraction * len(durations)))] / 1000
    return percentile(0.50), percentile(0.99)
