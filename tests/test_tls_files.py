"""Certificate and key files a TLS listener cannot use: each is refused at once, by `pyproxy check`,
at start and on reload, with a message naming the file and what is wrong with it."""

from __future__ import annotations

import os
import pty
import select
import signal
import time

import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from tests.support.command import EXIT_TIMEOUT, assert_one_line_problem, pyproxy_command, run_cli, write_config

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
