"""Per-route edge policies in the config: ``compress`` and ``redirect`` (validated here; applied by
proxy.http.compression and proxy.http.redirects). Problems go to ``add(key path, message)``, the
checker's own reporting, so they read like every other config problem.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass

from proxy.config.units import describe_value, parse_size

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
    return RedirectPolicy(value["to"], status) if ok else None


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
