"""The benchmark scenarios (docs/performance.md) and how one of them is measured against one target."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from .h2load import run_h2load
from .idle import hold_idle_connections
from .procs import TreeUsage, tree_usage
from .targets import TLS_TARGETS, Target, is_relay, worker_counts
from .wrk import WrkError, WrkResult, run_wrk

MIB = 1024 * 1024
UPLOAD_BYTES = MIB  # must match scripts/bench_upload.lua


@dataclass(frozen=True)
class Scenario:
    key: str
    number: int
    title: str
    unit: str  # "req/s", "MiB/s" or "MiB RSS"
    path: str = "/small"
    connections: int = 50
    headers: tuple[str, ...] = ()
    script: str | None = None
    wrk_timeout: str = "5s"
    # Measure a freshly started proxy, so the result does not depend on which scenarios ran first.
    fresh_start: bool = False
    # The calibration relays take part: they are built for small requests only.
    for_relays: bool = False
    # h2load over TLS instead of wrk: "h2" (streams per connection) or "h1" (HTTP/1.1, one at a time).
    # Only the targets with a TLS listener take part (nginx and pyproxy).
    h2load: str | None = None
    streams: int = 1


SCENARIOS = (
    Scenario("c50", 1, "small GET keep-alive c=50", "req/s", for_relays=True),
    Scenario("c1000", 2, "small GET keep-alive c=1000", "req/s", connections=1000, for_relays=True),
    Scenario("close", 3, "small GET Connection: close c=50", "req/s", headers=("Connection: close",),
             for_relays=True),
    Scenario("download", 4, "10 MiB GET c=4", "MiB/s", path="/big", connections=4, wrk_timeout="30s"),
    Scenario("upload", 5, "1 MiB POST c=4", "MiB/s", path="/upload", connections=4,
             script="bench_upload.lua", wrk_timeout="30s"),
    Scenario("idle", 6, "idle keep-alive clients", "MiB RSS", fresh_start=True),
    Scenario("h2", 7, "small GET h2 over TLS, 10 conns x 10 streams", "req/s", connections=10, h2load="h2",
             streams=10),
    Scenario("h2-1conn", 8, "small GET h2 over TLS, 1 conn x 10 streams", "req/s", connections=1, h2load="h2",
             streams=10),
    Scenario("h1-tls", 9, "small GET HTTP/1.1 over TLS c=10", "req/s", connections=10, h2load="h1"),
)


def select_scenarios(only: str | None) -> list[Scenario]:
    """--only takes keys or numbers, comma-separated: `c50,4`."""
    if not only:
        return list(SCENARIOS)
    wanted = {item.strip() for item in only.split(",") if item.strip()}
    known = {s.key for s in SCENARIOS} | {str(s.number) for s in SCENARIOS}
    unknown = wanted - known
    if unknown:
        raise ValueError(f"unknown scenario(s): {', '.join(sorted(unknown))}; "
                         f"choose from {', '.join(s.key for s in SCENARIOS)} or 1-{len(SCENARIOS)}")
    return [s for s in SCENARIOS if s.key in wanted or str(s.number) in wanted]


def takes_part(scenario: Scenario, target_name: str) -> bool:
    """Calibration relays are measured in the small-request scenarios only, and skipped elsewhere; the
    TLS scenarios take the targets with an h2 listener only."""
    if scenario.h2load:
        return target_name in TLS_TARGETS
    return scenario.for_relays or not is_relay(target_name)


@dataclass(frozen=True)
class RunSettings:
    wrk: str
    scripts_dir: Path
    duration_s: float
    warmup_s: float
    idle_connections: int
    idle_open_timeout_s: float
    h2load: str | None = None
    logs_dir: Path | None = None  # where h2load writes its per-request log (the run's temp dir)


@dataclass
class Measurement:
    scenario: str
    target: str
    unit: str
    value: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    errors: int | None = None
    failure: str | None = None
    details: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def measure(scenario: Scenario, target: Target, settings: RunSettings) -> Measurement:
    result = Measurement(scenario.key, target.name, scenario.unit)
    if target.failure:
        result.failure = target.failure
        return result
    if scenario.key == "idle":
        _measure_idle(target, settings, result)
    else:
        _measure_wrk(scenario, target, settings, result)
    return result


def _measure_wrk(scenario: Scenario, target: Target, settings: RunSettings, result: Measurement) -> None:
    try:
        if settings.warmup_s > 0:
            _wrk(scenario, target, settings, settings.warmup_s)
        before = worker_counts(target.admin_port) if target.admin_port else None
        run = _wrk(scenario, target, settings, settings.duration_s)
    except WrkError as error:
        result.failure = str(error)
        return
    if before is not None:
        after = worker_counts(target.admin_port)
        for key, index in (("connections_per_worker", 0), ("requests_per_worker", 1)):
            split = worker_split({slot: counts[index] for slot, counts in before.items()},
                                 {slot: counts[index] for slot, counts in after.items()} if after else None)
            if split:
                result.details[key] = split
    result.value = _throughput(scenario, run)
    result.p50_ms, result.p99_ms, result.errors = run.p50_ms, run.p99_ms, run.errors
    result.details = {**result.details, "requests": run.requests, "requests_per_sec": run.requests_per_sec,
                      "read_bytes_per_sec": run.transfer_per_sec,
                      "socket_errors": run.socket_errors, "non_2xx": run.non_2xx}


def worker_split(before: dict[int, int], after: dict[int, int] | None) -> list[int]:
    """What each worker slot counted between two /status readings (connections accepted or requests
    served), by slot; [] if unknown. A worker restarted in between starts from 0: its slot counts
    what the new one did."""
    if not after:
        return []
    return [after[slot] - before.get(slot, 0) if after[slot] >= before.get(slot, 0) else after[slot]
            for slot in sorted(after)]


def _wrk(scenario: Scenario, target: Target, settings: RunSettings, duration_s: float) -> WrkResult:
    if scenario.h2load:
        url = f"https://127.0.0.1:{target.tls_port}{scenario.path}"
        log_file = settings.logs_dir / f"h2load-{scenario.key}-{target.name}.log"
        return run_h2load(settings.h2load, url, scenario.connections, scenario.streams, duration_s,
                          0.0, log_file, h1=scenario.h2load == "h1")
    script = str(settings.scripts_dir / scenario.script) if scenario.script else None
    url = f"http://127.0.0.1:{target.port}{scenario.path}"
    return run_wrk(settings.wrk, url, scenario.connections, duration_s, scenario.wrk_timeout,
                   scenario.headers, script)


def _throughput(scenario: Scenario, run: WrkResult) -> float:
    if scenario.key == "upload":  # wrk counts only bytes read; the upload is the request body
        return run.requests_per_sec * UPLOAD_BYTES / MIB
    if scenario.unit == "MiB/s":
        return run.transfer_per_sec / MIB
    return run.requests_per_sec


def _measure_idle(target: Target, settings: RunSettings, result: Measurement) -> None:
    root_pid = target.process.pid
    before = tree_usage(root_pid)
    outcome = hold_idle_connections(target.port, settings.idle_connections,
                                    settings.idle_open_timeout_s, lambda: _peak_usage(root_pid))
    during: TreeUsage = outcome.sample
    result.value = during.rss_bytes / MIB
    result.errors = outcome.wanted - outcome.still_open
    result.details = {**result.details,
                      "connections_wanted": outcome.wanted, "connections_opened": outcome.opened,
                      "connections_still_open": outcome.still_open, "open_failures": outcome.failures,
                      "rss_mib_before": before.rss_bytes / MIB, "threads_before": before.threads,
                      "rss_mib": during.rss_bytes / MIB, "threads": during.threads,
                      "processes": during.processes}


def _peak_usage(root_pid: int, samples: int = 5) -> TreeUsage:
    """Largest RSS over a few quick reads, so a momentary dip does not flatter anyone."""
    readings = [tree_usage(root_pid) for _ in range(samples)]
    return max(readings, key=lambda usage: (usage.rss_bytes, usage.threads))
