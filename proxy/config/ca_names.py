"""The names pyproxy's local CA may issue for (proxy.http.local_ca), and where it lives by default.

They live in the config layer (below proxy.http) because the schema validates ``[tls]`` with them
and quick mode checks ``--from https://NAME`` against them.
"""

from __future__ import annotations

import os

ALWAYS_PERMITTED = ("localhost",)  # a DNS constraint covers the name and every name below it


def default_ca_dir() -> str:
    """$XDG_DATA_HOME/pyproxy/ca, i.e. ~/.local/share/pyproxy/ca by default."""
    data_home = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(data_home, "pyproxy", "ca")


def normalize_internal_name(name: str) -> str:
    """ ".test" and "test" both mean test and every name below it (how X.509 DNS constraints read)."""
    return name.strip().lower().lstrip("*").lstrip(".").rstrip(".")


def permitted_names(internal_names: tuple[str, ...]) -> tuple[str, ...]:
    """The DNS names the root permits, sorted, without duplicates."""
    return tuple(sorted(set(ALWAYS_PERMITTED) | {normalize_internal_name(n) for n in internal_names}))


def name_is_permitted(name: str, permitted: tuple[str, ...]) -> bool:
    """Is ``name`` one of ``permitted`` or below one of them?"""
    name = name.lower().rstrip(".")
    return any(name == base or name.endswith("." + base) for base in permitted)
