"""Config-time checks for a route's edge policies: ``allow`` / ``deny`` (client address rules).

The schema reads the keys; what each value may be, and how one rule can shadow another, lives here so
``proxy.config.schema`` stays a list of sections. The request-time side is ``proxy.http.access``.
"""
from __future__ import annotations

import ipaddress
from typing import Any

from proxy.config.units import describe_value

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_network(value: Any) -> str:
    """An IP address or CIDR network, normalised ("10.0.0.0/8", "2001:db8::/32", "192.168.1.5")."""
    if not isinstance(value, str):
        raise ValueError(f'expected an IP address or network like "10.0.0.0/8", got {describe_value(value)}')
    try:
        if "/" in value:
            return str(ipaddress.ip_network(value, strict=True))
        return str(ipaddress.ip_address(value))
    except ValueError as reason:
        raise ValueError(f"{describe_value(value)} is not a valid IP address or network ({reason})") from None


def as_network(rule: str) -> Network:
    """A normalised rule as a network; an IPv4-mapped IPv6 rule ("::ffff:10.0.0.0/104") becomes the
    IPv4 network it stands for, since mapped clients are checked as their IPv4 address."""
    network = ipaddress.ip_network(rule, strict=False)
    if network.version == 6 and network.prefixlen >= 96 and network[0].ipv4_mapped is not None:
        mapped = network[0].ipv4_mapped
        return ipaddress.ip_network(f"{mapped}/{network.prefixlen - 96}", strict=False)
    return network


def shadowed_allow(allow: str, deny: tuple[str, ...]) -> str | None:
    """The deny rule that covers every address of this allow rule (deny wins, so the allow can never
    let anyone in), or None."""
    allowed = as_network(allow)
    for rule in deny:
        denied = as_network(rule)
        if denied.version == allowed.version and allowed.subnet_of(denied):
            return rule
    return None
