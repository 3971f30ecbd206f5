"""What ``pyproxy check`` prints: the effective routing table, most specific route first, and the
precedence order the router uses (``proxy.routing.router`` sorts the same way). Presentation only: the
config is already validated when it gets here."""

from __future__ import annotations

from typing import Iterable

from proxy.config.schema import Config, ListenConfig, RouteConfig, UpstreamConfig
from proxy.routing.router import normal_prefix, wildcard_length
from proxy.config.units import describe_expect_status, format_duration



def route_precedence_key(route: RouteConfig) -> tuple[int, int, int]:
    """Sort key, most specific first, as the contract states it: exact host > "*.wildcard" (the
    longest first) > no host, then the longest path. Use with a stable sort so ties keep file order
    (proxy.routing.router sorts the same way)."""
    host_rank = 2 if route.host is None else 1 if route.host.startswith("*.") else 0
    return (host_rank, -wildcard_length(route.host), -len(normal_prefix(route.path)))  # as the router compares


def routes_by_precedence(routes: Iterable[RouteConfig]) -> list[RouteConfig]:
    """Routes in the order to try them: the first one whose host and path match wins."""
    return sorted(routes, key=route_precedence_key)


def _upstream_lines(upstream: UpstreamConfig, indent: str) -> list[str]:
    lines = []
    for server in upstream.servers:
        scheme = "https://" if server.tls else ""
        if server.discover == "srv":
            lines.append(f"{indent}SRV {server.address}  (targets, ports and weights from DNS)")
        elif server.discover:
            lines.append(f"{indent}{scheme}{server.address}  weight {server.weight}, each A/AAAA address a server")
        else:
            lines.append(f"{indent}{scheme}{server.address}  weight {server.weight}")
    health = upstream.health
    if health:
        lines.append(
            f"{indent}health: GET {health.path} every {format_duration(health.interval)}, "
            f"timeout {format_duration(health.timeout)}, expect {describe_expect_status(health.expect_status)}; "
            f"up after {health.healthy_after} passes, down after {health.unhealthy_after} failures")
    if upstream.passive:
        window = format_duration(upstream.passive.fail_timeout)
        if len(upstream.servers) == 1 and not upstream.servers[0].discover:  # there is nowhere else to send its traffic (as in nginx)
            lines.append(f"{indent}passive: off (the only server is never taken out)")
        else:
            lines.append(f"{indent}passive: out for {window} after {upstream.passive.max_fails} failures within {window}")
    if not health and not upstream.passive:
        lines.append(f"{indent}health: not checked")
    if upstream.send_proxy_protocol:
        lines.append(f"{indent}sends a PROXY protocol {upstream.send_proxy_protocol} header on each new connection")
    return lines


def _policy_lines(route: RouteConfig, indent: str) -> list[str]:
    """Who may use the route: allow / deny lists (deny wins; with an allow list, the rest is refused),
    then basic auth, and how often: the rate limit."""
    lines = []
    if route.allow:
        lines.append(f"{indent}allow: {', '.join(route.allow)}")
    if route.deny:
        lines.append(f"{indent}deny: {', '.join(route.deny)}")
    if route.basic_auth:
        auth = route.basic_auth
        count = len(auth.users)
        forwarded = "; Authorization forwarded" if auth.forward_auth_header else ""
        lines.append(f'{indent}basic auth: realm "{auth.realm}", {count} user{"s" if count != 1 else ""}{forwarded}')
    if route.rate_limit:
        limit = route.rate_limit
        lines.append(f"{indent}rate limit: {limit.requests} per {format_duration(limit.per)}, burst {limit.burst}, "
                     f"key {limit.key}")
    return lines


def _route_heading(route: RouteConfig, upstream: UpstreamConfig) -> str:
    host = route.host or "(any host)"
    strip = " (strip prefix)" if route.strip_prefix else ""
    return f"{host} {route.path}{strip} -> {upstream.name} ({upstream.policy})"


def routing_table_lines(config: Config) -> list[str]:
    """The effective routing table, most specific route first, for `pyproxy check`."""
    workers = config.server.workers
    lines = [
        "listen: " + ", ".join(_listen_label(entry) for entry in config.server.listen)
        + f" ({workers} worker{'s' if workers != 1 else ''})",
        "admin: " + (_listen_label(config.admin.listen) if config.admin else "off"),
        "routes (most specific first):",
    ]
    for number, route in enumerate(routes_by_precedence(config.routes), start=1):
        if route.redirect is not None:
            host = route.host or "(any host)"
            lines.append(f"  {number}. {host} {route.path} -> redirect {route.redirect.status} to {route.redirect.to}")
            continue
        upstream = config.upstreams[route.upstream]
        lines.append(f"  {number}. {_route_heading(route, upstream)}")
        lines.extend(f"       set header {name}: {value}" for name, value in route.set_headers)
        lines.extend(_policy_lines(route, "       "))
        if route.compress is not None:
            lines.append(f"       compress: {', '.join(route.compress.encodings)}")
        lines.extend(_upstream_lines(upstream, "       "))
    used = {route.upstream for route in config.routes}
    for name, upstream in config.upstreams.items():
        if name not in used:
            lines.append(f"unused upstream: {name} ({upstream.policy})")
            lines.extend(_upstream_lines(upstream, "       "))
    return lines


def _listen_label(entry: ListenConfig) -> str:
    if entry.redirect_https:
        label = f"{entry.address} (redirects to https)"
    elif entry.tls:
        label = f"{entry.address} (TLS, HTTP/2)" if entry.http2 else f"{entry.address} (TLS)"
    else:
        label = f"{entry.address} (h2c)" if entry.h2c else entry.address
    return f"{label} (PROXY protocol)" if entry.proxy_protocol else label
