"""The results table (scenario × target), the ratios of pyproxy and of the other Python proxies to
nginx and HAProxy, the goals (pyproxy only; docs/performance.md), with workers what they add over one
and how requests split between them, and the JSON record."""

from __future__ import annotations

import json
from pathlib import Path

from .scenarios import SCENARIOS, Measurement, Scenario
from .targets import PYTHON_PYPROXY, RELAY_MODES, SINGLE_WORKER, is_relay

FAILURE_WIDTH = 60
IDLE_RSS_LIMIT_MIB = 100
IDLE_THREAD_LIMIT = 100
# The goals (docs/performance.md): which target pyproxy is measured against in the same run, the
# minimum ratio, and whether errors must be zero. Small keep-alive GETs are held to the bare relay of
# pyproxy's own design (relay-pool2, run with --calibrate): that ceiling, not nginx, is what the
# accept-loop-and-pool design can reach under the GIL.
GOALS = {
    "c50": ("relay-pool2", 0.7, True),
    "c1000": ("relay-pool2", 0.7, True),
    "close": ("nginx", 0.5, False),
    "download": ("nginx", 1.0, False),
    "upload": ("nginx", 0.8, False),
    "h2": ("nginx", 0.25, False),
}
# Goals against pyproxy itself in another scenario of the same run: h2 on one connection against
# HTTP/1.1 over TLS at the same concurrency.
SELF_GOALS = {"h2-1conn": ("h1-tls", 0.9)}
P99_LIMIT_VS_NGINX = 3.0  # "p99 at c=50 ≤ 3× nginx's"
PYTHON_PEER_MINIMUM = 3.0  # pyproxy ÷ python-pyproxy at c=50 and c=1000
COLUMNS = ("scenario", "target", "result", "p50", "p99", "errors", "÷nginx", "÷haproxy", "goal")
# Added when pyproxy ran with workers: its result over pyproxy-1w's, and each worker's share of the
# connections and of the requests.
WORKER_COLUMNS = ("÷1 worker", "per worker")
COMPARED = ("pyproxy", SINGLE_WORKER, PYTHON_PYPROXY)  # rows with ratios to nginx and HAProxy


def ratio(measurements: list[Measurement], scenario: str, versus: str, target: str = "pyproxy") -> float | None:
    """target's value (pyproxy's by default) over another target's, in the same scenario of the same run."""
    ours = _find(measurements, scenario, target)
    theirs = _find(measurements, scenario, versus)
    if not ours or not theirs or ours.value is None or not theirs.value:
        return None
    return ours.value / theirs.value


def _find(measurements: list[Measurement], scenario: str, target: str) -> Measurement | None:
    return next((m for m in measurements if m.scenario == scenario and m.target == target), None)


def goal_verdict(measurements: list[Measurement], scenario: str) -> str:
    ours = _find(measurements, scenario, "pyproxy")
    if ours is None or ours.value is None:
        return ""
    if scenario == "idle":
        met = (ours.details["rss_mib"] < IDLE_RSS_LIMIT_MIB and ours.details["threads"] < IDLE_THREAD_LIMIT
               and ours.errors == 0)
        return "met" if met else f"missed (<{IDLE_RSS_LIMIT_MIB} MiB, <{IDLE_THREAD_LIMIT} thr)"
    if scenario in SELF_GOALS:
        return _self_goal_verdict(measurements, scenario, *SELF_GOALS[scenario])
    if scenario not in GOALS:
        return ""
    versus, minimum, zero_errors = GOALS[scenario]
    versus_ratio = ratio(measurements, scenario, versus)
    if versus_ratio is None:
        return f"no {versus}" + (" (--calibrate)" if is_relay(versus) else "")
    problems = []
    if versus_ratio < minimum:
        problems.append(f"<{minimum:g}x {versus}")
    if zero_errors and ours.errors:
        problems.append("errors")
    if scenario == "c50" and _p99_too_high(measurements):
        problems.append(f"p99>{P99_LIMIT_VS_NGINX:g}x")
    if scenario in ("c50", "c1000"):
        peer = ratio(measurements, scenario, PYTHON_PYPROXY)
        if peer is not None and peer < PYTHON_PEER_MINIMUM:
            problems.append(f"<{PYTHON_PEER_MINIMUM:g}x {PYTHON_PYPROXY}")
    verdict = f"{versus_ratio:.2f}x {versus}: " if versus != "nginx" else ""
    return verdict + ("met" if not problems else "missed: " + ", ".join(problems))


def _self_goal_verdict(measurements: list[Measurement], scenario: str, other: str, minimum: float) -> str:
    ours, theirs = _find(measurements, scenario, "pyproxy"), _find(measurements, other, "pyproxy")
    if ours is None or theirs is None or ours.value is None or not theirs.value:
        return f"no {other}"
    value = ours.value / theirs.value
    return f"{value:.2f}x {other}: " + ("met" if value >= minimum else f"missed: <{minimum:g}x")


def _p99_too_high(measurements: list[Measurement]) -> bool:
    ours, nginx = _find(measurements, "c50", "pyproxy"), _find(measurements, "c50", "nginx")
    if not ours or not nginx or ours.p99_ms is None or not nginx.p99_ms:
        return False
    return ours.p99_ms > P99_LIMIT_VS_NGINX * nginx.p99_ms


def render_table(measurements: list[Measurement]) -> str:
    with_workers = has_worker_columns(measurements)
    rows = [COLUMNS + (WORKER_COLUMNS if with_workers else ())]
    for scenario in SCENARIOS:
        own = [m for m in measurements if m.scenario == scenario.key]
        for index, measurement in enumerate(own):
            label = f"{scenario.number} {scenario.title}" if index == 0 else ""
            row = _row(label, scenario, measurement, measurements)
            rows.append(row + (_worker_cells(measurement, measurements) if with_workers else ()))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(_align(cell, width, i) for i, (cell, width) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(line.rstrip() for line in lines)


def _align(cell: str, width: int, column: int) -> str:
    return cell.ljust(width) if column in (0, 1, 2, 8) else cell.rjust(width)


def _row(label: str, scenario: Scenario, m: Measurement, everything: list[Measurement]) -> tuple[str, ...]:
    if m.failure:
        return (label, m.target, _shorten(m.failure), "", "", "", "", "", "")
    extras = ("", "", "")
    if m.target in COMPARED or is_relay(m.target):  # the goals are pyproxy's alone
        extras = (_ratio_text(everything, scenario.key, "nginx", m.target),
                  _ratio_text(everything, scenario.key, "haproxy", m.target),
                  goal_verdict(everything, scenario.key) if m.target == "pyproxy" else "")
    died = " (died!)" if "died_during_run" in m.details else ""
    return (label, m.target, _result_text(scenario, m) + died, _ms(m.p50_ms), _ms(m.p99_ms),
            str(m.errors), *extras)


def has_worker_columns(measurements: list[Measurement]) -> bool:
    return any(m.target == SINGLE_WORKER or "requests_per_worker" in m.details
               for m in measurements)


def _worker_cells(m: Measurement, everything: list[Measurement]) -> tuple[str, str]:
    if m.target != "pyproxy" or m.failure:
        return ("", "")
    connections = split_text(m.details.get("connections_per_worker", []))
    requests = split_text(m.details.get("requests_per_worker", []))
    split = ", ".join(part for part in (connections and f"conns {connections}", requests and f"reqs {requests}") if part)
    return (_ratio_text(everything, m.scenario, SINGLE_WORKER, "pyproxy"), split)


def split_text(per_worker: list[int]) -> str:
    """Each worker's share of the requests: "52/48%"; "" when unknown or none were served."""
    total = sum(per_worker)
    if not total:
        return ""
    return "/".join(f"{100 * count / total:.0f}" for count in per_worker) + "%"


def _result_text(scenario: Scenario, m: Measurement) -> str:
    if scenario.key == "idle":
        held = f"{m.details['connections_still_open']}/{m.details['connections_wanted']} held"
        return f"{m.value:.1f} MiB RSS, {m.details['threads']} thr, {held}"
    if m.details.get("requests") == 0:  # wrk's --timeout outlasted the run: slow, not an error
        return "0 req/s (none finished in the run)"
    if scenario.unit == "req/s":
        return f"{m.value:,.0f} req/s"
    return f"{m.value:,.1f} MiB/s ({m.details['requests_per_sec']:,.1f} req/s)"


def _ratio_text(measurements: list[Measurement], scenario: str, versus: str, target: str) -> str:
    value = ratio(measurements, scenario, versus, target)
    return "" if value is None else f"{value:.2f}x"


def _ms(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value * 1000:.0f}us" if value < 1 else f"{value:.2f}ms"


def _shorten(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= FAILURE_WIDTH else text[: FAILURE_WIDTH - 3] + "..."


def failure_notes(measurements: list[Measurement]) -> list[str]:
    """Full reasons, once each, for failures the table had to shorten, and for crashes."""
    seen: list[str] = []
    for m in measurements:
        notes = [f"{m.target}: {m.failure}"] if m.failure else []
        if "died_during_run" in m.details:
            notes.append(f"{m.target} died during scenario {m.scenario} "
                         f"({m.details['died_during_run']}); restarted for the next one")
        seen.extend(note for note in notes if note not in seen)
    return seen


def workers_note(measurements: list[Measurement], workers: int) -> str | None:
    """What the worker columns mean, printed under the table when there are any."""
    if not has_worker_columns(measurements):
        return None
    return (f"÷1 worker: pyproxy with --workers {workers} over {SINGLE_WORKER} (pyproxy with one worker, "
            "same run); per worker: each worker's share of the connections it accepted and of the requests "
            "it served in the measured run (admin /status)")


def python_pyproxy_note(measurements: list[Measurement], workers: int) -> str | None:
    if not any(m.target == PYTHON_PYPROXY and not m.failure for m in measurements):
        return None
    single = f", a single process even with --workers {workers}" if workers > 1 else ""
    return (f"{PYTHON_PYPROXY} is the asyncio reverse proxy of that name on PyPI{single}, "
            "installed in a throwaway venv")


def calibration_note(measurements: list[Measurement], workers: int) -> str | None:
    """What the relay-* rows are, printed under the table when there are any."""
    if not any(is_relay(m.target) for m in measurements):
        return None
    single = f", a single process even with --workers {workers}" if workers > 1 else ", a single process"
    scenarios = ", ".join(s.key for s in SCENARIOS if s.for_relays)
    return (f"relay-* are bare calibration relays (scripts/bench_lib/relays.py{single}): the ceiling "
            f"of a Python design on this machine; measured in {scenarios} only")


def write_json(path: Path, header: dict, measurements: list[Measurement]) -> None:
    record = {
        **header,
        "results": [m.as_dict() for m in measurements],
        "pyproxy": {s.key: {"vs_nginx": ratio(measurements, s.key, "nginx"),
                            "vs_haproxy": ratio(measurements, s.key, "haproxy"),
                            "vs_1_worker": ratio(measurements, s.key, SINGLE_WORKER),
                            "goal": goal_verdict(measurements, s.key)}
                    for s in SCENARIOS if any(m.scenario == s.key for m in measurements)},
    }
    relays = calibration_ratios(measurements)
    if relays:
        record["calibration_relays"] = {"note": calibration_note(measurements, header.get("workers", 1)),
                                        "ratios": relays}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")


def calibration_ratios(measurements: list[Measurement]) -> dict:
    """{relay: {scenario: {vs_nginx, vs_haproxy}}} for the relays and scenarios that were measured."""
    return {name: {m.scenario: {"vs_nginx": ratio(measurements, m.scenario, "nginx", name),
                                "vs_haproxy": ratio(measurements, m.scenario, "haproxy", name)}
                   for m in measurements if m.target == name}
            for name in RELAY_MODES if any(m.target == name for m in measurements)}
