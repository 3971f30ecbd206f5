"""The runtime API and ``pyproxy ctl`` against real processes: the proxy as a subprocess (one process,
and a supervisor with two workers), real backends, the real ``pyproxy ctl`` command.

A drained server takes no new request while the ones in flight finish; ``ctl drain --wait`` returns
when they did; ``enable`` brings it back; writes need the token; the state holds in every worker,
across SIGHUP and in a worker restarted after a crash; a disabled server gets no health checks.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading

import pytest
import requests

from proxy.config.schema import load_config
from proxy.serve.runner import ProxyProcess, bind_config_listener
from proxy.serve.supervisor import Supervisor, bind_slot_sockets
from tests.support import backends
from tests.support.backends import SLOW_BODY, named_backends
from tests.support.command import pyproxy_command
from tests.support.ports import free_port
from tests.support.processes import REPO, admin_status, children, ready_workers, running_proxy
from tests.support.timing import wait_for

pytestmark = pytest.mark.timeout(90)

TOKEN = "test-token-0123456789"
READY = 20.0     # generous: two cores shared with other test runs
CTL_EXIT = 30.0  # seconds for a ctl command to exit on its own
MAX_SLOW_TRIES = 40  # slow requests started at most to get 5 onto the server to drain


def api_config(port: int, admin_port: int, servers: list[str], *, workers: int = 1,
               admin_keys: str = f'token = "{TOKEN}"', upstream_keys: str = "") -> str:
    server_list = ", ".join(f'"{address}"' for address in servers)
    return f"""
[server]
listen = "127.0.0.1:{port}"
workers = {workers}
graceful_timeout = "5s"

[admin]
listen = "127.0.0.1:{admin_port}"
{admin_keys}

[log]
level = "info"
access = "off"

[[routes]]
path = "/"
upstream = "app"

[upstreams.app]
servers = [{server_list}]
{upstream_keys}
"""


def start(tmp_path, servers, **options):
    port, admin_port = free_port(), free_port()
    return running_proxy(tmp_path, api_config(port, admin_port, servers, **options))


def admin_url(run, path: str) -> str:
    return f"http://127.0.0.1:{run.admin_port}{path}"


def post(run, path: str, token: str | None = TOKEN) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return requests.post(admin_url(run, path), headers=headers, timeout=15)


def server_view(run, address: str) -> dict:
    view = requests.get(admin_url(run, "/upstreams/app"), timeout=10).json()
    return next(server for server in view["servers"] if server["address"] == address)


def ctl(run, *args: str, timeout: float = CTL_EXIT) -> subprocess.CompletedProcess:
    return subprocess.run(pyproxy_command() + ["ctl", "-c", str(run.config_path), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)


def ctl_started(run, *args: str) -> subprocess.Popen:
    return subprocess.Popen(pyproxy_command() + ["ctl", "-c", str(run.config_path), *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


class SlowRequests:
    """GET /slow requests on threads; the results (status, body length or the error) when they end."""

    def __init__(self, url: str):
        self.url = url
        self.results: list = []
        self.threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def start_one(self) -> None:
        def run():
            try:
                response = requests.get(self.url + "/slow", timeout=60)
                outcome = (response.status_code, len(response.content))
            except requests.RequestException as exc:
                outcome = ("error", repr(exc))
            with self._lock:
                self.results.append(outcome)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self.threads.append(thread)

    def finished(self) -> int:
        with self._lock:
            return len(self.results)

    def join(self) -> list:
        for thread in self.threads:
            thread.join(60)
        return list(self.results)


def hold_on(held, other, run, count: int) -> SlowRequests:
    """``count`` slow requests in flight on ``held`` (``other`` answers /slow at once): requests start
    one at a time until ``held`` has that many (the balancer, or the kernel with workers, decides)."""
    other.release.set()
    slow = SlowRequests(run.url)
    held_before, other_before = held.requests, other.requests
    for sent in range(1, MAX_SLOW_TRIES + 1):
        slow.start_one()
        wait_for(lambda: held.requests - held_before + other.requests - other_before >= sent, READY,
                 what="the request to reach a backend")
        if held.requests - held_before == count:
            break
    assert held.requests - held_before == count, f"{held.requests - held_before} of {sent} reached {held.name}"
    wait_for(lambda: server_view(run, held.address)["active_requests"] == count, READY,
             what=f"{count} requests in flight on {held.name}", on_timeout=run.log)
    return slow


def answered_by(url: str) -> str:
    with requests.Session() as session:  # a fresh connection: with workers, the kernel picks one each time
        response = session.get(url, timeout=10)
    assert response.status_code == 200, response.text
    return response.headers["X-Backend"]


# -- drain --wait, no new requests, enable ------------------------------------------------------------

@pytest.mark.parametrize("workers", [1, 2])
def test_drain_wait_returns_when_slow_requests_finish_and_enable_brings_it_back(tmp_path, workers, monkeypatch):
    monkeypatch.setattr(backends, "NAMED_HOLD_LIMIT", 60.0)  # held until the test lets go, however busy the machine
    with named_backends("a", "b") as (a, b), start(tmp_path, [a.address, b.address], workers=workers) as run:
        if workers > 1:
            wait_for(lambda: ready_workers(run) == workers, READY, what="every worker ready", on_timeout=run.log)
        slow = hold_on(a, b, run, 5)
        before = a.requests
        waiting = ctl_started(run, "drain", "app", a.address, "--wait", "--timeout", "60s")
        try:
            wait_for(lambda: server_view(run, a.address)["state"] == "draining", READY, what="a draining",
                     on_timeout=run.log)
            # Meanwhile every new request goes to b, and the drain is still waiting.
            served = [answered_by(run.url) for _ in range(20)]
            assert set(served) == {"b"}
            assert a.requests == before
            assert waiting.poll() is None, waiting.communicate()
            assert server_view(run, a.address)["active_requests"] == 5
            a.release.set()
            out, err = waiting.communicate(timeout=CTL_EXIT)
        finally:
            if waiting.poll() is None:
                waiting.kill()
        assert waiting.returncode == 0, err
        assert f"app/{a.address}: draining (was enabled)" in out
        assert f"app/{a.address}: drained (5 request(s) finished)" in out
        assert slow.join() == [(200, SLOW_BODY)] * len(slow.threads)  # 0 failed requests
        assert server_view(run, a.address)["active_requests"] == 0

        enabled = ctl(run, "enable", "app", a.address)
        assert enabled.returncode == 0, enabled.stderr
        assert f"app/{a.address}: enabled (was draining)" in enabled.stdout
        back = [answered_by(run.url) for _ in range(40)]
        assert "a" in back and "b" in back
        assert all(code == 200 for code, _ in slow.results)
        assert "runtime API: 127.0.0.1:" in run.log() and f"server {a.address} draining (was enabled)" in run.log()


def test_disabled_server_gets_no_traffic_and_no_health_checks(tmp_path):
    health = ('[upstreams.app.health]\npath = "/health"\ninterval = "250ms"\ntimeout = "250ms"\n'
              'unhealthy_after = 10\n')  # a check slowed by a busy machine must not take b out
    with named_backends("a", "b") as (a, b), start(tmp_path, [a.address, b.address], upstream_keys=health) as run:
        wait_for(lambda: a.requests >= 2 and b.requests >= 2, READY, what="health checks of both")
        disabled = ctl(run, "disable", "app", a.address)
        assert disabled.returncode == 0, disabled.stderr
        assert f"app/{a.address}: disabled (was enabled)" in disabled.stdout
        checks_in_flight_done = b.requests + 2  # a check of a already under way may still land meanwhile
        wait_for(lambda: b.requests >= checks_in_flight_done, READY, what="two more rounds of checks on b")
        after_disable = a.requests
        rounds_later = b.requests + 5
        wait_for(lambda: b.requests >= rounds_later, READY, what="five more rounds of checks on b")
        assert a.requests == after_disable, "a disabled server was health-checked"
        assert {answered_by(run.url) for _ in range(10)} == {"b"}
        assert a.requests == after_disable
        view = server_view(run, a.address)
        assert (view["state"], view["health"]) == ("disabled", "up")

        assert ctl(run, "enable", "app", a.address).returncode == 0
        wait_for(lambda: a.requests > after_disable, READY, what="checks of a again")
        wait_for(lambda: "a" in {answered_by(run.url) for _ in range(4)}, READY, what="traffic to a again")


# -- the token ---------------------------------------------------------------------------------------

def test_writes_need_the_token_and_reads_stay_open(tmp_path):
    with named_backends("a", "b") as (a, b), start(tmp_path, [a.address, b.address]) as run:
        path = f"/upstreams/app/servers/{a.address}/drain"
        missing = post(run, path, token=None)
        assert missing.status_code == 401 and "token" in missing.json()["error"]
        assert missing.headers["WWW-Authenticate"].startswith("Bearer")
        wrong = post(run, path, token=TOKEN + "x")
        assert wrong.status_code == 401
        assert requests.post(admin_url(run, path), headers={"Authorization": f"Basic {TOKEN}"},
                             timeout=10).status_code == 401
        assert server_view(run, a.address)["state"] == "up"
        right = post(run, path)
        assert right.status_code == 200, right.text
        assert right.json() == {"upstream": "app", "server": a.address, "state": "draining", "previous": "enabled"}
        assert requests.get(admin_url(run, "/upstreams"), timeout=10).json() == {"upstreams": ["app"]}
        assert server_view(run, a.address)["state"] == "draining"
        assert "refused (wrong token)" in run.log()


def test_no_token_configured_means_writes_are_disabled(tmp_path, monkeypatch):
    monkeypatch.delenv("PYPROXY_ADMIN_TOKEN", raising=False)
    with named_backends("a") as (a,), start(tmp_path, [a.address], admin_keys="") as run:
        refused = post(run, f"/upstreams/app/servers/{a.address}/drain")
        assert refused.status_code == 403
        assert refused.json() == {"error": "runtime API disabled: set admin.token"}
        result = ctl(run, "drain", "app", a.address)
        assert result.returncode == 3
        assert "403 runtime API disabled: set admin.token" in result.stderr
        assert server_view(run, a.address)["state"] == "up"


def test_token_file_and_environment_variable(tmp_path, monkeypatch):
    (tmp_path / "admin.token").write_text("from-a-file-123\n")
    with named_backends("a") as (a,), start(tmp_path, [a.address], admin_keys='token_file = "admin.token"') as run:
        path = f"/upstreams/app/servers/{a.address}/disable"
        assert post(run, path, token="from-a-file-123").status_code == 200
        assert post(run, path, token=TOKEN).status_code == 401
        assert ctl(run, "enable", "app", a.address).returncode == 0  # ctl reads the same file
    monkeypatch.setenv("PYPROXY_ADMIN_TOKEN", "from-the-environment")
    other = tmp_path / "env"
    other.mkdir()
    with named_backends("a") as (a,), start(other, [a.address], admin_keys="") as run:
        assert post(run, f"/upstreams/app/servers/{a.address}/drain", token="from-the-environment").status_code == 200
        assert ctl(run, "enable", "app", a.address).returncode == 0


# -- errors ------------------------------------------------------------------------------------------

def test_unknown_names_are_404_and_wrong_methods_405(tmp_path):
    with named_backends("a") as (a,), start(tmp_path, [a.address]) as run:
        unknown_upstream = post(run, f"/upstreams/nope/servers/{a.address}/drain")
        assert unknown_upstream.status_code == 404
        assert unknown_upstream.json() == {"error": "no upstream named 'nope'"}
        unknown_server = post(run, "/upstreams/app/servers/127.0.0.9:1/drain")
        assert unknown_server.status_code == 404
        assert unknown_server.json() == {"error": "upstream 'app' has no server '127.0.0.9:1'"}
        assert post(run, f"/upstreams/app/servers/{a.address}/reboot").status_code == 404
        assert requests.get(admin_url(run, "/upstreams/nope"), timeout=10).status_code == 404

        on_action = requests.get(admin_url(run, f"/upstreams/app/servers/{a.address}/drain"), timeout=10)
        assert on_action.status_code == 405 and on_action.headers["Allow"] == "POST"
        assert on_action.headers["Content-Type"].startswith("application/json")
        deleted = requests.delete(admin_url(run, f"/upstreams/app/servers/{a.address}/drain"), timeout=10)
        assert deleted.status_code == 405 and deleted.headers["Allow"] == "POST"
        posted = post(run, "/upstreams/app")
        assert posted.status_code == 405 and posted.headers["Allow"] == "GET, HEAD"

        too_big = requests.post(admin_url(run, f"/upstreams/app/servers/{a.address}/drain"), data=b"{" * 70000,
                                headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
        assert too_big.status_code == 413
        not_json = requests.post(admin_url(run, f"/upstreams/app/servers/{a.address}/drain"), data=b"drain!",
                                 headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
        assert not_json.status_code == 400
        assert server_view(run, a.address)["state"] == "up"
        # The listener keeps answering after all of that.
        assert requests.get(admin_url(run, "/healthz"), timeout=10).status_code == 200


def test_ctl_exit_codes(tmp_path):
    with named_backends("a") as (a,), start(tmp_path, [a.address]) as run:
        unknown = ctl(run, "drain", "app", "127.0.0.9:1")
        assert unknown.returncode == 3
        assert "404 upstream 'app' has no server '127.0.0.9:1'" in unknown.stderr
        slow = SlowRequests(run.url)
        slow.start_one()
        wait_for(lambda: server_view(run, a.address)["active_requests"] == 1, READY, what="a request in flight")
        timed_out = ctl(run, "drain", "app", a.address, "--wait", "--timeout", "300ms")
        assert timed_out.returncode == 5, timed_out.stderr
        assert "still has 1 active request(s) after 0.3s; it stays draining" in timed_out.stderr
        a.release.set()
        assert slow.join() == [(200, SLOW_BODY)]
        status = ctl(run, "--json", "status", "app")
        assert status.returncode == 0
        assert '"state": "draining"' in status.stdout
        after = ctl(run, "status", "app", "--json")
        assert after.returncode == 0 and json.loads(after.stdout)["servers"][0]["state"] == "draining"
        text = ctl(run, "status")
        assert text.stdout.startswith(f"app/{a.address}  draining  up  0 active")
        port = run.admin_port
        run.close()  # nothing listens on the admin address any more
        unreachable = ctl(run, "status")
        assert unreachable.returncode == 4
        assert f"cannot reach the admin listener at http://127.0.0.1:{port}" in unreachable.stderr
    no_admin = tmp_path / "no-admin.toml"
    no_admin.write_text('[[routes]]\npath = "/"\nupstream = "app"\n[upstreams.app]\nservers = ["127.0.0.1:9"]\n')
    result = subprocess.run(pyproxy_command() + ["ctl", "-c", str(no_admin), "status"], capture_output=True,
                            text=True, timeout=CTL_EXIT, cwd=REPO)
    assert result.returncode == 1 and "no [admin] table" in result.stderr


# -- reloads and worker processes ------------------------------------------------------------------

@pytest.mark.parametrize("workers", [1, 2])
def test_state_survives_sighup_for_servers_that_remain(tmp_path, workers):
    with named_backends("a", "b", "c") as (a, b, c), \
            start(tmp_path, [a.address, b.address, c.address], workers=workers) as run:
        if workers > 1:
            wait_for(lambda: ready_workers(run) == workers, READY, what="every worker ready", on_timeout=run.log)
        assert post(run, f"/upstreams/app/servers/{a.address}/drain").status_code == 200
        assert post(run, f"/upstreams/app/servers/{c.address}/disable").status_code == 200
        # a gets a new weight (the reload rebuilds its Server), c is removed.
        text = run.config_path.read_text().replace(f'"{a.address}", "{b.address}", "{c.address}"',
                                                   f'{{ address = "{a.address}", weight = 3 }}, "{b.address}"')
        run.rewrite(text)
        run.signal(signal.SIGHUP)
        marker = ") reloaded" if workers > 1 else "config reloaded"
        wait_for(lambda: run.log().count(marker) >= workers, READY, what="the reload", on_timeout=run.log)
        view = requests.get(admin_url(run, "/upstreams/app"), timeout=10).json()
        assert [(s["address"], s["weight"], s["state"]) for s in view["servers"]] == \
            [(a.address, 3, "draining"), (b.address, 1, "up")]
        before = a.requests
        assert {answered_by(run.url) for _ in range(20)} == {"b"}
        assert a.requests == before
        # c, added back by a later reload, starts enabled: the removal forgot its state.
        run.rewrite(run.config_path.read_text().replace(f'"{b.address}"]', f'"{b.address}", "{c.address}"]'))
        run.signal(signal.SIGHUP)
        wait_for(lambda: run.log().count(marker) >= 2 * workers, READY, what="the second reload", on_timeout=run.log)
        assert server_view(run, c.address)["state"] == "up"


@pytest.mark.parametrize("workers", [1, 2])
def test_a_reload_that_rebuilds_a_draining_server_still_counts_its_requests_in_flight(tmp_path, workers,
                                                                                     monkeypatch):
    # A new weight makes the reload build a new Server object; the request in flight holds the old one.
    # drain --wait must not report the server idle (and a deploy restart it) while that request runs.
    monkeypatch.setattr(backends, "NAMED_HOLD_LIMIT", 60.0)
    with named_backends("a", "b") as (a, b), start(tmp_path, [a.address, b.address], workers=workers) as run:
        if workers > 1:
            wait_for(lambda: ready_workers(run) == workers, READY, what="every worker ready", on_timeout=run.log)
        slow = hold_on(a, b, run, 1)
        assert post(run, f"/upstreams/app/servers/{a.address}/drain").status_code == 200
        run.rewrite(run.config_path.read_text().replace(f'"{a.address}", "{b.address}"',
                                                        f'{{ address = "{a.address}", weight = 3 }}, "{b.address}"'))
        run.signal(signal.SIGHUP)
        marker = ") reloaded" if workers > 1 else "config reloaded"
        wait_for(lambda: run.log().count(marker) >= workers, READY, what="the reload", on_timeout=run.log)
        view = server_view(run, a.address)
        assert (view["weight"], view["state"], view["active_requests"]) == (3, "draining", 1)
        timed_out = ctl(run, "drain", "app", a.address, "--wait", "--timeout", "300ms")
        assert timed_out.returncode == 5, timed_out.stdout + timed_out.stderr
        metrics = requests.get(admin_url(run, "/metrics"), timeout=10).text
        assert f'pyproxy_upstream_active_requests{{upstream="app",server="{a.address}"}} 1' in metrics
        a.release.set()
        assert slow.join() == [(200, SLOW_BODY)] * len(slow.threads)
        drained = ctl(run, "drain", "app", a.address, "--wait", "--timeout", "30s")
        assert drained.returncode == 0, drained.stderr
        assert server_view(run, a.address)["active_requests"] == 0


def test_requests_in_flight_on_workers_retired_by_a_listen_change_still_count(tmp_path, monkeypatch):
    # A new server.listen replaces every worker; the old ones finish their requests first. Until they
    # did, a drained server is not idle: drain --wait must not tell a deploy script it is.
    monkeypatch.setattr(backends, "NAMED_HOLD_LIMIT", 60.0)
    with named_backends("a", "b") as (a, b), start(tmp_path, [a.address, b.address], workers=2) as run:
        wait_for(lambda: ready_workers(run) == 2, READY, what="both workers ready", on_timeout=run.log)
        run.rewrite(run.config_path.read_text().replace('graceful_timeout = "5s"', 'graceful_timeout = "60s"'))
        run.signal(signal.SIGHUP)
        wait_for(lambda: run.log().count(") reloaded") >= 2, READY, what="the reload", on_timeout=run.log)
        slow = hold_on(a, b, run, 1)
        assert post(run, f"/upstreams/app/servers/{a.address}/drain").status_code == 200
        text = run.config_path.read_text()
        run.rewrite(text.replace(f'listen = "127.0.0.1:{run.port}"',
                                 f'listen = ["127.0.0.1:{run.port}", "127.0.0.1:{free_port()}"]', 1))
        run.signal(signal.SIGHUP)
        wait_for(lambda: ready_workers(run) == 4, READY, what="two new workers ready", on_timeout=run.log)
        assert server_view(run, a.address)["active_requests"] == 1
        timed_out = ctl(run, "drain", "app", a.address, "--wait", "--timeout", "300ms")
        assert timed_out.returncode == 5, timed_out.stdout + timed_out.stderr
        a.release.set()
        assert slow.join() == [(200, SLOW_BODY)] * len(slow.threads)
        drained = ctl(run, "drain", "app", a.address, "--wait", "--timeout", "30s")
        assert drained.returncode == 0, drained.stderr


def test_state_applies_in_both_workers_and_in_a_restarted_one(tmp_path):
    with named_backends("a", "b") as (a, b), start(tmp_path, [a.address, b.address], workers=2) as run:
        wait_for(lambda: ready_workers(run) == 2, READY, what="both workers ready", on_timeout=run.log)
        assert post(run, f"/upstreams/app/servers/{a.address}/drain").status_code == 200
        before = a.requests
        assert_every_worker_avoids(run, a, before)

        victim = min(children(run.proc.pid))
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: ready_workers(run) == 3, READY, what="the replacement worker ready", on_timeout=run.log)
        assert victim not in {w["pid"] for w in admin_status(run.admin_port)["workers"]}
        assert_every_worker_avoids(run, a, before)

        assert post(run, f"/upstreams/app/servers/{a.address}/enable").status_code == 200
        wait_for(lambda: "a" in {answered_by(run.url) for _ in range(4)}, READY, what="traffic to a again")


def test_a_worker_starts_serving_with_the_admin_states_already_applied(tmp_path, monkeypatch):
    # A replacement worker accepts the connections waiting for it as soon as its loop runs; the states
    # replayed after its "ready" come later, and in between it sent requests to a drained server.
    # Here the worker's loop only records the states it would start serving with, then returns.
    seen = tmp_path / "states-at-serve.json"

    def record_states(process) -> None:
        servers = process.app.runtime.upstreams["app"].servers
        seen.write_text(json.dumps({server.address: server.admin_state for server in servers}))

    monkeypatch.setattr(ProxyProcess, "serve_forever", record_states)
    config_path = tmp_path / "proxy.toml"
    config_path.write_text(api_config(free_port(), free_port(), ["127.0.0.1:9", "127.0.0.1:10"], workers=2))
    config = load_config(config_path)
    listen = config.server.listen[0]
    supervisor = Supervisor(config, None, bind_slot_sockets([(listen, bind_config_listener(listen))], 2))
    try:
        assert supervisor.set_server_state("app", "127.0.0.1:9", "draining") == "enabled"
        supervisor._spawn(0)
        pid = supervisor.slots[0].pid
        wait_for(lambda: os.waitpid(pid, os.WNOHANG)[0] == pid, READY, what="the worker to record and exit")
        assert json.loads(seen.read_text()) == {"127.0.0.1:9": "draining", "127.0.0.1:10": "enabled"}
    finally:
        worker = supervisor.slots[0]
        if worker is not None:
            worker.link.close()
            with contextlib.suppress(ProcessLookupError, ChildProcessError):  # reaped above unless it hung
                os.kill(worker.pid, signal.SIGKILL)
                os.waitpid(worker.pid, 0)
        supervisor._close_all_sockets()


def test_an_enable_while_a_worker_forks_reaches_that_worker(tmp_path, monkeypatch):
    # The enable came after the new worker's states were copied (it starts draining) and before the
    # supervisor had its control link: the enable went to the other workers only, and the replay after
    # "ready" sends the servers that are not enabled, so this worker kept the server drained for good,
    # unseen: /status takes admin states from the supervisor.
    config_path = tmp_path / "proxy.toml"
    config_path.write_text(api_config(free_port(), free_port(), ["127.0.0.1:9", "127.0.0.1:10"], workers=2))
    config = load_config(config_path)
    listen = config.server.listen[0]
    supervisor = Supervisor(config, None, bind_slot_sockets([(listen, bind_config_listener(listen))], 2))
    real_fork = os.fork

    def fork_then_enable() -> int:
        pid = real_fork()
        if pid != 0:  # the supervisor, before it registers the worker
            supervisor.set_server_state("app", "127.0.0.1:9", "enabled")
        return pid

    def worker_states() -> dict:
        answers = supervisor.collect("status")
        servers = answers[0][1]["upstreams"]["app"]["servers"] if answers else []
        return {server["address"]: server["admin_state"] for server in servers}

    try:
        assert supervisor.set_server_state("app", "127.0.0.1:9", "draining") == "enabled"
        monkeypatch.setattr(os, "fork", fork_then_enable)
        supervisor._spawn(0)
        monkeypatch.setattr(os, "fork", real_fork)
        assert supervisor.slots[0].ready.wait(READY), "the worker never got ready"
        wait_for(lambda: worker_states() == {"127.0.0.1:9": "enabled", "127.0.0.1:10": "enabled"}, READY,
                 what="the enable in the new worker")
    finally:
        worker = supervisor.slots[0]
        if worker is not None:
            worker.link.close()
            with contextlib.suppress(ProcessLookupError, ChildProcessError):
                os.kill(worker.pid, signal.SIGKILL)
                os.waitpid(worker.pid, 0)
        supervisor._close_all_sockets()


def test_a_worker_that_missed_a_reload_removing_a_drained_server_gets_it_enabled(tmp_path):
    # Two reloads in a row, the first removing a drained server and the second listing it again: the
    # supervisor forgot the drain (a removed server is forgotten) but a worker that read the file only
    # after both never removed the server, and kept it drained. The replay after its reload listed only
    # the supervisor's servers that are not enabled, so the drain held in that worker for good, unseen.
    with named_backends("a", "b") as (a, b), start(tmp_path, [a.address, b.address], workers=2) as run:
        wait_for(lambda: ready_workers(run) == 2, READY, what="both workers ready", on_timeout=run.log)
        assert post(run, f"/upstreams/app/servers/{a.address}/drain").status_code == 200
        late = min(children(run.proc.pid))
        os.kill(late, signal.SIGSTOP)  # it reads its control link (and the file) only after both reloads
        try:
            run.rewrite(api_config(run.port, run.admin_port, [b.address], workers=2))
            run.signal(signal.SIGHUP)
            wait_for(lambda: f"-{a.address}" in run.log(), READY, what="the reload removing a", on_timeout=run.log)
            run.rewrite(api_config(run.port, run.admin_port, [a.address, b.address], workers=2))
            run.signal(signal.SIGHUP)
            wait_for(lambda: f"+{a.address}" in run.log(), READY, what="the reload adding a", on_timeout=run.log)
        finally:
            os.kill(late, signal.SIGCONT)
        assert post(run, f"/upstreams/app/servers/{b.address}/drain").status_code == 200
        a.release.set()

        def answers() -> set:  # fresh connections, which the kernel spreads over both workers
            statuses = set()
            for _ in range(16):
                with requests.Session() as session:
                    response = session.get(run.url, timeout=10)
                statuses.add((response.status_code, response.headers.get("X-Backend")))
            return statuses
        wait_for(lambda: answers() == {(200, "a")}, READY, what="every worker sending to a", on_timeout=run.log)


def assert_every_worker_avoids(run, drained, before: int) -> None:
    """Fresh connections until every worker served requests since now; none reached ``drained``."""
    def served_since(start: dict) -> dict:
        return {w["pid"]: w["requests_total"] - start.get(w["pid"], 0) for w in admin_status(run.admin_port)["workers"]}

    start_counts = {w["pid"]: w["requests_total"] for w in admin_status(run.admin_port)["workers"]}
    for _ in range(30):
        assert {answered_by(run.url) for _ in range(16)} == {"b"}
        since = served_since(start_counts)
        if len(since) == 2 and all(count > 0 for count in since.values()):
            break
    assert len(since) == 2 and all(count > 0 for count in since.values()), since
    assert drained.requests == before


def test_ctl_refuses_an_empty_upstream_or_address_as_a_usage_error(tmp_path):
    with named_backends("a") as (a,), start(tmp_path, [a.address]) as run:
        for args in (("drain", "app", ""), ("enable", "", a.address), ("disable", "app", " ")):
            result = ctl(run, *args)
            assert result.returncode == 2, result.stderr
            assert "must not be empty" in result.stderr
        assert server_view(run, a.address)["state"] == "up"


def test_ctl_does_not_report_success_from_something_else_on_the_admin_address(tmp_path):
    # The admin port taken by another service (the proxy logged that it could not listen there): its
    # 200 answers (an echo of the request) must not read as a drain done, or a deploy script restarts a
    # server under traffic.
    other = backends.ScriptedBackend().start()
    try:
        config = tmp_path / "proxy.toml"
        config.write_text(api_config(free_port(), other.port, ["127.0.0.1:9"]))
        for args in (("drain", "app", "127.0.0.1:9"), ("enable", "app", "127.0.0.1:9"), ("status",)):
            result = subprocess.run(pyproxy_command() + ["ctl", "-c", str(config), *args], capture_output=True,
                                    text=True, timeout=CTL_EXIT, cwd=REPO)
            assert result.returncode == 3, (args, result.stdout, result.stderr)
            assert f"is http://127.0.0.1:{other.port} pyproxy's admin listener?" in result.stderr
        assert {request.method for request in other.requests} == {"GET", "POST"}
    finally:
        other.stop()


def test_ctl_drain_timeout_without_wait_is_a_usage_error_and_changes_nothing(tmp_path):
    # "--timeout 60s" alone returned at once with exit 0: a deploy script that forgot --wait would
    # restart a server still serving requests.
    with named_backends("a") as (a,), start(tmp_path, [a.address]) as run:
        result = ctl(run, "drain", "app", a.address, "--timeout", "60s")
        assert result.returncode == 2, result.stdout + result.stderr
        assert "--timeout goes with --wait" in result.stderr
        assert server_view(run, a.address)["state"] == "up"


def test_ctl_talks_to_the_admin_listener_directly_whatever_http_proxy_says(tmp_path):
    # urllib follows http_proxy: with one set (common on servers), ctl sent its requests, bearer token
    # included, to that proxy instead of the admin listener.
    elsewhere = backends.ScriptedBackend().start()
    proxied = {key: value for key, value in os.environ.items() if key.lower() != "no_proxy"}
    proxied.update(http_proxy=f"http://{elsewhere.address}", HTTP_PROXY=f"http://{elsewhere.address}")
    try:
        with named_backends("a") as (a,), start(tmp_path, [a.address]) as run:
            for args in (("drain", "app", a.address), ("status",)):
                result = subprocess.run(pyproxy_command() + ["ctl", "-c", str(run.config_path), *args], env=proxied,
                                        capture_output=True, text=True, timeout=CTL_EXIT, cwd=REPO)
                assert result.returncode == 0, result.stderr
            assert server_view(run, a.address)["state"] == "draining"
        assert elsewhere.requests == []
    finally:
        elsewhere.stop()


def test_ctl_takes_an_address_in_any_form_the_config_would(tmp_path):
    # The config normalises addresses (/status shows "[::1]:80" for "[0::1]:80", "localhost" for
    # "LOCALHOST"); ctl took only the exact text, and an unbracketed IPv6 address got a bare 404.
    with named_backends("a") as (a,):
        port = a.address.rsplit(":", 1)[1]
        with start(tmp_path, [f"localhost:{port}", "[::1]:9"]) as run:
            for given, shown in ((f"LOCALHOST:{port}", f"localhost:{port}"), ("[0:0::1]:9", "[::1]:9")):
                result = ctl(run, "drain", "app", given, "--wait", "--timeout", "10s")
                assert result.returncode == 0, result.stderr
                assert f"app/{shown}: draining (was enabled)" in result.stdout
                assert server_view(run, shown)["state"] == "draining"
            unbracketed = ctl(run, "drain", "app", "::1:9")
            assert unbracketed.returncode == 2
            assert 'IPv6 addresses need brackets, e.g. "[::1]:8080"' in unbracketed.stderr


def test_drain_wait_fails_when_the_server_is_enabled_again_meanwhile(tmp_path, monkeypatch):
    # Another operator (or a restart of the proxy) enables the server while a deploy script waits: the
    # wait must not end in "drained" (exit 0) when its requests happen to finish; it is in rotation.
    monkeypatch.setattr(backends, "NAMED_HOLD_LIMIT", 60.0)
    with named_backends("a", "b") as (a, b), start(tmp_path, [a.address, b.address]) as run:
        slow = hold_on(a, b, run, 1)
        waiting = ctl_started(run, "drain", "app", a.address, "--wait", "--timeout", "60s")
        try:
            wait_for(lambda: server_view(run, a.address)["state"] == "draining", READY, what="a draining")
            assert post(run, f"/upstreams/app/servers/{a.address}/enable").status_code == 200
            a.release.set()
            out, err = waiting.communicate(timeout=CTL_EXIT)
        finally:
            if waiting.poll() is None:
                waiting.kill()
        assert waiting.returncode == 3, out + err
        assert f"app/{a.address} is enabled now: no longer draining" in err
        assert slow.join() == [(200, SLOW_BODY)] * len(slow.threads)


@pytest.mark.parametrize("answer", [b"SSH-2.0-OpenSSH_9.2\r\n",  # another service on the admin port
                                    b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"state"'])  # cut short
def test_ctl_says_what_is_wrong_with_an_answer_that_is_not_http_or_cut_short(tmp_path, answer):
    # http.client raised BadStatusLine / IncompleteRead, which are no OSError: ctl printed a traceback
    # and exited 1, the code for a config file problem.
    def script(peer):
        peer.read_request()
        peer.send(answer)

    other = backends.RawBackend(script).start()
    try:
        config = tmp_path / "proxy.toml"
        config.write_text(api_config(free_port(), other.port, ["127.0.0.1:9"]))
        for args in (("drain", "app", "127.0.0.1:9"), ("status",)):
            result = subprocess.run(pyproxy_command() + ["ctl", "-c", str(config), *args], capture_output=True,
                                    text=True, timeout=CTL_EXIT, cwd=REPO)
            assert result.returncode == 3, (args, result.stdout, result.stderr)
            assert "Traceback" not in result.stderr
            assert f"is http://127.0.0.1:{other.port} pyproxy's admin listener?" in result.stderr
    finally:
        other.stop()


def test_errors_http_server_answers_itself_are_json_on_the_api_paths(tmp_path):
    # An unknown method or a header line too long is refused by http.server before any do_* method: its
    # HTML error page reached the API's clients, which expect {"error": ...} on every answer.
    with named_backends("a") as (a,), start(tmp_path, [a.address]) as run:
        purge = requests.request("PURGE", admin_url(run, "/upstreams/app"), timeout=10)
        assert purge.status_code == 501
        assert purge.headers["Content-Type"].startswith("application/json")
        assert purge.json() == {"error": "Unsupported method ('PURGE')"}
        long_header = requests.get(admin_url(run, "/upstreams/app"), headers={"X-Long": "x" * 70000}, timeout=10)
        assert long_header.status_code == 431
        assert "error" in long_header.json()
        # Outside the API, an unknown method is the endpoints' plain 405 (tests/test_admin.py).
        assert requests.request("PURGE", admin_url(run, "/status"), timeout=10).headers["Content-Type"].startswith(
            "text/plain")
        assert requests.get(admin_url(run, "/upstreams/app"), timeout=10).status_code == 200


@pytest.mark.parametrize("status", ["302 Found", "307 Temporary Redirect"])
def test_ctl_follows_no_redirect_so_the_token_goes_nowhere_else(tmp_path, status):
    # urllib follows a redirect with the request's headers, Authorization included: whatever answers on
    # the admin address (another service took the port) could send ctl, and its bearer token, anywhere.
    elsewhere = backends.ScriptedBackend().start()

    def redirect(peer):
        peer.read_request()
        peer.send(f"HTTP/1.1 {status}\r\nLocation: http://{elsewhere.address}/upstreams\r\n"
                  "Content-Length: 0\r\nConnection: close\r\n\r\n".encode())

    on_admin_port = backends.RawBackend(redirect).start()
    try:
        config = tmp_path / "proxy.toml"
        config.write_text(api_config(free_port(), on_admin_port.port, ["127.0.0.1:9"]))
        for args in (("drain", "app", "127.0.0.1:9"), ("status",)):
            result = subprocess.run(pyproxy_command() + ["ctl", "-c", str(config), *args], capture_output=True,
                                    text=True, timeout=CTL_EXIT, cwd=REPO)
            assert result.returncode == 3, (args, result.stdout, result.stderr)
            assert status.split()[0] in result.stderr
        assert elsewhere.requests == []
    finally:
        on_admin_port.stop()
        elsewhere.stop()
