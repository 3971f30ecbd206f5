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


@pytest.mark.parametrize("policy", ["round_robin", "least_connections"])
def test_a_recovering_server_gets_its_ramped_share(policy):
    upstream, steady, back, clock = _recovering_pair(policy)
    assert _share(upstream, back, 110) == pytest.approx(10 / 110, abs=0.01)  # weights 1 : 0.1
    clock.advance(30)
    assert _share(upstream, back, 100) == 0.5


def test_random_weighs_a_recovering_server_by_its_ramp():
    upstream, steady, back, clock = _recovering_pair("random")
    policy = WeightedRandom(random.Random(7))
    picks = [policy.pick(upstream.servers, "") for _ in range(2000)]
    assert 0.05 < picks.count(back) / len(picks) < 0.13  # 1/11 expected


def test_least_connections_under_steady_load_keeps_a_recovering_server_small():
    """8 requests always in flight, the oldest finishing first: the ramping server holds about its
    weighted share of them, not the half an idle server would get from plain least-connections."""
    upstream, steady, back, clock = _recovering_pair("least_connections")
    in_flight = [upstream.pick_server("") for _ in range(8)]
    to_back = 0
    for _ in range(400):
        in_flight.pop(0).release()
        picked = upstream.pick_server("")
        to_back += picked is back
        in_flight.append(picked)
    assert to_back / 400 <= 0.2


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
