"""Run h2load (nghttp2's load generator) for the TLS scenarios and read its report.

h2load prints req/s and a mean latency but no percentiles, so it writes every request to a log file
(``--log-file``: start time, status, latency in microseconds, tab-separated) and p50/p99 are taken
from there. It does not verify certificates: the bench's self-signed one will do.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from .wrk import WrkError, WrkResult

H2LOAD_GRACE_S = 30  # beyond the run: connection setup, warm-up and the report
THREADS = 1  # as wrk -t1: the client takes one core, the proxy and backends the rest


def run_h2load(h2load: str, url: str, connections: int, streams: int, duration_s: float, warmup_s: float,
               log_file: Path, h1: bool = False) -> WrkResult:
    """``connections`` TLS connections with ``streams`` requests in flight on each (h2), or, with
    ``h1``, HTTP/1.1 over TLS with one request at a time per connection (h2load --h1)."""
    argv = [h2load, f"-t{THREADS}", f"-c{connections}", f"-m{streams}", f"-D{duration_s:g}",
            f"--warm-up-time={warmup_s:g}", f"--log-file={log_file}"]
    argv += ["--h1"] if h1 else []
    argv.append(url)
    try:
        done = subprocess.run(argv, capture_output=True, timeout=duration_s + warmup_s + H2LOAD_GRACE_S,
                              check=False)
    except subprocess.TimeoutExpired as error:
        raise WrkError(f"h2load did not finish within {duration_s + warmup_s + H2LOAD_GRACE_S:.0f}s") from error
    output = done.stdout.decode(errors="replace")
    if done.returncode != 0:
        detail = (done.stderr.decode(errors="replace") or output).strip()
        raise WrkError(f"h2load exited with {done.returncode}: {detail[-300:]}")
    return parse_h2load_output(output, _latencies_ms(log_file))


def parse_h2load_output(text: str, latencies_ms: list[float]) -> WrkResult:
    finished = re.search(r"^finished in [\d.]+\w*, ([\d.]+) req/s, ([\d.]+)(\w*)B/s", text, re.MULTILINE)
    counts = re.search(r"^requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                       r"(\d+) errored, (\d+) timeout", text, re.MULTILINE)
    if finished is None or counts is None:
        raise WrkError(f"unexpected h2load output: {text.strip()[-300:]}")
    multiple = {"": 1, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}.get(finished.group(3), 1)
    statuses = re.search(r"^status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text, re.MULTILINE)
    non_2xx = sum(int(n) for n in statuses.groups()[1:]) if statuses else 0
    return WrkResult(
        requests=int(counts.group(2)),
        requests_per_sec=float(finished.group(1)),
        transfer_per_sec=float(finished.group(2)) * multiple,
        p50_ms=_percentile(latencies_ms, 0.50),
        p99_ms=_percentile(latencies_ms, 0.99),
        socket_errors={"failed": int(counts.group(4)) - non_2xx, "errored": int(counts.group(5)),
                       "timeout": int(counts.group(6))},
        non_2xx=non_2xx,
    )


def _latencies_ms(log_file: Path) -> list[float]:
    latencies = []
    try:
        with open(log_file, encoding="ascii", errors="replace") as lines:
            for line in lines:
                fields = line.split("\t")
                if len(fields) >= 3 and fields[2].strip().isdigit():
                    latencies.append(int(fields[2]) / 1000.0)
    except OSError:
        return []
    return sorted(latencies)


def _percentile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
