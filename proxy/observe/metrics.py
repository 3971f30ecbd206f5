"""Request metrics and the Prometheus text exposition format (version 0.0.4).

Three steps, so worker processes and the admin process can share the work:

- ``Metrics.observe(record)`` runs after every proxied request: a few dict/list increments in the
  calling thread's own counters, no lock (see ``ThreadCounters``).
- ``Metrics.snapshot()`` adds the threads' counters up and reads the gauges (servers, connections,
  threads) into a plain JSON-able dict: what a worker process sends to whoever serves ``/metrics``.
- ``merge(snapshots)`` adds several processes' snapshots together; ``render_prometheus(merged)`` writes
  the text format (https://prometheus.io/docs/instrumenting/exposition_formats/).

Merging: counters, histograms, active requests, connections and threads add up. ``pyproxy_upstream_up``
is 1 only if every process sees the server up: passive ejection is per process, and a server that one
process had to eject is, for an operator, a server with a problem.
"""

from __future__ import annotations

import bisect
import math
import threading
import time

from proxy.upstream.servers import ADMIN_STATES, ENABLED

# Prometheus client libraries' default buckets (seconds), which suit request latencies.
DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
NO_UPSTREAM = "-"  # the upstream label of requests the proxy answered itself before routing (400, 404)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# The dashboard's recent traffic: finer buckets than the Prometheus ones at the low end, because local
# backends answer in well under 5 ms and p50/p99 are interpolated inside a bucket (histogram_quantile).
RECENT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                  1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
RECENT_WINDOW = 10  # seconds of per-second slots behind the dashboard's rates and quantiles


class ThreadCounters:
    """One thread's share of the request counters.

    Only the thread that owns it writes to it, so increments need no lock under the GIL and none is
    lost. A reader copies each container with one C-level call (``dict(...)``, ``list(...)``), which
    no other thread can interleave with, and adds the copies of every thread up.
    """

    __slots__ = ("owner", "requests", "durations", "recent")

    def __init__(self, recent: "RecentTraffic"):
        self.owner = threading.current_thread()
        self.requests: dict[tuple[str, int], int] = {}  # (upstream, status as it comes) -> requests
        # upstream -> per-bucket counts (+Inf last) and then the sum of durations, in one list
        self.durations: dict[str, list] = {}
        self.recent = recent

    def absorb(self, other: "ThreadCounters") -> None:
        """Add a finished thread's counts to these (a reader's fold, under the reader's lock)."""
        for key, n in dict(other.requests).items():
            self.requests[key] = self.requests.get(key, 0) + n
        for upstream, histogram in dict(other.durations).items():
            _add_histogram(self.durations, upstream, list(histogram))
        self.recent.absorb(other.recent)


def _add_histogram(into: dict, upstream: str, histogram: list) -> None:
    target = into.get(upstream)
    if target is None:
        into[upstream] = histogram
    else:
        into[upstream] = [a + b for a, b in zip(target, histogram)]


class Metrics:
    """Counters fed by the request observer, gauges read at snapshot time."""

    def __init__(self, app, server=None, pool=None, access_log=None, buckets=DEFAULT_BUCKETS, clock=time.monotonic):
        self.app = app
        self.server = server          # core.SocketServer: connection_counts()
        self.pool = pool              # core.ThreadPool: counts()
        self.access_log = access_log  # proxy.observe.access_log.AccessLog: dropped / written
        self._retired_log_counts = {"written": 0, "dropped": 0}  # writers a reload replaced
        # A reload's swap of writers against a read of their totals: each line counted once, never dipping.
        self._log_counts_lock = threading.Lock()
        self.buckets = tuple(float(b) for b in buckets)
        self.clock = clock
        self.started = clock()
        # One bisect per request serves both histograms: a duration's slot among the union of their
        # bounds maps to its slot in each (how many of that histogram's bounds lie below it).
        bounds = sorted(set(self.buckets) | set(RECENT_BUCKETS))
        self._bounds = tuple(bounds)
        self._histogram_slot = (0, *(bisect.bisect_right(self.buckets, b) for b in bounds))
        self._recent_slot = (0, *(bisect.bisect_right(RECENT_BUCKETS, b) for b in bounds))
        self._local = threading.local()  # .counters: this thread's ThreadCounters
        self._threads_lock = threading.Lock()  # taken once per new thread, and by readers
        self._threads: list[ThreadCounters] = []
        self._finished = self._new_counters()  # what threads that have ended counted
        # A reload that rebuilds a server (weight, limits) gives it a new Server object counting from 0;
        # Prometheus reads a counter going down as a reset. The objects last seen per (upstream,
        # address) and what the replaced ones had counted keep pyproxy_upstream_*_total monotonic.
        self._servers_lock = threading.Lock()
        self._servers_seen: dict[tuple[str, str], object] = {}
        self._carried: dict[tuple[str, str], tuple[int, int]] = {}  # (requests, failures) of replaced objects
        self.track_servers()
        app.reload_listeners.append(lambda old_config, new_config: self.track_servers())

    def observe(self, record) -> None:
        """The request observer (hot path): this thread's own counters, no lock."""
        try:
            counters = self._local.counters
        except AttributeError:
            counters = self._register_thread()
        upstream = record.upstream or NO_UPSTREAM
        status = record.status
        key = (upstream, status)
        requests = counters.requests
        requests[key] = requests.get(key, 0) + 1
        # A tunnel (101) is observed when it closes; its lifetime is no response time (the access log
        # has it, as nginx's does), and minutes of WebSocket would swamp the latency percentiles.
        duration = record.duration if status != 101 else 0.0
        slot = bisect.bisect_left(self._bounds, duration)  # le is inclusive: duration == bound counts in it
        histogram = counters.durations.get(upstream)
        if histogram is None:
            histogram = counters.durations[upstream] = [0] * (len(self.buckets) + 1) + [0.0]
        histogram[self._histogram_slot[slot]] += 1
        histogram[-1] += duration
        # The engine passes an int: compare it rather than build a string per request.
        error = status >= 500 if type(status) is int else is_error_status(status)
        counters.recent.count(upstream, error, self._recent_slot[slot])

    __call__ = observe

    def _new_counters(self) -> ThreadCounters:
        return ThreadCounters(RecentTraffic(clock=self.clock, started=self.started))

    def _register_thread(self) -> ThreadCounters:
        counters = self._local.counters = self._new_counters()
        with self._threads_lock:
            self._fold_finished_threads()  # keeps the list as long as the live threads, under churn
            self._threads.append(counters)
        return counters

    def _fold_finished_threads(self) -> None:
        """Move ended threads' counts into ``_finished`` (they write no more). Under _threads_lock."""
        ended = [counters for counters in self._threads if not counters.owner.is_alive()]
        for counters in ended:
            self._finished.absorb(counters)
            self._threads.remove(counters)

    def _all_counters(self) -> list[ThreadCounters]:
        """Every thread's counters (live ones are still being written), ended threads' folded first.
        Call under _threads_lock."""
        self._fold_finished_threads()
        return [self._finished, *self._threads]

    def _totals(self) -> tuple[dict, dict]:
        """(requests by (upstream, status), histograms by upstream) added over every thread."""
        requests: dict[tuple[str, int], int] = {}
        durations: dict[str, list] = {}
        with self._threads_lock:
            for counters in self._all_counters():
                for key, n in dict(counters.requests).items():
                    requests[key] = requests.get(key, 0) + n
                for upstream, histogram in dict(counters.durations).items():
                    _add_histogram(durations, upstream, list(histogram))
        return requests, durations

    def recent(self) -> dict:
        """The last few seconds per upstream plus running totals: what /status's "traffic" and server
        counters are built from. ``carried`` holds, per upstream and server address, the totals of
        Server objects a reload replaced, which /status adds to the running object's (as /metrics)."""
        requests, _ = self._totals()
        with self._threads_lock:
            snapshots = [counters.recent for counters in self._all_counters()]
        recent = RecentTraffic.combine(snapshots, self.clock())
        totals: dict[str, list[int]] = {}
        for (upstream, code), n in requests.items():
            counts = totals.setdefault(upstream, [0, 0])
            counts[0] += n
            counts[1] += n if is_error_status(code) else 0
        for upstream, (requests_total, errors) in totals.items():
            entry = recent["upstreams"].setdefault(upstream, empty_window(len(recent["buckets"])))
            entry["requests_total"], entry["errors_total"] = requests_total, errors
        carried: dict[str, dict[str, dict]] = {}
        runtime, carried_totals = self._track()
        for (upstream, address), (requests_total, failures) in carried_totals.items():
            carried.setdefault(upstream, {})[address] = {"requests_total": requests_total,
                                                         "failures_total": failures}
        recent["carried"] = carried
        recent["runtime"] = runtime  # the one ``carried`` is for: /status reads its servers from it
        return recent

    def snapshot(self) -> dict:
        counted, histograms = self._totals()
        requests = [{"upstream": u, "code": str(c), "value": n} for (u, c), n in counted.items()]
        durations = {u: {"counts": h[:-1], "sum": h[-1], "count": sum(h[:-1])} for u, h in histograms.items()}
        return {
            "processes": 1,
            "buckets": list(self.buckets),
            "requests": requests,
            "durations": durations,
            "servers": self._server_gauges(),
            "retries": [{"upstream": name, "retries": u.retry_budget.retries_total,
                         "exhausted": u.retry_budget.exhausted_total}
                        for name, u in self.app.runtime.upstreams.items()],
            "client_connections": dict(self.server.connection_counts()) if self.server is not None else {},
            "threads": dict(self.pool.counts()) if self.pool is not None else {},
            "open_tunnels": self.app.open_tunnels,
            "access_log": self._access_log_counts(),
            "rate_limit": self._rate_limit_counts(),
            "http2": self.app.http2_counts(),
        }

    def _rate_limit_counts(self) -> dict:
        """This process's 429s and evicted buckets (none while no route ever had a limit: no table yet)."""
        table = self.app.rate_table_made
        return {"rejected": table.rejected, "evicted": table.evictions} if table is not None else {}

    def _server_gauges(self) -> list[dict]:
        gauges = []
        # The runtime the carried totals were worked out for: one a reload swapped in meanwhile has a new
        # Server object whose old count is not in ``carried`` yet, and its counter would go down.
        runtime, carried = self._track()
        for name, upstream in runtime.upstreams.items():
            for server in upstream.servers:
                snap = server.snapshot()
                requests, failures = carried.get((name, snap["address"]), (0, 0))
                gauges.append({"upstream": name, "server": snap["address"], "up": int(snap["state"] == "up"),
                               "admin_state": snap["admin_state"],
                               "active": snap["active_requests"], "requests": snap["requests_total"] + requests,
                               "failures": snap["failures_total"] + failures})
                if server.name:  # discovered from DNS (pyproxy_upstream_server_info)
                    gauges[-1]["name"] = server.name
        return gauges

    def track_servers(self) -> dict[tuple[str, str], tuple[int, int]]:
        """Note the running Server objects; a replaced one's totals are carried over to its successor.
        Runs on every reload (so no replaced object goes unseen) and every snapshot."""
        return self._track()[1]

    def _track(self) -> tuple:
        """track_servers, and the runtime whose Server objects it noted."""
        with self._servers_lock:
            runtime = self.app.runtime
            running = set()
            for name, upstream in runtime.upstreams.items():
                for server in upstream.servers:
                    key = (name, server.address)
                    running.add(key)
                    previous = self._servers_seen.get(key)
                    if previous is server:
                        continue
                    if previous is not None:
                        old = previous.snapshot()
                        requests, failures = self._carried.get(key, (0, 0))
                        self._carried[key] = (requests + old["requests_total"], failures + old["failures_total"])
                    self._servers_seen[key] = server
            # An address no longer served (gone from DNS or the config) is forgotten, or churning pods would
            # pile up their Server objects; if it comes back, its counters start again (a counter reset).
            for key in set(self._servers_seen) - running:
                del self._servers_seen[key]
                self._carried.pop(key, None)
            return runtime, dict(self._carried)

    def retire_access_log(self, access_log) -> None:
        """A reload replaced this (stopped) writer: keep its lines in the running totals."""
        with self._log_counts_lock:
            self._add_retired(access_log)

    def replace_access_log(self, fresh, retired=None) -> None:
        """A reload made ``fresh`` (or None) the running writer; ``retired`` (its ``written`` and
        ``dropped`` so far) joins the totals in the same step: a read counts its lines once."""
        with self._log_counts_lock:
            if retired is not None:
                self._add_retired(retired)
            self.access_log = fresh

    def _add_retired(self, counts) -> None:
        self._retired_log_counts["written"] += counts.written
        self._retired_log_counts["dropped"] += counts.dropped

    def _access_log_counts(self) -> dict:
        with self._log_counts_lock:
            retired, running = dict(self._retired_log_counts), self.access_log
            if running is None:
                return retired if any(retired.values()) else {}
            return {"written": retired["written"] + running.written, "dropped": retired["dropped"] + running.dropped}


# -- recent traffic (the dashboard) -----------------------------------------------------------------

def is_error_status(code) -> bool:
    """An error, for the dashboard's error rate: any 5xx, the proxy's own (502/503/504) or the server's."""
    return str(code).startswith("5")


def empty_window(bucket_count: int) -> dict:
    return {"requests": 0, "errors": 0, "latency_counts": [0] * (bucket_count + 1),
            "requests_total": 0, "errors_total": 0}


class RecentTraffic:
    """Requests, 5xx answers and a latency histogram per upstream over the last ``window`` seconds.

    One slot per clock second in a ring of ``window`` slots: a slot whose second has gone by is replaced
    (by a fresh one, in one store) by the next request landing on it, so memory stays window ×
    upstreams × buckets. One thread adds (``Metrics`` keeps one per thread); any thread may read.
    """

    def __init__(self, window: int = RECENT_WINDOW, buckets=RECENT_BUCKETS, clock=time.monotonic,
                 started: float | None = None):
        self.window = window
        self.buckets = tuple(float(b) for b in buckets)
        self.clock = clock
        self.started = clock() if started is None else started
        self._rings: dict[str, list[list]] = {}  # upstream -> window × [second, requests, errors, counts]

    def add(self, upstream: str, status, duration: float) -> None:
        error = status >= 500 if type(status) is int else is_error_status(status)
        self.count(upstream, error, bisect.bisect_left(self.buckets, duration))

    def count(self, upstream: str, error: bool, bucket: int) -> None:
        """One request in this second, whose latency falls in ``bucket`` (an index into the counts)."""
        second = math.floor(self.clock())
        ring = self._rings.get(upstream)
        if ring is None:
            ring = self._rings[upstream] = [[None, 0, 0, None] for _ in range(self.window)]
        index = second % self.window
        slot = ring[index]
        if slot[0] != second:
            slot = ring[index] = [second, 0, 0, [0] * (len(self.buckets) + 1)]
        slot[1] += 1
        if error:
            slot[2] += 1
        slot[3][bucket] += 1

    def absorb(self, other: "RecentTraffic") -> None:
        """Add another ring's slots (same window) to this one's: same second adds, a newer replaces."""
        for upstream, theirs in list(other._rings.items()):
            mine = self._rings.setdefault(upstream, [[None, 0, 0, None] for _ in range(self.window)])
            for index, slot in enumerate(list(theirs)):
                second = slot[0]
                if second is None:
                    continue
                current = mine[index]
                if current[0] == second:
                    mine[index] = [second, current[1] + slot[1], current[2] + slot[2],
                                   [a + b for a, b in zip(current[3], slot[3])]]
                elif current[0] is None or current[0] < second:
                    mine[index] = [second, slot[1], slot[2], list(slot[3])]

    def snapshot(self, now: float | None = None) -> dict:
        """{"window_seconds": covered, "buckets": [...], "upstreams": {name: window counts}}."""
        return RecentTraffic.combine([self], self.clock() if now is None else now)

    @staticmethod
    def combine(parts: list["RecentTraffic"], now: float) -> dict:
        """One snapshot of several rings (one per thread) with the same window, buckets and start."""
        first = parts[0]
        second = math.floor(now)
        oldest = second - first.window + 1
        upstreams: dict[str, dict] = {}
        for part in parts:
            for upstream, ring in list(part._rings.items()):
                entry = upstreams.get(upstream)
                if entry is None:
                    entry = upstreams[upstream] = empty_window(len(first.buckets))
                for slot_second, requests, errors, counts in list(ring):
                    if slot_second is not None and oldest <= slot_second <= second:
                        entry["requests"] += requests
                        entry["errors"] += errors
                        entry["latency_counts"] = [a + b for a, b in zip(entry["latency_counts"], counts)]
        # The slots cover the current (partial) second and window-1 whole ones, and never reach back
        # before this process started: rates divide by the time really covered, not by `window`.
        covered = min(now - oldest, now - first.started)
        return {"window_seconds": round(max(covered, 1.0), 3), "buckets": list(first.buckets), "upstreams": upstreams}


def estimate_quantile(buckets, counts, q: float) -> float | None:
    """The q-quantile (seconds) of a histogram, interpolating linearly inside the bucket it falls in.

    Prometheus' ``histogram_quantile`` does the same; the +Inf bucket answers its lower bound (the
    largest finite bound), and an empty histogram has no quantile (None).
    """
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for index, count in enumerate(counts):
        if count and seen + count >= rank:
            if index == len(buckets):
                return float(buckets[-1])
            lower = float(buckets[index - 1]) if index > 0 else 0.0
            return lower + (float(buckets[index]) - lower) * (rank - seen) / count
        seen += count
    return float(buckets[-1])


# -- merging -----------------------------------------------------------------------------------------

class IncompatibleSnapshots(ValueError):
    """Snapshots with different histogram buckets cannot be added together."""


def merge(snapshots: list[dict]) -> dict:
    """Add several processes' snapshots into one (same shape as a snapshot)."""
    if not snapshots:
        return _empty()
    buckets = snapshots[0]["buckets"]
    merged = _empty(buckets)
    requests: dict[tuple[str, str], int] = {}
    servers: dict[tuple[str, str], dict] = {}
    retries: dict[str, dict] = {}
    for snap in snapshots:
        if snap["buckets"] != buckets:
            raise IncompatibleSnapshots(f"buckets differ: {snap['buckets']} vs {buckets}")
        merged["processes"] += snap.get("processes", 1)
        for item in snap["requests"]:
            key = (item["upstream"], item["code"])
            requests[key] = requests.get(key, 0) + item["value"]
        _merge_durations(merged["durations"], snap["durations"])
        for gauge in snap["servers"]:
            _merge_server(servers, gauge)
        for item in snap.get("retries", []):
            counts = retries.setdefault(item["upstream"], {"upstream": item["upstream"], "retries": 0, "exhausted": 0})
            counts["retries"] += item["retries"]
            counts["exhausted"] += item["exhausted"]
        for field in ("client_connections", "threads", "access_log", "rate_limit", "http2"):
            _add_into(merged[field], snap.get(field, {}))
        merged["open_tunnels"] += snap.get("open_tunnels", 0)
    merged["requests"] = [{"upstream": u, "code": c, "value": n} for (u, c), n in requests.items()]
    merged["servers"] = list(servers.values())
    merged["retries"] = list(retries.values())
    return merged


class WorkerCounters:
    """Keeps counters merged over worker processes monotonic while the set of workers changes.

    ``merge`` alone sums the processes that answered: a worker killed and restarted (its successor
    counts from 0), one replaced on a reload, or one that did not answer in time took its counts out
    of every counter, and Prometheus reads a counter going down as a reset. So each process's last
    snapshot is kept: one that is silent adds its last counters, one that exited (``gone``) has them
    folded into the retired total for good. Gauges (up, active, connections) come from live answers only,
    and a server no live process reports any more is left out (a reload removed it).
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._last: dict = {}  # process key (pid) -> its last snapshot
        self._retired: dict | None = None  # counters of the processes gone, as one snapshot

    def merged(self, answers: dict) -> dict:
        """``answers``: process key -> snapshot, from the processes that answered just now."""
        with self._lock:
            self._last.update(answers)
            kept = [_counters_only(snap) for key, snap in self._last.items() if key not in answers]
            if self._retired is not None:
                kept.append(self._retired)
        merged = merge(list(answers.values()) + kept)
        live = {(g["upstream"], g["server"]) for snap in answers.values() for g in snap["servers"]}
        merged["servers"] = [g for g in merged["servers"] if (g["upstream"], g["server"]) in live]
        return merged

    def gone(self, key) -> None:
        """The process exited: its last counters stay in every later answer."""
        with self._lock:
            last = self._last.pop(key, None)
            if last is not None:
                earlier = [self._retired] if self._retired is not None else []
                self._retired = _counters_only(merge([last, *earlier]))


def _counters_only(snapshot: dict) -> dict:
    """A snapshot's counters (requests, durations, server attempts and failures, access log lines)
    with its gauges neutral: 0 processes, connections and tunnels, no active requests, up."""
    return {**_empty(snapshot["buckets"]), "requests": snapshot["requests"], "durations": snapshot["durations"],
            "servers": [{**gauge, "up": 1, "active": 0} for gauge in snapshot["servers"]],
            "retries": list(snapshot.get("retries", [])),
            "access_log": dict(snapshot.get("access_log", {})), "rate_limit": dict(snapshot.get("rate_limit", {})),
            "http2": {"streams_total": snapshot.get("http2", {}).get("streams_total", 0)}}


def _empty(buckets=DEFAULT_BUCKETS) -> dict:
    return {"processes": 0, "buckets": list(buckets), "requests": [], "durations": {}, "servers": [], "retries": [],
            "client_connections": {}, "threads": {}, "open_tunnels": 0, "access_log": {}, "rate_limit": {},
            "http2": {}}


def _merge_durations(into: dict, durations: dict) -> None:
    for upstream, histogram in durations.items():
        target = into.setdefault(upstream, {"counts": [0] * len(histogram["counts"]), "sum": 0.0, "count": 0})
        target["counts"] = [a + b for a, b in zip(target["counts"], histogram["counts"])]
        target["sum"] += histogram["sum"]
        target["count"] += histogram["count"]


def _merge_server(servers: dict, gauge: dict) -> None:
    key = (gauge["upstream"], gauge["server"])
    current = servers.get(key)
    if current is None:
        servers[key] = dict(gauge)
        return
    current["up"] = min(current["up"], gauge["up"])
    if current.get("admin_state", ENABLED) == ENABLED:
        current["admin_state"] = gauge.get("admin_state", ENABLED)
    for field in ("active", "requests", "failures"):
        current[field] += gauge[field]


def _add_into(into: dict, values: dict) -> None:
    for key, value in values.items():
        into[key] = into.get(key, 0) + value


# -- rendering ---------------------------------------------------------------------------------------

def render_prometheus(snapshot: dict) -> str:
    """The text exposition format for one (merged) snapshot."""
    out: list[str] = []
    _family(out, "pyproxy_requests_total", "counter", "Requests served, by upstream and status code.",
            [({"upstream": r["upstream"], "code": r["code"]}, r["value"]) for r in _sorted_requests(snapshot)])
    _histogram(out, snapshot)
    servers = sorted(snapshot["servers"], key=lambda g: (g["upstream"], g["server"]))
    labels = [{"upstream": g["upstream"], "server": g["server"]} for g in servers]
    _family(out, "pyproxy_upstream_up", "gauge", "1 if the server gets traffic (healthy, not ejected).",
            [(label, g["up"]) for label, g in zip(labels, servers)])
    _family(out, "pyproxy_upstream_admin_state", "gauge",
            "The operator's state of the server (runtime API): 1 for the state it is in, 0 for the others.",
            [({**label, "state": state}, int(g.get("admin_state", ENABLED) == state))
             for label, g in zip(labels, servers) for state in ADMIN_STATES])
    _family(out, "pyproxy_upstream_active_requests", "gauge", "Requests in flight to the server.",
            [(label, g["active"]) for label, g in zip(labels, servers)])
    _family(out, "pyproxy_upstream_requests_total", "counter", "Attempts sent to the server (retries included).",
            [(label, g["requests"]) for label, g in zip(labels, servers)])
    _family(out, "pyproxy_upstream_failures_total", "counter", "Failed attempts (connect, timeout, reset, garbage).",
            [(label, g["failures"]) for label, g in zip(labels, servers)])
    _family(out, "pyproxy_upstream_server_info", "gauge", "1 for each server found in DNS, with the name it came from.",
            [({**label, "name": g["name"]}, 1) for label, g in zip(labels, servers) if g.get("name")])
    retries = sorted(snapshot.get("retries", []), key=lambda r: r["upstream"])
    _family(out, "pyproxy_retries_total", "counter", "Retries after a failed attempt (the retry budget allowed them).",
            [({"upstream": r["upstream"]}, r["retries"]) for r in retries])
    _family(out, "pyproxy_retry_budget_exhausted_total", "counter",
            "Retries refused by the retry budget (the client got the original error).",
            [({"upstream": r["upstream"]}, r["exhausted"]) for r in retries])
    _family(out, "pyproxy_client_connections", "gauge", "Client connections by state.",
            [({"state": s}, n) for s, n in sorted(snapshot["client_connections"].items())])
    _family(out, "pyproxy_worker_threads", "gauge", "Worker threads: total, busy, and connections queued.",
            [({"state": s}, n) for s, n in sorted(snapshot["threads"].items())])
    _family(out, "pyproxy_open_tunnels", "gauge", "Upgraded (WebSocket) tunnels open.",
            [({}, snapshot["open_tunnels"])])
    http2 = snapshot.get("http2", {})
    _family(out, "pyproxy_http2_connections", "gauge", "HTTP/2 client connections open.",
            [({}, http2.get("connections", 0))])
    _family(out, "pyproxy_http2_streams", "gauge", "HTTP/2 streams (requests) in progress.",
            [({}, http2.get("streams", 0))])
    _family(out, "pyproxy_http2_streams_total", "counter", "HTTP/2 streams (requests) taken on.",
            [({}, http2.get("streams_total", 0))])
    _family(out, "pyproxy_access_log_lines_total", "counter", "Access log lines written or dropped (queue full).",
            [({"outcome": k}, n) for k, n in sorted(snapshot["access_log"].items())])
    rate_limit = snapshot.get("rate_limit", {})
    _family(out, "pyproxy_rate_limited_total", "counter", "Requests answered 429 by a route's rate_limit.",
            [({}, rate_limit.get("rejected", 0))])
    _family(out, "pyproxy_rate_limit_evictions_total", "counter",
            "Rate limit buckets evicted to make room for a new key (the table was full).",
            [({}, rate_limit.get("evicted", 0))])
    _family(out, "pyproxy_processes", "gauge", "Processes whose numbers are included here.",
            [({}, snapshot["processes"])])
    return "\n".join(out) + "\n"


def _sorted_requests(snapshot: dict) -> list[dict]:
    return sorted(snapshot["requests"], key=lambda r: (r["upstream"], r["code"]))


def _histogram(out: list[str], snapshot: dict) -> None:
    name = "pyproxy_request_duration_seconds"
    out.append(f"# HELP {name} Time from the request head to the last response byte, by upstream.")
    out.append(f"# TYPE {name} histogram")
    bounds = [_format_value(b) for b in snapshot["buckets"]] + ["+Inf"]
    for upstream, histogram in sorted(snapshot["durations"].items()):
        cumulative = 0
        for bound, count in zip(bounds, histogram["counts"]):
            cumulative += count
            out.append(_sample(f"{name}_bucket", {"upstream": upstream, "le": bound}, cumulative))
        out.append(_sample(f"{name}_sum", {"upstream": upstream}, histogram["sum"]))
        out.append(_sample(f"{name}_count", {"upstream": upstream}, histogram["count"]))


def _family(out: list[str], name: str, kind: str, help_text: str, samples) -> None:
    out.append(f"# HELP {name} {help_text}")
    out.append(f"# TYPE {name} {kind}")
    for labels, value in samples:
        out.append(_sample(name, labels, value))


def _sample(name: str, labels: dict, value) -> str:
    if not labels:
        return f"{name} {_format_value(value)}"
    text = ",".join(f'{key}="{_escape_label(str(val))}"' for key, val in labels.items())
    return f"{name}{{{text}}} {_format_value(value)}"


def _escape_label(value: str) -> str:
    # The exposition format escapes backslash, double quote and line feed in label values.
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _format_value(value) -> str:
    if isinstance(value, int):
        return str(value)
    return repr(float(value))
