"""all_down = "try_all": when every server of an upstream is down, requests go to all of them anyway
(fail open), logged once per episode; the default "fail" answers 503 (docs/configuration.md)."""

from __future__ import annotations

import logging

import pytest
import requests

from proxy.config.schema import ConfigError, parse_config
from proxy.upstream.balancing import Upstream
from proxy.upstream.servers import Server
from tests.support.backends import named_backends
from tests.support.processes import WORKERS, admin_status, answered_by, ready_workers, running_proxy, workers_config
from tests.support.proxy import DEADLINE, FAST_HEALTH, config_document, served_by
from tests.support.timing import FakeClock, wait_for


def _upstream(all_down: str, count: int = 3, **server_options) -> Upstream:
    clock = FakeClock()
    servers = [Server("127.0.0.1", 9001 + i, clock=clock, **server_options) for i in range(count)]
    return Upstream("web", servers, "round_robin", all_down=all_down)


def _pick_and_release(upstream: Upstream) -> str | None:
    server = upstream.pick_server("c")
    if server is None:
        return None
    server.release()
    return server.address


def test_try_all_sends_to_every_down_server_in_turn_and_logs_once_per_episode(caplog):
    upstream = _upstream("try_all")
    for server in upstream.servers:
        server.set_health(False, "refused")
    with caplog.at_level(logging.WARNING, logger="pyproxy.health"):
        picked = [_pick_and_release(upstream) for _ in range(6)]
    assert sorted(picked) == sorted([s.address for s in upstream.servers] * 2) and upstream.failing_open
    assert [r.getMessage() for r in caplog.records].count(
        'upstream web: every server is down; sending requests to all of them anyway (all_down = "try_all")') == 1
    caplog.clear()
    upstream.servers[1].set_health(True, "passed")
    with caplog.at_level(logging.WARNING, logger="pyproxy.health"):
        assert {_pick_and_release(upstream) for _ in range(4)} == {"127.0.0.1:9002"}
    assert not upstream.failing_open and "a server is up again" in caplog.text


def test_fail_is_the_default_and_answers_no_server():
    upstream = Upstream("web", [Server("127.0.0.1", 9001 + i) for i in range(2)], "round_robin")
    for server in upstream.servers:
        server.set_health(False, "refused")
    assert upstream.pick_server("c") is None and not upstream.failing_open


def test_try_all_does_not_override_max_connections():
    """A server that is up but full is not "down": the client gets the usual 503."""
    upstream = _upstream("try_all", count=2, max_connections=1)
    upstream.servers[0].set_health(False, "refused")
    busy = upstream.pick_server("c")
    assert busy is upstream.servers[1]
    assert upstream.pick_server("c") is None and not upstream.failing_open
    busy.release()


def test_bad_all_down_is_pinpointed():
    document = config_document({"web": {"servers": ["127.0.0.1:9"], "all_down": "open"}})
    with pytest.raises(ConfigError) as raised:
        parse_config(document, "test.toml")
    assert raised.value.problems == ['test.toml: upstreams.web.all_down: "open" is not one of fail | try_all']


def test_a_reload_to_try_all_serves_from_servers_failing_their_checks(backends, observed_proxy):
    """FlakyBackend serves traffic while its health path says 500: the checks are wrong, the servers fine."""
    a, b = backends("a", "b")
    a.health_status = b.health_status = 500
    document = config_document({"web": {"servers": [a.address, b.address], "health": FAST_HEALTH}})
    proxy = observed_proxy(document)
    wait_for(lambda: proxy.state("web", a.address) == proxy.state("web", b.address) == "down", what="both down")
    assert requests.get(proxy.url + "/", timeout=DEADLINE).status_code == 503
    document["upstreams"]["web"]["all_down"] = "try_all"
    proxy.reload(document)
    assert served_by(proxy, 6) == {"a": 3, "b": 3}
    assert proxy.status()["upstreams"]["web"]["failing_open"] is True


def test_with_worker_processes_every_worker_fails_open(tmp_path):
    with named_backends("a", "b") as backends:
        port, admin_port, config = workers_config(backends[0].address)
        addresses = ", ".join(f'"{b.address}"' for b in backends)
        config = config.replace(f'servers = ["{backends[0].address}"]', f'servers = [{addresses}]\nall_down = "try_all"')
        config += ('\n[upstreams.app.health]\npath = "/healthz"\ninterval = "100ms"\ntimeout = "90ms"\n'
                   "unhealthy_after = 1\nexpect_status = 204\n")  # NamedBackend answers 200: every check fails
        with running_proxy(tmp_path, config) as run:
            wait_for(lambda: ready_workers(run) == WORKERS, what="both workers ready")
            wait_for(lambda: all(len(w["down"]) == 2 for w in admin_status(admin_port)["workers"]),
                     what="both servers down in every worker", on_timeout=run.log)
            assert {answered_by(run.url) for _ in range(20)} == {"a", "b"}
            assert 1 <= run.log().count("every server is down") <= WORKERS  # once per worker that saw it
