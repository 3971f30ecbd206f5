"""/status totals (requests and failures per server, requests and errors per upstream) never go down:
not when a reload rebuilds a server, not when a worker process is killed and replaced.
/metrics already kept its counters monotonic; /status and the dashboard read the same totals."""

from __future__ import annotations

import os
import signal

import pytest
import requests

from proxy.observe.metrics import Metrics
from proxy.observe.status import WorkerStatusTotals, build_status, merge_status
from tests.support.backends import FlakyBackend
from tests.support.proxy import DEADLINE, config_document
from tests.support.timing import wait_for
from tests.support.ports import free_port
from tests.support.processes import admin_status, proxy_config, replaced, running_proxy, spread_requests
from tests.support.backends import named_backends
from tests.support.records import app_whose_server_counted, one_server_config
from tests.support.proxy import upstream_counter

pytestmark = pytest.mark.timeout(90)


def status_totals(status: dict, upstream: str = "web") -> dict:
    """The totals /status shows for one upstream: per server, and the upstream's traffic."""
    entry = status["upstreams"][upstream]
    servers = {s["address"]: (s["requests_total"], s["failures_total"]) for s in entry["servers"]}
    traffic = entry["traffic"]
    return {"servers": servers, "traffic": (traffic["requests_total"], traffic["errors_total"])}


def test_status_totals_survive_a_reload_that_rebuilds_the_server(observed_proxy):
    backend = FlakyBackend("a")
    document = config_document({"web": {"servers": [backend.address]}})
    proxy = observed_proxy(document)
    try:
        with requests.Session() as session:
            for _ in range(3):
                assert session.get(proxy.url + "/", timeout=DEADLINE).status_code == 200
        # A request is counted just after its answer is sent: the client may ask /status before that.
        wait_for(lambda: status_totals(proxy.status())["servers"] == {backend.address: (3, 0)},
                 what="three requests counted")
        document["upstreams"]["web"]["servers"] = [{"address": backend.address, "weight": 3}]
        proxy.reload(document)
        document["upstreams"]["web"]["servers"] = [{"address": backend.address, "weight": 2}]
        proxy.reload(document)  # twice without a read between: no replaced object goes unseen
        assert proxy.app.runtime.upstreams["web"].servers[0].requests_total == 0  # a new Server object
        assert status_totals(proxy.status()) == {"servers": {backend.address: (3, 0)}, "traffic": (3, 0)}
        assert requests.get(proxy.url + "/", timeout=DEADLINE).status_code == 200
        wait_for(lambda: status_totals(proxy.status()) == {"servers": {backend.address: (4, 0)}, "traffic": (4, 0)},
                 what="the fourth request counted")
        # /status and /metrics agree on the server's attempts
        assert upstream_counter(proxy, "pyproxy_upstream_requests_total", "web", backend.address) == 4
    finally:
        backend.kill()


def worker_status(requests_served: int, failures: int, errors: int = 0, servers=("127.0.0.1:9001",),
                  state: str = "up") -> dict:
    """One worker's /status document, as build_status makes it (the fields merging reads)."""
    traffic = {"window_seconds": 10.0, "requests": 1, "errors": 0, "requests_total": requests_served,
               "errors_total": errors, "latency_buckets": [1.0], "latency_counts": [1, 0]}
    return {"processes": 1, "draining": False, "routes": [], "client_connections": {}, "threads": {},
            "open_tunnels": 0,
            "upstreams": {"web": {"policy": "round_robin", "traffic": traffic, "servers": [
                {"address": address, "state": state, "reason": "", "active_requests": 1,
                 "requests_total": requests_served, "failures_total": failures, "last_check": None}
                for address in servers]}}}


def test_a_reload_during_a_status_read_never_counts_a_server_twice():
    """Bug: /status read app.runtime, then the traffic totals, which carry a replaced Server object's
    count over to its successor. A reload landing in between showed the old object with its own count
    plus the same count carried: 6 for 3 requests, then 3 again on the next read."""
    app = app_whose_server_counted(3)
    metrics = Metrics(app)
    server = app.runtime.upstreams["web"].servers[0]

    def reload_then_traffic():  # the reload lands after build_status could have looked at the runtime
        app.reload(one_server_config(2))  # a new weight: a new Server object
        return metrics.recent()
    status = build_status(app, traffic=reload_then_traffic)
    assert app.runtime.upstreams["web"].servers[0] is not server
    assert status_totals(status)["servers"] == {"127.0.0.1:3001": (3, 0)}
    assert status_totals(build_status(app, traffic=metrics.recent))["servers"] == {"127.0.0.1:3001": (3, 0)}


def test_worker_totals_keep_silent_and_gone_workers_counts_but_not_their_state():
    totals = WorkerStatusTotals()
    both = totals.merged({1: worker_status(10, 1, errors=2), 2: worker_status(5, 0)})
    assert status_totals(both) == status_totals(merge_status([worker_status(10, 1, 2), worker_status(5, 0)]))
    assert status_totals(both) == {"servers": {"127.0.0.1:9001": (15, 1)}, "traffic": (15, 2)}
    silent = totals.merged({2: worker_status(6, 0, state="down")})  # worker 1 did not answer in time
    assert status_totals(silent) == {"servers": {"127.0.0.1:9001": (16, 1)}, "traffic": (16, 2)}
    server = silent["upstreams"]["web"]["servers"][0]
    assert (server["state"], server["active_requests"], silent["processes"]) == ("down", 1, 1)  # live only
    totals.gone(1)  # killed: its replacement (3) starts from 0
    restarted = totals.merged({2: worker_status(6, 0), 3: worker_status(0, 0)})
    assert status_totals(restarted) == {"servers": {"127.0.0.1:9001": (16, 1)}, "traffic": (16, 2)}
    totals.gone(2)
    totals.gone(2)  # reaped twice (or never answered): counted once
    after_reload = totals.merged({3: worker_status(1, 0, servers=("127.0.0.1:9002",))})
    # a server no live worker reports (a reload removed it) is left out; the upstream's totals stay
    assert status_totals(after_reload) == {"servers": {"127.0.0.1:9002": (1, 0)}, "traffic": (17, 2)}


def test_status_totals_of_two_workers_do_not_go_down_when_one_is_killed_and_replaced(tmp_path):
    with named_backends("a") as (backend,):
        port, admin_port = free_port(), free_port()
        config = proxy_config(port, backend.address, workers=2, admin_port=admin_port)
        with running_proxy(tmp_path, config) as run:
            per_worker = spread_requests(run.url, admin_port, 2)
            assert len(per_worker) == 2 and all(per_worker.values())
            before = status_totals(admin_status(admin_port), "app")
            assert before["traffic"][0] == sum(per_worker.values())
            victim = next(iter(per_worker))
            os.kill(victim, signal.SIGKILL)
            wait_for(lambda: replaced(admin_port, victim), 20, what="the killed worker's replacement")
            assert status_totals(admin_status(admin_port), "app") == before  # nothing served meanwhile
            assert requests.get(run.url + "/", timeout=DEADLINE).status_code == 200
            after = status_totals(admin_status(admin_port), "app")
            assert after["traffic"] == (before["traffic"][0] + 1, before["traffic"][1])
            assert sum(r for r, _ in after["servers"].values()) == sum(r for r, _ in before["servers"].values()) + 1
