"""Worker processes: one supervisor, N forked workers, each accepting on its own listening sockets.

Why processes: one Python process serves on one core (the GIL); N workers, each with its own accept
loop and thread pool, use N cores. The shape is gunicorn's arbiter / nginx's master:

- The supervisor binds every listen address once per worker slot, with SO_REUSEPORT, then forks the
  workers; each keeps its slot's sockets only. The kernel hashes every new connection to one socket of
  the group, so the workers share connections evenly. (One socket shared by all workers let the first
  to wake accept a whole burst: 32 keep-alive connections split 32/0 or 28/4 between 2 workers.)
- The supervisor holds every slot's sockets too, so they outlive the workers: a crashed worker's
  replacement accepts the connections that waited in its slot's queue, a drained worker (listen change)
  hands its slot's sockets to its successor, and a reload keeps them. A worker that must wait before
  its restart (it keeps dying young) has its slot's sockets closed meanwhile, while another worker
  serves: the kernel then hashes new connections to the live workers (the few already queued on the
  closed socket are reset), and the replacement binds its slot's sockets anew.
- It never serves traffic. It runs the health checker and the admin listener (once per proxy), and
  talks to each worker over a ``socketpair`` made before the fork (``ControlLink``: JSON lines):
  health verdicts go down (``apply_health``), status/metrics snapshots come up and are merged.
- Signals (the handler records, the loop acts):
  SIGHUP → validate the file; invalid: log, keep everything; valid: every worker reloads in place
  (same sockets, same keep-alive connections). A change of ``server.listen`` instead binds the new
  addresses and replaces the workers (new ones start, old ones drain), as nginx does on every reload.
  SIGUSR1 → every worker reopens its access log file (logrotate); a SIGHUP does that too.
  A [server] key only new processes can take (workers, cpu_affinity) is logged as "needs a restart".
  SIGTERM/SIGINT → forwarded; the workers drain; the supervisor waits up to graceful_timeout + margin,
  kills what is left, and exits (0 when every worker stopped on its own). A second SIGINT forces.
- A worker that dies is logged and replaced, with a backoff when it keeps dying young; the supervisor
  never dies because a worker did.
Workers run in their own process group, so a terminal's Ctrl-C reaches the supervisor only (which
forwards exactly one signal), and they drain on their own when the supervisor disappears (EOF on
their control link).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import select
import signal
import socket
import threading
import time
from collections import deque
from typing import Callable

from core.cpu_affinity import pin_worker
from core.wakeup import WakePipe, ignore_late_signals, restore_wakeup_fd, stops_first

from proxy.observe.admin import AdminRelocation, AdminServer, AdminSources, configured_token, install_observability
from proxy.serve.app import Application, UnknownServer
from proxy.upstream.servers import ENABLED
from proxy.config.schema import Config, ConfigError, ListenConfig
from proxy.upstream.discovery import DnsDiscovery, discovered_entries, targets_from_lists
from proxy.upstream.health import HealthChecker, apply_health
from proxy.observe.log_reload import level_listener
from proxy.observe.metrics import WorkerCounters, render_prometheus
from proxy.http.bucket_table import BucketTable
from proxy.http.tls import validity_warnings
from proxy.serve.runner import (RESTART_ONLY, SERVING_SIGNALS, ProxyProcess, bind_config_listener,
                                bind_worker_listeners, load_for_reload, server_changes, tls_terminators)
from proxy.observe.status import WorkerStatusTotals
from proxy.serve.watch import Watcher, describe_changes

log = logging.getLogger("pyproxy.supervisor")

STOP_MARGIN = 5.0          # beyond graceful_timeout before left-over workers are killed
SNAPSHOT_TIMEOUT = 5.0     # a worker that does not answer a status/metrics request within this is left out
STABLE_AFTER = 10.0        # a worker that lived this long had no start-up problem: restart it at once
BACKOFF_FIRST = 0.5        # then 1, 2, 4 ... seconds between restarts of a worker that keeps dying young
BACKOFF_MAX = 30.0
LOOP_TICK = 0.5            # the supervisor loop wakes at least this often (reaping, due restarts)
MAX_LINE = 16 * 1024 * 1024  # a status document of a very large config still fits
SEND_STALL = 5.0           # a link whose other end takes nothing for this long is stuck: it is closed


class ControlError(RuntimeError):
    """The other end of a control link is gone or did not answer in time."""


class ControlLink:
    """One end of a supervisor↔worker socketpair speaking JSON lines.

    A message with ``id`` is a request; the other end answers ``{"reply_to": id, ...}``. Anything else
    (events, one-way commands) goes to ``on_message``; for a request, its return value is the reply.
    A reader thread per link; writes are serialised by a lock so any thread may send.
    """

    def __init__(self, sock: socket.socket, on_message: Callable[[dict], dict | None],
                 on_close: Callable[[], None] | None = None, name: str = "control"):
        sock.setblocking(True)
        self.sock = sock
        self.on_message = on_message
        self.on_close = on_close
        self.name = name
        self._write_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._waiting: dict[int, list] = {}  # id -> [Event, reply]
        self._waiting_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.closed = threading.Event()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._read_loop, name=f"pyproxy-{self.name}", daemon=True)
        self._thread.start()

    def send(self, message: dict) -> bool:
        data = json.dumps(message, separators=(",", ":")).encode() + b"\n"
        try:
            with self._write_lock:
                self._send_all(memoryview(data))
            return True
        except TimeoutError:
            log.warning("%s: the other end has taken nothing for %gs (stopped or stuck): closing the link",
                        self.name, SEND_STALL)
            self.close()  # a half-sent line would garble the stream: this link is done
            return False
        except OSError as exc:
            log.debug("%s: send failed: %s", self.name, exc)
            return False

    def _send_all(self, data: memoryview) -> None:
        """sendall, except that a peer which reads nothing (a stopped process) raises TimeoutError after
        SEND_STALL instead of holding the sender for good: the supervisor's loop, or a worker's request
        thread reporting an ejection, once the socket buffer is full (a few hundred messages)."""
        poller = None
        while data:
            try:
                data = data[self.sock.send(data, socket.MSG_DONTWAIT):]
            except BlockingIOError:
                if poller is None:
                    poller = select.poll()
                    poller.register(self.sock, select.POLLOUT)
                if not poller.poll(SEND_STALL * 1000):
                    raise TimeoutError from None

    def request(self, message: dict, timeout: float) -> dict:
        request_id = next(self._ids)
        slot = [threading.Event(), None]
        with self._waiting_lock:
            self._waiting[request_id] = slot
        try:
            if self.closed.is_set() or not self.send({**message, "id": request_id}):
                raise ControlError(f"{self.name}: link closed")
            if not slot[0].wait(timeout):
                raise ControlError(f"{self.name}: no answer to {message.get('op')} within {timeout}s")
            if slot[1] is None:
                raise ControlError(f"{self.name}: link closed")
            return slot[1]
        finally:
            with self._waiting_lock:
                self._waiting.pop(request_id, None)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:  # already disconnected: closing is all that is left
            pass
        self.sock.close()

    def _read_loop(self) -> None:
        reader = self.sock.makefile("rb")
        try:
            while True:
                line = reader.readline(MAX_LINE)
                if not line:
                    break
                message = _parse_line(line)
                if message is None:  # one bad line must not cut the link (a worker would drain)
                    log.warning("%s: ignored a line that is not a JSON object: %r", self.name, line[:80])
                    while not line.endswith(b"\n") and line:  # the rest of a line longer than MAX_LINE
                        line = reader.readline(MAX_LINE)
                    continue
                self._handle(message)
        except OSError as exc:
            log.debug("%s: read loop ends: %s", self.name, exc)
        finally:
            self.closed.set()
            with self._waiting_lock:
                waiting = list(self._waiting.values())
            for slot in waiting:
                slot[0].set()  # wake waiters; their reply stays None → ControlError
            if self.on_close is not None:
                self.on_close()

    def _handle(self, message: dict) -> None:
        reply_to = message.pop("reply_to", None)
        if reply_to is not None:
            with self._waiting_lock:
                slot = self._waiting.get(reply_to)
            if slot is not None:
                slot[1] = message
                slot[0].set()
            return
        request_id = message.pop("id", None)
        try:
            reply = self.on_message(message)
        except Exception as exc:  # a bad command must not end the link; the requester sees why
            log.exception("%s: handling %s failed", self.name, message.get("op"))
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        if request_id is not None:
            self.send({**(reply or {}), "reply_to": request_id})


def _parse_line(line: bytes) -> dict | None:
    """A control message, or None for a line that is not one JSON object."""
    try:
        message = json.loads(line)
    except ValueError:
        return None
    return message if isinstance(message, dict) else None


# -- the worker side ---------------------------------------------------------------------------------

class WorkerControl:
    """Service inside a worker: answers its supervisor over the control link."""

    def __init__(self, process: ProxyProcess, sock: socket.socket, slot: int,
                 status_source: Callable[[], dict], metrics_source: Callable[[], dict]):
        self.process = process
        self.slot = slot
        self.status_source = status_source
        self.metrics_source = metrics_source
        self.link = ControlLink(sock, self.handle, on_close=self._supervisor_gone, name=f"worker-{slot}-control")
        self._stopping = False

    def start(self) -> None:
        self.link.start()
        self.process.app.ejection_listeners.append(self._report_ejection)
        self.link.send({"event": "ready", "pid": os.getpid(), "slot": self.slot})

    def stop(self) -> None:
        self._stopping = True
        if self._report_ejection in self.process.app.ejection_listeners:
            self.process.app.ejection_listeners.remove(self._report_ejection)
        self.link.close()

    def _report_ejection(self, upstream: str, address: str, seconds: float, reason: str) -> None:
        """Passive checks here ejected a server: the supervisor has every other worker take it out too."""
        self.link.send({"event": "ejected", "upstream": upstream, "address": address, "seconds": seconds,
                        "reason": reason})

    def handle(self, message: dict) -> dict | None:
        op = message.get("op")
        if op == "health":
            apply_health(self.process.app, message["upstream"], message["address"], message["up"],
                         message.get("reason", ""), announce=False)  # the supervisor logged it
            return None
        if op == "admin_state":  # the runtime API, applied by the supervisor first (it logged it)
            try:
                self.process.app.set_admin_state(message["upstream"], message["address"], message["state"])
            except UnknownServer as exc:  # still on the config before a reload: replayed once it reloads
                log.debug("worker %d: admin state not applied yet: %s", self.slot, exc)
                return {"applied": False}
            return {"applied": True}
        if op == "eject":
            self.process.app.apply_ejection(message["upstream"], message["address"], message["seconds"],
                                            message.get("reason", ""))
            return None
        if op == "status":
            return {"status": self.status_source()}
        if op == "metrics":
            return {"metrics": self.metrics_source()}
        if op == "discovered":  # the supervisor resolved a discovered name to a new set of addresses
            key = (message["upstream"], message["kind"], message["name"], message["port"])
            self.process.app.apply_discovered(key, targets_from_lists(message["targets"]))
            return None
        if op == "reload":
            self.process.server.call_soon(self._reload)  # on the loop thread, exactly like a SIGHUP
            return None
        if op == "reopen":
            self.process.server.call_soon(self.process.reopen_logs)  # as a SIGUSR1 to the worker
            return None
        if op == "ping":
            return {"pid": os.getpid()}
        return {"error": f"unknown op {op!r}"}

    def _reload(self) -> None:
        if self.process.server.stopping:
            return  # retiring (a listen change): it finishes on the config it has, and says nothing
        ok = self.process.reload_from_file()
        self.link.send({"event": "reloaded", "pid": os.getpid(), "ok": ok})

    def _supervisor_gone(self) -> None:
        if not self._stopping:
            log.warning("worker %d: supervisor gone, draining", self.slot)
            self.process.stop()


def worker_main(slot: int, config: Config, config_path: str | None, listeners, control_sock,
                rate_table=None, discovered: dict | None = None, admin_states: dict | None = None,
                terminators: dict | None = None) -> int:
    """The body of a forked worker. Returns its exit code. ``rate_table`` is the supervisor's shared
    rate limit table: every worker takes tokens from the same buckets. ``discovered``: the supervisor's
    current addresses of the discovered names (the worker resolves nothing itself). ``admin_states``
    are the runtime API's, applied before the first connection is accepted. ``terminators``: the
    supervisor's TLS for ``config`` (a replacement must not depend on the files as they are now)."""
    os.setpgid(0, 0)  # a terminal's Ctrl-C goes to the supervisor's group only; it forwards one signal
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    pinned = pin_worker(config.server.cpu_affinity, slot)  # before ProxyProcess starts its threads
    process = ProxyProcess(config, listeners=listeners, install_signals=True, config_path=config_path,
                           observability=False, rate_table=rate_table, discovered=discovered,
                           resolve_names=False, terminators=terminators)
    if pinned is not None:
        log.info("worker %d pinned to CPU %d (server.cpu_affinity)", slot, pinned)
    process.manage_listeners = False  # the supervisor owns the sockets; it replaces workers to change them
    for (upstream, address), state in (admin_states or {}).items():
        try:  # the replay after "ready" comes too late for the connections already waiting
            process.app.set_admin_state(upstream, address, state)
        except UnknownServer:  # the supervisor's config has it; a replay after a reload settles it
            log.debug("worker %d: admin state of %s/%s not applied at start", slot, upstream, address)
    process.reports_changes = False  # the supervisor logs what changed once, not once per worker
    observability = install_observability(process, health=False, admin=False)
    process_status = observability.sources.status[0]

    def worker_status() -> dict:  # plus what only the per-worker line of /status shows
        return {**process_status(), "connections_accepted": process.server.accepted_total}

    process.add_service(WorkerControl(process, control_sock, slot, worker_status, observability.sources.metrics[0]))
    process.serve_forever()
    return 0


# -- the supervisor side ---------------------------------------------------------------------------

class WorkerHandle:
    """What the supervisor knows about one worker process."""

    def __init__(self, slot: int, pid: int, link: ControlLink, started: float):
        self.slot, self.pid, self.link, self.started = slot, pid, link, started
        self.ready = threading.Event()


class SupervisorSources(AdminSources):
    """Admin answers merged over the workers, plus a per-worker line in /status."""

    def __init__(self, supervisor: "Supervisor"):
        super().__init__(status=[], metrics=[], draining=lambda: supervisor.stopping, serving=supervisor.serving,
                         token=lambda: configured_token(supervisor.config),
                         set_server_state=supervisor.set_server_state)
        self.supervisor = supervisor

    def status_document(self) -> dict:
        per_worker = self.supervisor.collect("status")
        merged = self.supervisor.status_totals.merged({handle.pid: status for handle, status in per_worker})
        merged["workers"] = [{"slot": handle.slot, "pid": handle.pid, "requests_total": _requests_total(status),
                              "connections_accepted": status.get("connections_accepted", 0),
                              "down": _down_servers(status)} for handle, status in per_worker]
        merged["draining"] = merged["draining"] or self.supervisor.stopping
        self._add_last_checks(merged)
        self._add_admin_states(merged)
        self._add_retiring_in_flight(merged)
        return merged

    def _add_retiring_in_flight(self, merged: dict) -> None:
        """Old workers replaced by a server.listen change finish their requests first: until they have,
        a server's active_requests counts theirs too, or a drained server would look idle
        (``ctl drain --wait``). Asked only while there are such workers."""
        retiring = list(self.supervisor.retiring.values())
        if not retiring:
            return
        for _, status in self.supervisor.collect("status", retiring):
            for name, upstream in status.get("upstreams", {}).items():
                active = {server["address"]: server.get("active_requests", 0) for server in upstream["servers"]}
                for server in merged["upstreams"].get(name, {}).get("servers", ()):
                    server["active_requests"] = server.get("active_requests", 0) + active.get(server["address"], 0)

    def _add_admin_states(self, merged: dict) -> None:
        """The supervisor applied every runtime API write first: its word on admin states is the last,
        on the servers it has. Not on one it no longer has (its address left DNS, and it is leaving with
        requests in flight, or a worker has yet to apply that): the supervisor has forgotten its state,
        and the workers' servers still have the one it left with."""
        states = self.supervisor.app.admin_states
        runtime = self.supervisor.app.runtime
        for name, upstream in merged["upstreams"].items():
            known = runtime.upstreams.get(name)
            addresses = {server.address for server in known.servers} if known is not None else set()
            for server in upstream["servers"]:
                if server["address"] in addresses:
                    server["admin_state"] = states.get((name, server["address"]), "enabled")

    def _add_last_checks(self, merged: dict) -> None:
        """Workers run no checker: the latest check of each server is the supervisor's."""
        checker = self.supervisor.checker
        if checker is None:
            return
        wall_now = time.time()
        for name, upstream in merged["upstreams"].items():
            for server in upstream["servers"]:
                last = checker.last_check(name, server["address"])
                if last is not None:
                    server["last_check"] = {**last, "age_seconds": round(max(0.0, wall_now - last["checked_at"]), 3)}

    def metrics_text(self) -> str:
        answers = {handle.pid: metrics for handle, metrics in self.supervisor.collect("metrics")}
        return render_prometheus(self.supervisor.worker_counters.merged(answers))


def _down_servers(status: dict) -> list[str]:
    return sorted(f"{name}/{server['address']}" for name, upstream in status.get("upstreams", {}).items()
                  for server in upstream.get("servers", ()) if server.get("state") == "down")


def _requests_total(status: dict) -> int:
    return sum(server.get("requests_total", 0) for upstream in status.get("upstreams", {}).values()
               for server in upstream.get("servers", ()))


class Supervisor:
    """Forks and keeps ``workers`` worker processes; see the module docstring."""

    def __init__(self, config: Config, config_path: str | None,
                 slot_sockets: list[dict[str, socket.socket]], *, watch: bool = False, clock=time.monotonic,
                 workers_option: int | None = None):
        """``slot_sockets`` (from ``bind_slot_sockets``): per worker slot, its socket for each listen address.
        ``workers_option``: the count --workers gave, which server.workers does not change."""
        self.config = config
        self.workers_option = workers_option
        self.config_path = config_path
        # TLS as loaded with this config: a worker forked later (a replacement) serves these, not
        # whatever the files hold by then (a half-written renewal would keep it from starting).
        self.terminators = tls_terminators(config)
        self.slot_sockets = slot_sockets
        # listen address -> its port, for binding a slot's socket again (the real one when it said 0)
        self.ports = {address: sock.getsockname()[1] for address, sock in slot_sockets[0].items()}
        workers = len(slot_sockets)
        self.worker_count = workers
        self.watch = watch
        self.clock = clock
        self.slots: list[WorkerHandle | None] = [None] * workers
        self.retiring: dict[int, WorkerHandle] = {}  # pid -> old worker draining after a replacement
        self.restart_at: dict[int, float] = {}
        self.failures: dict[int, int] = {}
        self.stopping = False
        self.killed = 0
        self.restarts_total = 0
        self.worker_counters = WorkerCounters()  # /metrics counters never go down as workers come and go
        self.status_totals = WorkerStatusTotals()  # nor do /status totals
        self._deadline = 0.0
        self._signals: deque[int] = deque()
        self._calls: deque[Callable[[], None]] = deque()
        self._wakeup = WakePipe()
        self._previous_wakeup_fd: int | None = None  # set while signals wake this loop
        # The health checker's view of the servers; never serves traffic. Its rate limit table is made
        # now, before any fork, so that every worker maps the same shared memory.
        self.app = Application(config, rate_table=BucketTable(config.server.rate_limit_keys))
        self.app.reload_listeners.append(level_listener)  # workers switch their own access logs
        self.checker: HealthChecker | None = None
        self.discovery: DnsDiscovery | None = None  # the proxy's one DNS resolver (workers resolve nothing)
        self._discovered_lock = threading.Lock()
        self.services: list = []
        self._admin_lock = threading.Lock()  # runtime API writes vs replays to new workers

    # -- the loop --------------------------------------------------------------------------------
    def run(self) -> int:
        self._install_signals()
        self._handle_signals()  # a stop that arrived while starting (blocked until now): no workers at all
        if not self.stopping:
            # Names resolved once before the first fork: every worker starts with the same servers.
            self.discovery = DnsDiscovery(lambda: self.app.config, self._discovered_changed)
            self.discovery.start()
            self.app.reload_listeners.append(lambda old, new: self.discovery.kick())
            for slot in range(self.worker_count):
                self._spawn(slot)
            self._start_services()
            self.services.insert(0, self.discovery)  # started already; stopped last
        try:
            while not (self.stopping and not self._live_workers()):
                self._loop_once()
        finally:
            self._stop_services()
            self._close_all_sockets()
            if self._previous_wakeup_fd is not None:  # before the pipe closes: its number may be reused
                ignore_late_signals(SERVING_SIGNALS)  # a reload now would meet no loop, then kill the exit
                restore_wakeup_fd(self._previous_wakeup_fd)
            self._wakeup.close()
        log.info("supervisor exiting (%d worker(s) had to be killed)", self.killed)
        return 1 if self.killed else 0

    def _loop_once(self) -> None:
        timeout = LOOP_TICK
        if self.restart_at:
            timeout = max(0.0, min(timeout, min(self.restart_at.values()) - self.clock()))
        try:
            select.select([self._wakeup.read_fd], [], [], timeout)
        except InterruptedError:
            pass
        self._wakeup.drain()
        self._handle_signals()
        while self._calls:
            self._calls.popleft()()
        self._reap()
        self._restart_due()
        if self.stopping and self.clock() >= self._deadline:
            self._kill_leftovers()

    def call_soon(self, fn: Callable[[], None]) -> None:
        """From other threads (watcher, link readers): run ``fn`` on the supervisor loop."""
        self._calls.append(fn)
        self._wakeup.wake()

    # -- signals (the handler records, the loop acts) -------------------------------------------------
    def _install_signals(self) -> None:
        """The handlers, then unblock: the CLI blocks these signals from the bind on (a SIGTERM while
        __init__ built the Application killed the supervisor), so one that came meanwhile lands now."""
        self._previous_wakeup_fd = signal.set_wakeup_fd(self._wakeup.write_fd, warn_on_full_buffer=False)
        signals = (*SERVING_SIGNALS, signal.SIGCHLD)
        for signum in signals:
            signal.signal(signum, self._record_signal)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)  # before any fork: workers inherit the mask

    def _record_signal(self, signum, frame) -> None:
        self._signals.append(signum)

    def _handle_signals(self) -> None:
        batch = []
        while self._signals:  # popped one by one: a handler may append meanwhile
            batch.append(self._signals.popleft())
        for signum in stops_first(batch):  # a reload behind a stop finds it stopping
            self._handle_signal(signum)

    def _handle_signal(self, signum: int) -> None:
        if signum == signal.SIGCHLD:
            return  # _reap runs on every pass
        if signum == signal.SIGHUP:
            # While stopping, as a single process does: no reload (reload says so), but the logs
            # are reopened.
            if not self.reload():
                self._broadcast({"op": "reopen"})  # a valid reload reopens in each worker (LogSwitch)
            return
        if signum == signal.SIGUSR1:
            self._broadcast({"op": "reopen"})
            return
        self.stop(signum)

    def _broadcast(self, message: dict) -> None:
        for handle in self._all_handles():
            handle.link.send(message)

    # -- workers -------------------------------------------------------------------------------------
    def _spawn(self, slot: int) -> None:
        listeners = self._slot_listeners(slot)
        parent_sock, child_sock = socket.socketpair()
        with self._admin_lock:
            admin_states = dict(self.app.admin_states)
        # Asked before the fork: a lock another thread holds as it forks stays locked in the child.
        rate_table = self.app.rate_table()
        pid = os.fork()
        if pid == 0:  # the worker: never returns into the supervisor's code
            code = 1
            try:
                parent_sock.close()
                self._close_in_child(slot)
                code = worker_main(slot, self.config, self.config_path, listeners, child_sock,
                                   rate_table, discovered=self.app.discovered,
                                   admin_states=admin_states, terminators=self.terminators)
            except BaseException:  # the worker must end here, whatever happened, with its reason logged
                log.exception("worker %d failed", slot)
            finally:
                logging.shutdown()
                os._exit(code)
        child_sock.close()
        handle = WorkerHandle(slot, pid, None, self.clock())
        handle.link = ControlLink(parent_sock, lambda message: self._on_worker_message(handle, message),
                                  name=f"supervisor-link-{slot}")
        handle.link.start()
        self.slots[slot] = handle
        log.info("worker %d started (pid %d)", slot, pid)

    def _slot_listeners(self, slot: int) -> list[tuple[ListenConfig, socket.socket]]:
        """The slot's socket for every listen address, bound again where it was closed (its worker
        waited to restart); an address that cannot be bound is logged and left to the other slots."""
        sockets = self.slot_sockets[slot]
        for listen in self.config.server.listen:
            if listen.address in sockets or listen.address not in self.ports:
                continue
            try:
                sockets[listen.address] = bind_config_listener(listen, reuse_port=True, port=self.ports[listen.address])
            except OSError as exc:
                log.error("worker %d cannot listen on %s: %s", slot, listen.address, exc)
        return [(listen, sockets[listen.address]) for listen in self.config.server.listen if listen.address in sockets]

    def _close_slot_sockets(self, slot: int) -> None:
        for sock in self.slot_sockets[slot].values():
            sock.close()
        self.slot_sockets[slot] = {}

    def _close_all_sockets(self) -> None:
        for slot in range(self.worker_count):
            self._close_slot_sockets(slot)

    def _close_in_child(self, slot: int) -> None:
        """Drop the supervisor's own descriptors so a worker holds only its sockets and link. Another
        slot's socket left open here would stay in the SO_REUSEPORT group after that slot closed it,
        taking its share of connections and never accepting them."""
        for other, sockets in enumerate(self.slot_sockets):
            if other != slot:
                for sock in sockets.values():
                    sock.close()
        signal.set_wakeup_fd(-1)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, signal.SIG_DFL)  # until the worker's own loop installs its handlers
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # a reopen before the worker opened its log: nothing to do
        self._wakeup.close_in_child()
        for handle in self._all_handles():
            handle.link.sock.close()

    def _all_handles(self) -> list[WorkerHandle]:
        return [h for h in self.slots if h is not None] + list(self.retiring.values())

    def serving(self) -> bool:
        """A worker is ready to take traffic (/healthz): not while every one is dead, restarting or
        backing off after dying young, though the supervisor still holds the listening sockets."""
        return any(handle.ready.is_set() for handle in self._all_handles())

    def _live_workers(self) -> list[WorkerHandle]:
        return self._all_handles()

    def _on_worker_message(self, handle: WorkerHandle, message: dict) -> None:
        event = message.get("event")
        if event == "ready":
            handle.ready.set()
            log.info("worker %d (pid %d) ready", handle.slot, handle.pid)
            self._replay_discovered(handle)  # sets that changed between its fork and now; then verdicts
            self._replay_verdicts(handle)  # a new worker starts with every server up
        elif event == "ejected":
            # Passive checks count each worker's own traffic; the first worker to eject a server has the
            # others take it out too, so a server's state is the same in every worker.
            log.info("upstream %s server %s ejected by worker %d for %gs: %s; taking it out in every worker",
                     message["upstream"], message["address"], handle.slot, message["seconds"], message["reason"])
            for other in self._all_handles():
                if other is not handle:
                    other.link.send({"op": "eject", "upstream": message["upstream"], "address": message["address"],
                                     "seconds": message["seconds"], "reason": message["reason"]})
        elif event == "reloaded":
            # A verdict on a server the worker did not know yet (it was still on the old config) was
            # dropped by apply_health: replay them now that it has the new servers.
            self._replay_verdicts(handle)
            level = logging.INFO if message.get("ok") else logging.ERROR
            log.log(level, "worker %d (pid %d) %s", handle.slot, handle.pid,
                    "reloaded" if message.get("ok") else "failed to reload (kept its config)")
        return None

    def _replay_discovered(self, handle: WorkerHandle) -> None:
        with self._discovered_lock:  # not between a change's broadcast and its apply: the old set would win
            for key, targets in list(self.app.discovered.items()):
                handle.link.send(_discovered_message(key, targets))

    def _discovered_changed(self, key: tuple, targets: tuple) -> None:
        """The one resolver of the proxy found a new set: every worker applies it, then the supervisor
        (whose health checker then sees the new servers: its verdicts reach the workers after the set).
        A lookup that ended after a reload removed its name is dropped (Application.apply_discovered);
        the lock keeps a reload from coming between this check and the broadcast."""
        with self._discovered_lock:
            if key not in discovered_entries(self.app.config):
                return
            self._broadcast(_discovered_message(key, targets))
            self.app.apply_discovered(key, targets)

    def _replay_verdicts(self, handle: WorkerHandle) -> None:
        """A worker that just started or reloaded learns what its config cannot tell it: the runtime
        API's admin state of every server, enabled ones too (a worker may hold a drain the supervisor
        forgot: an enable sent before its link was registered, a reload removing the server that it read
        only after the next one had listed it again), and every health verdict."""
        with self._admin_lock:
            states = {(name, server.address): ENABLED
                      for name, upstream in self.app.runtime.upstreams.items() for server in upstream.servers}
            states.update(self.app.admin_states)
            for (upstream, address), state in states.items():
                handle.link.send({"op": "admin_state", "upstream": upstream, "address": address, "state": state})
        if self.checker is None:
            return

        def send(upstream: str, address: str, up: bool, reason: str) -> None:
            handle.link.send({"op": "health", "upstream": upstream, "address": address, "up": up, "reason": reason})

        # Ups too: a worker may hold down a server the checks brought up before its link was registered
        # (an address DNS added while it forked, taken in as joining: down until a verdict says up).
        self.checker.replay_verdicts(send)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self._worker_exited(pid, status)

    def _worker_exited(self, pid: int, status: int) -> None:
        how = _describe_exit(status)
        self.worker_counters.gone(pid)  # its counts stay in /metrics and /status (a successor starts from 0)
        self.status_totals.gone(pid)
        handle = self.retiring.pop(pid, None)
        if handle is not None:
            handle.link.close()
            log.info("old worker %d (pid %d) %s", handle.slot, pid, how)
            return
        for slot, handle in enumerate(self.slots):
            if handle is not None and handle.pid == pid:
                break
        else:
            return  # not ours (a probe's child, say)
        self.slots[slot] = None
        handle.link.close()
        if self.stopping:
            log.info("worker %d (pid %d) %s", slot, pid, how)
            return
        lived = self.clock() - handle.started
        self.failures[slot] = 0 if lived >= STABLE_AFTER else self.failures.get(slot, 0) + 1
        delay = 0.0 if self.failures[slot] <= 1 else min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (self.failures[slot] - 2))
        self.restart_at[slot] = self.clock() + delay
        log.warning("worker %d (pid %d) %s after %.1fs; restarting it in %.1fs", slot, pid, how, lived, delay)
        if delay > 0 and any(h is not None and h.ready.is_set() for h in self.slots):
            # Connections hashed to its sockets would wait `delay` unserved: send them to the live workers.
            self._close_slot_sockets(slot)

    def _restart_due(self) -> None:
        if self.stopping:
            self.restart_at.clear()
            return
        now = self.clock()
        for slot, due in list(self.restart_at.items()):
            if due <= now:
                del self.restart_at[slot]
                self.restarts_total += 1
                self._spawn_or_retry(slot)

    def _spawn_or_retry(self, slot: int) -> None:
        try:
            self._spawn(slot)
        except OSError as exc:  # fork or socketpair failed (EAGAIN, EMFILE): try again later
            self.failures[slot] = self.failures.get(slot, 0) + 1
            self.restart_at[slot] = self.clock() + min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** self.failures[slot])
            log.error("cannot start worker %d: %s; retrying", slot, exc)

    # -- reload --------------------------------------------------------------------------------------
    def reload(self) -> bool:
        """SIGHUP / --watch: validate first; only a valid file reaches the workers."""
        if self.stopping:  # --watch comes here directly; the workers are draining, none may start
            log.info("reload ignored: the proxy is draining")
            return False
        config = load_for_reload(self.config_path)
        if config is None:
            return False
        try:  # the workers load them too; one that cannot be loaded stops it here
            terminators = tls_terminators(config)
        except ConfigError as exc:
            log.error("reload failed, keeping the old config:\n%s", exc)
            return False
        replace = _listen_addresses(self.config) != _listen_addresses(config)
        try:
            added = self._bind_added_listeners(config) if replace else {}
        except OSError as exc:
            log.error("reload failed, keeping the old config:\n%s", exc)
            return False
        old, self.config, self.terminators = self.config, config, terminators
        with self._discovered_lock:  # not between a lookup's check that its name is configured and its push
            self.app.reload(config)
        for line in describe_changes(old, config) or ["no changes"]:
            log.info("  %s", line)
        for line in validity_warnings(config.server.listen):
            log.warning(line)
        # Workers apply the rest of [server] themselves (ProxyProcess.reload); new ones pin anew.
        restart_only = tuple(key for key in RESTART_ONLY if key != "workers") if not replace else ()
        for line in server_changes(old.server, config.server, restart_only):
            log.warning("needs a restart: %s", line)
        self._report_workers_change(old.server.workers, config.server.workers)
        if replace:
            self._replace_workers(config, added)
        else:
            self._broadcast({"op": "reload"})
        return True

    def _report_workers_change(self, old: int, new: int) -> None:
        """A changed server.workers, against the count running (--workers may have set it instead)."""
        if new == old:
            return
        if self.workers_option is not None:
            log.warning("server.workers changed (%s -> %s), but --workers %d decides the count, also after a "
                        "restart", old, new, self.workers_option)
        elif new != self.worker_count:
            log.warning("needs a restart: server.workers (%d running -> %d)", self.worker_count, new)

    def _bind_added_listeners(self, config: Config) -> dict:
        """Each address ``config`` adds, bound for every worker before anything changes: one that cannot
        be bound fails the reload (OSError naming the file and key, nothing left open), as in nginx.
        An address that takes over the port of one the reload drops is bound after that one closes."""
        wanted = {listen.address for listen in config.server.listen}
        dropped_ports = {listen.port for listen in self.config.server.listen if listen.address not in wanted}
        added = {}
        try:
            for index, listen in enumerate(config.server.listen):
                if listen.address not in self.ports and listen.port not in dropped_ports:
                    added[listen.address] = bind_worker_listeners(listen, self.worker_count)
        except OSError as exc:
            for sockets in added.values():
                for sock in sockets:
                    sock.close()
            raise OSError(exc.errno, f"{self.config_path}: server.listen[{index}]: cannot listen on "
                                     f"{listen.address}: {exc.strerror or exc}") from None
        return added

    def _replace_workers(self, config: Config, added: dict | None = None) -> None:
        """New listen addresses: bind them (``added``: those bound already), start new workers on the new
        set, drain the old ones. A kept address keeps its sockets: each new worker accepts on its
        predecessor's."""
        added = {} if added is None else added
        wanted = {listen.address: listen for listen in config.server.listen}
        for address in set(self.ports) - set(wanted):  # old workers keep their copies until they drain
            for sockets in self.slot_sockets:
                sock = sockets.pop(address, None)
                if sock is not None:
                    sock.close()
            del self.ports[address]
            log.info("stopped listening on %s", address)
        for address, listen in wanted.items():
            if address in self.ports:
                continue
            try:
                new = added.pop(address, None) or bind_worker_listeners(listen, self.worker_count)
            except OSError as exc:
                log.error("cannot listen on %s: %s", address, exc)
                continue
            for sockets, sock in zip(self.slot_sockets, new):
                sockets[address] = sock
            self.ports[address] = new[0].getsockname()[1]
            log.info("listening on %s", address)
        old = [h for h in self.slots if h is not None]
        self.restart_at.clear()
        for handle in old:
            self.retiring[handle.pid] = handle
        self.slots = [None] * self.worker_count  # a slot whose fork fails must not list its old worker
        for slot in range(self.worker_count):
            self._spawn_or_retry(slot)  # a failed fork must not end the supervisor (and every worker)
        for handle in old:
            _signal(handle.pid, signal.SIGTERM)

    # -- stop ----------------------------------------------------------------------------------------
    def stop(self, signum: int = signal.SIGTERM) -> None:
        if self.stopping:
            if signum == signal.SIGINT:
                log.info("second SIGINT: workers stop now")
                for handle in self._all_handles():
                    _signal(handle.pid, signal.SIGINT)
            return
        self.stopping = True
        self._deadline = self.clock() + self.config.server.graceful_timeout + STOP_MARGIN
        log.info("received %s: draining %d worker(s)", signal.Signals(signum).name, len(self._all_handles()))
        self._close_all_sockets()  # the workers' copies keep accepting until each one drains
        for handle in self._all_handles():
            _signal(handle.pid, signum)

    def _kill_leftovers(self) -> None:
        for handle in self._all_handles():
            log.error("worker %d (pid %d) still running after the graceful timeout: killing it",
                      handle.slot, handle.pid)
            _signal(handle.pid, signal.SIGKILL)
            self.killed += 1
        self._deadline = float("inf")  # killed once; SIGKILL cannot be ignored, _reap sees them go

    # -- services: health checks and admin, once per proxy -------------------------------------------
    def _start_services(self) -> None:
        self.checker = HealthChecker(self.app, apply_locally=True)
        self.checker.listeners.append(self._broadcast_health)
        self.services.append(self.checker)
        sources, admin = SupervisorSources(self), None
        if self.config.admin is not None:
            try:
                admin = AdminServer(self.config.admin.listen, sources)
                self.services.append(admin)
            except OSError as exc:
                log.error("cannot listen on %s for admin: %s", self.config.admin.listen.address, exc)
        self.app.reload_listeners.append(AdminRelocation(self.services, sources, admin))  # [admin] on reload
        if self.watch and self.config_path:
            self.services.append(Watcher(self.config_path, lambda: self.call_soon(self.reload)))
        for service in self.services:
            service.start()

    def _stop_services(self) -> None:
        for service in reversed(self.services):
            service.stop()

    def set_server_state(self, upstream: str, address: str, state: str) -> str:
        """The runtime API (on an admin thread): apply here (the health checker's servers), then in every
        worker, waiting for each to confirm, so a drain answered is a drain in force. Returns the state
        the server had; UnknownServer for an upstream or server the config does not have."""
        message = {"op": "admin_state", "upstream": upstream, "address": address, "state": state}
        with self._admin_lock:  # a replay to a starting worker cannot slip an older state in between
            previous = self.app.set_admin_state(upstream, address, state)
            handles = self._all_handles()
            for handle in handles:
                handle.link.send(message)
        for handle in handles:
            try:  # a link delivers in order: the answer to a ping means the state is applied
                handle.link.request({"op": "ping"}, timeout=SNAPSHOT_TIMEOUT)
            except ControlError as exc:  # gone or stuck: a successor gets it replayed when ready
                log.warning("worker %d (pid %d): admin state not confirmed: %s", handle.slot, handle.pid, exc)
        return previous

    def _broadcast_health(self, upstream: str, address: str, up: bool, reason: str) -> None:
        self._broadcast({"op": "health", "upstream": upstream, "address": address, "up": up, "reason": reason})

    def collect(self, what: str, handles=None) -> list[tuple[WorkerHandle, dict]]:
        """``what`` ("status" or "metrics") from every live worker (or from ``handles``); one not
        answering is left out."""
        answers = []
        for handle in list(self.slots if handles is None else handles):
            if handle is None:
                continue
            try:
                reply = handle.link.request({"op": what}, timeout=SNAPSHOT_TIMEOUT)
            except ControlError as exc:
                log.warning("worker %d (pid %d): no %s: %s", handle.slot, handle.pid, what, exc)
                continue
            if what in reply:
                answers.append((handle, reply[what]))
        return answers


def _discovered_message(key: tuple, targets: tuple) -> dict:
    upstream, kind, name, port = key
    return {"op": "discovered", "upstream": upstream, "kind": kind, "name": name, "port": port,
            "targets": [target.to_list() for target in targets]}


def _listen_addresses(config: Config) -> set[str]:
    return {listen.address for listen in config.server.listen}


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:  # already gone; _reap will see it
        pass


def _describe_exit(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"was killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exited with code {os.waitstatus_to_exitcode(status)}"


def bind_slot_sockets(listeners: list[tuple[ListenConfig, socket.socket]], workers: int) -> list[dict[str, socket.socket]]:
    """Per worker slot, its own SO_REUSEPORT socket for each listen address, in place of ``listeners``
    (bound, without SO_REUSEPORT, to report a taken address before anything starts). Raises OSError
    naming the address, with every socket closed."""
    per_address: list[tuple[str, list[socket.socket]]] = []
    try:
        for index, (listen, claimed) in enumerate(listeners):
            try:
                per_address.append((listen.address, bind_worker_listeners(listen, workers, claimed=claimed)))
            except OSError as exc:
                for _, later in listeners[index + 1:]:
                    later.close()
                raise OSError(exc.errno, f"cannot listen on {listen.address}: {exc.strerror or exc}") from None
    except OSError:
        for _, socks in per_address:
            for sock in socks:
                sock.close()
        raise
    return [{address: socks[slot] for address, socks in per_address} for slot in range(workers)]


def run_supervisor(config: Config, config_path: str | None, listeners, workers: int, watch: bool = False,
                   workers_option: int | None = None) -> int:
    """``pyproxy`` with workers > 1. Returns the exit code (1: an address could not be bound again)."""
    try:
        slot_sockets = bind_slot_sockets(listeners, workers)
    except OSError as exc:
        log.error("%s", exc.strerror or exc)
        return 1
    try:
        supervisor = Supervisor(config, config_path, slot_sockets, watch=watch, workers_option=workers_option)
    except ConfigError as exc:  # a certificate changed since the CLI loaded it a moment ago
        log.error("%s", exc)
        for sockets in slot_sockets:
            for sock in sockets.values():
                sock.close()
        return 1
    return supervisor.run()
