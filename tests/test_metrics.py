"""Metrics: the observer's counters and histogram, snapshots, merging processes, the Prometheus text.

Output is validated with the official parser (prometheus_client.parser), never by string matching alone.
"""

from __future__ import annotations

import json

import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.serve.app import Application
from proxy.config.schema import parse_config
from proxy.observe.metrics import IncompatibleSnapshots, Metrics, merge, render_prometheus


class Record:
    """The fields of handler.RequestRecord that Metrics reads."""

    def __init__(self, upstream, status, duration):
        self.upstream, self.status, self.duration = upstream, status, duration


def make_app(upstreams=None) -> Application:
    upstreams = upstreams or {"api": ["127.0.0.1:9001", "127.0.0.1:9002"], "web": ["127.0.0.1:9003"]}
    document = {"server": {"listen": "127.0.0.1:1"},
                "upstreams": {name: {"servers": servers} for name, servers in upstreams.items()},
                "routes": [{"path": "/", "upstream": next(iter(upstreams))}]}
    return Application(parse_config(document, "test.toml"))


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
