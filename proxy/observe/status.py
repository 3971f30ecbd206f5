"""The /status document: what each upstream server looks like right now, and the routing table.

``build_status`` describes one process; ``merge_status`` adds several processes' documents into one
(counters summed, a server "down" if any process sees it down, the newest health check kept), so a
supervisor can serve one answer for all its workers. Everything is plain JSON-able data.

Shape (documented in docs/configuration.md, "Admin endpoints"):
    {"processes": n, "draining": bool,
     "upstreams": {NAME: {"policy": ..., "all_down": ..., "failing_open": bool,
                          "health": {...} | null, "passive": {...} | null,
                          "servers": [{"address", "name" (discovered only), "state" (up, down, leaving),
                                       "reason", "since_seconds", "weight",
                                       "active_requests", "requests_total", "failures_total", "ejected", "would_eject",
                                       "admin_state" (enabled | draining | disabled),
                                       "last_check": {"checked_at", "age_seconds", "ok", "latency_ms",
                                                      "status", "error"} | null}],
                          "traffic": {"window_seconds", "requests", "errors", "requests_per_second",
                                      "errors_per_second", "error_rate", "p50_ms", "p99_ms",
                                      "requests_total", "errors_total", "latency_buckets",
                                      "latency_counts"} | null}},
     "routes": [{"host", "path", "upstream", "strip_prefix"}],
     "client_connections": {state: n}, "threads": {...}, "open_tunnels": n}
"""

from __future__ import annotations

import threading
import time

from proxy.config.units import describe_expect_status, describe_statuses
from proxy.routing.table import routes_by_precedence
from proxy.observe.metrics import empty_window, estimate_quantile

COUNTERS = ("active_requests", "requests_total", "failures_total")
TRAFFIC_COUNTERS = ("requests", "errors", "requests_total", "errors_total")
SERVER_TOTALS = ("requests_total", "failures_total")  # the counters among COUNTERS (never go down)
TRAFFIC_TOTALS = ("requests_total", "errors_total")  # the counters among TRAFFIC_COUNTERS
EJECTED_PREFIX = "ejected"  # servers.Server's reason while passive checks keep a server out


def build_status(app, server=None, pool=None, checker=None, wall_clock=time.time, traffic=None) -> dict:
    """This process's view. ``server``/``pool``/``checker`` are optional (a worker has no checker).

    ``traffic`` is ``Metrics.recent`` (or None): each upstream then gets its recent request and error
    rates and latency quantiles, and each server's totals include what the Server objects a reload
    replaced had counted (as /metrics does), so they never go down.
    """
    now, wall_now = app.clock(), wall_clock()
    recent = traffic() if traffic is not None else None
    # The runtime the carried totals were worked out for: with one a reload swapped in before or after
    # them, a replaced server would count twice or not at all, and its total would move down.
    runtime = recent.pop("runtime") if recent is not None else app.runtime
    carried = recent.get("carried", {}) if recent is not None else {}
    upstreams = {}
    for name, upstream in runtime.upstreams.items():
        servers = [_server_status(name, s, now, wall_now, checker) for s in upstream.servers]
        servers += [_leaving_status(name, s, now, wall_now) for s in upstream.leaving if s.active_requests]
        _add_server_totals(servers, carried.get(name, {}))
        upstreams[name] = {"policy": upstream.config.policy, "all_down": upstream.config.all_down,
                           "failing_open": upstream.balancer.failing_open,
                           "health": _health(upstream.config.health),
                           "passive": _passive(upstream.config.passive), "servers": servers,
                           "traffic": _traffic(recent, name)}
    return {
        "processes": 1,
        "draining": app.draining(),
        "upstreams": upstreams,
        "routes": _routes(runtime.config),
        "client_connections": dict(server.connection_counts()) if server is not None else {},
        "threads": dict(pool.counts()) if pool is not None else {},
        "open_tunnels": app.open_tunnels,
        "http2": app.http2_counts(),
    }


def _server_status(upstream_name: str, server, now: float, wall_now: float, checker) -> dict:
    snap = server.snapshot()
    since = snap.pop("since")
    snap["since_seconds"] = round(max(0.0, now - since), 3)
    snap["ejected"] = snap["state"] == "down" and snap["reason"].startswith(EJECTED_PREFIX)
    last = checker.last_check(upstream_name, snap["address"]) if checker is not None else None
    snap["last_check"] = _with_age(last, wall_now)
    if server.name:  # discovered from DNS: the name beside the address
        snap["name"] = server.name
    return snap


def _leaving_status(upstream_name: str, server, now: float, wall_now: float) -> dict:
    """A server whose address left DNS, finishing the requests it has (it takes no new ones)."""
    snap = _server_status(upstream_name, server, now, wall_now, None)
    snap.update(state="leaving", reason="removed from DNS: finishing its requests", ejected=False)
    return snap


def _add_server_totals(servers: list[dict], totals: dict[str, dict]) -> None:
    """Add counts kept elsewhere (replaced Server objects, exited workers) to servers by address."""
    for server in servers:
        extra = totals.get(server["address"])
        if extra is not None:
            for field in SERVER_TOTALS:
                server[field] = server.get(field, 0) + extra.get(field, 0)


def _with_age(last: dict | None, wall_now: float) -> dict | None:
    if last is None:
        return None
    return {**last, "age_seconds": round(max(0.0, wall_now - last["checked_at"]), 3)}


def _traffic(recent: dict | None, upstream: str) -> dict | None:
    if recent is None:
        return None
    window = recent["upstreams"].get(upstream) or empty_window(len(recent["buckets"]))
    return summarize_traffic({**window, "window_seconds": recent["window_seconds"],
                              "latency_buckets": list(recent["buckets"])})


def summarize_traffic(traffic: dict) -> dict:
    """Add the derived numbers (rates, error ratio, p50/p99 in ms) to a traffic window's raw counts."""
    window = traffic["window_seconds"]
    requests, errors = traffic["requests"], traffic["errors"]
    p50 = estimate_quantile(traffic["latency_buckets"], traffic["latency_counts"], 0.5)
    p99 = estimate_quantile(traffic["latency_buckets"], traffic["latency_counts"], 0.99)
    return {**traffic,
            "requests_per_second": round(requests / window, 3),
            "errors_per_second": round(errors / window, 3),
            "error_rate": round(errors / requests, 4) if requests else 0.0,
            "p50_ms": None if p50 is None else round(p50 * 1000, 3),
            "p99_ms": None if p99 is None else round(p99 * 1000, 3)}


def _health(health) -> dict | None:
    if health is None:
        return None
    return {"path": health.path, "interval": health.interval, "timeout": health.timeout,
            "expect_status": describe_expect_status(health.expect_status),
            "healthy_after": health.healthy_after, "unhealthy_after": health.unhealthy_after,
            "method": health.method, "host": health.host, "port": health.port,
            "expect_body": (f"~{health.expect_body}" if health.expect_body_regex else health.expect_body)}


def _passive(passive) -> dict | None:
    if passive is None:
        return None
    return {"max_fails": passive.max_fails, "fail_timeout": passive.fail_timeout,
            "statuses": describe_statuses(passive.statuses)}


def _routes(config) -> list[dict]:
    """Routes in the order the router tries them (most specific first)."""
    return [{"host": r.host, "path": r.path, "upstream": r.upstream, "strip_prefix": r.strip_prefix}
            | ({"redirect": {"to": r.redirect.to, "status": r.redirect.status}} if r.redirect else {})
            for r in routes_by_precedence(config.routes)]


# -- merging -----------------------------------------------------------------------------------------

def merge_status(statuses: list[dict]) -> dict:
    """One document for several processes (the first one's routes and upstream list lead)."""
    if not statuses:
        return {"processes": 0, "draining": False, "upstreams": {}, "routes": [],
                "client_connections": {}, "threads": {}, "open_tunnels": 0, "http2": {}}
    first = statuses[0]
    merged = {
        "processes": sum(s.get("processes", 1) for s in statuses),
        "draining": any(s.get("draining", False) for s in statuses),
        "upstreams": {},
        "routes": first["routes"],
        "client_connections": _sum_dicts(s.get("client_connections", {}) for s in statuses),
        "threads": _sum_dicts(s.get("threads", {}) for s in statuses),
        "open_tunnels": sum(s.get("open_tunnels", 0) for s in statuses),
        "http2": _sum_dicts(s.get("http2", {}) for s in statuses),
    }
    for status in statuses:
        for name, upstream in status["upstreams"].items():
            _merge_upstream(merged["upstreams"], name, upstream)
    return merged


def _merge_upstream(into: dict, name: str, upstream: dict) -> None:
    target = into.get(name)
    if target is None:
        into[name] = {**upstream, "servers": [dict(s) for s in upstream["servers"]]}
        return
    target["traffic"] = _merge_traffic(target.get("traffic"), upstream.get("traffic"))
    target["failing_open"] = target.get("failing_open", False) or upstream.get("failing_open", False)
    by_address = {s["address"]: s for s in target["servers"]}
    for server in upstream["servers"]:
        current = by_address.get(server["address"])
        if current is None:
            copy = dict(server)
            target["servers"].append(copy)
            by_address[copy["address"]] = copy
        else:
            _merge_server(current, server)


def _merge_traffic(mine: dict | None, theirs: dict | None) -> dict | None:
    """Counts add up over processes (their windows overlap in time: the longest one is kept)."""
    if mine is None or theirs is None or mine["latency_buckets"] != theirs["latency_buckets"]:
        return mine or theirs
    merged = {**mine, "window_seconds": max(mine["window_seconds"], theirs["window_seconds"]),
              "latency_counts": [a + b for a, b in zip(mine["latency_counts"], theirs["latency_counts"])]}
    for field in TRAFFIC_COUNTERS:
        merged[field] = mine.get(field, 0) + theirs.get(field, 0)
    return summarize_traffic(merged)


def _merge_server(current: dict, other: dict) -> None:
    for field in COUNTERS:
        current[field] = current.get(field, 0) + other.get(field, 0)
    if other["state"] == "down" and current["state"] == "up":
        current["state"], current["reason"] = "down", other.get("reason", "")
        current["since_seconds"] = other.get("since_seconds", 0.0)
        current["ejected"] = other.get("ejected", False)
    current["would_eject"] = current.get("would_eject", False) or other.get("would_eject", False)
    if current.get("admin_state", "enabled") == "enabled" and other.get("admin_state"):
        current["admin_state"] = other["admin_state"]  # a worker yet to apply a drain is not the last word
    mine, theirs = current.get("last_check"), other.get("last_check")
    if theirs is not None and (mine is None or theirs["checked_at"] > mine["checked_at"]):
        current["last_check"] = theirs


def _sum_dicts(dicts) -> dict:
    total: dict = {}
    for values in dicts:
        for key, value in values.items():
            total[key] = total.get(key, 0) + value
    return total


# -- totals that outlive a worker ----------------------------------------------------------------------

class WorkerStatusTotals:
    """Keeps /status totals merged over worker processes monotonic while the set of workers changes,
    as ``metrics.WorkerCounters`` does for /metrics.

    ``merge_status`` sums the workers that answered: a worker killed and restarted (its successor
    counts from 0), replaced on a reload, or slow to answer took its requests and failures out of the
    totals. So each worker's last totals are kept: a silent one adds its last totals, one that exited
    (``gone``) has them folded into the retired totals for good. Only totals are kept: states, active
    requests and recent rates come from live answers, and a server or upstream no live worker reports
    any more (a reload removed it) is left out.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._last: dict = {}  # process key (pid) -> its last totals (see document_totals)
        self._retired = _empty_totals()  # totals of the processes gone

    def merged(self, answers: dict) -> dict:
        """``answers``: process key -> status document, from the processes that answered just now
        (in the order their documents should be merged)."""
        with self._lock:
            for key, status in answers.items():
                self._last[key] = document_totals(status)
            kept = [totals for key, totals in self._last.items() if key not in answers]
            kept.append(self._retired)
        merged = merge_status(list(answers.values()))
        for totals in kept:
            _add_totals(merged, totals)
        return merged

    def gone(self, key) -> None:
        """The process exited: its last totals stay in every later answer."""
        with self._lock:
            last = self._last.pop(key, None)
            if last is not None:
                self._retired = _sum_totals(self._retired, last)


def _empty_totals() -> dict:
    return {"servers": {}, "traffic": {}}


def document_totals(status: dict) -> dict:
    """A status document's totals: {"servers": {upstream: {address: {field: n}}},
    "traffic": {upstream: {field: n}}}."""
    servers, traffic = {}, {}
    for name, upstream in status.get("upstreams", {}).items():
        servers[name] = {s["address"]: {field: s.get(field, 0) for field in SERVER_TOTALS}
                         for s in upstream.get("servers", ())}
        if upstream.get("traffic") is not None:
            traffic[name] = {field: upstream["traffic"].get(field, 0) for field in TRAFFIC_TOTALS}
    return {"servers": servers, "traffic": traffic}


def _sum_totals(one: dict, other: dict) -> dict:
    servers = {name: {address: dict(fields) for address, fields in by_address.items()}
               for name, by_address in one["servers"].items()}
    for name, by_address in other["servers"].items():
        mine = servers.setdefault(name, {})
        for address, fields in by_address.items():
            mine[address] = _sum_dicts([mine.get(address, {}), fields])
    traffic = {name: dict(fields) for name, fields in one["traffic"].items()}
    for name, fields in other["traffic"].items():
        traffic[name] = _sum_dicts([traffic.get(name, {}), fields])
    return {"servers": servers, "traffic": traffic}


def _add_totals(merged: dict, totals: dict) -> None:
    """Add kept totals to a merged document, only where a live process still reports the upstream
    (and server)."""
    for name, upstream in merged["upstreams"].items():
        _add_server_totals(upstream["servers"], totals["servers"].get(name, {}))
        extra, traffic = totals["traffic"].get(name), upstream.get("traffic")
        if extra is not None and traffic is not None:
            upstream["traffic"] = {**traffic, **{field: traffic.get(field, 0) + extra.get(field, 0)
                                                 for field in TRAFFIC_TOTALS}}
