"""Metrics: the observer's counters and histogram, snapshots, merging processes, the Prometheus text,
and counters of a running proxy that must never go down (reloads, a worker replaced).

Output is validated with the official parser (prometheus_client.parser), never by string matching alone.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from types import SimpleNamespace

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from proxy.observe.metrics import IncompatibleSnapshots, Metrics, WorkerCounters, merge, render_prometheus
from tests.support.backends import FlakyBackend, named_backends
from tests.support.ports import free_port
from tests.support.processes import admin_status, proxy_config, running_proxy, spread_requests
from tests.support.proxy import DEADLINE, config_document, scrape
from tests.support.timing import wait_for
from tests.support.records import Record, app_whose_server_counted, make_app, one_server_config
from tests.support.processes import replaced
from tests.support.proxy import upstream_counter


def families(text: str) -> dict:
    return {family.name: family for family in text_string_to_metric_families(text)}


def sample_value(family, name: str, **labels) -> float:
    matches = [s.value for s in family.samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(matches) == 1, (name, labels, family.samples)
    return matches[0]


def test_observe_counts_by_upstream_and_code():
    metrics = Metrics(make_app())
    for record in [Record("api", 200, 0.01), Record("api", 200, 0.02), Record("api", 502, 0.5),
                   Record(None, 404, 0.001)]:
        metrics.observe(record)
    requests = {(r["upstream"], r["code"]): r["value"] for r in metrics.snapshot()["requests"]}
    assert requests == {("api", "200"): 2, ("api", "502"): 1, ("-", "404"): 1}


def test_histogram_buckets_are_inclusive_upper_bounds():
    metrics = Metrics(make_app(), buckets=(0.1, 1.0))
    for duration in (0.05, 0.1, 0.5, 1.0, 3.0):
        metrics.observe(Record("api", 200, duration))
    histogram = metrics.snapshot()["durations"]["api"]
    assert histogram["counts"] == [2, 2, 1]  # le=0.1 takes 0.05 and 0.1 exactly; +Inf takes 3.0
    assert histogram["count"] == 5 and histogram["sum"] == pytest.approx(4.65)
    parsed = families(render_prometheus(metrics.snapshot()))["pyproxy_request_duration_seconds"]
    assert sample_value(parsed, "pyproxy_request_duration_seconds_bucket", upstream="api", le="0.1") == 2
    assert sample_value(parsed, "pyproxy_request_duration_seconds_bucket", upstream="api", le="1.0") == 4
    assert sample_value(parsed, "pyproxy_request_duration_seconds_bucket", upstream="api", le="+Inf") == 5
    assert sample_value(parsed, "pyproxy_request_duration_seconds_count", upstream="api") == 5


def test_snapshot_is_json_and_reads_server_gauges():
    app = make_app()
    server = app.runtime.upstreams["api"].servers[0]
    assert server.try_acquire()
    server.set_health(False, "test")
    snapshot = json.loads(json.dumps(Metrics(app).snapshot()))
    gauges = {(g["upstream"], g["server"]): g for g in snapshot["servers"]}
    assert gauges[("api", "127.0.0.1:9001")]["up"] == 0 and gauges[("api", "127.0.0.1:9001")]["active"] == 1
    assert gauges[("api", "127.0.0.1:9002")]["up"] == 1 and gauges[("web", "127.0.0.1:9003")]["active"] == 0


def test_merge_adds_processes_and_a_server_is_up_only_if_up_everywhere():
    app_one, app_two = make_app(), make_app()
    one, two = Metrics(app_one), Metrics(app_two)
    one.observe(Record("api", 200, 0.01))
    two.observe(Record("api", 200, 0.2))
    two.observe(Record("web", 500, 0.3))
    app_two.runtime.upstreams["api"].servers[1].set_health(False, "ejected in one worker")
    assert app_one.runtime.upstreams["api"].servers[0].try_acquire()
    assert app_two.runtime.upstreams["api"].servers[0].try_acquire()
    merged = merge([one.snapshot(), two.snapshot()])
    assert merged["processes"] == 2
    assert {(r["upstream"], r["code"]): r["value"] for r in merged["requests"]} == {("api", "200"): 2, ("web", "500"): 1}
    assert merged["durations"]["api"]["count"] == 2
    gauges = {(g["upstream"], g["server"]): g for g in merged["servers"]}
    assert gauges[("api", "127.0.0.1:9001")]["active"] == 2 and gauges[("api", "127.0.0.1:9001")]["up"] == 1
    assert gauges[("api", "127.0.0.1:9002")]["up"] == 0
    parsed = families(render_prometheus(merged))
    assert sample_value(parsed["pyproxy_requests"], "pyproxy_requests_total", upstream="api", code="200") == 2
    assert sample_value(parsed["pyproxy_processes"], "pyproxy_processes") == 2


def test_merge_refuses_different_buckets_and_handles_nothing():
    with pytest.raises(IncompatibleSnapshots):
        merge([Metrics(make_app(), buckets=(1.0,)).snapshot(), Metrics(make_app(), buckets=(2.0,)).snapshot()])
    parsed = families(render_prometheus(merge([])))
    assert sample_value(parsed["pyproxy_processes"], "pyproxy_processes") == 0


def test_rendering_has_every_required_family_with_the_right_types():
    metrics = Metrics(make_app())
    metrics.observe(Record("api", 200, 0.01))
    parsed = families(render_prometheus(metrics.snapshot()))
    expected = {"pyproxy_requests": "counter", "pyproxy_request_duration_seconds": "histogram",
                "pyproxy_upstream_up": "gauge", "pyproxy_upstream_active_requests": "gauge",
                "pyproxy_client_connections": "gauge"}
    for name, kind in expected.items():
        assert parsed[name].type == kind, name
    up = parsed["pyproxy_upstream_up"]
    assert sample_value(up, "pyproxy_upstream_up", upstream="web", server="127.0.0.1:9003") == 1


def test_label_values_are_escaped():
    metrics = Metrics(make_app())
    metrics.observe(Record('we"ird\\name\n', 200, 0.01))
    parsed = families(render_prometheus(metrics.snapshot()))
    labels = [s.labels for s in parsed["pyproxy_requests"].samples]
    assert {"upstream": 'we"ird\\name\n', "code": "200"} in labels


# -- counters never go down ---------------------------------------------------------------------------

def test_upstream_counters_survive_a_reload_that_rebuilds_the_server(observed_proxy):
    """Bug: a reload changing a server's weight rebuilds its Server object, whose counters start at 0:
    pyproxy_upstream_requests_total / _failures_total for the same labels fell back to 0, which
    Prometheus' rate() reads as a counter reset (the whole new value counted as fresh increase)."""
    backend = FlakyBackend("a")
    document = config_document({"web": {"servers": [backend.address]}})
    proxy = observed_proxy(document)
    try:
        with requests.Session() as session:
            for _ in range(3):
                assert session.get(proxy.url + "/", timeout=DEADLINE).status_code == 200
        assert upstream_counter(proxy, "pyproxy_upstream_requests_total", "web", backend.address) == 3
        document["upstreams"]["web"]["servers"] = [{"address": backend.address, "weight": 3}]
        proxy.reload(document)
        document["upstreams"]["web"]["servers"] = [{"address": backend.address, "weight": 2}]
        proxy.reload(document)  # twice without a scrape between: no replaced object goes unseen
        assert upstream_counter(proxy, "pyproxy_upstream_requests_total", "web", backend.address) == 3
        assert requests.get(proxy.url + "/", timeout=DEADLINE).status_code == 200
        assert upstream_counter(proxy, "pyproxy_upstream_requests_total", "web", backend.address) == 4
    finally:
        backend.kill()


def test_a_reload_during_a_snapshot_never_sends_a_server_counter_down():
    """Bug: a snapshot noted the running Server objects (what replaced ones had counted), then read
    app.runtime again for the gauges. A reload landing in between gave the new Server object (counting
    from 0) without the old one's count carried: pyproxy_upstream_requests_total fell from 3 to 0 for
    one scrape, which Prometheus reads as a counter reset. Here the reload lands right after the
    snapshot's first look at the runtime."""
    app = app_whose_server_counted(3)
    metrics = Metrics(app)
    server = app.runtime.upstreams["web"].servers[0]
    old_runtime, reloads = app.runtime, []

    class ReloadAfterFirstLook:
        def __getattr__(self, name):
            value = getattr(app, name)
            if name == "runtime" and not reloads:  # a reload on another thread swaps the runtime now
                reloads.append(threading.Thread(target=app.reload, args=(one_server_config(2),)))  # new Server
                reloads[0].start()
                wait_for(lambda: app.runtime is not old_runtime, what="the reload's new runtime")
            return value
    metrics.app = ReloadAfterFirstLook()
    counted = [gauge["requests"] for gauge in metrics.snapshot()["servers"]]
    reloads[0].join(DEADLINE)  # its listener notes the new Server once the snapshot lets it
    assert not reloads[0].is_alive() and app.runtime.upstreams["web"].servers[0] is not server
    assert counted == [3]
    assert [gauge["requests"] for gauge in metrics.snapshot()["servers"]] == [3]


def test_metrics_of_two_workers_do_not_go_down_when_one_is_killed_and_replaced(tmp_path):
    """Bug: with workers = 2, /metrics summed the workers that answered; a killed worker's
    replacement starts from 0, so pyproxy_requests_total (and every other counter) fell by what
    the dead worker had served, which Prometheus reads as a counter reset."""
    with named_backends("a") as (backend,):
        port, admin_port = free_port(), free_port()
        config = proxy_config(port, backend.address, workers=2, admin_port=admin_port)
        with running_proxy(tmp_path, config) as run:
            per_worker = spread_requests(run.url, admin_port, 2)
            assert len(per_worker) == 2 and all(per_worker.values())
            admin = SimpleNamespace(admin_url=f"http://127.0.0.1:{admin_port}")
            before = counter_totals(admin)
            victim = next(iter(per_worker))
            os.kill(victim, signal.SIGKILL)
            wait_for(lambda: replaced(admin_port, victim), 20, what="the killed worker's replacement")
            after = counter_totals(admin)
            assert after == pytest.approx(before)  # nothing served meanwhile: every counter where it was
            assert requests.get(run.url + "/", timeout=DEADLINE).status_code == 200
            assert counter_totals(admin)["pyproxy_requests_total"] == before["pyproxy_requests_total"] + 1


def counter_totals(proxy) -> dict[str, float]:
    """Every counter sample summed over its labels, by sample name."""
    totals: dict[str, float] = {}
    for family in scrape(proxy).values():
        if family.type in ("counter", "histogram"):
            for sample in family.samples:
                if sample.name.endswith(("_total", "_count", "_sum")):
                    totals[sample.name] = totals.get(sample.name, 0) + sample.value
    return totals


def worker_snapshot(requests_served: int, failures: int, servers=("127.0.0.1:9001",)) -> dict:
    return {"processes": 1, "buckets": [1.0], "requests": [{"upstream": "web", "code": "200", "value": requests_served}],
            "durations": {"web": {"counts": [requests_served, 0], "sum": 0.5, "count": requests_served}},
            "servers": [{"upstream": "web", "server": s, "up": 1, "active": 1, "requests": requests_served,
                         "failures": failures} for s in servers],
            "client_connections": {"idle": 2}, "threads": {"threads": 4}, "open_tunnels": 1,
            "access_log": {"written": requests_served, "dropped": 0}}


def test_worker_counters_keep_silent_and_gone_workers_counts_but_not_their_gauges():
    counters = WorkerCounters()
    both = counters.merged({1: worker_snapshot(10, 1), 2: worker_snapshot(5, 0)})
    assert both["requests"][0]["value"] == 15 and both["processes"] == 2
    silent = counters.merged({2: worker_snapshot(6, 0)})  # worker 1 did not answer in time
    assert silent["requests"][0]["value"] == 16 and silent["durations"]["web"]["count"] == 16
    assert silent["servers"][0]["requests"] == 16 and silent["servers"][0]["active"] == 1
    assert silent["client_connections"] == {"idle": 2} and silent["processes"] == 1
    counters.gone(1)
    counters.merged({2: worker_snapshot(7, 0)})
    counters.gone(2)
    fresh = counters.merged({3: worker_snapshot(1, 0, servers=("127.0.0.1:9002",))})
    assert fresh["requests"][0]["value"] == 10 + 7 + 1
    assert fresh["access_log"] == {"written": 18, "dropped": 0}
    # a server no live worker reports (a reload removed it) is no longer a series
    assert [(g["server"], g["requests"], g["failures"]) for g in fresh["servers"]] == [("127.0.0.1:9002", 1, 0)]


def test_a_tunnels_lifetime_stays_out_of_the_latency_histogram(observed_proxy):
    """Tunnels are observed when they close (above); minutes of WebSocket are no response time."""
    from proxy.serve.handler import RequestRecord
    proxy = observed_proxy(config_document({"ws": {"servers": ["127.0.0.1:9"]}}))
    metrics = next(o.__self__ for o in proxy.app.observers if hasattr(getattr(o, "__self__", None), "recent"))
    record = RequestRecord(0.0, "127.0.0.1", None)
    record.status, record.upstream, record.duration = 101, "ws", 600.0
    metrics.observe(record)
    durations = metrics.snapshot()["durations"]["ws"]
    assert durations["count"] == 1 and durations["sum"] == 0.0
