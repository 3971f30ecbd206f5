"""The application object: everything a request needs, built from one Config.

The CLI builds one ``Application``; nothing below it reaches for globals. Routing and upstreams live in
an immutable ``Runtime`` snapshot: a request reads ``app.runtime`` once and uses that snapshot to the
end, so a reload (which swaps the reference) never changes the rules under a request in flight.
Servers (with their health state) and their connection pools carry over a reload when unchanged.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Iterator

from proxy.http.access import AccessRules
from proxy.http.basic_auth import BasicAuth
from proxy.http.bucket_table import BucketTable
from proxy.http.rate_limit import RateLimiter
from proxy.upstream.balancing import Upstream
from proxy.config.schema import Config, ServerSettings, UpstreamConfig
from proxy.config.units import format_address
from proxy.http.redirects import https_port
from proxy.routing.router import Route, Router
from proxy.upstream.servers import ENABLED, Server
from proxy.upstream.pool import ServerPool, upstream_tls_context
from proxy.upstream.retry_budget import RetryBudget
from proxy.upstream.discovery import DiscoveryKey, Target, discovered_entries, discovery_key

log = logging.getLogger("pyproxy.app")

SEND_TIMEOUT = 60.0  # nginx's send_timeout default: a client that reads nothing for this long is dropped
BODY_TIMEOUT = 60.0  # nginx's client_body_timeout default: the gap allowed between request body reads
MAX_RESPONSE_HEADER_BYTES = 64 * 1024  # upstream heads are trusted more than clients'; still bounded


class UnknownServer(LookupError):
    """The runtime API named an upstream or a server this process does not have (a 404)."""


@dataclass(frozen=True)
class Settings:
    """Server settings the hot path reads, flattened from the config (plus derived limits)."""

    header_timeout: float
    idle_timeout: float
    graceful_timeout: float
    tunnel_timeout: float
    max_header_bytes: int
    max_body_bytes: int
    send_timeout: float = SEND_TIMEOUT
    body_timeout: float = BODY_TIMEOUT
    max_response_header_bytes: int = MAX_RESPONSE_HEADER_BYTES

    @classmethod
    def from_config(cls, server: ServerSettings) -> "Settings":
        return cls(header_timeout=server.header_timeout, idle_timeout=server.idle_timeout,
                   graceful_timeout=server.graceful_timeout, tunnel_timeout=server.tunnel_timeout,
                   max_header_bytes=server.max_header_bytes, max_body_bytes=server.max_body_bytes,
                   body_timeout=server.body_timeout, send_timeout=server.send_timeout)


class UpstreamRuntime:
    """One named upstream: its config, balancer (servers + policy) and a pool per server."""

    def __init__(self, config: UpstreamConfig, servers: list[Server], pools: dict[Server, ServerPool],
                 retry_budget: RetryBudget | None = None, clock=time.monotonic, on_ejected=None,
                 unresolved: tuple[str, ...] = (), leaving: tuple[Server, ...] = ()):
        self.name = config.name
        self.config = config
        self.unresolved = unresolved  # discovered names without addresses (the 503 names them)
        # Servers whose address left DNS while they still had requests in flight: no new requests (they
        # are not in the balancer); shown in /status until those finish, then dropped by a later rebuild.
        self.leaving = leaving
        for server in servers:
            server.set_ejection_listener(None if on_ejected is None else functools.partial(on_ejected, config.name))
        # Carried over reloads (by upstream name): its window and its totals (metrics) go on.
        budget = config.retry_budget
        self.retry_budget = retry_budget or RetryBudget(budget.percent, budget.min_per_second, clock)
        self.retry_budget.configure(budget.percent, budget.min_per_second)
        self.balancer = Upstream(config.name, servers, config.policy, config.max_ejected_percent, config.all_down,
                                 config.slow_start)
        self.pools = pools

    @property
    def servers(self) -> tuple[Server, ...]:
        return self.balancer.servers

    def pick_server(self, client_ip: str, exclude=(), retry_of: Exception | None = None) -> Server | None:
        """A server for a request, or for a retry of it after ``retry_of`` failed; None if there is no
        server, or the retry budget refuses the retry (the handler then answers ``retry_of``).

        A retry after a stale pooled connection is exempt: the server did not fail, and it happens at
        most once per request.
        """
        if retry_of is None:  # a first attempt, the common case
            self.retry_budget.count_request()
            return self.balancer.pick_server(client_ip, exclude)
        server = self.balancer.pick_server(client_ip, exclude)
        if server is None or getattr(retry_of, "stale", False):
            return server
        if not self.retry_budget.try_retry():
            server.release()
            log.debug("upstream %s: retry refused by the retry budget: %s", self.name, retry_of)  # a storm: no flood
            return None
        return server

    def no_server_detail(self) -> str:
        """The reason of the 503 when no server can be picked."""
        if self.unresolved and not self.servers:
            return f"no addresses for {', '.join(self.unresolved)}"
        return f"no server available in upstream '{self.name}'"

    def snapshot(self) -> dict:
        return self.balancer.snapshot()


@dataclass(frozen=True)
class ServerSpec:
    """One server to run: a configured address, or one address a discovered name resolved to."""

    host: str
    port: int
    weight: int = 1
    tls: bool = False
    name: str = ""      # the DNS name it was discovered under
    priority: int = 0   # SRV priority


def _server_specs(upstream: UpstreamConfig, discovered: dict) -> Iterator[tuple[ServerSpec, DiscoveryKey | None]]:
    """Every server of the upstream with the discovered name it came from (None: configured). Names
    expand to their current addresses; an address two entries give is served once."""
    seen = set()
    for entry in upstream.servers:
        key = discovery_key(upstream.name, entry) if entry.discover else None
        if key is None:
            specs = [ServerSpec(entry.host, entry.port, entry.weight, entry.tls)]
        else:
            targets: tuple[Target, ...] = discovered.get(key, ())
            # An SRV record carries its own weight; an A/AAAA entry gives every address the entry's.
            specs = [ServerSpec(t.host, t.port, t.weight if entry.discover == "srv" else entry.weight,
                                entry.tls, t.name, t.priority) for t in targets]
        for spec in specs:
            if (spec.host, spec.port) not in seen:
                seen.add((spec.host, spec.port))
                yield spec, key


def _server_key(upstream: UpstreamConfig, spec: ServerSpec) -> tuple:
    passive = upstream.passive
    return (upstream.name, spec.host, spec.port, spec.weight, spec.tls, spec.name, spec.priority,
            upstream.max_connections, passive.max_fails if passive else 0,
            passive.fail_timeout if passive else 0.0, passive.statuses if passive else frozenset())


def _still_leaving(before: "UpstreamRuntime | None", servers: list[Server]) -> tuple[Server, ...]:
    """Discovered servers the rebuild dropped that still have requests (or tunnels) in flight. One
    merely rebuilt (a reload changed its weight) is not leaving: its address still serves."""
    if before is None:
        return ()
    kept = set(map(id, servers))
    addresses = {server.address for server in servers}
    return tuple(server for server in (*before.servers, *before.leaving)
                 if server.name and id(server) not in kept and server.address not in addresses
                 and server.active_requests)


def _pool_key(upstream: UpstreamConfig, server_config) -> tuple:
    return (_server_key(upstream, server_config), upstream.keepalive, upstream.keepalive_timeout,
            upstream.connect_timeout, upstream.read_timeout, upstream.tls_verify, upstream.tls_ca,
            upstream.send_proxy_protocol)


def _link_rebuilt_servers(upstream: UpstreamRuntime, before: UpstreamRuntime) -> None:
    """A server the reload rebuilt (same address, new object) reports the requests still in flight on
    the object it replaces (Server.counts_in_flight_of). An idle one is not linked: reloads without a
    /status read in between must not build a chain of old objects."""
    old_by_address = {server.address: server for server in before.servers}
    for server in upstream.servers:
        old = old_by_address.get(server.address)
        if old is not None and old is not server and old.snapshot()["active_requests"] > 0:
            server.counts_in_flight_of(old)


class Runtime:
    """An immutable routing snapshot: router, upstreams, trusted proxies."""

    def __init__(self, config: Config, previous: "Runtime | None" = None, clock=time.monotonic, on_ejected=None,
                 rate_table=None, discovered: dict | None = None, joined: frozenset = frozenset()):
        """``rate_table``: a callable giving the shared rate limit table, asked only if a route has a limit.
        ``discovered``: the current addresses of each discovered name (DiscoveryKey -> Targets).
        ``joined``: the keys whose new addresses join a running upstream (a DNS change, not the
        first answer): with active health checks they start down until their first check passes."""
        self.config = config
        self._discovered = discovered or {}
        self._joined = joined
        self._on_ejected = on_ejected  # (upstream name, server, seconds, reason) after a passive ejection
        self.router = Router([Route(r.host, r.path, r.upstream, r.strip_prefix, r.set_headers, index=i,
                                    access=AccessRules.from_lists(r.allow, r.deny),
                                    basic_auth=BasicAuth.from_config(r.basic_auth),
                                    compress=r.compress, redirect=r.redirect,
                                    rate_limit=RateLimiter(r.rate_limit, f"{r.host or ''}{r.path}", rate_table(), clock)
                                    if r.rate_limit is not None else None)
                              for i, r in enumerate(config.routes)])
        # Listener address -> the https port its requests are redirected to (redirect_https).
        self.https_redirects = {listen.address: https_port(config.server.listen)
                                for listen in config.server.listen if listen.redirect_https}
        # Listener addresses whose connections start with a PROXY header (proxy.http.proxy_protocol).
        self.proxy_protocol_listeners = frozenset(listen.address for listen in config.server.listen
                                                  if listen.proxy_protocol)
        # Listener address -> its h2c flag, looked up for every new plain connection.
        self.h2c_by_address = {listen.address: listen.h2c for listen in config.server.listen}
        self.trusted = tuple(ipaddress.ip_network(p, strict=False) for p in config.server.trusted_proxies)
        self._trusted_cache: dict[str, bool] = {}
        old_servers = previous.servers_by_key if previous else {}
        old_pools = previous.pools_by_key if previous else {}
        self.servers_by_key: dict[tuple, Server] = {}
        self.pools_by_key: dict[tuple, ServerPool] = {}
        self.upstreams: dict[str, UpstreamRuntime] = {}
        for upstream in config.upstreams.values():
            budget = previous.upstreams[upstream.name].retry_budget if previous and upstream.name in previous.upstreams else None
            before = previous.upstreams.get(upstream.name) if previous else None
            self.upstreams[upstream.name] = self._build_upstream(upstream, old_servers, old_pools, clock, budget, before)
            if before is not None:
                _link_rebuilt_servers(self.upstreams[upstream.name], before)
            if previous is not None:
                self._start_slow_start_of_added(self.upstreams[upstream.name], previous.upstreams.get(upstream.name))

    def _build_upstream(self, upstream: UpstreamConfig, old_servers, old_pools, clock, budget,
                        before: "UpstreamRuntime | None") -> UpstreamRuntime:
        servers, pools = [], {}
        tls_context = None
        # An address the upstream had already is rebuilt, not joining (an SRV record's new weight, say): it
        # keeps the active checker's verdict of the server it replaces, which the checker carries on.
        old_by_address = {server.address: server for server in before.servers} if before is not None else {}
        for spec, name_key in _server_specs(upstream, self._discovered):
            key = _server_key(upstream, spec)
            server = old_servers.get(key)
            if server is None:
                predecessor = old_by_address.get(format_address(spec.host, spec.port))
                server = self._new_server(upstream, spec, clock, joined=name_key in self._joined and predecessor is None)
                if predecessor is not None and not predecessor.healthy and upstream.health is not None:
                    server.set_health(False, predecessor.state_reason, announce=False)
            pool_key = _pool_key(upstream, spec)
            pool = old_pools.get(pool_key)
            if spec.tls and tls_context is None:  # tls_ca is read on every rebuild (a rotated CA file)
                tls_context = upstream_tls_context(upstream)
            if pool is not None and spec.tls:
                pool.tls_context = tls_context  # a kept pool's new connections trust what tls_ca holds now
            elif pool is None:
                pool = ServerPool(spec.host, spec.port, keepalive=upstream.keepalive,
                                  keepalive_timeout=upstream.keepalive_timeout,
                                  connect_timeout=upstream.connect_timeout, read_timeout=upstream.read_timeout,
                                  tls_context=tls_context if spec.tls else None,
                                  proxy_protocol=upstream.send_proxy_protocol, clock=clock)
            self.servers_by_key[key] = server
            self.pools_by_key[pool_key] = pool
            servers.append(server)
            pools[server] = pool
        unresolved = tuple(entry.address for entry in upstream.servers
                           if entry.discover and not self._discovered.get(discovery_key(upstream.name, entry)))
        return UpstreamRuntime(upstream, servers, pools, budget, clock, self._on_ejected, unresolved,
                               _still_leaving(before, servers))

    @staticmethod
    def _new_server(upstream: UpstreamConfig, spec: ServerSpec, clock, joined: bool) -> Server:
        passive = upstream.passive
        server = Server(spec.host, spec.port, weight=spec.weight, max_connections=upstream.max_connections,
                        tls=spec.tls, max_fails=passive.max_fails if passive else 0,
                        fail_timeout=passive.fail_timeout if passive else 10.0,
                        failure_statuses=passive.statuses if passive else frozenset(), clock=clock,
                        name=spec.name, priority=spec.priority)
        if joined and upstream.health is not None:
            # A new address is checked before it takes traffic (the checker probes it at once).
            server.set_health(False, "new from DNS: waiting for its first health check", announce=False)
        return server

    @staticmethod
    def _start_slow_start_of_added(upstream: "UpstreamRuntime", before: "UpstreamRuntime | None") -> None:
        """slow_start: a server a reload added (an address the upstream did not have) ramps up. One the
        reload merely rebuilt (a new weight, say) was serving already and does not."""
        known = {server.address for server in before.servers} if before is not None else set()
        for server in upstream.servers:
            if server.address not in known and server.requests_total == 0:
                server.start_slow_start()

    def original_client(self, peer_ip: str, forwarded_for: str | None) -> str:
        """The address a request started from, for ip_hash: with ``trusted_proxies`` set, the rightmost
        X-Forwarded-For hop that is not a trusted proxy (nginx's realip module with
        real_ip_recursive); otherwise, or when nothing trustworthy says more, the TCP peer."""
        if not self.trusted or not forwarded_for or not self.is_trusted(peer_ip):
            return peer_ip
        hops = [hop.strip() for hop in forwarded_for.split(",")]
        for hop in reversed(hops):
            if not hop:
                break
            if not self.is_trusted(hop):
                return hop
        return hops[0] or peer_ip  # every hop is one of ours: the first one is as far as we can see

    def is_trusted(self, client_ip: str) -> bool:
        """Is this client allowed to tell us about earlier hops (X-Forwarded-For, Forwarded)?

        With no ``trusted_proxies`` configured every client is (nginx's $proxy_add_x_forwarded_for:
        append to what came in); once the list is set, only the listed addresses are.
        """
        if not self.trusted:
            return True
        cached = self._trusted_cache.get(client_ip)
        if cached is None:
            try:
                address = ipaddress.ip_address(client_ip)
                if address.version == 6 and address.ipv4_mapped is not None:
                    address = address.ipv4_mapped  # a dual-stack listener's IPv4 peer, as allow / deny see it
                cached = any(address in network for network in self.trusted)
            except ValueError:
                cached = False
            if len(self._trusted_cache) < 65536:
                self._trusted_cache[client_ip] = cached
        return cached

    def all_pools(self) -> list[ServerPool]:
        return list(self.pools_by_key.values())


class Application:
    """Built once by the CLI from a Config; handed to the handler, admin, health checks."""

    def __init__(self, config: Config, clock=time.monotonic, rate_table: BucketTable | None = None,
                 discovered: dict | None = None):
        self.clock = clock
        self.config = config
        # The rate limit buckets: the supervisor's shared table in a worker; made on first use otherwise.
        self._rate_table = rate_table
        self._rate_table_lock = threading.Lock()
        self.settings = Settings.from_config(config.server)
        # Callables (upstream name, server, seconds, reason) told when passive checks here eject a server:
        # a worker passes it on, so every worker takes the server out.
        self.ejection_listeners: list = []
        # The current addresses of each discovered name (proxy.upstream.discovery), kept across reloads. A
        # worker starts with its supervisor's (copied at fork) and gets every change over its control link.
        self.discovered: dict[DiscoveryKey, tuple[Target, ...]] = dict(discovered or {})
        self.runtime = Runtime(config, clock=clock, on_ejected=self._server_ejected, rate_table=self.rate_table,
                               discovered=self.discovered)
        self.observers: list = []  # callables(record) run after each request: access log, metrics
        self.return_request_id = True
        self.draining_event = threading.Event()  # the server's own, once there is one (see the setter)
        self.tls_contexts: dict = {}  # listener tag -> TLS terminator (see proxy.http.tls)
        self.http2_counts = lambda: {"connections": 0, "streams": 0, "streams_total": 0}  # the process's Http2Server
        self._tunnels = 0
        self._tunnel_lock = threading.Lock()
        self._reload_lock = threading.Lock()
        self.reload_listeners: list = []  # callables(old_config, new_config) after a successful reload
        # The runtime API's drain/disable per (upstream name, server address), so a reload that rebuilds
        # a server (a new weight, say) keeps it. Only servers not enabled are listed.
        self.admin_states: dict[tuple[str, str], str] = {}

    @property
    def reload_lock(self):
        """Held while a reload or a DNS change builds the new servers and puts them in place."""
        return self._reload_lock

    @property
    def rate_table_made(self) -> BucketTable | None:
        """The rate limit table if there is one already (the metrics ask without making one)."""
        return self._rate_table

    def rate_table(self) -> BucketTable:
        """The table every rate-limited route takes tokens from (kept across reloads: its size needs a restart)."""
        with self._rate_table_lock:
            if self._rate_table is None:
                self._rate_table = BucketTable(self.config.server.rate_limit_keys)
            return self._rate_table

    def _server_ejected(self, upstream_name: str, server: Server, seconds: float, reason: str) -> None:
        for listener in self.ejection_listeners:
            try:
                listener(upstream_name, server.address, seconds, reason)
            except Exception:  # the ejection stands here whatever a listener does
                log.exception("ejection listener %r failed", listener)

    def apply_ejection(self, upstream_name: str, address: str, seconds: float, reason: str) -> bool:
        """Another worker's passive checks ejected this server: take it out here too. True if applied."""
        upstream = self.runtime.upstreams.get(upstream_name)
        servers = upstream.servers if upstream is not None else ()
        return any([server.eject_for(seconds, reason) for server in servers if server.address == address])

    # -- the runtime API ------------------------------------------------------------------------
    def set_admin_state(self, upstream_name: str, address: str, state: str) -> str:
        """Drain, disable or enable a server (``address`` as /status shows it). Returns the state it
        had; UnknownServer if there is no such upstream or server. Under the reload lock, so a reload
        running meanwhile cannot build its servers from the state before this one."""
        with self._reload_lock:
            upstream = self.runtime.upstreams.get(upstream_name)
            if upstream is None:
                raise UnknownServer(f"no upstream named {upstream_name!r}")
            servers = [server for server in upstream.servers if server.address == address]
            if not servers:
                raise UnknownServer(f"upstream {upstream_name!r} has no server {address!r}")
            previous = servers[0].admin_state
            for server in servers:
                server.set_admin_state(state)
            if state == ENABLED:
                self.admin_states.pop((upstream_name, address), None)
            else:
                self.admin_states[(upstream_name, address)] = state
        return previous

    def _carry_admin_states(self, runtime: "Runtime") -> None:
        """After a reload: every server keeps its admin state; a server the reload removed is forgotten
        (added back later, it starts enabled, as nginx and HAProxy treat a new server)."""
        kept = {}
        for (upstream_name, address), state in self.admin_states.items():
            upstream = runtime.upstreams.get(upstream_name)
            servers = [s for s in upstream.servers if s.address == address] if upstream is not None else []
            for server in servers:
                server.set_admin_state(state)
            if servers:
                kept[(upstream_name, address)] = state
        self.admin_states = kept

    # -- state the handler asks about --------------------------------------------------------
    @property
    def draining_event(self) -> threading.Event:
        return self._draining_event

    @draining_event.setter
    def draining_event(self, event: threading.Event) -> None:
        self._draining_event = event
        self.draining = event.is_set  # draining(): asked twice per request, so no wrapper around it

    def observe(self, record) -> None:
        for observer in self.observers:
            try:
                observer(record)
            except Exception:  # an observer bug must never fail a request that already completed
                log.exception("request observer %r failed", observer)

    def tls_for_listener(self, tag):
        return self.tls_contexts.get(tag) if tag is not None else None

    def tunnel_opened(self) -> None:
        with self._tunnel_lock:
            self._tunnels += 1

    def tunnel_closed(self) -> None:
        with self._tunnel_lock:
            self._tunnels -= 1

    @property
    def open_tunnels(self) -> int:
        return self._tunnels

    # -- reload --------------------------------------------------------------------------------
    def reload(self, config: Config) -> None:
        """Swap in a new (already validated) config. In-flight requests keep their old snapshot."""
        with self._reload_lock:
            old_runtime, old_config = self.runtime, self.config
            # A name the config no longer has is forgotten: added back later, it starts from a fresh lookup
            for key in set(self.discovered) - set(discovered_entries(config)):
                del self.discovered[key]
            new_runtime = Runtime(config, previous=old_runtime, clock=self.clock, on_ejected=self._server_ejected,
                                  rate_table=self.rate_table, discovered=self.discovered)
            self._carry_admin_states(new_runtime)
            self.config = config
            self.settings = Settings.from_config(config.server)
            self.runtime = new_runtime
        _close_dropped_pools(old_runtime, new_runtime)
        for listener in self.reload_listeners:
            try:
                listener(old_config, config)
            except Exception:  # the new config is in place; one listener's bug must not undo the reload
                log.exception("reload listener %r failed", listener)

    def apply_discovered(self, key: DiscoveryKey, targets: tuple[Target, ...],
                         only_if_configured: bool = False) -> None:
        """A discovered name resolved to a new set of addresses: rebuild the runtime with it.

        Unchanged addresses keep their Server (health, counters) and pool; new ones join (checked first
        when the upstream has active checks, unless this is the name's first answer); vanished ones get
        no new requests, and those in flight (tunnels too) finish on the snapshot they started with.
        ``only_if_configured``: the process resolved it itself, and a lookup that ended after a reload
        removed its name is dropped; its set kept would come back with a reload that lists the name again.
        (A worker applies what its supervisor sends even before its own reload adds the name.)
        """
        with self._reload_lock:
            if only_if_configured and key not in discovered_entries(self.config):
                return
            if self.discovered.get(key) == tuple(targets):
                return  # a replay of what this process has already
            joined = frozenset([key]) if key in self.discovered else frozenset()
            self.discovered[key] = tuple(targets)
            old_runtime = self.runtime
            new_runtime = Runtime(self.config, previous=old_runtime, clock=self.clock,
                                  on_ejected=self._server_ejected, rate_table=self.rate_table,
                                  discovered=self.discovered, joined=joined)
            self._carry_admin_states(new_runtime)
            self.runtime = new_runtime
        _close_dropped_pools(old_runtime, self.runtime)

    def close(self) -> None:
        for pool in self.runtime.all_pools():
            pool.close_all()


def _close_dropped_pools(old_runtime: Runtime, new_runtime: Runtime) -> None:
    kept = set(map(id, new_runtime.pools_by_key.values()))
    for pool in old_runtime.all_pools():
        if id(pool) not in kept:
            pool.close_all()  # idle ones only: a request still using a connection closes it itself
