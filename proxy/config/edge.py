"""Config-time checks for a route's edge policies: ``allow`` / ``deny`` (client address rules),
``basic_auth`` (user names with bcrypt hashes, inline or from an htpasswd file), ``compress``,
``redirect`` and ``rate_limit``.

The schema reads the keys; what each value may be, how one rule can shadow another and how an htpasswd
file is read live here, so ``proxy.config.schema`` stays a list of sections. The request-time sides are
``proxy.http.access``, ``proxy.http.basic_auth``, ``proxy.http.compression`` and
``proxy.http.redirects``, ``proxy.http.rate_limit``. compress, redirect and rate_limit problems go to ``add(key path, message)``, the
checker's own reporting, so they read like every other config problem.
"""
from __future__ import annotations

import codecs
import importlib.util
import ipaddress
import re
from dataclasses import dataclass
from typing import Any

from proxy.config.units import describe_value, format_size, parse_duration, parse_size

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


# -- basic_auth ---------------------------------------------------------------------------------------

DEFAULT_REALM = "restricted"
MAX_REALM_CHARS = 200
MAX_HTPASSWD_BYTES = 16 * 1024 ** 2  # some 200 000 bcrypt entries; a bigger file is another file named by mistake
# A bcrypt hash in modular crypt format: $2a$, $2b$ or $2y$ (what htpasswd -B writes), a two-digit cost
# 04-31, then 22 characters of salt and 31 of hash in bcrypt's base64 alphabet.
_BCRYPT_HASH = re.compile(r"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")
# What other htpasswd entries look like, to say which kind was found (htpasswd -m, -s, -d, -p).
_OTHER_SCHEMES = (("$apr1$", "an MD5 ($apr1$) hash"), ("{SHA}", "a SHA-1 ({SHA}) hash"),
                  ("$1$", "an MD5-crypt ($1$) hash"), ("$5$", "a SHA-256-crypt ($5$) hash"),
                  ("$6$", "a SHA-512-crypt ($6$) hash"))


@dataclass(frozen=True)
class BasicAuthConfig:
    realm: str = DEFAULT_REALM
    users: tuple[tuple[str, str], ...] = ()   # (user name, bcrypt hash), in file order
    forward_auth_header: bool = False         # pass the client's Authorization on to the upstream


def bcrypt_cost(password_hash: str) -> int:
    """The work factor written in a valid bcrypt hash ("$2b$12$..." -> 12)."""
    return int(password_hash[4:6])


def check_bcrypt_hash(value: Any) -> str:
    """A bcrypt hash, or ValueError saying what it is instead (plain text, MD5...)."""
    if not isinstance(value, str):
        raise ValueError(f'expected a bcrypt hash like "$2b$12$...", got {describe_value(value)}')
    if _BCRYPT_HASH.fullmatch(value):
        return value
    kind = next((name for prefix, name in _OTHER_SCHEMES if value.startswith(prefix)), None)
    if kind is None:
        kind = "a malformed bcrypt hash" if value.startswith("$2") else "not a hash (plain text or crypt)"
    raise ValueError(f"{kind}; only bcrypt hashes are accepted (make one with: pyproxy hash-password, "
                     f"or htpasswd -B)")


def check_user_name(name: str) -> str:
    """A Basic auth user name: not empty, no ":" (it ends the user name in the credentials, RFC 7617
    §2), no control characters."""
    if not name:
        raise ValueError("a user name cannot be empty")
    if ":" in name:
        raise ValueError(f"user name {describe_value(name)} contains ':', which Basic credentials cannot carry")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise ValueError(f"user name {describe_value(name)} contains control characters")
    return name


def check_realm(value: Any) -> str:
    """The realm shown by browsers: printable ASCII without a quote or a backslash, so it goes into the
    WWW-Authenticate header as it is."""
    if not isinstance(value, str) or not value:
        raise ValueError(f'expected a name like "staff", got {describe_value(value)}')
    if len(value) > MAX_REALM_CHARS or not all(32 <= ord(c) < 127 and c not in '"\\' for c in value):
        raise ValueError(f"{describe_value(value)} must be printable ASCII without a quote or a backslash, "
                         f"at most {MAX_REALM_CHARS} characters")
    return value


def read_htpasswd(path: str) -> tuple[list[tuple[str, str]], list[str]]:
    """The (user, hash) entries of an htpasswd file, and its problems as "line N: ..." messages.

    One "user:hash" per line; empty lines and lines starting with "#" are skipped, as Apache does.
    Only bcrypt entries (htpasswd -B) are accepted: a plain or MD5 entry is named by its line. A
    UTF-8 byte order mark (editors on Windows write one) is not part of the first user's name."""
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_HTPASSWD_BYTES + 1)
    except OSError as error:
        return [], [f"cannot read {path} ({error.strerror or error})"]
    if len(data) > MAX_HTPASSWD_BYTES:
        return [], [f"larger than {format_size(MAX_HTPASSWD_BYTES)}: not an htpasswd file"]
    raw_lines = data.removeprefix(codecs.BOM_UTF8).splitlines()
    users: list[tuple[str, str]] = []
    problems: list[str] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(raw_lines, start=1):
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            problems.append(f"line {number}: not valid UTF-8 text")
            continue
        if not line or line.startswith("#"):
            continue
        name, colon, password_hash = line.partition(":")
        try:
            if not colon:
                raise ValueError('expected "user:hash"')
            check_user_name(name)
            check_bcrypt_hash(password_hash)
        except ValueError as problem:
            who = f" (user {describe_value(name)})" if colon and name else ""
            problems.append(f"line {number}{who}: {problem}")
            continue
        if name in seen:
            problems.append(f"line {number}: user {describe_value(name)} is already on line {seen[name]}")
            continue
        seen[name] = number
        users.append((name, password_hash))
    return users, problems


# -- compress -------------------------------------------------------------------------------------

ENCODINGS = ("zstd", "br", "gzip")  # the proxy's preference: best ratio for its speed first
DEFAULT_MIN_LENGTH = 1024  # below this the coding's framing can outweigh what it saves
# Text formats that compress well. Images (but SVG), audio, video and archives are compressed already.
DEFAULT_TYPES = (
    "text/*", "application/json", "application/*+json", "application/javascript", "application/xml",
    "application/*+xml", "application/x-javascript", "application/wasm", "application/manifest+json",
    "image/svg+xml", "image/x-icon", "font/ttf", "font/otf",
)
COMPRESS_KEYS = ("encodings", "min_length", "types")  # the table form of a route's ``compress``
_LIBRARIES = {"zstd": "zstandard", "br": "brotli"}  # gzip is the standard library's zlib


@dataclass(frozen=True)
class CompressPolicy:
    """A route's ``compress`` settings, validated."""

    encodings: tuple[str, ...] = ENCODINGS
    min_length: int = DEFAULT_MIN_LENGTH
    types: tuple[str, ...] = DEFAULT_TYPES


def missing_library(encoding: str) -> str | None:
    """The package an encoding needs that is not installed, or None (both are dependencies; a broken
    install is named by the config check rather than failing on the first compressed response)."""
    package = _LIBRARIES.get(encoding)
    return package if package is not None and importlib.util.find_spec(package) is None else None


def parse_compress(value, path: str, add) -> CompressPolicy | None:
    """A route's ``compress`` value: true, false, or a table {encodings, min_length, types}. Problems go
    to ``add(key path, message)``; the answer is None when compression is off (or invalid)."""
    if isinstance(value, bool):
        return CompressPolicy() if value else None
    if not isinstance(value, dict):
        add(path, f"expected true, false or a table like {{ encodings = [\"gzip\"] }}, got {describe_value(value)}")
        return None
    unknown_keys = []
    for key in value:
        if key not in COMPRESS_KEYS:
            add(f"{path}.{key}", f"unknown key (expected one of: {', '.join(COMPRESS_KEYS)})")
            unknown_keys.append(key)
    encodings = _parse_encodings(value.get("encodings", list(ENCODINGS)), f"{path}.encodings", add)
    try:
        min_length = parse_size(value.get("min_length", DEFAULT_MIN_LENGTH))
    except ValueError as problem:
        add(f"{path}.min_length", str(problem))
        min_length = None
    types = _parse_types(value.get("types", list(DEFAULT_TYPES)), f"{path}.types", add)
    if unknown_keys or encodings is None or min_length is None or types is None:
        return None
    return CompressPolicy(encodings, min_length, types)


def _parse_encodings(value, path: str, add) -> tuple[str, ...] | None:
    if not isinstance(value, list) or not value:
        add(path, f'expected a list like ["zstd", "br", "gzip"], got {describe_value(value)}')
        return None
    ok = True
    for index, item in enumerate(value):
        where = f"{path}[{index}]"
        if item not in ENCODINGS:
            add(where, f"{describe_value(item)} is not one of {' | '.join(ENCODINGS)}")
            ok = False
        elif value.index(item) != index:
            add(where, f"{describe_value(item)} is listed twice")
            ok = False
        elif missing_library(item):
            add(where, f"{item} needs the {missing_library(item)} package (pip install {missing_library(item)})")
            ok = False
    return tuple(value) if ok else None


def _parse_types(value, path: str, add) -> tuple[str, ...] | None:
    if not isinstance(value, list) or not value:
        add(path, f'expected a list of media types like ["text/*", "application/json"], got {describe_value(value)}')
        return None
    types = []
    for index, item in enumerate(value):
        major, slash, minor = item.partition("/") if isinstance(item, str) else ("", "", "")
        if not (slash and major and minor and major != "*" and " " not in item and ";" not in item):
            add(f"{path}[{index}]", f'{describe_value(item)} is not a media type like "text/html" or "text/*"')
            continue
        types.append(item.lower())
    return tuple(types) if len(types) == len(value) else None


# -- redirect -------------------------------------------------------------------------------------

REDIRECT_STATUSES = (301, 302, 303, 307, 308)
DEFAULT_STATUS = 308  # permanent, and the method and body are kept (unlike 301, RFC 9110 §15.4.9)
PLACEHOLDERS = ("host", "uri", "path", "query")
REDIRECT_KEYS = ("to", "status")  # the table form of a route's ``redirect``
PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


@dataclass(frozen=True)
class RedirectPolicy:
    """A route's ``redirect``, validated: the Location template and the status."""

    to: str
    status: int = DEFAULT_STATUS

    @property
    def needs_host(self) -> bool:
        return "{host}" in self.to


def parse_redirect(value, path: str, add) -> RedirectPolicy | None:
    """A route's ``redirect`` table {to, status}. Problems go to ``add(key path, message)``."""
    if not isinstance(value, dict):
        add(path, f'expected a table like {{ to = "https://example.com{{uri}}", status = 308 }}, '
                  f"got {describe_value(value)}")
        return None
    ok = True
    for key in value:
        if key not in REDIRECT_KEYS:
            add(f"{path}.{key}", f"unknown key (expected one of: {', '.join(REDIRECT_KEYS)})")
            ok = False
    status = value.get("status", DEFAULT_STATUS)
    if status not in REDIRECT_STATUSES or isinstance(status, bool):
        add(f"{path}.status", f"{describe_value(status)} is not one of {' | '.join(map(str, REDIRECT_STATUSES))}")
        ok = False
    if "to" not in value:
        add(path, 'missing required key "to"')
        return None
    problem = _template_problem(value["to"])
    if problem:
        add(f"{path}.to", problem)
        return None
    try:
        to = ascii_location(value["to"])
    except UnicodeError as error:
        reason = error.__cause__ or error  # the codec wraps the reason in a long sentence
        add(f"{path}.to", f"{describe_value(value['to'])} has a host that is not a valid domain name ({reason})")
        return None
    return RedirectPolicy(to, status) if ok else None


def ascii_location(to: str) -> str:
    """The template as a Location field can carry it: ASCII only (a URI, RFC 9110 §10.2.2). A host
    written in Unicode gets its IDNA ("xn--") form, other non-ASCII characters are percent-encoded as
    UTF-8, as browsers do with a typed URL. UnicodeError for a host IDNA cannot encode."""
    if to.isascii():
        return to
    scheme, separator, rest = to.partition("://")
    if not separator:  # a path on the same host
        return _percent_encoded(to)
    authority_end = next((index for index, char in enumerate(rest) if char in "/?#"), len(rest))
    authority = rest[:authority_end]
    if not authority.isascii():
        authority = authority.encode("idna").decode("ascii")
    return f"{scheme}://{authority}{_percent_encoded(rest[authority_end:])}"


def _percent_encoded(text: str) -> str:
    return "".join(char if char.isascii() else "".join(f"%{byte:02X}" for byte in char.encode("utf-8"))
                   for char in text)


def _template_problem(to) -> str | None:
    if not isinstance(to, str) or not to:
        return f'expected a URL like "https://example.com{{uri}}", got {describe_value(to)}'
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in to):
        return f"{describe_value(to)} is not a valid URL (no spaces or control characters)"
    if not (to.startswith("/") or to.lower().startswith(("http://", "https://"))):
        return f'{describe_value(to)} must start with "http://", "https://" or "/"'
    for name in PLACEHOLDER.findall(to):
        if name not in PLACEHOLDERS:
            return f"unknown placeholder {{{name}}} (use {', '.join('{' + p + '}' for p in PLACEHOLDERS)})"
    if "{" in PLACEHOLDER.sub("", to) or "}" in PLACEHOLDER.sub("", to):
        return f"{describe_value(to)} has an unmatched brace"
    return None


# -- rate_limit -----------------------------------------------------------------------------------

RATE_LIMIT_KEYS = ("requests", "per", "burst", "key")  # the table form of a route's ``rate_limit``
KEY_KINDS = ("client_ip", "header:<name>")
_HEADER_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # a field name, RFC 9110 §5.6.2
MAX_RATE_REQUESTS = 10 ** 9  # far beyond any real limit; keeps the bucket arithmetic in float's exact range


@dataclass(frozen=True)
class RateLimitPolicy:
    """A route's ``rate_limit``, validated: a token bucket holding ``burst`` tokens, refilled with
    ``requests`` tokens every ``per`` seconds. ``header`` is the lowercase field name a
    ``key = "header:Name"`` limit keys on, or None for ``key = "client_ip"``."""

    requests: int
    per: float
    burst: int
    header: str | None = None

    @property
    def rate(self) -> float:
        """Tokens added per second."""
        return self.requests / self.per

    @property
    def key(self) -> str:
        return "client_ip" if self.header is None else f"header:{self.header}"


def parse_rate_limit(value, path: str, add) -> RateLimitPolicy | None:
    """A route's ``rate_limit`` table {requests, per, burst, key}. Problems go to ``add(key path,
    message)``; the answer is None when the value is invalid."""
    if not isinstance(value, dict):
        add(path, f'expected a table like {{ requests = 100, per = "1m", burst = 20 }}, got {describe_value(value)}')
        return None
    ok = True
    for key in value:
        if key not in RATE_LIMIT_KEYS:
            add(f"{path}.{key}", f"unknown key (expected one of: {', '.join(RATE_LIMIT_KEYS)})")
            ok = False
    if "requests" not in value:
        add(path, 'missing required key "requests" (how many requests per "per")')
        return None
    requests = _count(value["requests"], f"{path}.requests", add)
    burst = _count(value["burst"], f"{path}.burst", add) if "burst" in value else requests  # a default never fails
    per = _period(value.get("per", "1s"), f"{path}.per", add)
    header = _rate_key(value.get("key", "client_ip"), f"{path}.key", add)
    if not ok or requests is None or burst is None or per is None or header is False:
        return None
    return RateLimitPolicy(requests, per, burst, header)


def _count(value, path: str, add) -> int | None:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_RATE_REQUESTS:
        add(path, f"expected a whole number of requests, at least 1, got {describe_value(value)}")
        return None
    return value


def _period(value, path: str, add) -> float | None:
    try:
        seconds = parse_duration(value)
    except ValueError as problem:
        add(path, str(problem))
        return None
    if seconds <= 0:
        add(path, f'{describe_value(value)} is too short (a period like "1s", "1m" or "1h")')
        return None
    return seconds


def _rate_key(value, path: str, add) -> str | None | bool:
    """None for "client_ip", the lowercase header name for "header:Name", False (and a problem) otherwise."""
    if value == "client_ip":
        return None
    if isinstance(value, str) and value[:7].lower() == "header:":
        name = value[7:].strip()
        if _HEADER_TOKEN.fullmatch(name):
            return name.lower()
        add(path, f"{describe_value(value)} does not name a header (like \"header:X-Api-Key\")")
        return False
    add(path, f'{describe_value(value)} is not a key kind (expected "client_ip" or "header:<name>", '
              f'like "header:X-Api-Key")')
    return False
