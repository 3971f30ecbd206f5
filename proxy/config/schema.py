"""The config file: TOML in, an immutable, fully validated Config out (reference: docs/configuration.md).

`load_config` and `parse_config` check everything before returning and collect every problem, so a
user fixes a broken file in one round. Each problem is one line naming the file, the key path and
what is wrong, e.g.
    proxy.toml: upstreams.api.servers[1]: "127.0.0.1:99999" is not a valid address (port must be 1-65535)
They raise ConfigError and nothing else.

Relative file paths (tls_cert, tls_key, tls_ca, an access log file) are resolved against the
directory of the config file, so the proxy behaves the same whatever directory it is started from
(and under --watch). The Config holds the resolved absolute paths.
"""
from __future__ import annotations

import dataclasses
import functools
import difflib
import ipaddress
import os
import re
import stat
import tomllib
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from core.cpu_affinity import available_cpus
from proxy.config.ca_names import default_ca_dir, name_is_permitted, normalize_internal_name
from proxy.config.edge import (
    BasicAuthConfig, check_bcrypt_hash, check_realm, check_user_name, parse_network, read_htpasswd, shadowed_allow,
)
# COMPRESS_KEYS and REDIRECT_KEYS are imported for the reference test, which reads every *_KEYS here.
from proxy.config.edge import (COMPRESS_KEYS, RATE_LIMIT_KEYS, REDIRECT_KEYS, CompressPolicy,  # noqa: F401
                               RateLimitPolicy, RedirectPolicy, parse_compress, parse_rate_limit, parse_redirect)
from proxy.config.units import (
    describe_value, format_address, format_duration, format_size, parse_address, parse_duration, parse_host,
    parse_port, parse_size, split_host_port,
)

# Config names map to balancing policy classes in one dict (proxy.upstream.balancing.make_policy);
# this is the list of names the config accepts.
POLICY_NAMES = ("round_robin", "least_connections", "random", "ip_hash")
LOG_LEVELS = ("debug", "info", "warning", "error")
ALL_DOWN_MODES = ("fail", "try_all")
LOG_FORMATS = ("combined", "json")
ACCESS_STREAMS = ("stdout", "stderr", "off")

DEFAULT_LISTEN = "127.0.0.1:8080"
DEFAULT_ADMIN_LISTEN = "127.0.0.1:9901"  # Envoy's conventional admin port
MIN_HEADER_BYTES = 1024                  # below this ordinary browser requests would get 431
MAX_HEADER_BYTES = 1024 ** 2             # Go's default; HTTP/2 advertises twice it in a 32-bit field
MAX_WEIGHT = 1000
MAX_RETRIES = 100
DEFAULT_EXPECT_STATUS = frozenset(range(200, 300))
COMMAND_LINE_SOURCE = "command line"
# Upper bounds for counts that are spent at once: min_threads threads start at boot, in every worker
# process, so a stray zero must get a clear error rather than exhaust the machine (or a traceback).
MAX_THREADS = 10000
MAX_WORKERS = 1024

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")               # TOML bare key (TOML 1.0 "Keys")
_UPSTREAM_NAME = re.compile(r"[A-Za-z0-9_.-]+")         # safe in key paths, logs and metric labels
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # token, RFC 9110 §5.6.2
_FORBIDDEN_IN_HEADER_VALUE = ("\r", "\n", "\0")          # RFC 9110 §5.5: never valid in a field value
_STATUS_CLASS = re.compile(r"([2-5])xx", re.IGNORECASE)
_TOML_POSITION = re.compile(r"^(?P<message>.*) \(at (?:line (?P<line>\d+), column (?P<column>\d+)|end of document)\)$")


# ---------------------------------------------------------------------------------------------
# The validated configuration
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SniCertificate:
    """A further certificate on a TLS listener, served to clients asking for one of ``hosts`` (SNI)."""
    hosts: tuple[str, ...]  # lowercase names; "*.example.com" covers one label
    tls_cert: str
    tls_key: str


@dataclass(frozen=True)
class ListenConfig:
    host: str              # "" = all interfaces; the listener picks 0.0.0.0 or ::
    port: int
    tls_cert: str | None = None
    tls_key: str | None = None
    sni: tuple[SniCertificate, ...] = ()  # certificates picked by server name; tls_cert is the default
    tls_internal: bool = False  # tls = "internal": certificates issued on demand by the local CA
    redirect_https: bool = False  # every request answered with a 308 to the same URL on https
    proxy_protocol: bool = False  # every connection starts with a PROXY header (proxy.http.proxy_protocol)
    http2: bool = True  # a TLS listener offers h2 by ALPN (RFC 9113 §3.2)
    h2c: bool = False  # a plain listener also takes HTTP/2 with prior knowledge (RFC 9113 §3.3)

    @functools.cached_property  # asked for every new connection (the listener's own settings)
    def address(self) -> str:
        return format_address(self.host, self.port)

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None or self.tls_internal


_DEFAULT_LISTEN_CONFIG = ListenConfig("127.0.0.1", 8080)


@dataclass(frozen=True)
class ServerSettings:
    listen: tuple[ListenConfig, ...] = (_DEFAULT_LISTEN_CONFIG,)
    workers: int = 1
    min_threads: int = 4
    max_threads: int = 256
    thread_idle_timeout: float = 30.0     # a thread above min_threads idle this long retires
    max_connections: int = 10000
    graceful_timeout: float = 30.0        # Kubernetes' default terminationGracePeriodSeconds
    header_timeout: float = 10.0
    idle_timeout: float = 75.0            # nginx's keepalive_timeout default
    max_header_bytes: int = 16384         # Node.js' default --max-http-header-size
    max_body_bytes: int = 100 * 1024 ** 2
    tunnel_timeout: float = 3600.0        # idle limit for upgraded (WebSocket) tunnels
    body_timeout: float = 60.0            # gap allowed between request body reads (nginx client_body_timeout)
    send_timeout: float = 60.0            # a client that takes nothing for this long is dropped (nginx send_timeout)
    trusted_proxies: tuple[str, ...] = ()  # normalised IPs/CIDRs whose X-Forwarded-For is believed
    cpu_affinity: str | tuple[int, ...] = "auto"  # "auto" | "off" | CPU numbers (core.cpu_affinity)
    rate_limit_keys: int = 65536          # rate limit buckets kept (32 bytes each: 2 MiB), shared by every worker
    h2_max_streams: int = 100             # SETTINGS_MAX_CONCURRENT_STREAMS (nginx http2_max_concurrent_streams 128)


@dataclass(frozen=True)
class AdminConfig:
    listen: ListenConfig
    # The runtime API's bearer token (from token, token_file or PYPROXY_ADMIN_TOKEN); None: writes are off.
    token: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"
    access: str = "stdout"   # "stdout" | "stderr" | "off" | an absolute file path
    format: str = "combined"


@dataclass(frozen=True, kw_only=True)
class RouteConfig:
    host: str | None = None   # lowercase, no port; "*.example.com" matches any subdomain
    path: str = "/"           # prefix on segment boundaries; no trailing "/" except the root
    strip_prefix: bool = False
    upstream: str
    set_headers: tuple[tuple[str, str], ...] = ()
    allow: tuple[str, ...] = ()   # client addresses/networks let in (empty: everyone not denied)
    deny: tuple[str, ...] = ()    # client addresses/networks refused with 403; deny wins over allow
    basic_auth: BasicAuthConfig | None = None  # users who may use the route (401 for anyone else)
    compress: CompressPolicy | None = None  # None: responses relayed as the upstream sent them
    redirect: RedirectPolicy | None = None  # set: answered by the proxy, upstream is ""
    rate_limit: RateLimitPolicy | None = None  # a token bucket per client (or header value): 429 past it


@dataclass(frozen=True)
class HealthConfig:
    path: str = "/healthz"
    interval: float = 5.0
    timeout: float = 2.0          # lowered to a shorter interval when the file gives no timeout
    expect_status: frozenset[int] = DEFAULT_EXPECT_STATUS
    healthy_after: int = 2
    unhealthy_after: int = 3
    method: str = "GET"           # GET | HEAD
    host: str | None = None       # the Host header; None = the server's address
    headers: tuple[tuple[str, str], ...] = ()
    port: int | None = None       # probe this port of the server's host; None = the server's port
    expect_body: str | None = None  # a substring of the body, or a regular expression (expect_body_regex)
    expect_body_regex: bool = False


@dataclass(frozen=True)
class PassiveConfig:
    max_fails: int = 3
    fail_timeout: float = 10.0
    statuses: frozenset[int] = frozenset()  # answers that count as failures; none by default


@dataclass(frozen=True)
class RetryBudgetConfig:
    percent: int = 20           # retries may be this share of the requests of the last 10 s ...
    min_per_second: int = 3     # ... or this many per second, whichever allows more


@dataclass(frozen=True)
class UpstreamServerConfig:
    host: str
    port: int                 # 0 for an SRV name: its records give the ports
    weight: int = 1
    tls: bool = False
    discover: str = ""        # "": one server; "a": every A/AAAA record of host; "srv": SRV records of host

    @property
    def address(self) -> str:
        return self.host if self.discover == "srv" else format_address(self.host, self.port)


@dataclass(frozen=True)
class DnsConfig:
    """[dns]: how names of servers with discover / srv are resolved (proxy.upstream.discovery)."""
    resolvers: tuple[tuple[str, int], ...] = ()  # (ip, port); empty = the system's /etc/resolv.conf
    refresh: float = 10.0     # re-resolve at least this often (sooner when the records' TTL says so)
    timeout: float = 2.0      # one lookup, retries included; past it the last good set is kept


@dataclass(frozen=True)
class UpstreamConfig:
    name: str
    servers: tuple[UpstreamServerConfig, ...]
    policy: str = "round_robin"
    preserve_host: bool = True
    keepalive: int = 32
    keepalive_timeout: float = 30.0
    max_connections: int = 0          # 0 = unlimited
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    retries: int = 2
    health: HealthConfig | None = None
    passive: PassiveConfig | None = None
    max_ejected_percent: int = 100    # 100 = checks may take every server out (then 503)
    all_down: str = "fail"            # "fail" (503) | "try_all" (fail open: send to every server anyway)
    slow_start: float = 0.0           # seconds a server that became available ramps up over; 0 = off
    retry_budget: RetryBudgetConfig = RetryBudgetConfig()
    tls_verify: bool = True
    tls_ca: str | None = None
    send_proxy_protocol: str | None = None  # "v1" | "v2": a PROXY header on each new connection


@dataclass(frozen=True)
class TlsSettings:
    """[tls]: the local CA behind listeners with tls = "internal" (proxy.http.local_ca)."""
    internal_ca_dir: str = ""                 # "" = the default, $XDG_DATA_HOME/pyproxy/ca
    internal_names: tuple[str, ...] = ()      # further domains the CA may issue for, e.g. ("test",)

    @property
    def ca_dir(self) -> str:
        return self.internal_ca_dir or default_ca_dir()


@dataclass(frozen=True, kw_only=True)
class Config:
    source: str
    server: ServerSettings = ServerSettings()
    tls: TlsSettings = TlsSettings()
    admin: AdminConfig | None = None
    log: LogConfig = LogConfig()
    dns: DnsConfig = DnsConfig()
    routes: tuple[RouteConfig, ...]
    upstreams: Mapping[str, UpstreamConfig]

    def __post_init__(self) -> None:
        # A read-only view, so nobody mutates a Config shared between threads.
        object.__setattr__(self, "upstreams", types.MappingProxyType(dict(self.upstreams)))

    def __reduce__(self):
        # MappingProxyType cannot be pickled; rebuild from a plain dict (e.g. sent to a worker).
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        fields["upstreams"] = dict(self.upstreams)
        return (_rebuild_config, (fields,))


def _rebuild_config(fields: dict) -> Config:
    return Config(**fields)


class ConfigError(Exception):
    """Every problem found in a config, one full line each: "FILE: key.path: problem"."""

    def __init__(self, problems: Iterable[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))

    def __str__(self) -> str:
        return "\n".join(self.problems)


# ---------------------------------------------------------------------------------------------
# Collecting problems
# ---------------------------------------------------------------------------------------------

def key_path(parent: str, key: str) -> str:
    """Join a key onto a dotted path as TOML would spell it (quoted when not a bare key)."""
    shown = key if _BARE_KEY.fullmatch(key) else describe_value(key)
    return f"{parent}.{shown}" if parent else shown


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """ " (did you mean 'x'?)" when a candidate is close, else ""."""
    candidates = list(candidates)
    same_but_case = [candidate for candidate in candidates if candidate.lower() == word.lower()]
    close = same_but_case or difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


class _Checker:
    """Collects problems while a config is read, and reads tables key by key."""

    def __init__(self, source: str, base_dir: str):
        self.source = source
        self.base_dir = base_dir
        self.problems: list[str] = []

    def add(self, path: str, message: str) -> None:
        where = f"{path}: " if path else ""
        self.problems.append(f"{self.source}: {where}{message}")

    def table(self, value: Any, path: str) -> dict:
        """The value if it is a table; otherwise a problem and an empty table."""
        if isinstance(value, dict):
            return value
        self.add(path, f"expected a table, got {describe_value(value)}")
        return {}

    def reject_unknown(self, table: dict, allowed: Iterable[str], path: str) -> None:
        allowed = list(allowed)
        for key in table:
            if key not in allowed:
                hint = did_you_mean(key, allowed) or f" (expected one of: {', '.join(allowed)})"
                self.add(key_path(path, key), f"unknown key{hint}")

    def fields(self, table: dict, path: str, converters: Mapping[str, Callable[[Any], Any]]) -> dict:
        """Convert each present key; return the valid ones as keyword arguments."""
        values = {}
        for key, convert in converters.items():
            if key in table:
                try:
                    values[key] = convert(table[key])
                except ValueError as problem:
                    self.add(key_path(path, key), str(problem))
        return values

    def existing_file(self, value: Any, path: str) -> str | None:
        """An absolute path to an existing file, resolved against the config's directory."""
        if not isinstance(value, str) or not value:
            self.add(path, f"expected a file path, got {describe_value(value)}")
            return None
        resolved = self.resolve(value)
        if not os.path.isfile(resolved):
            where = "" if resolved == value else f" (looked for {resolved})"
            self.add(path, f"{describe_value(value)} does not exist or is not a file{where}")
            return None
        return resolved

    def resolve(self, file_path: str) -> str:
        return os.path.normpath(os.path.join(self.base_dir, os.path.expanduser(file_path)))


# ---------------------------------------------------------------------------------------------
# Value converters: each takes a raw TOML value and returns the parsed one or raises ValueError
# ---------------------------------------------------------------------------------------------

def _integer(minimum: int, maximum: int | None = None) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"expected a whole number, got {describe_value(value)}")
        if value < minimum or (maximum is not None and value > maximum):
            allowed = f"{minimum}-{maximum}" if maximum is not None else f"at least {minimum}"
            raise ValueError(f"must be {allowed}, got {value}")
        return value
    return convert


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {describe_value(value)}")
    return value


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {describe_value(value)}")
    return value


def _choice(names: Iterable[str]) -> Callable[[Any], str]:
    names = tuple(names)

    def convert(value: Any) -> str:
        if value not in names:
            hint = did_you_mean(value, names) if isinstance(value, str) else ""
            raise ValueError(f"{describe_value(value)} is not one of {' | '.join(names)}{hint}")
        return value
    return convert


def _duration(positive: bool = True) -> Callable[[Any], float]:
    def convert(value: Any) -> float:
        seconds = parse_duration(value)
        if positive and seconds == 0:
            raise ValueError(f"{describe_value(value)} is too short (must be more than 0)")
        return seconds
    return convert


def _size(minimum: int = 0, maximum: int | None = None) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        size = parse_size(value)
        if size < minimum:
            raise ValueError(f"{describe_value(value)} is too small (must be at least {minimum} bytes)")
        if maximum is not None and size > maximum:
            raise ValueError(f"{describe_value(value)} is too large (must be at most {format_size(maximum)})")
        return size
    return convert


def _max_body_bytes(value: Any) -> int:
    """A size of at least one byte: nginx users write 0 for "no limit", which here would refuse every upload."""
    size = parse_size(value)
    if size == 0:
        raise ValueError(f'{describe_value(value)} would refuse every request body with 413 (it is not "no limit" '
                         'as in nginx: give a large size like "100GiB")')
    return size


def usable_cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # no affinity API on this platform
        return os.cpu_count() or 1


def parse_workers(value: Any) -> int:
    """server.workers and --workers: a number of processes, or "auto" = one per CPU this process may
    run on (a container or taskset limited to 2 of 64 CPUs gets 2 workers, not 64)."""
    if value == "auto":
        return usable_cpu_count()
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_WORKERS:
        return value
    raise ValueError(f'expected a number of processes (1-{MAX_WORKERS}) or "auto", got {describe_value(value)}')


def _cpu_affinity(value: Any) -> str | tuple[int, ...]:
    """"auto" (each worker on its own CPU), "off", or the CPU numbers workers take in turn."""
    if value in ("auto", "off"):
        return value
    if not isinstance(value, list) or not value or not all(
            isinstance(cpu, int) and not isinstance(cpu, bool) and cpu >= 0 for cpu in value):
        raise ValueError(f'expected "auto", "off" or a list of CPU numbers like [0, 1], got {describe_value(value)}')
    available = available_cpus()
    missing = [cpu for cpu in value if available and cpu not in available]
    if missing:
        raise ValueError(f"CPU {', '.join(map(str, missing))} not available here "
                         f"(this process may use {', '.join(map(str, available))})")
    return tuple(value)


def _expect_status(value: Any) -> frozenset[int]:
    """ "2xx" | 200 | [200, 204]."""
    if isinstance(value, str) and _STATUS_CLASS.fullmatch(value):
        first = int(value[0]) * 100
        return frozenset(range(first, first + 100))
    codes = value if isinstance(value, list) and value else [value]
    for code in codes:
        # 1xx are interim responses (RFC 9110 §15.2), never the final status a check sees.
        if not isinstance(code, int) or isinstance(code, bool) or not 200 <= code <= 599:
            raise ValueError(f'expected "2xx", "3xx", a status code 200-599 or a list of them, got {describe_value(value)}')
    return frozenset(codes)


def _probe_host(value: Any) -> str:
    """The Host header a health probe sends: a host name or address, optionally with a port."""
    if not isinstance(value, str) or not value:
        raise ValueError(f'expected a host like "app.example.com", got {describe_value(value)}')
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in value) or any(c in value for c in "/?#@"):
        raise ValueError(f"{describe_value(value)} is not a valid Host header (a host name with an optional port)")
    if not value.isascii():  # the probe's head is bytes: a name outside ASCII goes in its IDNA form
        raise ValueError(f"{describe_value(value)} is not a valid Host header (write the name in ASCII, "
                         f"its xn-- form)")
    return value


def _expect_body(value: Any) -> tuple[str, bool]:
    """(text, is_regex): a substring, or a regular expression written "~regex" (checked now)."""
    if not isinstance(value, str) or not value:
        raise ValueError(f'expected a substring like "ok" or a regular expression like "~^ok", got {describe_value(value)}')
    if not value.startswith("~"):
        return value, False
    pattern = value[1:]
    if not pattern:
        raise ValueError('"~" needs a regular expression after it, e.g. "~status: *ok"')
    try:
        re.compile(pattern)
    except re.error as problem:
        raise ValueError(f"{describe_value(value)} is not a valid regular expression ({problem})") from None
    return pattern, True


def _failure_statuses(value: Any) -> frozenset[int]:
    """passive.statuses: a list of "5xx"/"4xx" classes and codes 400-599, e.g. ["5xx"] or [502, 503]."""
    expected = 'expected a list of "5xx", "4xx" or status codes 400-599, like ["5xx"] or [502, 503]'
    if not isinstance(value, list) or not value:
        raise ValueError(f"{expected}, got {describe_value(value)}")
    codes: set[int] = set()
    for index, item in enumerate(value):
        if isinstance(item, str) and _STATUS_CLASS.fullmatch(item) and item[0] in "45":
            first = int(item[0]) * 100
            codes.update(range(first, first + 100))
        elif isinstance(item, int) and not isinstance(item, bool) and 400 <= item <= 599:
            codes.add(item)
        else:
            # A 2xx/3xx is a working answer: counting it as a failure would eject healthy servers.
            raise ValueError(f'item {index}: {describe_value(item)} is not "5xx", "4xx" or a status code 400-599 '
                             "(a 2xx or 3xx answer is the server working)")
    return frozenset(codes)


def _route_path(value: Any) -> str:
    """A path prefix: starts with "/", no query or fragment; a trailing "/" is dropped because
    matching is on segment boundaries anyway ("/api/" and "/api" both mean the /api segment)."""
    if not isinstance(value, str):
        raise ValueError(f'expected a path like "/api", got {describe_value(value)}')
    if not value.startswith("/"):
        raise ValueError(f'{describe_value(value)} must start with "/"')
    if any(c in value for c in "?#") or any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError(f"{describe_value(value)} is not a valid path prefix (no spaces, control characters, '?' or '#')")
    return _encode_non_ascii(value.rstrip("/") or "/")


def _encode_non_ascii(path: str) -> str:
    """ "/café" as clients send it, "/caf%C3%A9" (RFC 3986 §2.5: UTF-8, percent-encoded; uppercase as
    the router normalises escapes): a prefix kept with raw letters could never match a request."""
    if path.isascii():
        return path
    return "".join(c if c.isascii() else "".join(f"%{byte:02X}" for byte in c.encode("utf-8")) for c in path)


def _request_path(value: Any) -> str:
    """A path to request, e.g. for health checks: starts with "/", may carry a query."""
    if not isinstance(value, str):
        raise ValueError(f'expected a path like "/healthz", got {describe_value(value)}')
    if not value.startswith("/"):
        raise ValueError(f'{describe_value(value)} must start with "/"')
    if "#" in value or any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError(f"{describe_value(value)} is not a valid path (no spaces, control characters or '#')")
    return _encode_non_ascii(value)


def _route_host(value: Any) -> str:
    """A host to match the request's Host against: lowercase, port dropped, "*.name" allowed."""
    if not isinstance(value, str) or not value:
        raise ValueError(f'expected a host name like "app.example.com", got {describe_value(value)}')
    text = value.lower()
    wildcard = text.startswith("*.")
    if wildcard:
        text = text[2:]
    if "*" in text:
        raise ValueError(f'{describe_value(value)} is not a valid host (a wildcard must be the whole first label, e.g. "*.example.com")')
    try:
        if not text.isascii():  # a Unicode name, as clients send it: its IDNA ("xn--") form
            text = text.encode("idna").decode("ascii")
    except UnicodeError:
        raise ValueError(f"{describe_value(value)} is not a valid host (IDNA cannot encode it)") from None
    try:
        host = parse_host(_drop_port(text)).rstrip(".")
    except ValueError as reason:
        raise ValueError(f"{describe_value(value)} is not a valid host ({reason})") from None
    host = f"[{host}]" if ":" in host else host   # as IPv6 appears in a Host header
    return f"*.{host}" if wildcard else host


def _drop_port(text: str) -> str:
    if text.startswith("["):
        end = text.find("]")
        if end > 0 and text[end + 1:].startswith(":"):
            parse_port(text[end + 2:])
            return text[:end + 1]
        return text
    if text.count(":") == 1:
        host, _, port = text.partition(":")
        parse_port(port)
        return host
    return text


def _header_name(name: str) -> None:
    if not _HEADER_NAME.fullmatch(name):
        raise ValueError(f"{describe_value(name)} is not a valid header name (RFC 9110 §5.6.2 token)")


def _header_value(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {describe_value(value)}")
    if any(c in value for c in _FORBIDDEN_IN_HEADER_VALUE):
        raise ValueError(f"{describe_value(value)} is not a valid header value (no CR, LF or NUL)")
    if any(ord(c) > 255 for c in value):  # a head is sent as Latin-1 bytes (RFC 9110 §5.5: ASCII, or obs-text)
        raise ValueError(f"{describe_value(value)} is not a valid header value (only ASCII and Latin-1 characters)")
    return value


def parse_server_address(text: Any) -> tuple[str, int, bool]:
    """(host, port, tls) from "host:port", "http://host[:port]" or "https://host[:port]"."""
    if not isinstance(text, str):
        raise ValueError(f'{describe_value(text)} is not a valid address (expected a string like "127.0.0.1:9001")')
    scheme, sep, rest = text.partition("://")
    if not sep:
        host, port = parse_address(f":{text}" if text.isascii() and text.isdigit() else text)
        if not host:
            raise ValueError(f'{describe_value(text)} is not a valid address (an upstream server needs a host, e.g. "127.0.0.1:{port}")')
        return host, port, False
    try:
        return _split_server_url(scheme, rest)
    except ValueError as reason:
        raise ValueError(f"{describe_value(text)} is not a valid address ({reason})") from None


def _split_server_url(scheme: str, rest: str) -> tuple[str, int, bool]:
    """The part after "scheme://": a host and an optional port; the port defaults by scheme."""
    scheme = scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError("the scheme must be http or https")
    rest = rest[:-1] if rest.endswith("/") else rest
    if any(c in rest for c in "/?#@"):
        raise ValueError("a server URL is only scheme://host:port; routes decide paths")
    tls = scheme == "https"
    if rest.rfind(":") <= rest.rfind("]"):   # no port (a colon inside [IPv6] does not count)
        return parse_host(rest), (443 if tls else 80), tls
    host_text, port_text = split_host_port(rest)
    return parse_host(host_text), parse_port(port_text), tls


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------

MAX_H2_STREAMS = 10000  # streams a client may run at once on one connection; each may take a worker

SERVER_KEYS = (
    "listen", "workers", "min_threads", "max_threads", "thread_idle_timeout", "max_connections",
    "graceful_timeout", "header_timeout", "idle_timeout", "max_header_bytes", "max_body_bytes",
    "tunnel_timeout", "trusted_proxies", "body_timeout", "send_timeout", "cpu_affinity", "rate_limit_keys",
    "h2_max_streams",
)
_SERVER_CONVERTERS = {
    "workers": parse_workers,
    "rate_limit_keys": _integer(64, 16 * 1024 ** 2),  # at most 512 MiB of buckets
    "min_threads": _integer(1, MAX_THREADS),
    "max_threads": _integer(1, MAX_THREADS),
    "thread_idle_timeout": _duration(),
    "max_connections": _integer(1),
    "graceful_timeout": _duration(positive=False),   # 0 = close at once
    "header_timeout": _duration(),
    "idle_timeout": _duration(),
    "max_header_bytes": _size(MIN_HEADER_BYTES, MAX_HEADER_BYTES),
    "max_body_bytes": _max_body_bytes,
    "tunnel_timeout": _duration(),
    "body_timeout": _duration(),
    "send_timeout": _duration(),
    "cpu_affinity": _cpu_affinity,
    "h2_max_streams": _integer(1, MAX_H2_STREAMS),
}
LISTEN_KEYS = ("address", "tls", "tls_cert", "tls_key", "sni", "redirect_https", "proxy_protocol", "http2", "h2c")
LISTEN_TLS_MODES = ("internal",)
TLS_KEYS = ("internal_ca_dir", "internal_names")
SNI_KEYS = ("host", "tls_cert", "tls_key")
ADMIN_KEYS = ("listen", "token", "token_file")
ADMIN_TOKEN_ENV = "PYPROXY_ADMIN_TOKEN"  # the token when the config names none (kept out of the file)
LOG_KEYS = ("level", "access", "format")
ROUTE_KEYS = ("host", "path", "strip_prefix", "upstream", "set_headers", "allow", "deny", "basic_auth",
              "compress", "redirect", "rate_limit")
BASIC_AUTH_KEYS = ("realm", "users", "users_file", "forward_auth_header")
# Keys that only make sense with an upstream: on a redirect route they would silently do nothing.
UPSTREAM_ONLY_ROUTE_OPTIONS = ("strip_prefix", "set_headers", "compress")
UPSTREAM_KEYS = (
    "servers", "policy", "preserve_host", "keepalive", "keepalive_timeout", "max_connections",
    "connect_timeout", "read_timeout", "retries", "health", "passive", "tls_verify", "tls_ca",
    "max_ejected_percent", "all_down", "slow_start", "retry_budget", "send_proxy_protocol",
)
PROXY_PROTOCOL_VERSIONS = ("v1", "v2")
_UPSTREAM_CONVERTERS = {
    "policy": _choice(POLICY_NAMES),
    "preserve_host": _boolean,
    "keepalive": _integer(0),
    "keepalive_timeout": _duration(),
    "max_connections": _integer(0),
    "connect_timeout": _duration(),
    "read_timeout": _duration(),
    "retries": _integer(0, MAX_RETRIES),
    "tls_verify": _boolean,
    "max_ejected_percent": _integer(0, 100),
    "all_down": _choice(ALL_DOWN_MODES),
    "slow_start": _duration(positive=False),   # 0 = off
    "send_proxy_protocol": _choice(PROXY_PROTOCOL_VERSIONS),
}
SERVER_ENTRY_KEYS = ("address", "weight", "discover", "srv")
DISCOVER_MODES = ("a",)
DNS_KEYS = ("resolvers", "refresh", "timeout")
MIN_DNS_REFRESH = 1.0  # records are never re-resolved more often than this, whatever their TTL
HEALTH_KEYS = ("path", "interval", "timeout", "expect_status", "healthy_after", "unhealthy_after",
               "method", "host", "headers", "port", "expect_body")
HEALTH_METHODS = ("GET", "HEAD")
_HEALTH_CONVERTERS = {
    "path": _request_path,
    "interval": _duration(),
    "timeout": _duration(),
    "expect_status": _expect_status,
    "healthy_after": _integer(1),
    "unhealthy_after": _integer(1),
    "method": _choice(HEALTH_METHODS),
    "host": _probe_host,
    "port": _integer(1, 65535),
}
# The probe writes these itself: one Connection: close request with no body, Host from `host`.
_PROBE_OWN_HEADERS = ("host", "connection", "content-length", "transfer-encoding")
RETRY_BUDGET_KEYS = ("percent", "min_per_second")
_RETRY_BUDGET_CONVERTERS = {"percent": _integer(0, 100), "min_per_second": _integer(0)}
PASSIVE_KEYS = ("max_fails", "fail_timeout", "statuses")
_PASSIVE_CONVERTERS = {"max_fails": _integer(1), "fail_timeout": _duration(), "statuses": _failure_statuses}
TOP_KEYS = ("server", "tls", "admin", "log", "dns", "routes", "upstreams")
_DNS_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")


def _parse_listen_entry(c: _Checker, value: Any, path: str) -> ListenConfig | None:
    """One listen address: a string, or a table {address, tls_cert, tls_key}."""
    if isinstance(value, dict):
        return _parse_listen_table(c, value, path)
    try:
        return ListenConfig(*parse_address(value))
    except ValueError as problem:
        c.add(path, str(problem))
        return None


def _parse_listen_table(c: _Checker, table: dict, path: str) -> ListenConfig | None:
    c.reject_unknown(table, LISTEN_KEYS, path)
    internal = _parse_listen_tls(c, table, path)
    if ("tls_cert" in table) != ("tls_key" in table):
        c.add(path, "tls_cert and tls_key go together: give both or neither")
    cert = c.existing_file(table["tls_cert"], key_path(path, "tls_cert")) if "tls_cert" in table else None
    key = c.existing_file(table["tls_key"], key_path(path, "tls_key")) if "tls_key" in table else None
    has_default = "tls_cert" in table or internal
    sni = _parse_sni(c, table["sni"], key_path(path, "sni"), has_default) if "sni" in table else ()
    flags = c.fields(table, path, {"redirect_https": _boolean, "proxy_protocol": _boolean})
    redirect_https = flags.get("redirect_https", False)
    if redirect_https and has_default:
        c.add(key_path(path, "redirect_https"), "a TLS listener is https already: it would redirect to itself")
    http2, h2c = _parse_listen_http2(c, table, path, has_default)
    if "address" not in table:
        c.add(path, 'missing required key "address"')
        return None
    try:
        host, port = parse_address(table["address"])
    except ValueError as problem:
        c.add(key_path(path, "address"), str(problem))
        return None
    return ListenConfig(host, port, cert, key, sni, internal, redirect_https,
                        proxy_protocol=flags.get("proxy_protocol", False), http2=http2, h2c=h2c)


def _parse_listen_http2(c: _Checker, table: dict, path: str, tls: bool) -> tuple[bool, bool]:
    """http2 (ALPN h2, TLS listeners) and h2c (prior knowledge, plain listeners): each where it means something."""
    values = c.fields(table, path, {"http2": _boolean, "h2c": _boolean})
    if "http2" in values and not tls:
        c.add(key_path(path, "http2"), "only for TLS listeners (ALPN); a plain listener takes HTTP/2 with h2c = true")
    if values.get("h2c") and tls:
        c.add(key_path(path, "h2c"), "only for plain listeners; a TLS listener offers h2 by ALPN (http2)")
    return values.get("http2", True), values.get("h2c", False)


def _parse_listen_tls(c: _Checker, table: dict, path: str) -> bool:
    """tls = "internal": True when given and valid (a problem is recorded otherwise)."""
    if "tls" not in table:
        return False
    value = table["tls"]
    if value not in LISTEN_TLS_MODES:
        hint = did_you_mean(value, LISTEN_TLS_MODES) if isinstance(value, str) else ""
        c.add(key_path(path, "tls"), f'expected "internal" (certificates from pyproxy\'s local CA), '
                                     f"got {describe_value(value)}{hint}")
        return False
    if "tls_cert" in table or "tls_key" in table:
        c.add(key_path(path, "tls"), 'tls = "internal" and tls_cert/tls_key exclude each other: the local CA '
                                     "issues the certificates (add files for some names with sni = [...])")
        return False
    return True


def _parse_tls(c: _Checker, value: Any) -> TlsSettings:
    table = c.table(value, "tls")
    c.reject_unknown(table, TLS_KEYS, "tls")
    ca_dir = ""
    if "internal_ca_dir" in table:
        raw = table["internal_ca_dir"]
        if isinstance(raw, str) and raw:
            ca_dir = c.resolve(raw)
        else:
            c.add("tls.internal_ca_dir", f"expected a directory path, got {describe_value(raw)}")
    names: list[str] = []
    raw_names = table.get("internal_names", [])
    if not isinstance(raw_names, list):
        c.add("tls.internal_names", f'expected a list of domains like [".test"], got {describe_value(raw_names)}')
        raw_names = []
    for index, raw in enumerate(raw_names):
        try:
            names.append(_internal_name(raw))
        except ValueError as problem:
            c.add(f"tls.internal_names[{index}]", str(problem))
    return TlsSettings(ca_dir or default_ca_dir(), tuple(names))


def _internal_name(value: Any) -> str:
    """A domain the local CA may issue for: ".test" (or "test") covers test and every name below it."""
    if not isinstance(value, str):
        raise ValueError(f'expected a domain like ".test", got {describe_value(value)}')
    name = normalize_internal_name(value)
    labels = name.split(".")
    if not name or not all(_DNS_LABEL.fullmatch(label) for label in labels) or _looks_like_ip(name):
        raise ValueError(f'{describe_value(value)} is not a domain name like ".test" or ".internal"')
    return name


def _looks_like_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _parse_sni(c: _Checker, value: Any, path: str, has_default: bool) -> tuple[SniCertificate, ...]:
    """sni = [{ host = "a.test" | ["a.test", "*.a.test"], tls_cert = "...", tls_key = "..." }, ...]"""
    if not has_default:
        c.add(path, "needs tls_cert and tls_key on the listener too (the certificate for other names), or tls = \"internal\"")
    if not isinstance(value, list) or not value:
        c.add(path, f"expected a list of {{ host, tls_cert, tls_key }} tables, got {describe_value(value)}")
        return ()
    entries = []
    first_for: dict[str, int] = {}  # host -> the entry that names it first (the one that would win)
    for index, item in enumerate(value):
        entry = _parse_sni_entry(c, item, f"{path}[{index}]")
        if not entry:
            continue
        for host in entry.hosts:
            if host in first_for:
                c.add(key_path(f"{path}[{index}]", "host"),
                      f"{host} is already given a certificate by {path}[{first_for[host]}]")
            else:
                first_for[host] = index
        entries.append(entry)
    return tuple(entries)


def _parse_sni_entry(c: _Checker, item: Any, path: str) -> SniCertificate | None:
    table = c.table(item, path)
    c.reject_unknown(table, SNI_KEYS, path)
    missing = [k for k in SNI_KEYS if k not in table]
    for name in missing:
        c.add(path, f'missing required key "{name}"')
    if missing:
        return None
    raw_hosts = table["host"] if isinstance(table["host"], list) else [table["host"]]
    hosts = []
    for host in raw_hosts:
        try:
            hosts.append(_route_host(host))
        except ValueError as problem:
            c.add(key_path(path, "host"), str(problem))
    cert = c.existing_file(table["tls_cert"], key_path(path, "tls_cert"))
    key = c.existing_file(table["tls_key"], key_path(path, "tls_key"))
    if not (hosts and cert and key) or len(hosts) != len(raw_hosts):
        return None
    return SniCertificate(tuple(hosts), cert, key)


def _parse_listen(c: _Checker, value: Any, path: str) -> tuple[ListenConfig, ...]:
    if not isinstance(value, list):
        entry = _parse_listen_entry(c, value, path)
        return (entry,) if entry else ()
    if not value:
        c.add(path, "needs at least one address")
    entries: list[ListenConfig] = []
    for index, item in enumerate(value):
        entry = _parse_listen_entry(c, item, f"{path}[{index}]")
        if entry and any(_same_socket(entry, seen) for seen in entries):
            c.add(f"{path}[{index}]", f"{entry.address} is listed twice")
        elif entry:
            entries.append(entry)
    return tuple(entries)


def _same_socket(a: ListenConfig, b: ListenConfig) -> bool:
    """Would binding both fail (bind(2) EADDRINUSE)? Same port, and the same host or a wildcard that
    covers the other: "" and "::" take every address (dual-stack), "0.0.0.0" every IPv4 address.
    Host names are not resolved here, so a name only clashes with itself and the dual-stack ones."""
    if a.port != b.port:
        return False
    if a.host == b.host or {a.host, b.host} & {"", "::"}:
        return True
    return "0.0.0.0" in (a.host, b.host) and _is_ipv4(a.host) and _is_ipv4(b.host)


def _is_ipv4(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return True


def _parse_server(c: _Checker, value: Any) -> ServerSettings:
    table = c.table(value, "server")
    c.reject_unknown(table, SERVER_KEYS, "server")
    values = c.fields(table, "server", _SERVER_CONVERTERS)
    listen = _parse_listen(c, table.get("listen", DEFAULT_LISTEN), "server.listen")
    if listen:
        values["listen"] = listen
    if "trusted_proxies" in table:
        values["trusted_proxies"] = _parse_trusted_proxies(c, table["trusted_proxies"])
    settings = ServerSettings(**values)
    _check_proxy_protocol_trust(c, settings, isinstance(table.get("listen"), list))
    if settings.min_threads > settings.max_threads:
        c.add("server.min_threads", f"must not exceed max_threads ({settings.min_threads} > {settings.max_threads})")
    return settings


def _check_proxy_protocol_trust(c: _Checker, settings: ServerSettings, listed: bool) -> None:
    """A PROXY header says who the client is; believed from anyone, it would let anyone claim any address."""
    if settings.trusted_proxies:
        return
    for index, listen in enumerate(settings.listen):
        if listen.proxy_protocol:
            c.add(f"server.listen[{index}].proxy_protocol" if listed else "server.listen.proxy_protocol",
                  "needs server.trusted_proxies: the addresses of the balancers allowed to send the header")


def _parse_trusted_proxies(c: _Checker, value: Any) -> tuple[str, ...]:
    return _parse_network_list(c, value, "server.trusted_proxies")


def _parse_admin(c: _Checker, value: Any, server: ServerSettings) -> AdminConfig:
    table = c.table(value, "admin")
    c.reject_unknown(table, ADMIN_KEYS, "admin")
    raw = table.get("listen", DEFAULT_ADMIN_LISTEN)
    if isinstance(raw, list):
        c.add("admin.listen", f"expected one address, got {describe_value(raw)}")
        raw = DEFAULT_ADMIN_LISTEN
    listen = _parse_listen_entry(c, raw, "admin.listen") or ListenConfig(*parse_address(DEFAULT_ADMIN_LISTEN))
    if listen.redirect_https:
        c.add("admin.listen.redirect_https", "only for server.listen (the admin listener serves the admin endpoints)")
    if listen.proxy_protocol:
        c.add("admin.listen.proxy_protocol", "only for server.listen (the admin listener is reached directly)")
    if isinstance(raw, dict):
        for key in ("http2", "h2c"):
            if key in raw:
                c.add(f"admin.listen.{key}", "only for server.listen (the admin listener speaks HTTP/1.1)")
    for key in ("tls", "tls_cert", "tls_key", "sni"):
        if isinstance(raw, dict) and key in raw:
            c.add(f"admin.listen.{key}", "the admin listener serves plain HTTP (no TLS): keep it on loopback or a "
                                         "private network, or put a TLS-terminating proxy in front of it")
    clash = next((entry for entry in server.listen if _same_socket(entry, listen)), None)
    if clash:
        c.add("admin.listen", f"{listen.address} clashes with server.listen {clash.address}")
    return AdminConfig(listen, _parse_admin_token(c, table))


def _parse_admin_token(c: _Checker, table: dict) -> str | None:
    """admin.token, the contents of admin.token_file (read now: a reload reads it again), or else the
    PYPROXY_ADMIN_TOKEN environment variable. None: the runtime API's writes stay off."""
    if "token" in table and "token_file" in table:
        c.add("admin", 'give "token" or "token_file", not both')
        return None
    if "token" in table:
        return _checked_token(c, table["token"], "admin.token")
    if "token_file" in table:
        resolved = c.existing_file(table["token_file"], "admin.token_file")
        if resolved is None:
            return None
        try:
            with open(resolved, encoding="utf-8") as token_file:
                text = token_file.read(MAX_TOKEN_LENGTH + 2).strip()
        except (OSError, UnicodeDecodeError) as exc:
            c.add("admin.token_file", f"cannot read {resolved}: {getattr(exc, 'strerror', None) or exc}")
            return None
        return _checked_token(c, text, f"admin.token_file ({resolved})")
    from_env = os.environ.get(ADMIN_TOKEN_ENV, "").strip()
    return _checked_token(c, from_env, f"admin.token (from {ADMIN_TOKEN_ENV})") if from_env else None


MAX_TOKEN_LENGTH = 4096  # far beyond any generated token; an Authorization header must fit in a head
_TOKEN_CHARACTERS = re.compile(r"[\x21-\x7e]+")  # visible ASCII: it travels in an HTTP header


def _checked_token(c: _Checker, value: Any, path: str) -> str | None:
    if not isinstance(value, str) or not value:
        c.add(path, f"expected a non-empty string, got {describe_value(value)}")
        return None
    if len(value) > MAX_TOKEN_LENGTH or not _TOKEN_CHARACTERS.fullmatch(value):
        c.add(path, f"must be 1-{MAX_TOKEN_LENGTH} visible ASCII characters, without spaces "
                    "(it is sent as an Authorization header)")
        return None
    return value


def _parse_dns(c: _Checker, value: Any) -> DnsConfig:
    table = c.table(value, "dns")
    c.reject_unknown(table, DNS_KEYS, "dns")
    values = c.fields(table, "dns", {"refresh": _duration(), "timeout": _duration()})
    if values.get("refresh", MIN_DNS_REFRESH) < MIN_DNS_REFRESH:
        c.add("dns.refresh", f"must be at least 1s (got {format_duration(values['refresh'])})")
    if "resolvers" in table:
        values["resolvers"] = _parse_resolvers(c, table["resolvers"])
    return DnsConfig(**values)


def _parse_resolvers(c: _Checker, value: Any) -> tuple[tuple[str, int], ...]:
    """["10.0.0.2", "127.0.0.1:5353", "[::1]:53"]: name servers by IP address, port 53 unless given."""
    if not isinstance(value, list) or not value:
        c.add("dns.resolvers", f'expected a list of at least one IP address like ["10.0.0.2"], got {describe_value(value)}')
        return ()
    resolvers = []
    for index, item in enumerate(value):
        try:
            resolvers.append(_parse_resolver(item))
        except ValueError as problem:
            c.add(f"dns.resolvers[{index}]", f"{describe_value(item)} is not a name server address ({problem})")
    return tuple(resolvers)


def _parse_resolver(item: Any) -> tuple[str, int]:
    if not isinstance(item, str):
        raise ValueError('expected a string like "10.0.0.2" or "127.0.0.1:5353"')
    host, port = item, 53
    if item.startswith("[") or item.count(":") == 1:
        host_text, port_text = split_host_port(item)
        host, port = host_text.strip("[]"), parse_port(port_text)
    try:
        return str(ipaddress.ip_address(host)), port
    except ValueError:
        raise ValueError("an IP address, not a name: the resolver is what resolves names") from None


def _parse_log(c: _Checker, value: Any) -> LogConfig:
    table = c.table(value, "log")
    c.reject_unknown(table, LOG_KEYS, "log")
    values = c.fields(table, "log", {"level": _choice(LOG_LEVELS), "format": _choice(LOG_FORMATS)})
    if "access" in table:
        access = _parse_access_target(c, table["access"])
        if access:
            values["access"] = access
    return LogConfig(**values)


def _parse_access_target(c: _Checker, value: Any) -> str | None:
    if not isinstance(value, str) or not value:
        c.add("log.access", f'expected "stdout", "stderr", "off" or a file path, got {describe_value(value)}')
        return None
    if value in ACCESS_STREAMS:
        return value
    resolved = c.resolve(value)
    directory = os.path.dirname(resolved)
    if os.path.isdir(resolved):
        c.add("log.access", f"cannot write {describe_value(value)}: {resolved} is a directory (name a file in it)")
        return None
    if not os.path.isdir(directory):
        c.add("log.access", f"cannot write {describe_value(value)}: directory {directory} does not exist")
        return None
    return resolved


def _parse_set_headers(c: _Checker, value: Any, path: str) -> tuple[tuple[str, str], ...]:
    table = c.table(value, path)
    headers: list[tuple[str, str]] = []
    seen: set[str] = set()
    for name, header_value in table.items():
        where = key_path(path, name)
        try:
            _header_name(name)
            headers.append((name, _header_value(header_value)))
        except ValueError as problem:
            c.add(where, str(problem))
            continue
        if name.lower() in seen:   # field names are case-insensitive, RFC 9110 §5.1
            c.add(where, f"header {name} is set twice")
        seen.add(name.lower())
    return tuple(headers)


def _parse_route(c: _Checker, value: Any, path: str, upstream_names: list[str]) -> RouteConfig:
    table = c.table(value, path)
    c.reject_unknown(table, ROUTE_KEYS, path)
    values = c.fields(table, path, {"host": _route_host, "path": _route_path, "strip_prefix": _boolean})
    if "set_headers" in table:
        values["set_headers"] = _parse_set_headers(c, table["set_headers"], key_path(path, "set_headers"))
    values.update(_parse_access_rules(c, table, path))
    if "basic_auth" in table:
        values["basic_auth"] = _parse_basic_auth(c, table["basic_auth"], key_path(path, "basic_auth"))
    if "compress" in table:
        values["compress"] = parse_compress(table["compress"], key_path(path, "compress"), c.add)
    if "rate_limit" in table:
        values["rate_limit"] = parse_rate_limit(table["rate_limit"], key_path(path, "rate_limit"), c.add)
    upstream = table.get("upstream")
    if "redirect" in table:
        return _redirect_route(c, table, path, values)
    if upstream is None:
        c.add(path, 'missing required key "upstream"')
    elif not isinstance(upstream, str):
        c.add(key_path(path, "upstream"), f"expected an upstream name, got {describe_value(upstream)}")
    elif upstream not in upstream_names:
        c.add(key_path(path, "upstream"), _undefined_upstream(upstream, upstream_names))
    return RouteConfig(upstream=upstream if isinstance(upstream, str) else "", **values)


def _parse_network_list(c: _Checker, value: Any, path: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        c.add(path, f'expected a list of IP addresses or networks like ["10.0.0.0/8"], got {describe_value(value)}')
        return ()
    networks = []
    for index, item in enumerate(value):
        try:
            networks.append(parse_network(item))
        except ValueError as problem:
            c.add(f"{path}[{index}]", str(problem))
    return tuple(networks)


def _parse_access_rules(c: _Checker, table: dict, path: str) -> dict:
    """A route's allow / deny lists (proxy.config.edge). Deny wins, so an allow entry inside a deny
    entry can never let anyone in: that is a mistake worth naming rather than a silent no-op."""
    rules = {key: _parse_network_list(c, table[key], key_path(path, key)) for key in ("allow", "deny") if key in table}
    if table.get("allow") == []:
        c.add(key_path(path, "allow"), "an empty allow list would refuse every client (leave the key out to allow all)")
    for index, allow in enumerate(rules.get("allow", ())):
        covering = shadowed_allow(allow, rules.get("deny", ()))
        if covering:
            c.add(f"{key_path(path, 'allow')}[{index}]",
                  f'"{allow}" is inside deny "{covering}", and deny wins: it never lets anyone in')
    return rules


def _parse_basic_auth(c: _Checker, value: Any, path: str) -> BasicAuthConfig:
    """{ realm, users = { name = "bcrypt hash" } or users_file = "htpasswd file", forward_auth_header }."""
    if not isinstance(value, dict):
        c.table(value, path)  # says what it got instead
        return BasicAuthConfig()
    table = value
    c.reject_unknown(table, BASIC_AUTH_KEYS, path)
    values = c.fields(table, path, {"realm": check_realm, "forward_auth_header": _boolean})
    if "users" in table and "users_file" in table:
        c.add(path, "give users or users_file, not both")
    elif "users" in table:
        values["users"] = _parse_users(c, table["users"], key_path(path, "users"))
    elif "users_file" in table:
        values["users"] = _parse_users_file(c, table["users_file"], key_path(path, "users_file"))
    else:
        c.add(path, 'missing "users" (a table of name = bcrypt hash) or "users_file" (an htpasswd file)')
    return BasicAuthConfig(**values)


def _parse_users(c: _Checker, value: Any, path: str) -> tuple[tuple[str, str], ...]:
    table = c.table(value, path)
    if not table and isinstance(value, dict):
        c.add(path, "no users: nobody could sign in")
    users = []
    for name, password_hash in table.items():
        try:
            users.append((check_user_name(name), check_bcrypt_hash(password_hash)))
        except ValueError as problem:
            c.add(key_path(path, name), str(problem))
    return tuple(users)


MAX_FILE_PROBLEMS = 10  # problems listed for one htpasswd file; the rest are counted


def _parse_users_file(c: _Checker, value: Any, path: str) -> tuple[tuple[str, str], ...]:
    """An htpasswd file (relative to the config's directory), read now: a reload reads it again."""
    resolved = c.existing_file(value, path)
    if resolved is None:
        return ()
    users, problems = read_htpasswd(resolved)
    for problem in problems[:MAX_FILE_PROBLEMS]:
        c.add(path, f"{resolved}: {problem}")
    if len(problems) > MAX_FILE_PROBLEMS:  # another file named by mistake (a log): not one line per line
        c.add(path, f"{resolved}: {len(problems) - MAX_FILE_PROBLEMS} more problems (is it an htpasswd file?)")
    if not users and not problems:
        c.add(path, f"{resolved} has no users: nobody could sign in")
    return tuple(users)


def _redirect_route(c: _Checker, table: dict, path: str, values: dict) -> RouteConfig:
    """A route answered by the proxy with a redirect: no upstream, nor the keys that need one."""
    if "upstream" in table:
        c.add(path, 'give either "upstream" or "redirect", not both')
    for key in UPSTREAM_ONLY_ROUTE_OPTIONS:
        if key in table:
            c.add(key_path(path, key), "does not apply to a redirect route (nothing is forwarded)")
    redirect = parse_redirect(table["redirect"], key_path(path, "redirect"), c.add)
    kept = {key: value for key, value in values.items() if key in ("host", "path", "allow", "deny", "basic_auth",
                                                                  "rate_limit")}
    return RouteConfig(upstream="", redirect=redirect, **kept)


def _undefined_upstream(name: str, defined: list[str]) -> str:
    hint = did_you_mean(name, defined)
    if not hint:
        hint = f" (defined: {', '.join(defined)})" if defined else " (no upstreams are defined)"
    return f"upstream {describe_value(name)} is not defined{hint}"


def _parse_routes(c: _Checker, value: Any, upstream_names: list[str]) -> tuple[RouteConfig, ...]:
    if value is None:
        c.add("routes", "missing: add at least one [[routes]] table")
        return ()
    if not isinstance(value, list) or not value:
        c.add("routes", f"expected at least one [[routes]] table, got {describe_value(value)}")
        return ()
    routes: list[RouteConfig] = []
    clean: dict[tuple[str | None, str], int] = {}   # (host, path) -> index of the first such route
    for index, item in enumerate(value):
        problems_before = len(c.problems)
        route = _parse_route(c, item, f"routes[{index}]", upstream_names)
        routes.append(route)
        if len(c.problems) > problems_before:
            continue   # a bad host or path fell back to a default; comparing it would mislead
        twin = clean.setdefault((route.host, route.path), index)
        if twin != index:
            c.add(f"routes[{index}]", f"same host and path as routes[{twin}], so it can never match")
    return tuple(routes)


def _parse_server_entry(c: _Checker, value: Any, path: str) -> UpstreamServerConfig | None:
    """ "host:port" | "http(s)://host[:port]" | {address = ..., weight = N, discover = "a"} | {srv = NAME}.

    Address problems are reported at the entry's own path (servers[1]), whichever form it takes.
    """
    weight, discover = 1, ""
    if isinstance(value, dict):
        c.reject_unknown(value, SERVER_ENTRY_KEYS, path)
        fields = c.fields(value, path, {"weight": _integer(1, MAX_WEIGHT), "discover": _choice(DISCOVER_MODES)})
        weight, discover = fields.get("weight", 1), fields.get("discover", "")
        if "srv" in value:
            return _parse_srv_entry(c, value, path)
        if "address" not in value:
            c.add(path, 'missing required key "address" (or "srv")')
            return None
        value = value["address"]
    try:
        host, port, tls = parse_server_address(value)
    except ValueError as problem:
        c.add(path, str(problem))
        return None
    if discover and _looks_like_ip(host):
        c.add(key_path(path, "discover"), f"{host} is an IP address; discover needs a DNS name")
        return None
    return UpstreamServerConfig(host, port, weight, tls, discover)


def _parse_srv_entry(c: _Checker, table: dict, path: str) -> UpstreamServerConfig | None:
    """{srv = "_http._tcp.api.service.consul"}: the SRV records give targets, ports, priorities, weights."""
    for key in ("address", "weight", "discover"):
        if key in table:
            c.add(key_path(path, key), "not with srv (the SRV records give the addresses, ports and weights)")
    name = table["srv"]
    try:
        if not isinstance(name, str) or not name or ":" in name or "/" in name:
            raise ValueError("expected a DNS name")
        host = parse_host(name.rstrip("."))
    except ValueError:
        c.add(key_path(path, "srv"), f'{describe_value(name)} is not an SRV name (expected one like '
                                     f'"_http._tcp.api.service.consul")')
        return None
    return UpstreamServerConfig(host.lower(), 0, 1, False, "srv")


def _parse_servers(c: _Checker, value: Any, path: str) -> tuple[UpstreamServerConfig, ...]:
    if not isinstance(value, list) or not value:
        c.add(path, f'expected a list of at least one server like ["127.0.0.1:9001"], got {describe_value(value)}')
        return ()
    servers: list[UpstreamServerConfig] = []
    for index, item in enumerate(value):
        server = _parse_server_entry(c, item, f"{path}[{index}]")
        if server and any((s.host, s.port, s.discover) == (server.host, server.port, server.discover) for s in servers):
            c.add(f"{path}[{index}]", f"{server.address} is listed twice (give it a weight instead)")
        elif server:
            servers.append(server)
    return tuple(servers)


def _parse_health(c: _Checker, value: Any, path: str) -> HealthConfig:
    table = c.table(value, path)
    c.reject_unknown(table, HEALTH_KEYS, path)
    values = c.fields(table, path, _HEALTH_CONVERTERS)
    if "headers" in table:
        values["headers"] = _parse_probe_headers(c, table["headers"], key_path(path, "headers"))
    if "expect_body" in table:
        try:
            values["expect_body"], values["expect_body_regex"] = _expect_body(table["expect_body"])
        except ValueError as problem:
            c.add(key_path(path, "expect_body"), str(problem))
        if values.get("method") == "HEAD":
            c.add(key_path(path, "expect_body"), "a HEAD answer has no body to match: use method = \"GET\"")
    if "timeout" not in table:
        # A short interval alone must not fail on a timeout the user never wrote.
        values["timeout"] = min(HealthConfig.timeout, values.get("interval", HealthConfig.interval))
    health = HealthConfig(**values)
    if health.timeout > health.interval:
        c.add(key_path(path, "timeout"), f"must not exceed interval ({format_duration(health.timeout)} > {format_duration(health.interval)})")
    return health


def _parse_probe_headers(c: _Checker, value: Any, path: str) -> tuple[tuple[str, str], ...]:
    problems_before = len(c.problems)
    headers = _parse_set_headers(c, value, path)
    for name, _ in headers:
        if name.lower() in _PROBE_OWN_HEADERS:
            hint = ' (use health.host)' if name.lower() == "host" else ""
            c.add(key_path(path, name), f"the probe sets {name} itself{hint}")
    return headers if len(c.problems) == problems_before else ()


def _parse_passive(c: _Checker, value: Any, path: str) -> PassiveConfig:
    table = c.table(value, path)
    c.reject_unknown(table, PASSIVE_KEYS, path)
    return PassiveConfig(**c.fields(table, path, _PASSIVE_CONVERTERS))


def _parse_upstream(c: _Checker, name: str, value: Any) -> UpstreamConfig:
    path = key_path("upstreams", name)
    if not _UPSTREAM_NAME.fullmatch(name):
        c.add(path, "an upstream name may only use letters, digits, '-', '_' and '.'")
    table = c.table(value, path)
    c.reject_unknown(table, UPSTREAM_KEYS, path)
    values = c.fields(table, path, _UPSTREAM_CONVERTERS)
    if "servers" not in table:
        c.add(path, 'missing required key "servers"')
    servers = _parse_servers(c, table["servers"], key_path(path, "servers")) if "servers" in table else ()
    if "health" in table:
        values["health"] = _parse_health(c, table["health"], key_path(path, "health"))
    if "passive" in table:
        values["passive"] = _parse_passive(c, table["passive"], key_path(path, "passive"))
    if "retry_budget" in table:
        budget_path = key_path(path, "retry_budget")
        budget = c.table(table["retry_budget"], budget_path)
        c.reject_unknown(budget, RETRY_BUDGET_KEYS, budget_path)
        values["retry_budget"] = RetryBudgetConfig(**c.fields(budget, budget_path, _RETRY_BUDGET_CONVERTERS))
    if "tls_ca" in table:
        values["tls_ca"] = c.existing_file(table["tls_ca"], key_path(path, "tls_ca"))
    return UpstreamConfig(name, servers, **values)


def _parse_upstreams(c: _Checker, value: Any, needed: bool) -> dict[str, UpstreamConfig]:
    """``needed``: some route forwards; a config whose routes all redirect needs no upstream."""
    if value is None:
        if needed:
            c.add("upstreams", "missing: add at least one [upstreams.NAME] table")
        return {}
    table = c.table(value, "upstreams")
    if not table and isinstance(value, dict) and needed:
        c.add("upstreams", "missing: add at least one [upstreams.NAME] table")
    return {name: _parse_upstream(c, name, item) for name, item in table.items()}


def _only_redirects(routes: Any) -> bool:
    """Every route (at least one) answers with a redirect: nothing is forwarded anywhere."""
    return isinstance(routes, list) and bool(routes) and all(
        isinstance(route, dict) and "redirect" in route and "upstream" not in route for route in routes)


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------

def parse_config(data: dict, source: str, base_dir: str | None = None) -> Config:
    """Validate a TOML document already parsed into a dict. Raises ConfigError listing every problem.

    base_dir is where relative file paths are resolved (default: the current directory).
    """
    c = _Checker(source, os.path.abspath(base_dir or os.getcwd()))
    if not isinstance(data, dict):
        c.add("", f"expected a table at the top level, got {describe_value(data)}")
        raise ConfigError(c.problems)
    c.reject_unknown(data, TOP_KEYS, "")
    server = _parse_server(c, data.get("server", {}))
    tls = _parse_tls(c, data.get("tls", {}))
    admin = _parse_admin(c, data["admin"], server) if "admin" in data else None
    log = _parse_log(c, data.get("log", {}))
    dns = _parse_dns(c, data.get("dns", {}))
    upstream_value = data.get("upstreams")
    upstream_names = list(upstream_value) if isinstance(upstream_value, dict) else []
    routes = _parse_routes(c, data.get("routes"), upstream_names)
    upstreams = _parse_upstreams(c, upstream_value, needed=not _only_redirects(data.get("routes")))
    if c.problems:
        raise ConfigError(c.problems)
    return Config(source=source, server=server, tls=tls, admin=admin, log=log, dns=dns, routes=routes,
                  upstreams=upstreams)


def load_config(path: str | os.PathLike) -> Config:
    """Read and validate a TOML config file. Raises ConfigError (never anything else)."""
    source = os.fspath(path)
    try:
        # "utf-8-sig": editors on Windows may start the file with a byte order mark, which
        # tomllib reports as an "Invalid statement" at line 1, column 1 (an invisible character).
        data = tomllib.loads(_read_config_bytes(source).decode("utf-8-sig"))
    except OSError as error:
        raise ConfigError([f"{source}: cannot read the config file ({error.strerror or error})"]) from None
    except UnicodeDecodeError as error:
        raise ConfigError([f"{source}: not valid UTF-8 text (byte {error.start})"]) from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError([f"{source}: {_describe_toml_error(error)}"]) from None
    return parse_config(data, source, base_dir=os.path.dirname(os.path.abspath(source)))


MAX_CONFIG_BYTES = 16 * 1024 ** 2   # far beyond any real config
_NOT_REGULAR = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"),
                (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"))


def _read_config_bytes(source: str) -> bytes:
    """The file's bytes. Opened without blocking and checked to be a regular file first: a FIFO would
    hang check (or a reload, on the loop thread) waiting for a writer, and /dev/zero fill the memory."""
    fd = os.open(source, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        os.close(fd)
        raise
    kind = next((name for test, name in _NOT_REGULAR if test(mode)), None)
    if kind:
        os.close(fd)
        raise ConfigError([f"{source}: cannot read the config file ({kind}, not a regular file)"])
    with open(fd, "rb") as file:
        data = file.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError([f"{source}: the file is larger than {format_size(MAX_CONFIG_BYTES)}: not a config file"])
    return data


def _describe_toml_error(error: tomllib.TOMLDecodeError) -> str:
    """ "line 3, column 5: invalid TOML: Expected '=' after a key" from tomllib's message."""
    match = _TOML_POSITION.match(str(error))
    if not match:
        return f"invalid TOML: {error}"
    if match.group("line"):
        return f"line {match.group('line')}, column {match.group('column')}: invalid TOML: {match.group('message')}"
    return f"end of file: invalid TOML: {match.group('message')}"


# ---------------------------------------------------------------------------------------------
# Quick mode: pyproxy --from :8080 --to 127.0.0.1:3000 --route app.localhost=127.0.0.1:3000
# ---------------------------------------------------------------------------------------------

def _split_route_key(key: str) -> tuple[str | None, str]:
    """ "/api" -> (None, "/api"); "app.localhost" -> ("app.localhost", "/");
    "app.localhost/api" -> ("app.localhost", "/api")."""
    if key.startswith("/"):
        return None, key
    host, slash, rest = key.partition("/")
    return host, slash + rest if slash else "/"


def _quick_upstream_name(servers: list[str], taken: dict[str, dict]) -> str:
    """A name for the upstream of these servers: the same servers share one; other servers whose
    names sanitise alike ("a:1,b:2" and "a_1_b:2") get a suffix rather than each other's servers."""
    base = re.sub(r"[^A-Za-z0-9_.-]", "_", "+".join(servers))
    name, number = base, 1
    while name in taken and taken[name]["servers"] != servers:
        number += 1
        name = f"{base}-{number}"
    return name


def _quick_servers(c: _Checker, target: str, label: str, seen: set | None = None) -> list[str]:
    """Comma-separated servers, each checked now so the problem names the command-line option.
    ``seen`` (the parsed servers of the same upstream so far) catches one listed twice."""
    servers = [part.strip() for part in target.split(",") if part.strip()]
    if not servers:
        c.add(label, 'expected a server address like "127.0.0.1:3000"')
    seen = set() if seen is None else seen
    for server in servers:
        try:
            parsed = parse_server_address(server)
        except ValueError as problem:
            c.add(label, str(problem))
            continue
        if parsed in seen:
            c.add(label, f"{server} is listed twice")
        seen.add(parsed)
    return servers


def _quick_check(c: _Checker, label: str, convert: Callable[[Any], Any], value: Any) -> Any:
    try:
        return convert(value)
    except ValueError as problem:
        c.add(label, str(problem))
        return None


def _quick_route_twin(c: _Checker, label: str, key: tuple, labels: dict[tuple, str]) -> None:
    """Two options for the same host and path: the second could never match (as for two [[routes]])."""
    if key in labels:
        c.add(label, f"same host and path as {labels[key]}, so it can never match")
    else:
        labels[key] = label


HTTPS_PORT = 443
HTTP_PORT = 80


@dataclass(frozen=True)
class QuickListen:
    """What --from asks for: the server.listen entry, and where to redirect plain HTTP to it (or None)."""
    entry: str | dict
    redirect: str | None = None


def quick_listen(text: str) -> QuickListen:
    """--from "ADDRESS", "http://ADDRESS" or "https://[HOST][:PORT]". https serves certificates from the
    local CA; a host name (localhost or *.localhost, the names it issues for) binds to 127.0.0.1, and
    without a port it listens on 443 and redirects port 80 to HTTPS, as Caddy's reverse-proxy does.
    Raises ValueError (the reason)."""
    scheme, separator, rest = text.partition("://")
    if not separator:
        return QuickListen(text)
    scheme = scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError(f"{scheme}:// is not supported: use an address, http:// or https://")
    rest = rest.rstrip("/")
    has_port = rest.rsplit("]", 1)[-1].count(":") == 1
    host_text, port_text = split_host_port(rest) if has_port else (rest, "")
    host = parse_host(host_text) if host_text else ""
    port = parse_port(port_text) if has_port else (HTTPS_PORT if scheme == "https" else HTTP_PORT)
    if scheme == "http":
        return QuickListen(format_address(host, port))
    if host and not _looks_like_ip(host):
        if not name_is_permitted(host, ("localhost",)):
            raise ValueError(f"{host} is not localhost or a *.localhost name, the names the local CA issues "
                             "certificates for here (a config file can add more with tls.internal_names)")
        host = "127.0.0.1"
    entry = {"address": format_address(host, port), "tls": "internal"}
    return QuickListen(entry, None if has_port else format_address(host, HTTP_PORT))


def quick_config(listen: str, targets: list[str], routes: list[tuple[str, str]]) -> Config:
    """A Config from command-line options, validated by parse_config like any file.

    targets: servers for every request no route takes (one upstream, balanced round robin).
    routes: (key, target) pairs; a key starting with "/" is a path prefix, "host" or "host/path"
    otherwise; a target may list several servers separated by commas. Prefixes are not stripped.
    """
    c = _Checker(COMMAND_LINE_SOURCE, os.getcwd())
    upstreams: dict[str, dict] = {}
    route_tables: list[dict] = []
    labels: dict[tuple, str] = {}  # (host, path) as matched -> the option that asked for it first
    for key, target in routes:
        label = f"--route {key}={target}"
        servers = _quick_servers(c, target, label)
        host, path = _split_route_key(key)
        matched_path = _quick_check(c, label, _route_path, path)
        matched_host = _quick_check(c, label, _route_host, host) if host is not None else None
        if matched_path is not None and (host is None or matched_host is not None):
            _quick_route_twin(c, label, (matched_host, matched_path), labels)
        name = _quick_upstream_name(servers, upstreams)
        upstreams[name] = {"servers": servers}
        route_tables.append({"path": path, "upstream": name} | ({"host": host} if host is not None else {}))
    if targets:
        seen: set = set()
        servers = [server for target in targets for server in _quick_servers(c, target, f"--to {target}", seen)]
        _quick_route_twin(c, f"--to {targets[0]}", (None, "/"), labels)
        name = _quick_upstream_name(servers, upstreams)
        upstreams[name] = {"servers": servers}
        route_tables.append({"path": "/", "upstream": name})
    if not route_tables:
        c.add("", "nothing to proxy to: give --to ADDRESS or --route KEY=ADDRESS")
    try:
        quick = quick_listen(listen)
        entry = quick.entry
        parse_address(entry["address"] if isinstance(entry, dict) else entry)
    except ValueError as problem:
        c.add(f"--from {listen}", str(problem))
    if c.problems:
        raise ConfigError(c.problems)
    if quick.redirect is not None:  # https://NAME without a port: port 80 sends browsers to https://
        entry = [entry, {"address": quick.redirect, "redirect_https": True}]
    data = {"server": {"listen": entry}, "routes": route_tables, "upstreams": upstreams}
    return parse_config(data, COMMAND_LINE_SOURCE)
