"""Per-route access control: a route's ``allow`` / ``deny`` lists checked against the client address.

The rule, stated once (docs/configuration.md): deny wins over allow; with an allow list, a client not
on it is refused; with only a deny list, everyone else gets in. The address checked is the original
client (after ``server.trusted_proxies``, as for ip_hash); an IPv4-mapped IPv6 client
("::ffff:10.1.2.3", as a dual-stack listener reports IPv4 peers) is checked as its IPv4 address, so
IPv4 rules hold on any listener. An address that does not parse is refused: the rule fails closed.
"""

from __future__ import annotations

import ipaddress

from proxy.config.edge import as_network
from proxy.http.errors import Forbidden

CACHE_LIMIT = 65536  # verdicts remembered per address string; bounded, as clients choose X-Forwarded-For


class AccessRules:
    """One route's allow and deny networks, with each client's verdict cached (an immutable snapshot:
    a reload builds new rules and so starts a new cache)."""

    def __init__(self, allow: tuple[str, ...] = (), deny: tuple[str, ...] = ()):
        self.allow = tuple(as_network(rule) for rule in allow)
        self.deny = tuple(as_network(rule) for rule in deny)
        self._verdicts: dict[str, bool] = {}

    @classmethod
    def from_lists(cls, allow: tuple[str, ...], deny: tuple[str, ...]) -> "AccessRules | None":
        """The rules for a route, or None when it has none (no check per request at all)."""
        return cls(allow, deny) if allow or deny else None

    def permits(self, client: str) -> bool:
        verdict = self._verdicts.get(client)
        if verdict is None:
            verdict = self._decide(client)
            if len(self._verdicts) < CACHE_LIMIT:
                self._verdicts[client] = verdict
        return verdict

    def check(self, client: str) -> None:
        """Raise Forbidden (403) unless the rules let this client address in."""
        if not self.permits(client):
            raise Forbidden(log_detail=f"client {client} is not allowed on this route")

    def _decide(self, client: str) -> bool:
        try:
            address = ipaddress.ip_address(client)
        except ValueError:
            return False  # not an address (a garbled X-Forwarded-For hop): nothing to match, refuse
        if address.version == 6 and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if any(address in network for network in self.deny):
            return False
        return not self.allow or any(address in network for network in self.allow)
