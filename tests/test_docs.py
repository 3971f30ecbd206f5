"""The documentation stays true to the code and to the repository.

- docs/configuration.md documents exactly the keys the config schema accepts: the key tuples in
  proxy/config/schema.py (the ones "unknown key" errors are checked against), and every key that
  ``pyproxy init`` writes, commented out or not. A key row is a table row whose first cell is the
  key's full path in backticks, as error messages name it: | `upstreams.NAME.health.interval` | ...
- Every option of the ``pyproxy`` command and its subcommands is named in docs/configuration.md.
- Every relative link in README.md and docs/*.md points at a file in the repository.
- No tracked file refers to notes outside the repository (git grep).
"""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

import click
import pytest

from proxy.config import schema
from proxy.config.starter import STARTER_CONFIG
from proxy.serve.cli import main

ROOT = Path(__file__).resolve().parent.parent
CONFIG_DOC = ROOT / "docs" / "configuration.md"
THIS_FILE = Path(__file__).resolve().relative_to(ROOT).as_posix()

# Where each key tuple of the schema lives in the file, as a key path prefix. A new *_KEYS tuple in
# schema.py must be added here (the test below says so), and its keys documented.
KEY_PREFIXES = {
    "SERVER_KEYS": "server.",
    "LISTEN_KEYS": "server.listen[].",
    "SNI_KEYS": "server.listen[].sni[].",
    "TLS_KEYS": "tls.",
    "ADMIN_KEYS": "admin.",
    "LOG_KEYS": "log.",
    "DNS_KEYS": "dns.",
    "ROUTE_KEYS": "routes[].",
    "BASIC_AUTH_KEYS": "routes[].basic_auth.",
    "COMPRESS_KEYS": "routes[].compress.",
    "REDIRECT_KEYS": "routes[].redirect.",
    "RATE_LIMIT_KEYS": "routes[].rate_limit.",
    "UPSTREAM_KEYS": "upstreams.NAME.",
    "SERVER_ENTRY_KEYS": "upstreams.NAME.servers[].",
    "HEALTH_KEYS": "upstreams.NAME.health.",
    "PASSIVE_KEYS": "upstreams.NAME.passive.",
    "RETRY_BUDGET_KEYS": "upstreams.NAME.retry_budget.",
}
# The top-level tables; each has its own section heading in the reference.
TOP_LEVEL_HEADINGS = {"server": "[server]", "tls": "[tls]", "admin": "[admin]", "log": "[log]", "dns": "[dns]", "routes": "[[routes]]",
                      "upstreams": "[upstreams.NAME]"}

KEY_ROW = re.compile(r"^\|\s*`([A-Za-z_][A-Za-z0-9_.\[\]]*)`\s*\|")
HEADING = re.compile(r"^#{2,4}\s+(.*)$")
# A commented-out TOML line in the starter: "# key = value" or "# [table]" / "# [[array]]".
COMMENTED_TOML = re.compile(r"^#\s?((?:[A-Za-z_][A-Za-z0-9_]*\s*=)|(?:\[))")
MARKDOWN_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")

# Strings that point outside the repository. Built from pieces so this file does not match itself.
OUTSIDE_REFERENCES = "|".join([
    "STYLE" + " pattern", r"\.\./" + "shared", "shared/(CONFIG|STYLE|SEED)", "CONFIG" + r"\.md",
    "SEED" + r"\.md", r"\bissue [0-9]{1,2}\b", "this" + " stop", "previous" + " stop",
])


# ---------------------------------------------------------------------------------------------
# Key sets
# ---------------------------------------------------------------------------------------------

def schema_key_tuples() -> dict[str, tuple[str, ...]]:
    """Every module-level ``*_KEYS`` tuple of strings in the schema (the "unknown key" tables)."""
    return {name: value for name, value in vars(schema).items()
            if name.endswith("_KEYS") and isinstance(value, tuple) and all(isinstance(v, str) for v in value)}


def schema_keys() -> set[str]:
    keys = set()
    for name, values in schema_key_tuples().items():
        if name == "TOP_KEYS":
            continue
        keys.update(KEY_PREFIXES[name] + key for key in values)
    return keys


def documented_keys(text: str) -> set[str]:
    return {match.group(1) for line in text.splitlines() if (match := KEY_ROW.match(line))
            and _is_key_path(match.group(1))}


def _is_key_path(cell: str) -> bool:
    return any(cell.startswith(prefix) for prefix in KEY_PREFIXES.values())


def headings(text: str) -> list[str]:
    return [match.group(1) for line in text.splitlines() if (match := HEADING.match(line))]


def starter_keys() -> set[str]:
    """Every key `pyproxy init` writes, its commented-out examples included, as full key paths."""
    lines = []
    for line in STARTER_CONFIG.splitlines():
        match = COMMENTED_TOML.match(line)
        lines.append(line[match.start(1):] if match else line)
    document = tomllib.loads("\n".join(lines))
    keys: set[str] = set()
    _collect(document, "", keys)
    return keys


def _collect(table: dict, path: str, keys: set[str]) -> None:
    """Walk a TOML document down the tables the schema knows (KEY_PREFIXES); anything else is a key.
    ``path`` is the prefix so far ("" at the top, "upstreams.NAME.", "routes[]." ...)."""
    prefixes = set(KEY_PREFIXES.values())
    for key, item in table.items():
        full = path + ("NAME" if path == "upstreams." else key)  # an upstream's own name is a placeholder
        if path in prefixes:
            keys.add(full)  # "server", "routes" and "upstreams.NAME" are tables, not keys
        if isinstance(item, dict) and (full + "." in prefixes or full == "upstreams"):
            _collect(item, full + ".", keys)
        elif isinstance(item, list) and full + "[]." in prefixes:
            for entry in item:
                if isinstance(entry, dict):  # servers mix "host:port" strings and tables
                    _collect(entry, full + "[].", keys)


# ---------------------------------------------------------------------------------------------
# The configuration reference
# ---------------------------------------------------------------------------------------------

def test_every_schema_key_tuple_has_a_place_in_the_reference():
    unknown = sorted(set(schema_key_tuples()) - set(KEY_PREFIXES) - {"TOP_KEYS"})
    assert not unknown, (f"proxy/config/schema.py has key tables {unknown} that tests/test_docs.py does not "
                         f"know: add their key path prefix to KEY_PREFIXES and document the keys")


def test_every_schema_key_is_documented():
    missing = sorted(schema_keys() - documented_keys(CONFIG_DOC.read_text(encoding="utf-8")))
    assert not missing, f"keys the schema accepts but docs/configuration.md does not document: {missing}"


def test_every_documented_key_exists_in_the_schema():
    unknown = sorted(documented_keys(CONFIG_DOC.read_text(encoding="utf-8")) - schema_keys())
    assert not unknown, f"keys docs/configuration.md documents but the schema rejects: {unknown}"


def test_every_key_pyproxy_init_writes_is_documented():
    keys = starter_keys()
    assert "server.listen" in keys and "upstreams.NAME.health.interval" in keys  # the walk saw the file
    missing = sorted(keys - documented_keys(CONFIG_DOC.read_text(encoding="utf-8")))
    assert not missing, f"keys in `pyproxy init` output missing from docs/configuration.md: {missing}"


def test_every_top_level_table_has_a_section():
    shown = headings(CONFIG_DOC.read_text(encoding="utf-8"))
    missing = [heading for key, heading in TOP_LEVEL_HEADINGS.items()
               if key in schema.TOP_KEYS and not any(heading in line for line in shown)]
    extra = sorted(set(schema.TOP_KEYS) - set(TOP_LEVEL_HEADINGS))
    assert not missing and not extra, f"sections missing: {missing}; top-level tables without a heading: {extra}"


def test_the_key_reader_sees_keys_and_only_keys():
    text = ("| `server.listen` | address | x | y |\n| `upstreams.NAME.health.path` | s | d | w |\n"
            "| `GET /healthz` | 200 |\n| `400` | bad |\n| key | type |\n")
    assert documented_keys(text) == {"server.listen", "upstreams.NAME.health.path"}


def _options(command: click.Command) -> set[str]:
    return {name for param in command.params if isinstance(param, click.Option)
            for name in param.opts + param.secondary_opts}


def test_every_command_line_option_is_documented():
    text = CONFIG_DOC.read_text(encoding="utf-8")
    commands = {"pyproxy": main, **{f"pyproxy {name}": cmd for name, cmd in main.commands.items()}}
    missing = [f"{label} {option}" for label, command in commands.items()
               for option in sorted(_options(command)) if f"`{option}`" not in text]
    assert len(commands) >= 3
    assert not missing, f"options missing from docs/configuration.md: {missing}"
    for name in main.commands:
        assert f"pyproxy {name}" in text, f"subcommand {name} is not documented"


# ---------------------------------------------------------------------------------------------
# Links and outside references
# ---------------------------------------------------------------------------------------------

def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def relative_links(text: str) -> list[str]:
    """The file part of every relative Markdown link outside code blocks."""
    text = re.sub(r"```.*?```", "", text, flags=re.DOTALL)  # code blocks hold no links
    links = []
    for target in MARKDOWN_LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # http:, mailto:, an anchor on the same page
        links.append(target.split("#", 1)[0])
    return links


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve_to_files_in_the_repository(path):
    broken = [link for link in relative_links(path.read_text(encoding="utf-8")) if not (path.parent / link).resolve().exists()
              or not (path.parent / link).resolve().is_relative_to(ROOT)]
    assert not broken, f"{path.relative_to(ROOT)}: links to nothing in the repository: {broken}"


def test_the_link_reader_finds_relative_links_only():
    text = "[a](b.md) [c](https://x.org) [d](#top) [e](../README.md#quickstart)\n```\n[f](no.md)\n```\n"
    assert relative_links(text) == ["b.md", "../README.md"]


def test_no_file_refers_to_notes_outside_the_repository():
    try:
        result = subprocess.run(["git", "grep", "-niIE", OUTSIDE_REFERENCES, "--", ".", f":!{THIS_FILE}"],
                                cwd=ROOT, capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        pytest.skip("git is not installed")
    if result.returncode not in (0, 1) or not (ROOT / ".git").exists():
        pytest.skip(f"not a git checkout: {result.stderr.strip()}")
    assert result.returncode == 1, ("references to notes outside the repository (point at docs/ "
                                    "instead):\n" + result.stdout)
