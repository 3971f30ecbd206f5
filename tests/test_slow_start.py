"""slow_start: a server that becomes available (recovers, or is added by a reload) ramps its effective
weight from 10% to 100% over the period, in round robin, least connections and random; ip_hash is
exempt (docs/configuration.md)."""

from __future__ import annotations

import random
import signal

import pytest

from proxy.config.schema import ConfigError, parse_config
from proxy.upstream.balancing import Upstream, WeightedRandom
from proxy.upstream.servers import Server
from tests.support.backends import named_backends
from tests.support.processes import WORKERS, admin_status, answered_by, ready_workers, running_proxy, workers_config
from tests.support.proxy import config_document, served_by
from tests.support.timing import FakeClock, wait_for


def _recovering_pair(policy: str, slow_start: float = 30.0, weight: int = 1):
    """Two servers; the second just came back from being down, so it is at the start of its ramp."""
    clock = FakeClock()
    steady = Server("127.0.0.1", 9001, weight=weight, clock=clock)
    back = Server("127.0.0.1", 9002, weight=weight, clock=clock)
    upstream = Upstream("web", [steady, back], policy, slow_start=slow_start)
    back.set_health(False, "refused")
    clock.advance(5)
    back.set_health(True, "passed")
    return upstream, steady, back, clock


def _share(upstream: Upstream, server: Server, picks: int) -> float:
    chosen = 0
    for _ in range(picks):
        picked = upstream.pick_server("192.0.2.1")
        chosen += picked is server
        picked.release()
    return chosen / picks


def test_effective_weight_ramps_from_10_to_100_percent_and_a_recovery_restarts_it():
    upstream, steady, back, clock = _recovering_pair("round_robin", weight=10)
    assert (back.effective_weight(), steady.effective_weight()) == (1.0, 10)
    assert back.snapshot()["slow_start_remaining"] == 30.0
    clock.advance(15)
    assert back.effective_weight() == pytest.approx(5.5)
    clock.advance(15)
    assert back.effective_weight() == 10 and back.snapshot()["slow_start_remaining"] == 0.0
    back.set_health(False, "refused")
    back.set_health(True, "passed")
    assert back.effective_weight() == 1.0


@pytest.mark.parametrize("policy, share", [
    ("round_robin", 10 / 110),        # weights 1 : 0.1
    ("least_connections", 1 / 101),   # idle: weight² / (active + 1), so 1 : 0.01
])
def test_a_recovering_server_gets_its_ramped_share(policy, share):
    upstream, steady, back, clock = _recovering_pair(policy)
    assert _share(upstream, back, 1010) == pytest.approx(share, abs=0.01)
    clock.advance(30)
    assert _share(upstream, back, 100) == 0.5


def test_random_weighs_a_recovering_server_by_its_ramp():
    upstream, steady, back, clock = _recovering_pair("random")
    policy = WeightedRandom(random.Random(7))
    picks = [policy.pick(upstream.servers, "") for _ in range(2000)]
    assert 0.05 < picks.count(back) / len(picks) < 0.13  # 1/11 expected


def _share_under_steady_load(upstream: Upstream, server: Server, in_flight_count: int, picks: int) -> float:
    """``in_flight_count`` requests always in flight, the oldest finishing first."""
    in_flight = [upstream.pick_server("") for _ in range(in_flight_count)]
    chosen = 0
    for _ in range(picks):
        in_flight.pop(0).release()
        picked = upstream.pick_server("")
        chosen += picked is server
        in_flight.append(picked)
    for left in in_flight:
        left.release()
    return chosen / picks


@pytest.mark.parametrize("in_flight", [2, 8, 50])
def test_least_connections_under_steady_load_ramps_a_recovering_server_smoothly(in_flight):
    """Its share stays near weighted round robin's (1/11 at 10% of its weight) at any concurrency,
    not the half an idle server draws from plain least connections, and rises to half by the end."""
    upstream, steady, back, clock = _recovering_pair("least_connections", slow_start=10.0)
    shares = []
    for _ in range(5):
        shares.append(_share_under_steady_load(upstream, back, in_flight, 500))
        clock.advance(2.5)
    assert shares[0] <= 0.1 and shares == sorted(shares)  # rising
    assert _share_under_steady_load(upstream, back, in_flight, 500) == pytest.approx(0.5, abs=0.01)


def test_ip_hash_ignores_slow_start():
    upstream, steady, back, clock = _recovering_pair("ip_hash")
    clients = [f"10.0.0.{i}" for i in range(50)]
    before = {client: upstream.pick_server(client) for client in clients}
    for server in before.values():
        server.release()
    clock.advance(30)
    after = {client: upstream.pick_server(client) for client in clients}
    assert before == after and back in after.values()


def test_servers_of_the_first_config_do_not_ramp():
    clock = FakeClock()
    servers = [Server("127.0.0.1", 9001 + i, clock=clock) for i in range(2)]
    Upstream("web", servers, "round_robin", slow_start=30.0)
    assert [s.effective_weight() for s in servers] == [1, 1]


@pytest.mark.parametrize("value, problem", [
    ("-1s", "upstreams.web.slow_start: "), ("soon", 'upstreams.web.slow_start: "soon"'),
])
def test_bad_slow_start_is_pinpointed(value, problem):
    document = config_document({"web": {"servers": ["127.0.0.1:9"], "slow_start": value}})
    with pytest.raises(ConfigError) as raised:
        parse_config(document, "test.toml")
    assert len(raised.value.problems) == 1 and raised.value.problems[0].startswith(f"test.toml: {problem}")


def test_a_server_added_by_a_reload_ramps_up_and_status_shows_it(backends, observed_proxy):
    a, b = backends("a", "b")
    document = config_document({"web": {"servers": [a.address], "slow_start": "1h"}})
    proxy = observed_proxy(document)
    document["upstreams"]["web"]["servers"] = [a.address, b.address]
    proxy.reload(document)
    servers = {s["address"]: s for s in proxy.status()["upstreams"]["web"]["servers"]}
    assert servers[a.address]["slow_start_remaining"] == 0.0
    assert 3500 < servers[b.address]["slow_start_remaining"] <= 3600
    seen = served_by(proxy, 55)
    assert 1 <= seen.get("b", 0) <= 8 and seen["a"] >= 47  # 1 : 0.1 gives b 5 of 55
    document["upstreams"]["web"]["slow_start"] = "0s"
    proxy.reload(document)
    assert served_by(proxy, 10) == {"a": 5, "b": 5}


def test_with_worker_processes_a_server_added_by_sighup_ramps_in_every_worker(tmp_path):
    with named_backends("a", "b") as (a, b):
        port, admin_port, config = workers_config(a.address)
        config = config.replace(f'servers = ["{a.address}"]', f'servers = ["{a.address}"]\nslow_start = "1h"')
        with running_proxy(tmp_path, config) as run:
            wait_for(lambda: ready_workers(run) == WORKERS, what="both workers ready")
            run.rewrite(config.replace(f'servers = ["{a.address}"]', f'servers = ["{a.address}", "{b.address}"]'))
            run.signal(signal.SIGHUP)
            wait_for(lambda: run.log().count(") reloaded") == WORKERS, what="every worker reloaded",
                     on_timeout=run.log)
            workers = admin_status(admin_port)["workers"]
            assert len(workers) == WORKERS
            servers = {s["address"]: s for s in admin_status(admin_port)["upstreams"]["app"]["servers"]}
            assert servers[a.address]["slow_start_remaining"] == 0.0
            assert 3500 < servers[b.address]["slow_start_remaining"] <= 3600
            answers = [answered_by(run.url) for _ in range(66)]
            assert 1 <= answers.count("b") <= 14  # about 1 in 11 in each worker, not 1 in 2
