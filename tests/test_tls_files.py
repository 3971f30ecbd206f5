"""Certificate and key files a TLS listener cannot use: each is refused at once, by `pyproxy check`,
at start and on reload, with a message naming the file and what is wrong with it."""

from __future__ import annotations

import datetime
import os
import pty
import select
import shutil
import signal
import time

import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from proxy.config.schema import ListenConfig, SniCertificate
from proxy.http.tls import validity_warnings
from tests.support.command import (EXIT_TIMEOUT, assert_one_line_problem, proxy_running, pyproxy_command, run_cli,
                                   wait_for_log, write_config)
from tests.support.timing import wait_for

LISTEN = 'listen = [{{ address = "127.0.0.1:1", tls_cert = "{cert}", tls_key = "{key}" }}]'
CONFIG = """\
[server]
{listen}

[[routes]]
path = "/"
upstream = "web"

[upstreams.web]
servers = ["127.0.0.1:9"]
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A leaf issued by an intermediate: its chain in order and reversed, its key plain and encrypted."""
    directory = tmp_path_factory.mktemp("tls-files")
    leaf = trustme.CA().create_child_ca().issue_cert("a.test")
    chain = [blob.bytes() for blob in leaf.cert_chain_pems]
    paths = {name: str(directory / name) for name in ("chain.pem", "reversed.pem", "key.pem", "encrypted.pem")}
    with open(paths["chain.pem"], "wb") as out:
        out.write(b"".join(chain))
    with open(paths["reversed.pem"], "wb") as out:
        out.write(b"".join(reversed(chain)))
    leaf.private_key_pem.write_to_path(paths["key.pem"])
    key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), password=None)
    with open(paths["encrypted.pem"], "wb") as out:
        out.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.BestAvailableEncryption(b"secret")))
    return paths


def check_on_a_terminal(config_path) -> str:
    """`pyproxy check` run from a terminal (its controlling tty, as a shell gives it): what it printed.
    Fails if it has not exited within EXIT_TIMEOUT."""
    command = pyproxy_command() + ["check", str(config_path)]
    pid, terminal = pty.fork()
    if pid == 0:  # the child: exec at once, whatever happens
        try:
            os.execv(command[0], command)
        finally:
            os._exit(127)
    output, exited, deadline = b"", False, time.monotonic() + EXIT_TIMEOUT
    readable = select.poll()  # not select(): a test process late in the suite has descriptors past 1024
    readable.register(terminal, select.POLLIN)
    try:
        while not exited and time.monotonic() < deadline:
            if readable.poll(200):
                try:
                    output += os.read(terminal, 4096)
                except OSError:  # EIO: every process holding the terminal has closed it
                    pass
            exited = os.waitpid(pid, os.WNOHANG)[0] == pid
        assert exited, f"pyproxy check still running after {EXIT_TIMEOUT}s; it printed {output!r}"
        while readable.poll(0):  # what it wrote just before exiting
            try:
                chunk = os.read(terminal, 4096)
            except OSError:
                break
            if not chunk:
                break
            output += chunk
    finally:
        os.close(terminal)
        if not exited:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    return output.decode(errors="replace")


def test_an_encrypted_key_is_refused_instead_of_asking_for_its_passphrase(files, tmp_path):
    """OpenSSL asks on the terminal for a passphrase it is not given: a start or reload from a shell
    waited there forever, the accept loop with it."""
    listen = LISTEN.format(cert=files["chain.pem"], key=files["encrypted.pem"])
    output = check_on_a_terminal(write_config(tmp_path, CONFIG.format(listen=listen)))
    assert "pass phrase" not in output.lower()
    assert "is encrypted with a passphrase" in output, output


def check_problem(tmp_path, listen: str) -> str:
    """The one line `pyproxy check` prints for a config refused for its certificate files."""
    result = run_cli("check", str(write_config(tmp_path, CONFIG.format(listen=listen))))
    assert_one_line_problem(result, "tls_cert/tls_key cannot be loaded")
    return result.stderr


def test_an_encrypted_key_is_named(files, tmp_path):
    listen = LISTEN.format(cert=files["chain.pem"], key=files["encrypted.pem"])
    assert f"{files['encrypted.pem']} is encrypted with a passphrase" in check_problem(tmp_path, listen)


def test_a_chain_in_the_wrong_order_says_so(files, tmp_path):
    """An intermediate first and the server's certificate after it (OpenSSL only says the key does
    not match): the message points at the order, not at the key."""
    listen = LISTEN.format(cert=files["reversed.pem"], key=files["key.pem"])
    problem = check_problem(tmp_path, listen)
    assert f"{files['reversed.pem']} lists its certificates in the wrong order" in problem, problem


def test_files_swapped_or_of_the_wrong_kind_are_named(files, tmp_path):
    listen = LISTEN.format(cert=files["key.pem"], key=files["key.pem"])
    assert f"{files['key.pem']} holds no PEM certificate" in check_problem(tmp_path, listen)
    listen = LISTEN.format(cert=files["chain.pem"], key=files["chain.pem"])
    assert f"{files['chain.pem']} holds no PEM private key" in check_problem(tmp_path, listen)


def test_the_broken_sni_certificate_of_several_is_named(files, tmp_path):
    """With several certificates on a listener, the message says which one cannot be loaded."""
    good = f'tls_cert = "{files["chain.pem"]}", tls_key = "{files["key.pem"]}"'
    broken = f'tls_cert = "{files["chain.pem"]}", tls_key = "{files["encrypted.pem"]}"'
    listen = (f'listen = [{{ address = "127.0.0.1:1", {good}, sni = [{{ host = "a.test", {good} }}, '
              f'{{ host = ["b.test", "*.b.test"], {broken} }}] }}]')
    problem = check_problem(tmp_path, listen)
    assert "sni b.test, *.b.test: tls_cert/tls_key cannot be loaded" in problem, problem
    assert "sni a.test" not in problem


# -- certificates out of their validity period: served, with a warning ------------------------------------
NOW = datetime.datetime(2026, 12, 6, 12, 0, tzinfo=datetime.timezone.utc)
DAY = datetime.timedelta(days=1)


def dated_pair(directory, name: str, *hosts: str, not_before, not_after) -> tuple[str, str]:
    """A certificate for ``hosts`` valid from not_before to not_after, and its key: (cert, key) paths."""
    leaf = trustme.CA().issue_cert(*hosts, not_before=not_before, not_after=not_after)
    cert, key = str(directory / f"{name}.crt"), str(directory / f"{name}.key")
    leaf.cert_chain_pems[0].write_to_path(cert)
    leaf.private_key_pem.write_to_path(key)
    return cert, key


@pytest.mark.parametrize("not_before, not_after, expected", [
    (NOW - 90 * DAY, NOW - DAY, "(a.test, www.a.test) expired on 2026-12-05 12:00 UTC"),
    (NOW + DAY, NOW + 90 * DAY, "(a.test, www.a.test) is not valid until 2026-12-07 12:00 UTC"),
    (NOW - 80 * DAY, NOW + 3 * DAY, "(a.test, www.a.test) expires on 2026-12-09 12:00 UTC"),
], ids=["expired", "not-yet-valid", "expires-within-a-week"])
def test_a_certificate_out_of_its_dates_gets_a_warning_naming_file_hosts_and_date(
        tmp_path, not_before, not_after, expected):
    cert, key = dated_pair(tmp_path, "dated", "a.test", "www.a.test", not_before=not_before, not_after=not_after)
    listen = ListenConfig("127.0.0.1", 8443, tls_cert=cert, tls_key=key)
    (warning,) = validity_warnings([listen], now=NOW)
    assert warning.startswith(f"server.listen 127.0.0.1:8443: certificate {cert} {expected}"), warning


def test_certificates_in_their_dates_get_no_warning_and_an_sni_one_is_checked_too(tmp_path):
    good = dated_pair(tmp_path, "good", "a.test", not_before=NOW - DAY, not_after=NOW + 8 * DAY)
    old = dated_pair(tmp_path, "old", "b.test", not_before=NOW - 90 * DAY, not_after=NOW - DAY)
    assert validity_warnings([ListenConfig("127.0.0.1", 1, tls_cert=good[0], tls_key=good[1])], now=NOW) == []
    listen = ListenConfig("127.0.0.1", 1, tls_cert=good[0], tls_key=good[1],
                          sni=(SniCertificate(("b.test",), old[0], old[1]),))
    (warning,) = validity_warnings([listen], now=NOW)
    assert f"certificate {old[0]} (b.test) expired on" in warning


def test_check_warns_about_an_expired_certificate_and_passes(tmp_path):
    """An expired certificate file used to be served without a word. It is not refused (a test setup
    may use one on purpose): `pyproxy check` says it and exits 0."""
    now = datetime.datetime.now(datetime.timezone.utc)
    cert, key = dated_pair(tmp_path, "old", "a.test", not_before=now - 90 * DAY, not_after=now - 2 * DAY)
    result = run_cli("check", str(write_config(tmp_path, CONFIG.format(listen=LISTEN.format(cert=cert, key=key)))))
    assert result.returncode == 0, result.stderr
    assert f"warning: server.listen 127.0.0.1:1: certificate {cert} (a.test) expired on" in result.stderr


@pytest.mark.parametrize("workers", [1, 2])
def test_start_and_reload_warn_once_about_an_expired_certificate(tmp_path, workers):
    now = datetime.datetime.now(datetime.timezone.utc)
    good = dated_pair(tmp_path, "good", "a.test", not_before=now - DAY, not_after=now + 90 * DAY)
    old = dated_pair(tmp_path, "old", "b.test", not_before=now - 90 * DAY, not_after=now - 2 * DAY)
    shutil.copy(old[0], tmp_path / "serving.crt")
    shutil.copy(old[1], tmp_path / "serving.key")
    serving = (str(tmp_path / "serving.crt"), str(tmp_path / "serving.key"))
    warning = f"certificate {serving[0]} (b.test) expired on"

    def args_for_port(port):
        listen = f'listen = [{{ address = "127.0.0.1:{port}", tls_cert = "{serving[0]}", tls_key = "{serving[1]}" }}]'
        text = CONFIG.format(listen=listen).replace("[server]\n", f"[server]\nworkers = {workers}\n")
        return ["-c", str(write_config(tmp_path, text))]

    with proxy_running(tmp_path, args_for_port) as running:
        wait_for_log(running, warning)  # at start
        shutil.copy(good[0], serving[0])
        shutil.copy(good[1], serving[1])
        running.process.send_signal(signal.SIGHUP)
        wait_for_log(running, "config reloaded" if workers == 1 else "no changes")
        shutil.copy(old[0], serving[0])
        shutil.copy(old[1], serving[1])
        running.process.send_signal(signal.SIGHUP)
        wait_for(lambda: running.stderr().count(warning) == 2, 10.0, what="the reload's warning")
    assert running.stderr().count(warning) == 2, running.stderr()  # the start's and the reload's, once each
