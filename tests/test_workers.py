"""Worker processes (server.workers > 1): the real ``pyproxy`` command with a supervisor and forked
workers. Worker PIDs come from /proc (the supervisor's children) and from /status, which the
supervisor aggregates over the workers through their control links.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
from pathlib import Path

import pytest
import requests

from proxy.serve import supervisor
from proxy.serve.supervisor import ControlError, ControlLink
from tests.support.backends import SLOW_BODY, named_backends
from tests.support.ports import free_port
from tests.support.processes import (Load, admin_status, answered_by, children, proxy_config, running_proxy,
                                     spread_requests, start_slow_request)
from tests.support.timing import wait_for
from tests.support.processes import WORKERS, ready_workers, workers_config

pytestmark = pytest.mark.timeout(60)
def test_two_workers_both_serve_and_status_aggregates(tmp_path):
    with named_backends("a") as (a,):
        port, admin_port, config = workers_config(a.address)
        with running_proxy(tmp_path, config) as run:
            wait_for(lambda: ready_workers(run) == WORKERS, what="both workers ready", on_timeout=run.log)
            pids = children(run.proc.pid)
            assert len(pids) == WORKERS
            per_pid = spread_requests(run.url, admin_port, WORKERS)
            assert set(per_pid) == pids and all(per_pid.values()), per_pid
            document = admin_status(admin_port)
            assert document["processes"] == WORKERS
            total = document["upstreams"]["app"]["servers"][0]["requests_total"]
            assert total == sum(per_pid.values()) == a.requests
            line = f'pyproxy_requests_total{{upstream="app",code="200"}} {total}'
            # counted just after each response went out: wait for the last one, then it must match
            wait_for(lambda: line in requests.get(f"http://127.0.0.1:{admin_port}/metrics", timeout=5).text,
                     what="every request in /metrics", on_timeout=run.log)
            run.signal(signal.SIGTERM)
            assert run.wait_exit() == 0


def test_a_killed_worker_is_replaced_and_traffic_continues(tmp_path):
    with named_backends("a") as (a,):
        port, admin_port, config = workers_config(a.address)
        with running_proxy(tmp_path, config) as run:
            wait_for(lambda: ready_workers(run) == WORKERS, what="both workers ready")
            before = children(run.proc.pid)
            victim = min(before)
            os.kill(victim, signal.SIGKILL)
            wait_for(lambda: len(children(run.proc.pid) - {victim}) == WORKERS, what="a replacement worker",
                     on_timeout=run.log)
            after = children(run.proc.pid)
            assert victim not in after and len(after - before) == 1
            assert "was killed by SIGKILL" in run.log()
            wait_for(lambda: ready_workers(run) == WORKERS + 1, what="the replacement to be ready")
            assert [answered_by(run.url) for _ in range(20)] == ["a"] * 20
            assert {w["pid"] for w in admin_status(admin_port)["workers"]} == after
            run.signal(signal.SIGTERM)
            assert run.wait_exit() == 0


def test_sigterm_with_workers_finishes_in_flight_requests_and_exits_0(tmp_path):
    with named_backends("a") as (a,):
        port, admin_port, config = workers_config(a.address)
        with running_proxy(tmp_path, config) as run:
            wait_for(lambda: ready_workers(run) == WORKERS, what="both workers ready")
            pids = children(run.proc.pid)
            thread, result = start_slow_request(run.url)
            assert a.slow_entered.wait(5)
            run.signal(signal.SIGTERM)
            wait_for(lambda: requests.get(f"http://127.0.0.1:{admin_port}/healthz", timeout=5).status_code == 503,
                     what="/healthz to say draining")
            wait_for(lambda: not _accepts(port), what="the listeners to close")
            a.release.set()
            thread.join(10)
            assert result == {"status": 200, "length": SLOW_BODY}
            assert run.wait_exit() == 0
            assert all(not Path(f"/proc/{pid}").exists() or _zombie(pid) for pid in pids)


def test_sighup_with_workers_reloads_every_worker_under_load(tmp_path):
    with named_backends("a", "b") as (a, b):
        port, admin_port, config = workers_config(a.address)
        with running_proxy(tmp_path, config) as run:
            wait_for(lambda: ready_workers(run) == WORKERS, what="both workers ready")
            load = Load(run.url, clients=8)
            try:
                wait_for(lambda: load.outcomes().count("a") >= 50, what="load on a")
                run.rewrite(config.replace(a.address, b.address))
                run.signal(signal.SIGHUP)
                wait_for(lambda: run.log().count(") reloaded") == WORKERS, what="every worker reloaded",
                         on_timeout=run.log)
                mark = len(load.outcomes())
                wait_for(lambda: load.outcomes()[mark:].count("b") >= 100, what="traffic on b")
            finally:
                load.stop()
            assert load.failures() == []
            # every worker switched: only the requests in flight at the mark (one per client) end on a
            assert load.outcomes()[mark:].count("a") <= 8
            assert load.outcomes()[-20:] == ["b"] * 20
            run.rewrite("this is not toml [")
            run.signal(signal.SIGHUP)
            wait_for(lambda: "reload failed, keeping the old config" in run.log(), what="the reload error")
            assert [answered_by(run.url) for _ in range(10)] == ["b"] * 10
            assert run.log().count(") reloaded") == WORKERS  # the invalid file never reached the workers


def test_sighup_with_workers_moves_the_supervisors_admin_listener(tmp_path):
    with named_backends("a") as (a,):
        port, admin_port, config = workers_config(a.address)
        with running_proxy(tmp_path, config) as run:
            wait_for(lambda: ready_workers(run) == WORKERS, what="both workers ready")
            assert admin_status(admin_port)["processes"] == WORKERS
            new_admin_port = free_port()
            run.rewrite(config.replace(f"127.0.0.1:{admin_port}", f"127.0.0.1:{new_admin_port}"))
            run.signal(signal.SIGHUP)
            wait_for(lambda: _accepts(new_admin_port), what="the admin listener on its new port", on_timeout=run.log)
            assert admin_status(new_admin_port)["processes"] == WORKERS  # still the supervisor's merged view
            wait_for(lambda: not _accepts(admin_port), what="the old admin port closed", on_timeout=run.log)
            assert answered_by(run.url) == "a"


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


# -- the control link on its own -----------------------------------------------------------------------

def test_control_link_requests_replies_events_and_close():
    left_sock, right_sock = socket.socketpair()
    events: list[dict] = []
    closed = threading.Event()
    left = ControlLink(left_sock, events.append, on_close=closed.set, name="left")
    right = ControlLink(right_sock, lambda m: {"echo": m["op"], "pid": os.getpid()} if "op" in m else None,
                        name="right")
    left.start()
    right.start()
    assert left.request({"op": "status"}, timeout=5) == {"echo": "status", "pid": os.getpid()}
    right.send({"event": "ready", "pid": 1})
    wait_for(lambda: events == [{"event": "ready", "pid": 1}], what="the event")
    right.close()
    assert closed.wait(5)
    with pytest.raises(ControlError):
        left.request({"op": "status"}, timeout=1)
    left.close()


def test_control_link_skips_bad_lines_and_keeps_serving(monkeypatch):
    """A line that is not a JSON object (garbage, a JSON list, one past MAX_LINE) is logged and
    skipped: it used to end the link, and a worker whose link ends drains and exits."""
    monkeypatch.setattr(supervisor, "MAX_LINE", 64)
    link_sock, peer = socket.socketpair()
    closed = threading.Event()
    link = ControlLink(link_sock, lambda m: {"pong": m.get("op")}, on_close=closed.set, name="link")
    link.start()
    peer.settimeout(5)
    try:
        peer.sendall(b"not json\n" + b"[1, 2]\n" + b'{"op": "' + b"x" * 200 + b'"}\n' + b'{"op": "ping", "id": 7}\n')
        assert peer.makefile("rb").readline() == b'{"pong":"ping","reply_to":7}\n'
        assert not closed.is_set()
    finally:
        peer.close()
    assert closed.wait(5)
    link.close()


def test_control_link_to_a_peer_that_reads_nothing_gives_up_and_closes(monkeypatch):
    """A stopped worker (SIGSTOP, a reader starved of the GIL) read nothing while /status polls and
    broadcasts kept coming: after a few hundred messages the supervisor's sendall blocked for good,
    its loop (signals, restarts) or its admin thread with it."""
    monkeypatch.setattr(supervisor, "SEND_STALL", 0.2)
    link_sock, stuck = socket.socketpair()
    closed = threading.Event()
    link = ControlLink(link_sock, lambda m: None, on_close=closed.set, name="link")
    link.start()
    outcomes = []

    def keep_sending():
        for _ in range(5000):  # the buffer holds a few hundred of these
            if not link.send({"op": "status", "id": 1}):
                outcomes.append("refused")
                return
        outcomes.append("all sent")

    sender = threading.Thread(target=keep_sending, daemon=True)
    sender.start()
    sender.join(10)
    try:
        assert not sender.is_alive(), "send() still blocked on a peer that reads nothing"
        assert outcomes == ["refused"]
        assert closed.wait(5)  # the link is closed: a worker's end would now drain
        assert link.send({"op": "ping"}) is False
    finally:
        stuck.close()
        link.close()


def test_a_replacement_worker_serves_the_loaded_certificate_whatever_the_file_holds_now(tmp_path):
    """A worker forked after its predecessor died takes the TLS its supervisor loaded with the running
    config. It used to read the files again: a key overwritten on disk (no reload asked for) kept
    every replacement from starting, the slot down for good, a traceback per try."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    cert, key, ca_file = tmp_path / "site.crt", tmp_path / "site.key", tmp_path / "ca.pem"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_file))
    with named_backends("a") as (a,):
        port, admin_port, config = workers_config(a.address)
        tls_port = free_port()
        config = config.replace(f'listen = "127.0.0.1:{port}"', f'listen = ["127.0.0.1:{port}", {{ address = '
                                f'"127.0.0.1:{tls_port}", tls_cert = "{cert}", tls_key = "{key}" }}]')
        with running_proxy(tmp_path, config) as run:
            wait_for(lambda: ready_workers(run) == WORKERS, what="both workers ready")
            key.write_text("half a renewal\n")
            victim = min(children(run.proc.pid))
            os.kill(victim, signal.SIGKILL)
            wait_for(lambda: ready_workers(run) == WORKERS + 1, what="the replacement to be ready", on_timeout=run.log)
            assert "failed" not in run.log()
            for _ in range(10):  # both workers, most likely: each answers over the certificate it was given
                response = requests.get(f"https://127.0.0.1:{tls_port}/", verify=str(ca_file), timeout=5)
                assert response.headers["X-Backend"] == "a"
            run.signal(signal.SIGTERM)
            assert run.wait_exit() == 0


def test_listen_change_with_workers_replaces_them_and_moves_the_listener(tmp_path):
    with named_backends("a") as (a,):
        port, admin_port, config = workers_config(a.address)
        with running_proxy(tmp_path, config) as run:
            wait_for(lambda: ready_workers(run) == WORKERS, what="both workers ready")
            old_pids = children(run.proc.pid)
            new_port = free_port()
            run.rewrite(config.replace(f"127.0.0.1:{port}", f"127.0.0.1:{new_port}"))
            run.signal(signal.SIGHUP)
            wait_for(lambda: ready_workers(run) == 2 * WORKERS, what="the new workers", on_timeout=run.log)
            assert answered_by(f"http://127.0.0.1:{new_port}") == "a"
            wait_for(lambda: not _accepts(port), what="the old address to close", on_timeout=run.log)
            wait_for(lambda: not (children(run.proc.pid) & old_pids), what="the old workers to drain and exit")
            assert f"listener added: 127.0.0.1:{new_port}" in run.log()
            run.signal(signal.SIGTERM)
            assert run.wait_exit() == 0


def test_a_reload_while_old_workers_drain_reloads_the_new_ones_only(tmp_path):
    """The old workers of a listen change drain on the config they have: a reload meanwhile is not
    theirs to take, and is not reported as a failure of theirs."""
    with named_backends("a") as (a,):
        port, admin_port, config = workers_config(a.address)
        with running_proxy(tmp_path, config) as run:
            wait_for(lambda: ready_workers(run) == WORKERS, what="both workers ready")
            thread, result = start_slow_request(run.url)  # keeps one old worker draining
            assert a.slow_entered.wait(5), "the slow request never reached the backend"
            run.rewrite(config.replace(f"127.0.0.1:{port}", f"127.0.0.1:{free_port()}"))
            run.signal(signal.SIGHUP)
            wait_for(lambda: ready_workers(run) == 2 * WORKERS, what="the new workers", on_timeout=run.log)
            run.signal(signal.SIGHUP)  # the same file again: every worker is told to reload
            wait_for(lambda: run.log().count(") reloaded") == WORKERS, what="the new workers reloaded",
                     on_timeout=run.log)
            a.release.set()
            thread.join(10)
            assert result == {"status": 200, "length": SLOW_BODY}
            assert "failed to reload" not in run.log(), run.log()
            run.signal(signal.SIGTERM)
            assert run.wait_exit() == 0


def test_health_checks_run_in_the_supervisor_and_reach_every_worker_including_a_replacement(tmp_path):
    with named_backends("a") as (a,):
        dead = f"127.0.0.1:{free_port()}"  # nothing listens there: every check fails
        port, admin_port, config = workers_config(a.address)
        config = config.replace(f'servers = ["{a.address}"]', f'servers = ["{a.address}", "{dead}"]')
        config += '\n[upstreams.app.health]\npath = "/healthz"\ninterval = "200ms"\ntimeout = "150ms"\nunhealthy_after = 1\n'
        with running_proxy(tmp_path, config) as run:
            wait_for(lambda: ready_workers(run) == WORKERS, what="both workers ready")

            def every_worker_has_it_down():
                workers = admin_status(admin_port)["workers"]
                return len(workers) == WORKERS and all(w["down"] == [f"app/{dead}"] for w in workers)

            wait_for(every_worker_has_it_down, what="the verdict in every worker", on_timeout=run.log)
            document = admin_status(admin_port)
            dead_status = [s for s in document["upstreams"]["app"]["servers"] if s["address"] == dead][0]
            assert dead_status["state"] == "down" and dead_status["last_check"]["ok"] is False
            victim = min(children(run.proc.pid))
            os.kill(victim, signal.SIGKILL)
            wait_for(lambda: ready_workers(run) == WORKERS + 1, what="the replacement", on_timeout=run.log)
            wait_for(every_worker_has_it_down, what="the verdict replayed to the replacement")
            assert [answered_by(run.url) for _ in range(10)] == ["a"] * 10


@pytest.mark.parametrize("lock_of", [
    lambda sup: sup.app._rate_table_lock,  # DNS discovery rebuilding the runtime asks for the rate table
    lambda sup: sup._wakeup._lock,  # --watch's thread waking the supervisor's loop for a reload
], ids=["rate table", "wake-up pipe"])
def test_a_worker_forked_while_another_thread_holds_a_lock_starts(tmp_path, monkeypatch, lock_of):
    # A forked child has only the forking thread: a lock another supervisor thread held at that moment
    # stays locked in the child for good. The worker asked the supervisor's Application for its rate
    # table, and closed the supervisor's wake-up pipe under its lock, after the fork: it hung there.
    import contextlib

    from proxy.config.schema import load_config
    from proxy.serve.runner import bind_config_listener
    from proxy.serve.supervisor import Supervisor, bind_slot_sockets

    config_path = tmp_path / "proxy.toml"
    config_path.write_text(proxy_config(free_port(), "127.0.0.1:9", workers=WORKERS, admin_port=free_port()))
    config = load_config(config_path)
    listen = config.server.listen[0]
    sup = Supervisor(config, None, bind_slot_sockets([(listen, bind_config_listener(listen))], WORKERS))
    real_fork = os.fork
    held, release = threading.Event(), threading.Event()

    def hold_the_lock() -> None:
        with lock_of(sup):
            held.set()
            release.wait(30)

    def fork_while_locked() -> int:
        holder = threading.Thread(target=hold_the_lock, daemon=True)
        holder.start()
        assert held.wait(10)
        pid = real_fork()
        if pid != 0:
            release.set()
            holder.join(10)
        return pid

    try:
        monkeypatch.setattr(os, "fork", fork_while_locked)
        sup._spawn(0)
        monkeypatch.setattr(os, "fork", real_fork)
        assert sup.slots[0].ready.wait(20), "the worker never got ready"
    finally:
        release.set()
        worker = sup.slots[0]
        if worker is not None:
            worker.link.close()
            with contextlib.suppress(ProcessLookupError, ChildProcessError):
                os.kill(worker.pid, signal.SIGKILL)
                os.waitpid(worker.pid, 0)
        sup._close_all_sockets()


def test_a_supervisor_that_stopped_leaves_no_signal_wakeup_on_its_closed_pipe(tmp_path, monkeypatch):
    # As for the accept loop: the supervisor's self-pipe is the signal wake-up descriptor, and it
    # stayed registered after the pipe closed, so a late signal wrote a byte to a reused number.
    from proxy.config.schema import load_config
    from proxy.serve.runner import bind_config_listener
    from proxy.serve.supervisor import Supervisor, bind_slot_sockets

    config_path = tmp_path / "proxy.toml"
    config_path.write_text(proxy_config(free_port(), "127.0.0.1:9", workers=WORKERS))
    config = load_config(config_path)
    listen = config.server.listen[0]
    sup = Supervisor(config, None, bind_slot_sockets([(listen, bind_config_listener(listen))], WORKERS))
    monkeypatch.setattr(sup, "_spawn", lambda slot: None)  # no workers: the run is about its own loop
    watched = (*supervisor.SERVING_SIGNALS, signal.SIGCHLD)
    before = {signum: signal.getsignal(signum) for signum in watched}
    previous = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(previous)
    try:
        wakeup_fd = sup._wakeup.write_fd
        sup._signals.append(signal.SIGTERM)  # a stop that came while it started
        assert sup.run() == 0
        current = signal.set_wakeup_fd(previous)
        assert current != wakeup_fd, "the signal wake-up still points at the closed pipe"
    finally:
        signal.set_wakeup_fd(previous)
        for signum, action in before.items():
            signal.signal(signum, action)


def test_a_watched_file_changing_during_the_drain_starts_no_workers(tmp_path, monkeypatch):
    # --watch reloads through Supervisor.reload directly, without the SIGHUP path's check: a file
    # saved while the supervisor drained started a new set of workers for a listen change, which the
    # stop had already passed by (killed at the deadline, exit code 1).
    from proxy.config.schema import load_config
    from proxy.serve.runner import bind_config_listener
    from proxy.serve.supervisor import Supervisor, bind_slot_sockets

    port = free_port()
    config_path = tmp_path / "proxy.toml"
    config_path.write_text(proxy_config(port, "127.0.0.1:9", workers=WORKERS))
    config = load_config(config_path)
    listen = config.server.listen[0]
    sup = Supervisor(config, str(config_path), bind_slot_sockets([(listen, bind_config_listener(listen))], WORKERS))
    spawned = []
    monkeypatch.setattr(sup, "_spawn", spawned.append)
    try:
        sup.stop(signal.SIGTERM)  # no workers yet: it only closes the sockets and starts the clock
        config_path.write_text(proxy_config(port, "127.0.0.1:9", workers=WORKERS).replace(
            f"127.0.0.1:{port}", f"127.0.0.1:{free_port()}"))
        assert sup.reload() is False
        assert spawned == []
        assert sup.config is config
    finally:
        sup._close_all_sockets()
