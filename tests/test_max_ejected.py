"""max_ejected_percent: passive and active checks never take more than that share of an upstream's
servers out at once; the rest keep serving, shown as would_eject (docs/configuration.md)."""

from __future__ import annotations

import threading

import pytest

from proxy.config.schema import ConfigError, parse_config
from proxy.serve.app import Application
from proxy.upstream.balancing import Upstream
from proxy.upstream.health import HealthChecker, _Target
from proxy.upstream.servers import Server
from tests.support.backends import named_backends
from tests.support.processes import WORKERS, admin_status, answered_by, ready_workers, running_proxy, workers_config
from tests.support.proxy import FAST_HEALTH, config_document, served_by
from tests.support.timing import FakeClock, wait_for


def _upstream(count: int, percent: int, clock, **server_options) -> Upstream:
    servers = [Server("127.0.0.1", 9001 + i, clock=clock, **server_options) for i in range(count)]
    return Upstream("web", servers, "round_robin", max_ejected_percent=percent)


def _states(upstream: Upstream) -> list[str]:
    return [server.state for server in upstream.servers]


def test_four_servers_failing_checks_with_50_percent_leaves_two_serving():
    clock = FakeClock()
    upstream = _upstream(4, 50, clock)
    for server in upstream.servers:
        clock.advance(1)
        server.set_health(False, "status 500")
    assert _states(upstream) == ["down", "down", "up", "up"]  # the first two out stay out
    held = upstream.servers[2].snapshot()
    assert held["would_eject"] and held["reason"] == "would be ejected: status 500"
    picked = {upstream.pick_server("c").address for _ in range(4)}
    assert picked == {"127.0.0.1:9003", "127.0.0.1:9004"}
    for server in upstream.servers:
        server.release()


def test_room_freed_by_a_recovery_takes_the_next_failing_server_out():
    clock = FakeClock()
    upstream = _upstream(4, 50, clock)
    for server in upstream.servers[:3]:
        clock.advance(1)
        server.set_health(False, "refused")
    assert _states(upstream) == ["down", "down", "up", "up"]
    upstream.servers[0].set_health(True, "2 consecutive checks passed")
    assert _states(upstream) == ["up", "down", "down", "up"]
    assert not any(server.snapshot()["would_eject"] for server in upstream.servers)


def test_passive_ejection_is_capped_too():
    clock = FakeClock()
    upstream = _upstream(2, 50, clock, max_fails=1, fail_timeout=10.0)
    first, second = upstream.servers
    first.record_failure("refused")
    clock.advance(1)
    second.record_failure("refused")
    assert _states(upstream) == ["down", "up"] and second.snapshot()["would_eject"]
    clock.advance(9.5)  # the first ejection expires: the second one's (still running) takes the room
    assert first.state == "up"
    assert second.state == "down" and not second.snapshot()["would_eject"]


def test_without_the_key_every_server_can_go_down():
    clock = FakeClock()
    upstream = Upstream("web", [Server("127.0.0.1", 9001 + i, clock=clock) for i in range(4)], "round_robin")
    for server in upstream.servers:
        server.set_health(False, "refused")
    assert _states(upstream) == ["down"] * 4 and upstream.pick_server("c") is None


@pytest.mark.parametrize("value, problem", [
    (101, "must be 0-100, got 101"), (-1, "must be 0-100, got -1"), ("50%", 'expected a whole number, got "50%"'),
])
def test_bad_max_ejected_percent_is_pinpointed(value, problem):
    document = config_document({"web": {"servers": ["127.0.0.1:9"], "max_ejected_percent": value}})
    with pytest.raises(ConfigError) as raised:
        parse_config(document, "test.toml")
    assert raised.value.problems == [f"test.toml: upstreams.web.max_ejected_percent: {problem}"]


def test_a_running_proxy_keeps_two_of_four_failing_servers_and_a_reload_lifts_the_cap(backends, observed_proxy):
    servers = backends("a", "b", "c", "d")
    for backend in servers:
        backend.health_status = 500
    document = config_document({"web": {"servers": [s.address for s in servers], "health": FAST_HEALTH,
                                        "max_ejected_percent": 50}})
    proxy = observed_proxy(document)

    def states():
        return [s["state"] for s in proxy.status()["upstreams"]["web"]["servers"]]

    wait_for(lambda: states().count("down") == 2 and sum(
        s["would_eject"] for s in proxy.status()["upstreams"]["web"]["servers"]) == 2, what="two out, two held")
    serving = served_by(proxy, 10)
    assert len(serving) == 2 and sum(serving.values()) == 10
    document["upstreams"]["web"]["max_ejected_percent"] = 100
    proxy.reload(document)
    wait_for(lambda: states() == ["down"] * 4, what="every server out once the cap is lifted")


def test_with_worker_processes_every_worker_keeps_the_same_two_serving(tmp_path):
    with named_backends("a", "b", "c", "d") as backends:
        port, admin_port, config = workers_config(backends[0].address)
        addresses = ", ".join(f'"{b.address}"' for b in backends)
        config = config.replace(f'servers = ["{backends[0].address}"]', f"servers = [{addresses}]\nmax_ejected_percent = 50")
        # NamedBackend answers 200 to everything: expecting 204 fails every check.
        config += ('\n[upstreams.app.health]\npath = "/healthz"\ninterval = "100ms"\ntimeout = "90ms"\n'
                   "unhealthy_after = 1\nexpect_status = 204\n")
        with running_proxy(tmp_path, config) as run:
            wait_for(lambda: ready_workers(run) == WORKERS, what="both workers ready")

            def same_two_down_everywhere():
                workers = admin_status(admin_port)["workers"]
                return (len(workers) == WORKERS and len(workers[0]["down"]) == 2
                        and all(w["down"] == workers[0]["down"] for w in workers))

            wait_for(same_two_down_everywhere, what="two servers down in every worker", on_timeout=run.log)
            down = {entry.split("/", 1)[1] for entry in admin_status(admin_port)["workers"][0]["down"]}
            serving = {b.name for b in backends if b.address not in down}
            assert {answered_by(run.url) for _ in range(20)} == serving
            assert "max_ejected_percent allows 2 of 4 servers out" in run.log()


def test_verdicts_reach_listeners_in_the_order_they_were_applied():
    """Checks finish on several threads; each worker's cap keeps the servers that went out first, so the
    workers must hear the verdicts in the supervisor's order. Here the first verdict's local apply is
    held up while a second check finishes on another thread."""
    app = Application(parse_config(config_document({"app": {"servers": ["127.0.0.1:1", "127.0.0.1:2"],
                                                            "health": {"path": "/healthz"}}}), "test.toml"))
    first, second = app.runtime.upstreams["app"].servers
    health = app.config.upstreams["app"].health
    checker = HealthChecker(app)
    applied, heard = [], []
    checker.listeners.append(lambda upstream, address, up, reason: heard.append(address))
    first_started, release_first, second_done = threading.Event(), threading.Event(), threading.Event()
    for server in (first, second):
        original = server.set_health

        def set_health(up, reason, announce=True, server=server, original=original):
            applied.append(server.address)
            if server is first:
                first_started.set()
                release_first.wait(10)
            return original(up, reason, announce)
        server.set_health = set_health

    def emit(server, done=None):
        checker._emit(_Target("app", server, health, 0.0), False, "failed")
        if done is not None:
            done.set()

    threads = [threading.Thread(target=emit, args=(first,))]
    threads[0].start()
    assert first_started.wait(10)
    threads.append(threading.Thread(target=emit, args=(second, second_done)))
    threads[1].start()
    second_done.wait(0.5)  # it cannot finish while the first is announced (without the order, it does)
    release_first.set()
    for thread in threads:
        thread.join(10)
    assert applied == heard == ["127.0.0.1:1", "127.0.0.1:2"]


def test_a_recompute_by_the_cap_a_rebuild_replaced_changes_nothing():
    """A server taken out calls its upstream's cap after releasing its own lock. When a reload (or a DNS
    change) rebuilt the upstream around the same Server objects meanwhile, with a new cap that decided
    first, the old cap's late decision overrode it: here the new 50% lets both failing servers out, and
    the old 25% put the second back in, serving while failing, until the next up/down change."""
    clock = FakeClock()
    old = _upstream(4, 25, clock)
    first, second = old.servers[:2]
    first.set_health(False, "refused")
    clock.advance(1)
    old_cap = old._cap
    with old_cap._lock:  # the second failure's recompute, by the cap it read, waits here
        failing = threading.Thread(target=second.set_health, args=(False, "refused"))
        failing.start()
        wait_for(lambda: second.out_since() is not None, what="the second server's failure recorded")
        rebuilt = Upstream("web", old.servers, "round_robin", max_ejected_percent=50)
        assert _states(rebuilt)[:2] == ["down", "down"]
    failing.join(5.0)
    assert not failing.is_alive()
    assert _states(rebuilt) == ["down", "down", "up", "up"]
    assert not second.snapshot()["would_eject"]
