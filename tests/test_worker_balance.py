"""How worker processes share new connections (server.workers > 1).

Each worker accepts on its own SO_REUSEPORT socket, so the kernel spreads connections over the workers
by a hash of the client's address and port, whichever worker happens to be awake. With one socket
shared by every worker, the first to wake took most of a burst (52/12 for 64 connections in most
runs, though not in every one): the burst test checks the outcome, and the socket test checks the
mechanism in a way that does not depend on timing.
"""

from __future__ import annotations

import errno
import os
import signal
import socket

import pytest

from proxy.config.schema import load_config
from proxy.serve.runner import bind_config_listener
from proxy.serve import supervisor as supervisor_module
from proxy.serve.supervisor import Supervisor, WorkerHandle, bind_slot_sockets
from tests.support.timing import wait_for
from tests.support.backends import named_backends
from tests.support.client import read_response
from tests.support.processes import (WORKERS, admin_status, answered_by, children, ready_workers, running_proxy,
                                     workers_config)

pytestmark = pytest.mark.timeout(60)
CONNECTIONS = 64
# A fair hash gives each of 2 workers 32 ± 4 (one standard deviation): fewer than 16 happens by chance
# about once in 30,000 runs.
FEWEST_PER_WORKER = CONNECTIONS // 4


def open_keepalive_connections(port: int, count: int) -> list[socket.socket]:
    """``count`` connections opened together (a burst, as a load balancer or wrk opens them), then one
    request on each; they stay open so each worker's count is its share of the burst."""
    conns = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(count)]
    for sock in conns:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
    for sock in conns:
        assert read_response(sock).startswith(b"HTTP/1.1 200"), "a request of the burst failed"
    return conns


def listening_inodes(port: int) -> set[int]:
    """Inodes of the IPv4 sockets listening on ``port`` (/proc/net/tcp: state 0A is LISTEN)."""
    inodes = set()
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(int(fields[9]))
    return inodes


def sockets_held(pid: int, inodes: set[int]) -> set[int]:
    """Which of ``inodes`` the process holds a descriptor of."""
    held = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:  # closed while we looked
            continue
        if target.startswith("socket:[") and int(target[8:-1]) in inodes:
            held.add(int(target[8:-1]))
    return held


def listeners_by_worker(run, port: int) -> dict[int, set[int]]:
    inodes = listening_inodes(port)
    return {pid: sockets_held(pid, inodes) for pid in children(run.proc.pid)}


def gone(pid: int) -> bool:
    """Dead: a zombie not yet reaped by the supervisor, or reaped."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def requests_per_worker(admin_port: int, counter: str = "requests_total") -> dict[int, int]:
    return {worker["pid"]: worker.get(counter, 0) for worker in admin_status(admin_port)["workers"]}


def test_a_burst_of_keepalive_connections_is_shared_between_the_workers(tmp_path):
    with named_backends("a") as (a,):
        port, admin_port, config = workers_config(a.address)
        with running_proxy(tmp_path, config) as run:
            wait_for(lambda: ready_workers(run) == WORKERS, what="both workers ready", on_timeout=run.log)
            before = requests_per_worker(admin_port)  # the start-up probe's request
            accepted_before = requests_per_worker(admin_port, "connections_accepted")
            conns = open_keepalive_connections(port, CONNECTIONS)
            try:
                after = requests_per_worker(admin_port)
                shares = {pid: after[pid] - before.get(pid, 0) for pid in after}
                assert sum(shares.values()) == CONNECTIONS, shares
                assert len(shares) == WORKERS and min(shares.values()) >= FEWEST_PER_WORKER, shares
                accepted = requests_per_worker(admin_port, "connections_accepted")
                # one request per connection: each worker accepted the connections it served
                assert {pid: accepted[pid] - accepted_before[pid] for pid in accepted} == shares
            finally:
                for sock in conns:
                    sock.close()


def test_each_worker_accepts_on_a_listening_socket_of_its_own(tmp_path):
    """The mechanism behind the even split, checked without depending on timing: one socket per
    worker in the port's SO_REUSEPORT group, none shared (a shared one lets one worker take a burst)."""
    with named_backends("a") as (a,):
        port, admin_port, config = workers_config(a.address)
        with running_proxy(tmp_path, config) as run:
            wait_for(lambda: ready_workers(run) == WORKERS, what="both workers ready", on_timeout=run.log)
            held = listeners_by_worker(run, port)
            assert len(held) == WORKERS and all(len(inodes) == 1 for inodes in held.values()), held
            assert len(set.union(*held.values())) == WORKERS, f"workers share a listening socket: {held}"
            assert listening_inodes(port) == set.union(*held.values())  # no stray socket takes connections


def test_a_replacement_worker_takes_over_its_predecessors_socket(tmp_path):
    """A worker killed while idle: the replacement accepts on the same socket, so every connection the
    kernel hashes to that slot is served, during the restart and after it."""
    with named_backends("a") as (a,):
        port, admin_port, config = workers_config(a.address)
        with running_proxy(tmp_path, config) as run:
            wait_for(lambda: ready_workers(run) == WORKERS, what="both workers ready")
            before = children(run.proc.pid)
            victim = min(before)
            victims_socket = listeners_by_worker(run, port)[victim]
            os.kill(victim, signal.SIGKILL)
            wait_for(lambda: gone(victim), what="the killed worker to die")
            conns = open_keepalive_connections(port, CONNECTIONS)  # some wait in the dead worker's queue
            for sock in conns:
                sock.close()
            wait_for(lambda: ready_workers(run) == WORKERS + 1, what="the replacement", on_timeout=run.log)
            pids = children(run.proc.pid)
            assert victim not in pids
            shares = requests_per_worker(admin_port)
            assert set(shares) == pids and all(shares.values()), shares  # the replacement served its slot
            (replacement,) = pids - before
            assert listeners_by_worker(run, port)[replacement] == victims_socket  # the same socket, not a new one
            assert [answered_by(run.url) for _ in range(20)] == ["a"] * 20
            run.signal(signal.SIGTERM)
            assert run.wait_exit() == 0


# -- the supervisor's sockets, without processes -----------------------------------------------------

class _NoLink:
    def close(self) -> None:
        pass


def accepted_within(sock: socket.socket, limit: int) -> int:
    """How many connections wait in a listening socket's queue (at most ``limit``), accepting them."""
    sock.settimeout(0.5)  # a connect() returned: its connection is already queued, or in another socket
    count = 0
    for _ in range(limit):
        try:
            sock.accept()[0].close()
        except TimeoutError:
            break
        count += 1
    return count


def test_a_worker_waiting_to_restart_gives_its_connections_to_the_live_one(tmp_path):
    config_path = tmp_path / "proxy.toml"
    config_path.write_text(workers_config("127.0.0.1:9")[2])
    config = load_config(config_path)
    listen = config.server.listen[0]
    now = 100.0
    supervisor = Supervisor(config, None, bind_slot_sockets([(listen, bind_config_listener(listen))], WORKERS),
                            clock=lambda: now)
    try:  # a worker that dies 1s after it started, the second time in a row
        dying, live = WorkerHandle(0, 1_000_001, _NoLink(), now - 1), WorkerHandle(1, 1_000_002, _NoLink(), now - 1)
        live.ready.set()
        supervisor.slots = [dying, live]
        supervisor.failures[0] = 1  # it died young before: this time its restart waits
        supervisor._worker_exited(dying.pid, signal.SIGKILL)
        assert supervisor.restart_at[0] > now
        assert supervisor.slot_sockets[0] == {}
        clients = [socket.create_connection(("127.0.0.1", listen.port), timeout=5) for _ in range(20)]
        assert accepted_within(supervisor.slot_sockets[1][listen.address], 20) == 20  # none lost in a dead queue
        for client in clients:
            client.close()
        (rebound_listen, rebound), = supervisor._slot_listeners(0)  # the replacement binds its slot anew
        assert rebound_listen == listen and rebound.getsockname()[1] == listen.port
    finally:
        supervisor._close_all_sockets()


def test_a_listen_change_whose_fork_fails_keeps_the_supervisor_and_retries(tmp_path, monkeypatch):
    """fork() failing (EAGAIN: a process limit) while a reload replaces the workers used to raise out
    of the supervisor's loop: the supervisor exited, and its workers drained away with it."""
    config_path = tmp_path / "proxy.toml"
    config_path.write_text(workers_config("127.0.0.1:9")[2])
    config = load_config(config_path)
    listen = config.server.listen[0]
    config_path.write_text(workers_config("127.0.0.1:9")[2])  # another free port: a listen change
    moved = load_config(config_path)
    now = 100.0
    supervisor = Supervisor(config, None, bind_slot_sockets([(listen, bind_config_listener(listen))], WORKERS),
                            clock=lambda: now)
    signalled = []
    monkeypatch.setattr(supervisor_module, "_signal", lambda pid, signum: signalled.append((pid, signum)))

    def no_fork(slot):
        raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")

    monkeypatch.setattr(supervisor, "_spawn", no_fork)
    try:
        old = [WorkerHandle(slot, 1_000_001 + slot, _NoLink(), now - 100) for slot in range(WORKERS)]
        supervisor.slots = list(old)
        supervisor._replace_workers(moved)
        assert sorted(supervisor.restart_at) == list(range(WORKERS))  # each slot tried again later
        assert all(due > now for due in supervisor.restart_at.values())
        assert supervisor.slots == [None] * WORKERS  # the old workers are retiring, not serving
        assert sorted(supervisor.retiring) == [handle.pid for handle in old]
        assert signalled == [(handle.pid, signal.SIGTERM) for handle in old]
    finally:
        supervisor._close_all_sockets()
