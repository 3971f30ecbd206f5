"""DNS discovery: servers from the A/AAAA or SRV records of a name, kept up to date.

``servers = [{ address = "api.internal:8080", discover = "a" }]`` makes every A and AAAA record of
``api.internal`` a server of its own; ``servers = [{ srv = "_http._tcp.api.service.consul" }]`` takes
targets, ports, priorities and weights from SRV records (docs/configuration.md, "DNS discovery").

``DnsResolver.lookup`` asks the name servers of ``[dns]`` with dnspython and answers a ``Lookup``: the
set of ``Target`` addresses (empty for NXDOMAIN or no records) or ``None`` when the lookup failed
(timeout, SERVFAIL), in which case the caller keeps the last good set. ``DnsDiscovery`` is the loop
that re-resolves every name when due (the earlier of ``dns.refresh`` and the records' TTL, never
more often than once a second) on its own thread, and hands each changed set to ``on_change``. It never
runs on a request's path: requests read the servers a set was turned into (``proxy/serve/app.py``).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.resolver

from proxy.config.schema import MIN_DNS_REFRESH, Config, DnsConfig, UpstreamServerConfig
from proxy.config.units import format_address
from proxy.upstream.rounds import RoundLoop

log = logging.getLogger("pyproxy.dns")

MAX_IDLE_WAIT = 1.0  # the loop looks at the config at least this often (a reload may add names)
# A failed lookup is tried again after 1 s, then 2, 4 ... up to dns.refresh: a name server back after a
# blip is used at once (HAProxy's "timeout retry" is 1 s), one down for long is not asked every second.
FIRST_RETRY = MIN_DNS_REFRESH


@dataclass(frozen=True, order=True)
class Target:
    """One address a name resolved to: a server of the upstream."""

    priority: int   # SRV priority (lowest used first); 0 for A/AAAA
    host: str       # an IP address
    port: int
    weight: int
    name: str       # the DNS name the address belongs to (an SRV record's target)

    @property
    def address(self) -> str:
        return format_address(self.host, self.port)

    def to_list(self) -> list:
        """For the supervisor's control link (JSON)."""
        return [self.priority, self.host, self.port, self.weight, self.name]


def targets_from_lists(items: Iterable[list]) -> tuple[Target, ...]:
    return tuple(sorted(Target(int(p), str(h), int(port), int(w), str(n)) for p, h, port, w, n in items))


@dataclass(frozen=True)
class Lookup:
    """What one lookup found. ``targets`` None: it failed (keep the last good set), see ``problem``."""

    targets: tuple[Target, ...] | None
    ttl: float | None = None   # the smallest TTL of the records; None when there were none
    problem: str = ""          # why it failed, or why the set is empty (NXDOMAIN)
    # SRV targets whose own lookup failed: ``targets`` lacks them, and the caller keeps their last addresses
    unresolved: tuple[str, ...] = ()


DiscoveryKey = tuple  # (upstream name, "a" | "srv", name, port)


def discovery_key(upstream_name: str, entry: UpstreamServerConfig) -> DiscoveryKey:
    """Identifies one discovered entry across reloads (its weight may change; its set stays)."""
    return (upstream_name, entry.discover, entry.host, entry.port)


def discovered_entries(config: Config) -> dict[DiscoveryKey, UpstreamServerConfig]:
    return {discovery_key(upstream.name, entry): entry for upstream in config.upstreams.values()
            for entry in upstream.servers if entry.discover}


class _Failed(Exception):
    """A lookup that did not get an answer (timeout, SERVFAIL, REFUSED)."""


class DnsResolver:
    """Lookups with dnspython against ``[dns] resolvers`` (or /etc/resolv.conf), bounded by ``timeout``."""

    def __init__(self, settings: DnsConfig) -> None:
        self.settings = settings
        self._resolver: dns.resolver.Resolver | None = None
        self._problem = ""
        try:
            resolver = dns.resolver.Resolver(configure=not settings.resolvers)
        except (dns.resolver.NoResolverConfiguration, OSError) as exc:
            self._problem = f"no name servers: /etc/resolv.conf cannot be used ({exc}); set dns.resolvers"
            return
        if settings.resolvers:
            resolver.nameservers = [dns.nameserver.Do53Nameserver(host, port) for host, port in settings.resolvers]
        resolver.timeout = settings.timeout    # one attempt on one name server ...
        resolver.lifetime = settings.timeout   # ... and one query, retries included
        self._resolver = resolver
        self._deadline = 0.0  # of the current lookup: its queries (SRV, then A and AAAA of each target) share it

    def lookup(self, entry: UpstreamServerConfig) -> Lookup:
        if self._resolver is None:
            return Lookup(None, problem=self._problem)
        self._deadline = time.monotonic() + self.settings.timeout
        try:
            if entry.discover == "srv":
                return self._lookup_srv(entry)
            targets, ttl, exists = self._addresses(entry.host, entry.port, entry.weight, 0)
        except _Failed as exc:
            return Lookup(None, problem=str(exc))
        return Lookup(tuple(sorted(targets)), ttl, "" if targets else "no A or AAAA records" if exists else "NXDOMAIN")

    def _lookup_srv(self, entry: UpstreamServerConfig) -> Lookup:
        answer = self._query(entry.host, "SRV")
        if answer is None:
            return Lookup((), problem="NXDOMAIN")
        ttls = [answer.rrset.ttl] if answer.rrset is not None else []
        targets: list[Target] = []
        failed: dict[str, str] = {}  # target -> why its lookup failed
        for record in answer:
            if record.target == dns.name.root or record.port == 0:  # "." means: no service here (RFC 2782)
                continue
            target = record.target.to_text(omit_final_dot=True)
            try:
                found, ttl, _ = self._addresses(target, record.port, max(1, record.weight), record.priority)
            except _Failed as exc:  # one broken target must not freeze the others (HAProxy resolves each too)
                failed[target] = str(exc)
                continue
            targets += found
            ttls += [ttl] if ttl is not None else []
        unique = tuple(sorted(set(targets)))
        if failed and not unique:
            raise _Failed("; ".join(f"{target}: {why}" for target, why in sorted(failed.items())))
        problem = "; ".join(f"{target}: {why}" for target, why in sorted(failed.items()))
        return Lookup(unique, min(ttls) if ttls else None, problem or ("" if unique else "no SRV records with addresses"),
                      tuple(sorted(failed)))

    def _addresses(self, name: str, port: int, weight: int, priority: int) -> tuple[list[Target], float | None, bool]:
        """The A and AAAA records of ``name`` as targets, their smallest TTL, and whether the name exists."""
        targets, ttls = [], []
        for kind in ("A", "AAAA"):
            answer = self._query(name, kind)
            if answer is None:  # NXDOMAIN: the name does not exist, so it has no AAAA either
                return targets, None, False
            if answer.rrset is not None:
                ttls.append(answer.rrset.ttl)
                targets += [Target(priority, record.address, port, weight, name) for record in answer]
        return targets, (min(ttls) if ttls else None), True

    def _query(self, name: str, kind: str):
        """The answer (maybe without records), None for NXDOMAIN; raises _Failed if there is no answer."""
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise _Failed(f"no answer within {self.settings.timeout:g}s")
        try:
            return self._resolver.resolve(name, kind, search=False, raise_on_no_answer=False, lifetime=remaining)
        except dns.resolver.NXDOMAIN:
            return None
        except dns.resolver.LifetimeTimeout:
            raise _Failed(f"no answer within {self.settings.timeout:g}s") from None
        except dns.resolver.NoNameservers as exc:  # every name server answered SERVFAIL, REFUSED, ...
            raise _Failed(f"the name servers failed: {_servers_said(exc)}") from None
        except dns.exception.DNSException as exc:
            raise _Failed(str(exc) or type(exc).__name__) from None


def _servers_said(exc: dns.resolver.NoNameservers) -> str:
    errors = exc.kwargs.get("errors") or []
    said = sorted({_describe_error(error[3]) for error in errors if len(error) > 3})
    return ", ".join(said) or "no usable answer"


def _describe_error(error) -> str:
    """One name server's failure. A truncated UDP answer (its text is empty) is retried over TCP, which
    then failed too: a firewall that blocks TCP port 53 is the usual cause."""
    if isinstance(error, dns.message.Truncated):
        return "answer truncated (too big for UDP, and TCP failed)"
    return str(error) or type(error).__name__


class _Name:
    """The loop's state for one discovered entry."""

    __slots__ = ("entry", "targets", "next_due", "failing", "failures", "unresolved")

    def __init__(self, entry: UpstreamServerConfig, due: float) -> None:
        self.entry = entry
        self.targets: tuple[Target, ...] | None = None  # the last good set; None before the first
        self.next_due = due
        self.failing = False
        self.failures = 0  # failed lookups in a row (the retry backs off)
        self.unresolved: tuple[str, ...] = ()  # SRV targets whose lookup is failing (logged once each)


class DnsDiscovery:
    """Re-resolves every discovered name of the config when due and reports changed sets.

    ``on_change(key, targets)`` runs on the loop's thread (or the starting one, for the first round).
    ``config`` returns the current Config (reloads show up within a second; call ``run_once`` after a
    reload to resolve new names at once). ``make_resolver`` and ``clock`` are injectable for tests.
    """

    def __init__(self, config: Callable[[], Config], on_change: Callable[[DiscoveryKey, tuple[Target, ...]], None],
                 make_resolver: Callable[[DnsConfig], object] = DnsResolver, clock=time.monotonic) -> None:
        self._config = config
        self._on_change = on_change
        self._make_resolver = make_resolver
        self._clock = clock
        self._resolver = None
        self._resolver_settings: DnsConfig | None = None
        self._names: dict[DiscoveryKey, _Name] = {}
        self._round_lock = threading.Lock()
        self._loop = RoundLoop(self.run_once, "pyproxy-dns", "dns discovery round", MAX_IDLE_WAIT, log)
        self._hand_over_again = False  # set by kick(): see there
        # Guards that flag's read-and-clear: a kick landing between the two would otherwise be lost.
        self._kick_lock = threading.Lock()

    def start(self) -> None:
        """Resolve every name once before returning (the proxy then starts with its servers), then loop."""
        self.run_once()
        self._loop.start()

    def stop(self) -> None:
        self._loop.stop()

    def kick(self) -> None:
        """Look at the config again now (after a reload), and hand every known set over again: a reload
        drops the sets of names it removes, and one added back before the loop saw it go needs its set."""
        with self._kick_lock:
            self._hand_over_again = True
        self._loop.kick()

    def current(self) -> dict[DiscoveryKey, tuple[Target, ...]]:
        """The last good set of every name resolved at least once (replayed to a new worker)."""
        return {key: name.targets for key, name in list(self._names.items()) if name.targets is not None}

    def run_once(self) -> float:
        """Resolve every name that is due; returns the seconds until the next one is."""
        with self._round_lock:
            with self._kick_lock:
                hand_over_again, self._hand_over_again = self._hand_over_again, False
            config = self._config()
            self._sync(config)
            if hand_over_again:
                for key, name in list(self._names.items()):
                    if name.targets is not None:
                        self._hand_over(key, name.entry.address, name.targets)
            for key, name in list(self._names.items()):
                if name.next_due <= self._clock():
                    self._refresh(key, name, config.dns)
            now = self._clock()
            waits = [name.next_due - now for name in self._names.values()]
        return max(0.0, min([MAX_IDLE_WAIT, *waits]))

    def _sync(self, config: Config) -> None:
        wanted = discovered_entries(config)
        if wanted and (self._resolver is None or config.dns != self._resolver_settings):
            self._resolver, self._resolver_settings = self._make_resolver(config.dns), config.dns
        for key in set(self._names) - set(wanted):
            del self._names[key]
        for key, entry in wanted.items():
            name = self._names.get(key)
            if name is None:
                self._names[key] = _Name(entry, self._clock())
            elif name.entry != entry:  # a new weight: the same addresses, weighed anew
                name.entry, name.next_due = entry, self._clock()

    def _refresh(self, key: DiscoveryKey, name: _Name, settings: DnsConfig) -> None:
        lookup = self._resolver.lookup(name.entry)
        label = name.entry.address
        if lookup.targets is None:
            if not name.failing:  # once per outage: a name server down for an hour logs one line
                kept = "no addresses yet" if name.targets is None else f"keeping its {len(name.targets)} address(es)"
                log.warning("dns: lookup of %s failed (%s); %s until it answers", label, lookup.problem, kept)
            name.failing = True
            name.failures += 1
            name.next_due = self._clock() + min(settings.refresh, FIRST_RETRY * 2 ** min(name.failures - 1, 16))
            return
        if name.failing:
            log.info("dns: %s answers again", label)
        name.failing = False
        name.failures = 0
        ttl = settings.refresh if lookup.ttl is None else lookup.ttl
        name.next_due = self._clock() + max(MIN_DNS_REFRESH, min(settings.refresh, ttl))
        lookup = self._keep_unresolved(name, lookup)
        if lookup.targets == name.targets:
            return
        self._report(key, name, lookup)

    def _keep_unresolved(self, name: _Name, lookup: Lookup) -> Lookup:
        """SRV targets whose lookup failed keep their last addresses, as a failed name keeps its set."""
        newly_failing = set(lookup.unresolved) - set(name.unresolved)
        if newly_failing:
            log.warning("dns: %s: lookup of SRV target(s) %s failed (%s); keeping their last addresses",
                        name.entry.address, ", ".join(sorted(newly_failing)), lookup.problem)
        name.unresolved = lookup.unresolved
        if not lookup.unresolved:
            return lookup
        kept = [target for target in name.targets or () if target.name in lookup.unresolved]
        return Lookup(tuple(sorted(set(lookup.targets) | set(kept))), lookup.ttl, lookup.problem, lookup.unresolved)

    def _report(self, key: DiscoveryKey, name: _Name, lookup: Lookup) -> None:
        before = set(name.targets or ())
        after = set(lookup.targets)
        label = name.entry.address
        if not after:
            log.warning("dns: no addresses for %s (%s): upstream %s answers 503 until records appear",
                        label, lookup.problem, key[0])
        else:
            added = ", ".join(sorted(t.address for t in after - before))
            removed = ", ".join(sorted(t.address for t in before - after))
            log.info("dns: %s: %d address(es)%s%s", label, len(after), f"; added {added}" if added else "",
                     f"; removed {removed} (draining)" if removed else "")
        name.targets = lookup.targets
        self._hand_over(key, label, lookup.targets)

    def _hand_over(self, key: DiscoveryKey, label: str, targets: tuple[Target, ...]) -> None:
        try:
            self._on_change(key, targets)
        except Exception:  # the set is recorded; one broken listener must not stop discovery
            log.exception("applying the addresses of %s failed", label)


def check_names(config: Config, make_resolver: Callable[[DnsConfig], object] = DnsResolver) -> list[str]:
    """``pyproxy check``: a warning line for each discovered name that does not resolve now."""
    resolver = None
    warnings = []
    for key, entry in discovered_entries(config).items():
        resolver = resolver or make_resolver(config.dns)
        lookup = resolver.lookup(entry)
        if lookup.targets is None:
            warnings.append(f"warning: upstreams.{key[0]}: cannot resolve {entry.address}: {lookup.problem}")
        elif not lookup.targets:
            warnings.append(f"warning: upstreams.{key[0]}: {entry.address} has no addresses ({lookup.problem}); "
                            "the upstream answers 503 until it has")
        elif lookup.unresolved:
            warnings.append(f"warning: upstreams.{key[0]}: {entry.address}: cannot resolve SRV target(s): "
                            f"{lookup.problem}")
    return warnings
