"""Load-balancing policies and the Upstream that uses them.

A policy is a small class owning its own state with one method,
`pick(servers, client_ip) -> Server | None` (Caddy's `Selector.Select`,
modules/caddyhttp/reverseproxy/selectionpolicies.go). A policy only asks
`server.available()`, honours weights, and returns None when no server is
available. It never claims a slot: `Upstream.pick_server()` does that with
`Server.try_acquire()`, because between a policy's look and the claim another
thread may have taken the last slot.

Policies are shared by every worker thread of one upstream, so each one is
thread-safe. A policy instance belongs to one Upstream: keep the Server objects
stable (a config reload builds new Upstreams, and with them new policies).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import random
import threading
from typing import Collection, Protocol, Sequence

from proxy.upstream.servers import ENABLED, EjectionCap, Server

log = logging.getLogger("pyproxy.health")

# Rendezvous hashing uses 52 bits of the digest so that (x + 0.5) / 2**52 is an
# exact float strictly inside (0, 1): log() never sees 0 or 1.
_HASH_BITS = 52
_HASH_SCALE = float(2 ** _HASH_BITS)


class UnknownPolicyError(ValueError):
    """The config named a policy that does not exist."""


class Policy(Protocol):
    def pick(self, servers: Sequence[Server], client_ip: str) -> Server | None: ...


def _available(servers: Sequence[Server]) -> list[Server]:
    return [server for server in servers if server.available()]


def _same_weight(servers: Sequence[Server]) -> bool:
    first = servers[0].weight if servers else 1
    return all(server.weight == first for server in servers)


def _same_effective_weight(servers: Sequence[Server]) -> bool:
    """Equal weights now, slow start included (a server ramping up weighs less for a while)."""
    first = servers[0].effective_weight() if servers else 1
    return all(server.effective_weight() == first for server in servers)


class RoundRobin:
    """nginx's smooth weighted round-robin (ngx_http_upstream_get_peer).

    Each pick adds every available server's weight to its running score, takes
    the highest and subtracts the total from it: weights 5,1,1 give
    a,a,b,a,c,a,a rather than a burst of five a's. Unavailable servers are
    skipped and their scores left alone, so the others stay smooth.

    Equal weights (the common case) use a plain counter: O(1) while the server
    it lands on is available.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # The turns: next() on an itertools.count is one C call under the GIL, so two threads never get
        # the same turn, without a lock around a counter.
        self._turns = itertools.count()
        self._spill_turns = itertools.count()
        self._scores: dict[Server, int] = {}
        # (sequence, all weights equal?) for the last tuple seen: weights never
        # change and a tuple cannot be mutated, so the answer can be reused.
        self._uniform_cache: tuple[Sequence[Server], bool] | None = None

    def pick(self, servers: Sequence[Server], client_ip: str) -> Server | None:
        if not servers:
            return None
        cached = self._uniform_cache  # the answer for the same tuple as last time: no call for it
        uniform = cached[1] if cached is not None and cached[0] is servers else self._is_uniform(servers)
        if not uniform:
            return self._pick_smooth(servers)
        server = servers[next(self._turns) % len(servers)]  # the common case, inline: no call for it
        if server.available():
            return server
        return self._spill(servers)

    def _is_uniform(self, servers: Sequence[Server]) -> bool:
        # A server with slow start can weigh less at any moment: those upstreams always take the smooth path.
        uniform = _same_weight(servers) and not any(server.slow_start for server in servers)
        if isinstance(servers, tuple):
            self._uniform_cache = (servers, uniform)
        return uniform

    def _spill(self, servers: Sequence[Server]) -> Server | None:
        """The server whose turn it was is out: hand its turn to the available ones
        in rotation, rather than always to its neighbour (which would get double)."""
        available = _available(servers)
        if not available:
            return None
        return available[next(self._spill_turns) % len(available)]

    def _pick_smooth(self, servers: Sequence[Server], weight_of=Server.effective_weight) -> Server | None:
        available = _available(servers)
        if not available:
            return None
        with self._lock:
            scores = self._scores
            total = 0
            best: Server | None = None
            best_score = 0
            for server in available:
                weight = weight_of(server)
                score = scores.get(server, 0) + weight
                scores[server] = score
                total += weight
                if best is None or score > best_score:
                    best, best_score = server, score
            scores[best] = best_score - total
        return best


class LeastConnections:
    """Fewest active requests per unit of weight (active / weight).

    Ties (for instance every server idle) go through smooth weighted
    round-robin among the tied servers, as nginx's least_conn does, so load
    spreads evenly and weights still count when the upstream is mostly idle.
    """

    def __init__(self) -> None:
        self._tie_breaker = RoundRobin()
        self._ramp = RoundRobin()  # own scores: picks while a server is in slow start

    def pick(self, servers: Sequence[Server], client_ip: str) -> Server | None:
        if any(server.slow_start and server.effective_weight() != server.weight for server in servers):
            return self._pick_while_ramping(servers)
        tied = self._least_loaded(servers)
        if len(tied) <= 1:
            return tied[0] if tied else None
        # The tie-breaker re-checks available(); if a tied server just filled up,
        # any other tied one is as good.
        return self._tie_breaker.pick(tied, client_ip) or tied[0]

    def _pick_while_ramping(self, servers: Sequence[Server]) -> Server | None:
        """A server is in slow start: smooth weighted round robin over weight² / (active + 1).

        Plain active/weight cannot hold a ramp when few requests are in flight: an idle server scores
        0 whatever its weight, and takes the next request while the others each have one. Here the
        weight counts twice: once as a rate (as in round robin, which rules when little is in flight)
        and once against the requests in flight (as in least connections, which rules under load), so
        a server at 10% of its weight gets about its weighted round-robin share at any concurrency.
        """
        return self._ramp._pick_smooth(servers, weight_of=_ramp_weight)

    @staticmethod
    def _least_loaded(servers: Sequence[Server]) -> list[Server]:
        tied: list[Server] = []
        best_active, best_weight = 0, 1
        for server in servers:
            if not server.available():
                continue
            active, weight = server.active_requests, server.effective_weight()
            # active/weight < best_active/best_weight, without dividing (integers, no float ties,
            # unless a server in slow start weighs a fraction).
            difference = active * best_weight - best_active * weight
            if not tied or difference < 0:
                tied = [server]
                best_active, best_weight = active, weight
            elif difference == 0:
                tied.append(server)
        return tied


def _ramp_weight(server: Server) -> float:
    weight = server.effective_weight()
    return weight * weight / (server.active_requests + 1)


class WeightedRandom:
    """A random available server, each with probability weight / total weight."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng if rng is not None else random.Random()
        # choice()/choices() are Python code over random(); one lock per pick keeps
        # an injected generator deterministic and safe on free-threaded builds.
        self._lock = threading.Lock()

    def pick(self, servers: Sequence[Server], client_ip: str) -> Server | None:
        available = _available(servers)
        if not available:
            return None
        with self._lock:
            if _same_effective_weight(available):
                return self._rng.choice(available)
            return self._rng.choices(available, weights=[s.effective_weight() for s in available])[0]


class IpHash:
    """Weighted rendezvous (highest-random-weight) hashing on the client address.

    Each server scores -weight / ln(h), where h in (0, 1) is a stable hash of
    (client, server); the highest score wins. A client keeps its server while
    the set of available servers is stable, and when a server goes away only
    the clients it had move (about 1/N of them), each to its own runner-up.
    The score is the weighted form (Schindelhauer & Schomaker, "Weighted
    distributed hash tables", 2005): each server wins with probability
    weight / total weight.
    """

    def pick(self, servers: Sequence[Server], client_ip: str) -> Server | None:
        # Slow start does not apply: scaling one server's weight would move clients to it and back,
        # breaking the stickiness that is this policy's point. Static weights only.
        best: Server | None = None
        best_score = 0.0
        for server in servers:
            if not server.available():
                continue
            score = _rendezvous_score(client_ip, server)
            if best is None or score > best_score:
                best, best_score = server, score
        return best


def _rendezvous_score(client_ip: str, server: Server) -> float:
    key = f"{client_ip}\x00{server.address}".encode()
    digest = hashlib.blake2b(key, digest_size=8).digest()
    fraction = ((int.from_bytes(digest, "big") >> (64 - _HASH_BITS)) + 0.5) / _HASH_SCALE
    return -server.weight / math.log(fraction)


def _priority_groups(servers: Sequence[Server]) -> tuple[tuple[Server, ...], ...] | None:
    priorities = sorted({server.priority for server in servers})
    if len(priorities) < 2:
        return None
    return tuple(tuple(server for server in servers if server.priority == priority) for priority in priorities)


POLICIES: dict[str, type] = {
    "round_robin": RoundRobin,
    "least_connections": LeastConnections,
    "random": WeightedRandom,
    "ip_hash": IpHash,
}


def make_policy(name: str) -> Policy:
    """A fresh policy instance for the config name; UnknownPolicyError otherwise."""
    try:
        policy_class = POLICIES[name]
    except KeyError:
        known = ", ".join(POLICIES)
        raise UnknownPolicyError(f"unknown policy {name!r} (expected one of: {known})") from None
    return policy_class()


class Upstream:
    """A named group of servers and the policy that picks among them."""

    def __init__(self, name: str, servers: Sequence[Server], policy_name: str, max_ejected_percent: int = 100,
                 all_down: str = "fail", slow_start: float = 0.0) -> None:
        self._name = name
        self._servers = tuple(servers)
        self._policy_name = policy_name
        self._policy = make_policy(policy_name)
        # Retries (and picks after a lost acquire race) choose among fewer servers. They get their own
        # instance so they never move the first pick's rotation: with one shared round-robin counter,
        # servers [dead, live] had every request try the dead one first (the retry took the live one's
        # turn), each paying a connect_timeout. Stateless policies (random, ip_hash) are unaffected.
        self._fallback_policy = make_policy(policy_name)
        # nginx ignores max_fails for an upstream of one server: ejecting it leaves nothing to serve.
        for server in self._servers:
            server.set_sole_server(len(self._servers) == 1)
            server.set_slow_start(slow_start)
        # max_ejected_percent (100 = no cap): checks never take more than that share out at once.
        self._cap = EjectionCap(name, self._servers, max_ejected_percent) if max_ejected_percent < 100 else None
        for server in self._servers:
            server.attach_cap(self._cap)
        if self._cap is not None:
            self._cap.recompute()  # servers carried over a reload may be out already
        # all_down = "try_all": when every server is down, send requests to them anyway, in turn.
        self._try_all_when_down = all_down == "try_all"
        # SRV priorities: the servers by priority, lowest first; None when there is one priority (the usual case).
        self._priority_groups = _priority_groups(self._servers)
        self._fail_open_lock = threading.Lock()
        self._fail_open_turn = 0
        self._failing_open = False  # in an episode of every server down (logged once when it starts)

    @property
    def name(self) -> str:
        return self._name

    @property
    def servers(self) -> tuple[Server, ...]:
        return self._servers

    @property
    def policy_name(self) -> str:
        return self._policy_name

    def pick_server(self, client_ip: str, exclude: Collection[Server] = ()) -> Server | None:
        """Pick a server not in `exclude` and claim a slot on it; the caller must release() it.

        Returns None when no server is available (the handler answers 503).
        `exclude` holds the servers a retry has already tried.
        """
        servers = self._servers if self._priority_groups is None else self._preferred_group(exclude)
        if exclude:
            candidates = tuple(server for server in servers if server not in exclude)
            policy = self._fallback_policy
        else:
            candidates, policy = servers, self._policy
        first_candidates = candidates
        # Bounded: each lost race (the server filled up between pick and claim)
        # removes that server from this call's candidates.
        while candidates:
            server = policy.pick(candidates, client_ip)
            if server is None:
                break
            if server.try_acquire():
                if self._failing_open:  # rare: no call per request otherwise
                    self._end_fail_open()
                return server
            candidates = tuple(other for other in candidates if other is not server)
            policy = self._fallback_policy
        if self._try_all_when_down:
            return self._pick_failing_open(first_candidates)
        return None

    def _preferred_group(self, exclude: Collection[Server]) -> tuple[Server, ...]:
        """The lowest-priority group with a server available (and not tried yet); every server if none is."""
        for group in self._priority_groups:
            if any(server.available() and server not in exclude for server in group):
                return group
        return self._servers

    @property
    def failing_open(self) -> bool:
        """all_down = "try_all" is sending requests to servers that are all down."""
        return self._failing_open

    def _pick_failing_open(self, candidates: Sequence[Server]) -> Server | None:
        """Every server is down (not merely full): claim the next one in turn whatever its checks say.
        Servers an operator drained or disabled stay out: fail-open overrules the checks, not them."""
        candidates = [server for server in candidates if server.admin_state == ENABLED]
        if not candidates or any(server.state == "up" and server.admin_state == ENABLED for server in self._servers):
            return None  # some server is up but busy (max_connections): that is a 503, not fail-open
        with self._fail_open_lock:
            turn = self._fail_open_turn
            self._fail_open_turn += 1
            starting = not self._failing_open
            self._failing_open = True
        if starting:
            log.warning("upstream %s: every server is down; sending requests to all of them anyway "
                        "(all_down = \"try_all\")", self._name)
        for offset in range(len(candidates)):
            server = candidates[(turn + offset) % len(candidates)]
            if server.try_acquire(even_if_down=True):
                return server
        return None

    def _end_fail_open(self) -> None:
        with self._fail_open_lock:
            ending, self._failing_open = self._failing_open, False
        if ending:
            log.warning("upstream %s: a server is up again; requests go to the servers that are up", self._name)

    def snapshot(self) -> dict:
        return {"policy": self._policy_name, "servers": [server.snapshot() for server in self._servers]}
