"""``pyproxy trust`` / ``untrust`` (proxy.serve.trust), never touching this machine's real stores.

Every test runs with HOME and XDG_DATA_HOME in its tmp_path (so the CA and the NSS databases are the
test's own) and PYPROXY_SYSTEM_STORE naming a tmp directory (so the system-store step copies the root
there and runs no command). Planning for the real system store is checked without running anything.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import tomli_w
from click.testing import CliRunner

from proxy.http import local_ca
from proxy.serve import trust
from proxy.serve.cli import main

pytestmark = pytest.mark.timeout(60)

needs_certutil = pytest.mark.skipif(shutil.which("certutil") is None,
                                    reason="certutil not installed (apt-get install libnss3-tools)")


@pytest.fixture(autouse=True)
def private_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_DATA_HOME", str(home / ".local" / "share"))
    monkeypatch.setenv("PYPROXY_SYSTEM_STORE", str(tmp_path / "system-store"))
    return home


def pyproxy(*args: str):
    return CliRunner().invoke(main, list(args))


def nss_nicknames(database: str) -> str:
    return subprocess.run(["certutil", "-L", "-d", database], capture_output=True, text=True, timeout=30).stdout


def default_root(home) -> str:
    return str(home / ".local" / "share" / "pyproxy" / "ca" / "root.crt")


def test_print_path_creates_the_default_root_and_prints_it(private_home):
    result = pyproxy("trust", "--print-path")
    assert result.exit_code == 0, result.output
    assert result.output.strip() == default_root(private_home)
    assert os.path.isfile(default_root(private_home))


def test_trust_uses_the_configs_ca_dir(tmp_path):
    config = tmp_path / "p.toml"
    config.write_text(tomli_w.dumps({"tls": {"internal_ca_dir": "my-ca", "internal_names": [".test"]},
                                     "routes": [{"path": "/", "upstream": "a"}],
                                     "upstreams": {"a": {"servers": ["127.0.0.1:3000"]}}}))
    result = pyproxy("trust", "-c", str(config), "--print-path")
    assert result.output.strip() == str(tmp_path / "my-ca" / "root.crt")
    root, _ = local_ca.open_root(str(tmp_path / "my-ca"), (".test",))  # made with the config's names
    assert pyproxy("-c", str(config), "trust", "--print-path").output.strip() == str(tmp_path / "my-ca" / "root.crt")


def test_dry_run_prints_the_steps_and_changes_nothing(private_home, tmp_path):
    result = pyproxy("trust", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "would create a new local CA in" in result.output
    assert f"copy {default_root(private_home)} to {tmp_path / 'system-store'}" in result.output
    assert not (private_home / ".local").exists() and not (tmp_path / "system-store").exists()
    assert not (private_home / ".pki").exists()


def test_untrust_without_a_root_has_nothing_to_do():
    result = pyproxy("untrust")
    assert result.exit_code == 0 and "nothing to untrust" in result.output


@needs_certutil
def test_trust_and_untrust_a_fresh_homes_chromium_database(private_home, tmp_path):
    result = pyproxy("trust")
    assert result.exit_code == 0, result.output
    database = f"sql:{private_home / '.pki' / 'nssdb'}"
    fingerprint = local_ca.fingerprint(local_ca.open_root(str(private_home / ".local/share/pyproxy/ca"), ())[0])
    nickname = f"pyproxy local CA {fingerprint[:12]}"
    assert nickname in nss_nicknames(database)
    copied = tmp_path / "system-store" / f"pyproxy-local-ca-{fingerprint[:12]}.crt"
    assert copied.read_bytes() == open(default_root(private_home), "rb").read()
    assert f"Chromium ({private_home / '.pki' / 'nssdb'}): added the root" in result.output

    again = pyproxy("trust")  # idempotent
    assert again.exit_code == 0, again.output

    removed = pyproxy("untrust")
    assert removed.exit_code == 0, removed.output
    assert nickname not in nss_nicknames(database)
    assert not copied.exists()


@needs_certutil
def test_trust_finds_firefox_profiles(private_home):
    profile = private_home / ".mozilla" / "firefox" / "abcd.default-release"
    profile.mkdir(parents=True)
    subprocess.run(["certutil", "-N", "-d", f"sql:{profile}", "--empty-password"], check=True, timeout=30)
    result = pyproxy("trust")
    assert result.exit_code == 0, result.output
    assert "Firefox profile abcd.default-release" in result.output
    assert "pyproxy local CA" in nss_nicknames(f"sql:{profile}")


def test_without_certutil_the_step_says_how_to_get_it(monkeypatch):
    real = trust.find_tool
    monkeypatch.setattr(trust, "find_tool", lambda name: None if name == "certutil" else real(name))
    result = pyproxy("trust")
    assert result.exit_code == 0, result.output
    assert ("NSS databases (Chromium, Firefox): certutil not found: apt-get install libnss3-tools "
            "(Fedora: dnf install nss-tools), then run `pyproxy trust` again") in result.output


def test_system_store_can_be_skipped():
    result = pyproxy("trust", "--system-store", "skip", "--dry-run")
    assert "system store: skipped" in result.output


ROOT = trust.Root("/ca/root.crt", "ab" * 32)


def test_system_store_plan_on_debian_installs_and_updates():
    if not (os.path.isdir(trust.DEBIAN_ANCHORS) and trust.find_tool("update-ca-certificates")):
        pytest.skip("not a Debian-like system")
    step = trust.system_step(ROOT, True, None)  # planned only: nothing runs
    destination = os.path.join(trust.DEBIAN_ANCHORS, ROOT.file_name)
    assert step.commands[0][-5:] == ["install", "-m", "0644", "/ca/root.crt", destination]
    assert step.commands[1][-1].endswith("update-ca-certificates")


def test_without_root_and_without_a_terminal_sudo_never_prompts(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(trust.shutil, "which", lambda name, path=None: f"/usr/bin/{name}")
    monkeypatch.setattr(trust.sys.stdin, "isatty", lambda: False, raising=False)
    step = trust._privileged(trust.Step("system store", [["update-ca-certificates"]]))
    assert step.commands == [["sudo", "-n", "update-ca-certificates"]]


def test_without_root_and_without_sudo_the_step_says_so(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(trust.shutil, "which", lambda name, path=None: None)
    step = trust._privileged(trust.Step("system store", [["update-ca-certificates"]]))
    assert "needs root" in step.skipped and not step.commands
