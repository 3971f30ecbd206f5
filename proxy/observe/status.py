"""The /status document: what each upstream server looks like right now, and the routing table.

``build_status`` describes one process; ``merge_status`` adds several processes' documents into one
(counters summed, a server "down" if any process sees it down, the newest health check kept), so a
supervisor can serve one answer for all its workers. Everything is plain JSON-able data.

Shape (documented in docs/configuration.md, "Admin endpoints"):
    {"processes": n, "draining": bool,
     "upstreams": {NAME: {"policy": ..., "health": {...} | null, "passive": {...} | null,
                          "servers": [{"address", "state", "reason", "since_seconds", "weight",
                                       "active_requests", "requests_total", "failures_total", "ejected",
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

import time

from proxy.routing.table import describe_expect_status, routes_by_precedence
from proxy.observe.metrics import empty_window, estimate_quantile

COUNTERS = ("active_requests", "requests_total", "failures_total")
TRAFFIC_COUNTERS = ("requests", "errors", "requests_total", "errors_total")
EJECTED_PREFIX = "ejected"  # servers.Server's reason while passive checks keep a server out


def build_status(app, server=None, pool=None, checker=None, wall_clock=time.time, traffic=None) -> dict:
    """This process's view. ``server``/``pool``/``checker`` are optional (a worker has no checker).

    ``traffic`` is ``Metrics.recent`` (or None): each upstream then gets its recent request and error
    rates and latency quantiles.
    """
    runtime = app.runtime
    now, wall_now = app.clock(), wall_clock()
    recent = traffic() if traffic is not None else None
    upstreams = {}
    for name, upstream in runtime.upstreams.items():
        servers = [_server_status(name, s, now, wall_now, checker) for s in upstream.servers]
        upstreams[name] = {"policy": upstream.config.policy, "health": _health(upstream.config.health),
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
    }


def _server_status(upstream_name: str, server, now: float, wall_now: float, checker) -> dict:
    snap = server.snapshot()
    since = snap.pop("since")
    snap["since_seconds"] = round(max(0.0, now - since), 3)
    snap["ejected"] = snap["state"] == "down" and snap["reason"].startswith(EJECTED_PREFIX)
    last = checker.last_check(upstream_name, snap["address"]) if checker is not None else None
    snap["last_check"] = _with_age(last, wall_now)
    return snap


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
            "healthy_after": health.healthy_after, "unhealthy_after": health.unhealthy_after}


def _passive(passive) -> dict | None:
    if passive is None:
        return None
    return {"max_fails": passive.max_fails, "fail_timeout": passive.fail_timeout}


def _routes(config) -> list[dict]:
    """Routes in the order the router tries them (most specific first)."""
    return [{"host": r.host, "path": r.path, "upstream": r.upstream, "strip_prefix": r.strip_prefix}
            for r in routes_by_precedence(config.routes)]


# -- merging -----------------------------------------------------------------------------------------

def merge_status(statuses: list[dict]) -> dict:
    """One document for several processes (the first one's routes and upstream list lead)."""
    if not statuses:
        return {"processes": 0, "draining": False, "upstreams": {}, "routes": [],
                "client_connections": {}, "threads": {}, "open_tunnels": 0}
    first = statuses[0]
    merged = {
        "processes": sum(s.get("processes", 1) for s in statuses),
        "draining": any(s.get("draining", False) for s in statuses),
        "upstreams": {},
        "routes": first["routes"],
        "client_connections": _sum_dicts(s.get("client_connections", {}) for s in statuses),
        "threads": _sum_dicts(s.get("threads", {}) for s in statuses),
        "open_tunnels": sum(s.get("open_tunnels", 0) for s in statuses),
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
    mine, theirs = current.get("last_check"), other.get("last_check")
    if theirs is not None and (mine is None or theirs["checked_at"] > mine["checked_at"]):
        current["last_check"] = theirs


def _sum_dicts(dicts) -> dict:
    total: dict = {}
    for values in dicts:
        for key, value in values.items():
            total[key] = total.get(key, 0) + value
    return total
