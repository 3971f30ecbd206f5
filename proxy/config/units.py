"""Parsing of the value types the config file uses: durations, sizes and addresses.

Each parser takes the raw TOML value and returns a plain Python value, or raises ValueError with a
short message meant for a person, e.g. `"127.0.0.1:99999" is not a valid address (port must be
1-65535)`. The config loader prefixes the file name and key path. Parsers never raise anything else,
whatever type they are given, so the loader can collect every problem in one pass.
"""
from __future__ import annotations

import ipaddress
import json
import math
import re
from decimal import Decimal

DURATION_UNITS = {"ms": Decimal("0.001"), "s": Decimal(1), "m": Decimal(60), "h": Decimal(3600), "d": Decimal(86400)}
# Binary units (IEC) are what the docs use; the SI spellings are accepted with their SI meaning
# (1 kB = 1000 bytes) rather than silently treated as 1024.
SIZE_UNITS = {
    "B": 1,
    "KiB": 1024, "MiB": 1024 ** 2, "GiB": 1024 ** 3,
    "kB": 1000, "KB": 1000, "MB": 1000 ** 2, "GB": 1000 ** 3,
}
MAX_PORT = 65535
# No timeout here needs more than a year, and far larger ones overflow time_t / the C timeouts
# sockets and threads take (settimeout(1e12) raises OverflowError on every request).
MAX_DURATION_SECONDS = 365 * 24 * 3600

_NUMBER_WITH_UNIT = re.compile(r"(\d+(?:\.\d+)?)([A-Za-z]+)")
# One or more number-unit parts, summed as Go (Caddy, Traefik) reads "1h30m"; "ms" is tried before "m".
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|[smhd])")
_DURATION = re.compile(rf"(?:{_DURATION_PART.pattern})+")
# RFC 1123 §2.1 host name labels; "_" is tolerated because real internal names use it.
_HOST_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
_DURATION_HINT = 'use a number of seconds or a string like "250ms", "5s", "2m", "1h"'
_SIZE_HINT = 'use a number of bytes or a string like "512B", "16KiB", "10MiB", "1GiB"'


def describe_value(value: object) -> str:
    """Show a config value the way the user wrote it in TOML: strings quoted, booleans lowercase."""
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return f"a {type(value).__name__}"


def _is_number(value: object) -> bool:
    # bool is an int subclass, but `timeout = true` is a mistake, not one second.
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_duration(value: object) -> float:
    """Seconds from a number (5, 0.25) or a string with units ("250ms", "5s", "2m", "1h", "1d", "1h30m")."""
    if _is_number(value):
        if not math.isfinite(value):
            raise ValueError(f"{describe_value(value)} is not a valid duration ({_DURATION_HINT})")
        if value < 0:
            raise ValueError(f"{describe_value(value)} is not a valid duration (must not be negative)")
        return _at_most_a_year(value, float(value))
    if isinstance(value, str) and _DURATION.fullmatch(value):
        total = sum(Decimal(number) * DURATION_UNITS[unit] for number, unit in _DURATION_PART.findall(value))
        return _at_most_a_year(value, float(total))
    raise ValueError(f"{describe_value(value)} is not a valid duration ({_DURATION_HINT})")


def _at_most_a_year(value: object, seconds: float) -> float:
    if seconds > MAX_DURATION_SECONDS:
        raise ValueError(f'{describe_value(value)} is too long (at most "8760h", one year)')
    return seconds


def parse_size(value: object) -> int:
    """Bytes from a whole number (16384) or a string with a unit ("512B", "16KiB", "10MiB", "1GiB")."""
    if _is_number(value):
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"{describe_value(value)} is not a valid size (must be a whole number of bytes)")
        if value < 0:
            raise ValueError(f"{describe_value(value)} is not a valid size (must not be negative)")
        return int(value)
    if isinstance(value, str):
        match = _NUMBER_WITH_UNIT.fullmatch(value)
        if match and match.group(2) in SIZE_UNITS:
            size = Decimal(match.group(1)) * SIZE_UNITS[match.group(2)]
            if size != size.to_integral_value():
                raise ValueError(f"{describe_value(value)} is not a valid size (must be a whole number of bytes)")
            return int(size)
    raise ValueError(f"{describe_value(value)} is not a valid size ({_SIZE_HINT})")


def parse_host(text: str) -> str:
    """Validate a host: a name, an IPv4 address or a bracketed IPv6 address; returns it unbracketed.

    Raises ValueError with the reason only (the caller knows what the whole value was).
    """
    if text.startswith("[") and text.endswith("]"):
        try:
            return str(ipaddress.IPv6Address(text[1:-1]))
        except ValueError:
            raise ValueError(f"{text} is not an IPv6 address") from None
    if ":" in text:
        raise ValueError('IPv6 addresses need brackets, e.g. "[::1]:8080"')
    if not text:
        raise ValueError("missing host")
    labels = text[:-1].split(".") if text.endswith(".") else text.split(".")
    if all(label.isdigit() for label in labels):
        try:
            return str(ipaddress.IPv4Address(text))
        except ValueError:
            raise ValueError(f"{text} is not an IPv4 address") from None
    if len(text) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels):
        raise ValueError(f"{describe_value(text)} is not a valid host name")
    return text.lower()


def parse_port(text: str) -> int:
    """A decimal port 1-65535 (no sign, no spaces)."""
    if not text:
        raise ValueError('missing port, e.g. "127.0.0.1:8080"')
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_PORT:
        raise ValueError(f"port must be 1-{MAX_PORT}")
    return int(text)


def split_host_port(text: str) -> tuple[str, str]:
    """("host", "port") texts, unparsed; "[::1]:80" gives ("[::1]", "80"). Raises ValueError (reason only)."""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError('missing "]" after the IPv6 address')
        host, rest = text[:end + 1], text[end + 1:]
        if not rest.startswith(":"):
            raise ValueError('missing port, e.g. "[::1]:8080"')
        return host, rest[1:]
    host, sep, port = text.rpartition(":")
    if not sep:
        raise ValueError('missing port, e.g. "127.0.0.1:8080"')
    return host, port


def parse_address(text: object) -> tuple[str, int]:
    """(host, port) from "host:port", "[::1]:port" or ":port".

    The host comes back unbracketed. ":port" gives host "" meaning "all interfaces": the listener
    decides what that means (0.0.0.0, or dual-stack "::" where it binds IPv6), so it is not
    guessed here. Callers that need a real host (upstream servers) reject "" themselves.
    """
    if not isinstance(text, str):
        raise ValueError(f'{describe_value(text)} is not a valid address (expected a string like "127.0.0.1:8080", '
                         'or ":8080" for all interfaces)')
    if text.isascii() and text.isdigit():  # nginx's "listen 8080"
        raise ValueError(f'{describe_value(text)} is not a valid address (a port alone is written ":{text}", '
                         'for all interfaces)')
    try:
        host_text, port_text = split_host_port(text)
        port = parse_port(port_text)
        host = parse_host(host_text) if host_text else ""
    except ValueError as reason:
        raise ValueError(f"{describe_value(text)} is not a valid address ({reason})") from None
    return host, port


def format_address(host: str, port: int) -> str:
    """The inverse of parse_address: "host:port", with IPv6 hosts bracketed (RFC 3986 §3.2.2)."""
    shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"{shown}:{port}"


def format_duration(seconds: float) -> str:
    """A short human form of a duration: 0.25 -> "250ms", 5.0 -> "5s", 120.0 -> "2m"."""
    if seconds == 0:
        return "0s"
    for unit, factor in (("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= factor and (seconds / factor).is_integer():
            return f"{int(seconds // factor)}{unit}"
    if seconds < 1 and (seconds * 1000).is_integer():
        return f"{int(seconds * 1000)}ms"
    return f"{seconds:g}s"


def format_size(size: int) -> str:
    """A short human form of a byte count: 16384 -> "16KiB", 100 -> "100B"."""
    for unit in ("GiB", "MiB", "KiB"):
        factor = SIZE_UNITS[unit]
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size}B"


def describe_expect_status(statuses: frozenset[int]) -> str:
    """A health check's expected statuses as written in a config: "2xx", or "200, 204"."""
    for first in range(200, 600, 100):
        if statuses == frozenset(range(first, first + 100)):
            return f"{first // 100}xx"
    return ", ".join(str(code) for code in sorted(statuses))


def describe_statuses(statuses: frozenset[int]) -> list[str]:
    """Statuses as a config lists them: whole classes as "5xx", other codes as numbers ("404")."""
    described, rest = [], set(statuses)
    for first in range(100, 600, 100):
        whole = set(range(first, first + 100))
        if whole <= rest:
            described.append(f"{first // 100}xx")
            rest -= whole
    return described + [str(code) for code in sorted(rest)]
