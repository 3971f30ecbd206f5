"""The runtime API on the admin listener: look at an upstream's servers, drain, disable or enable one.

    GET  /upstreams                                    the upstream names
    GET  /upstreams/NAME                               every server: state, health, active requests
    POST /upstreams/NAME/servers/ADDRESS/drain         no new requests; in-flight ones finish
    POST /upstreams/NAME/servers/ADDRESS/disable       no traffic, no health checks
    POST /upstreams/NAME/servers/ADDRESS/enable        back to what its health checks say

ADDRESS is the server's ``host:port`` as /status shows it (percent-encoded where needed, e.g. an
IPv6 ``[::1]:8080``). Writes need ``Authorization: Bearer TOKEN`` with ``[admin] token``; the token is
compared in constant time (``hmac.compare_digest``), so the time of a refusal says nothing about how
much of a guess was right. With no token configured, writes are refused with 403: an admin listener
that was read-only stays read-only until the operator sets one (Caddy and HAProxy keep their write
APIs off the network by default too).

Every answer is JSON; an error is ``{"error": "..."}``. This module knows nothing of processes: the
admin listener hands it an ``AdminSources``, whose ``set_server_state`` is the process's own
``Application.set_admin_state`` or, with workers, the supervisor's, which tells every worker.
"""

from __future__ import annotations

import hmac
import json
import logging
from dataclasses import dataclass, field
from urllib.parse import unquote

from proxy.http.proxy_protocol import ThrottledLog

log = logging.getLogger("pyproxy.admin")

PREFIX = "/upstreams"
# The action in the path -> the admin state it sets (proxy.upstream.servers.ADMIN_STATES).
ACTIONS = {"drain": "draining", "disable": "disabled", "enable": "enabled"}
DISABLED_MESSAGE = "runtime API disabled: set admin.token"
# A refused request's path is the client's: a terminal escape sequence in it must not reach the log raw.
_CONTROL_CHARACTERS = {code: f"\\x{code:02x}" for code in [*range(0x20), *range(0x7f, 0xa0)]}


@dataclass
class ApiAnswer:
    status: int
    document: dict
    headers: dict = field(default_factory=dict)


def _error(status: int, message: str, **headers) -> ApiAnswer:
    return ApiAnswer(status, {"error": message}, headers)


class RuntimeApi:
    """One request's worth of the runtime API, over the admin listener's sources."""

    def __init__(self, sources, refusals: ThrottledLog | None = None) -> None:
        self.sources = sources
        # Refused writes are logged through this, shared by the listener: a flood of guesses writes a
        # few lines and a count, not a line each.
        self.refusals = refusals if refusals is not None else ThrottledLog(log)

    @staticmethod
    def handles(path: str) -> bool:
        return path == PREFIX or path.startswith(PREFIX + "/")

    @staticmethod
    def _parts(path: str) -> list[str]:
        return [unquote(part) for part in path[len(PREFIX):].strip("/").split("/") if part]

    @staticmethod
    def _is_write(parts: list[str]) -> bool:
        return len(parts) == 4 and parts[1] == "servers"

    @classmethod
    def not_allowed(cls, path: str, method: str) -> ApiAnswer:
        """405 on a path of the API (with the methods it takes); 404 on one that is none of its paths."""
        parts = cls._parts(path)
        if not cls._is_write(parts) and len(parts) > 1:
            return _error(404, f"no such path {path}; try {PREFIX}/NAME or POST {PREFIX}/NAME/servers/ADDRESS/ACTION")
        allow = "POST" if cls._is_write(parts) else "GET, HEAD"
        return _error(405, f"method {method} not allowed on {path}", Allow=allow)

    # -- reads --------------------------------------------------------------------------------------
    def get(self, path: str) -> ApiAnswer:
        parts = self._parts(path)
        if len(parts) > 1:
            return self.not_allowed(path, "GET")
        upstreams = self.sources.status_document()["upstreams"]
        if not parts:
            return ApiAnswer(200, {"upstreams": sorted(upstreams)})
        name = parts[0]
        if name not in upstreams:
            return _error(404, f"no upstream named {name!r}")
        return ApiAnswer(200, upstream_view(name, upstreams[name]))

    # -- writes -------------------------------------------------------------------------------------
    def post(self, path: str, authorization: str | None, body: bytes, peer: str) -> ApiAnswer:
        parts = self._parts(path)
        if not self._is_write(parts):
            return self.not_allowed(path, "POST")
        refused = self._refuse_unauthorised(authorization, peer, path)
        if refused is not None:
            return refused
        problem = _body_problem(body)
        if problem is not None:
            return _error(400, problem)
        upstream, _, address, action = parts
        state = ACTIONS.get(action)
        if state is None:
            return _error(404, f"unknown action {action!r}; expected one of: {', '.join(ACTIONS)}")
        try:
            previous = self.sources.set_server_state(upstream, address, state)
        except LookupError as exc:
            return _error(404, exc.args[0] if exc.args else str(exc))
        log.warning("runtime API: %s set upstream %s server %s %s (was %s)", peer, upstream, address, state, previous)
        return ApiAnswer(200, {"upstream": upstream, "server": address, "state": state, "previous": previous})

    def _refuse_unauthorised(self, authorization: str | None, peer: str, path: str) -> ApiAnswer | None:
        token = self.sources.token()
        if token is None or self.sources.set_server_state is None:
            return _error(403, DISABLED_MESSAGE)
        scheme, _, given = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            self.refusals.warning("runtime API: %s refused (%s) for POST %s", peer,
                                  "no bearer token" if not given else "wrong token",
                                  path.translate(_CONTROL_CHARACTERS))
            return _error(401, "missing or wrong token: send Authorization: Bearer TOKEN (admin.token)",
                          **{"WWW-Authenticate": 'Bearer realm="pyproxy admin"'})
        return None


def _body_problem(body: bytes) -> str | None:
    """A write takes no parameters: no body, or a JSON object (``{}``), is fine."""
    if not body.strip():
        return None
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return "the body must be JSON (or empty)"
    return None if isinstance(document, dict) else "the body must be a JSON object (or empty)"


def upstream_view(name: str, upstream: dict) -> dict:
    """GET /upstreams/NAME: the /status entry of each server. "state" is the one word for it:
    "draining" or "disabled" when an operator said so, else what the checks say ("up", "down", or
    "leaving" for an address gone from DNS); "admin_state" (enabled, draining, disabled) and "health"
    give the two halves. "name" is the DNS name of a server found in DNS."""
    servers = []
    for server in upstream["servers"]:
        admin_state = server.get("admin_state", "enabled")
        servers.append({
            "address": server["address"],
            **({"name": server["name"]} if server.get("name") else {}),
            "state": server["state"] if admin_state == "enabled" else admin_state,
            "admin_state": admin_state,
            "health": server["state"],
            "reason": server.get("reason", ""),
            "active_requests": server.get("active_requests", 0),
            "requests_total": server.get("requests_total", 0),
            "failures_total": server.get("failures_total", 0),
            "weight": server.get("weight", 1),
            "last_check": server.get("last_check"),
        })
    return {"name": name, "policy": upstream.get("policy"), "servers": servers}
