"""pyproxy's own local certificate authority, for HTTPS in local development with no setup.

On first use a root CA (ECDSA P-256, valid 10 years) is written to the CA directory as ``root.crt`` and
``root.key`` (key 0600, directory 0700); every later start loads the same one. The root carries a
critical NameConstraints extension permitting only localhost, ``*.localhost``, the loopback addresses
and the names listed in ``[tls] internal_names``: even if its key leaks, no client that checks name
constraints (browsers, OpenSSL) accepts a certificate it signs for a real domain. Changing
``internal_names`` therefore needs a new root; ``problems()`` says so instead of silently using the old one.

Leaf certificates (7 days) are issued on demand, one per server name, and kept in memory; a leaf is
renewed on the first handshake after two thirds of its life. Issuing happens in the TLS handshake's SNI
callback, on a worker thread; a name being issued is issued once however many clients ask at the same time.
"""

from __future__ import annotations

import datetime
import fcntl
import ipaddress
import logging
import os
import re
import socket
import ssl
import stat
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Callable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from proxy.config.ca_names import name_is_permitted, normalize_internal_name, permitted_names

log = logging.getLogger("pyproxy.local_ca")

ROOT_CERT = "root.crt"
ROOT_KEY = "root.key"
LOCK_FILE = ".lock"
ROOT_LIFETIME = datetime.timedelta(days=3650)
LEAF_LIFETIME = datetime.timedelta(days=7)
RENEW_AFTER = LEAF_LIFETIME * 2 / 3      # as Caddy does: renew with a third of the lifetime left
BACKDATE = datetime.timedelta(minutes=5)  # tolerate a client clock a little behind ours
ISSUE_WAIT = 10.0                         # seconds a handshake waits for another thread issuing its name
MAX_CACHED_LEAVES = 1000                  # *.localhost is endless: the oldest leaves go past this many
LOOPBACK_NETWORKS = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
LOOPBACK_ADDRESSES = (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"))
NO_SNI = ""  # the cache key of the certificate for clients that send no server name (loopback IPs)
# A host name as a certificate may hold it (RFC 1035 labels, underscores tolerated as browsers do):
# no wildcard, no empty label, no spaces or punctuation a client's SNI could carry.
HOST_NAME = re.compile(r"(?=.{1,253}\Z)[a-z0-9_-]{1,63}(?:\.[a-z0-9_-]{1,63})*")


class LocalCaError(Exception):
    """The CA directory or its root cannot be used; the message is one line for the user, and ``key``
    the config key to fix."""

    def __init__(self, message: str, key: str = "tls.internal_ca_dir"):
        super().__init__(message)
        self.key = key


# ---------------------------------------------------------------------------------------------
# The root: created once, then loaded, with its permissions checked
# ---------------------------------------------------------------------------------------------

def root_paths(ca_dir: str) -> tuple[str, str]:
    return os.path.join(ca_dir, ROOT_CERT), os.path.join(ca_dir, ROOT_KEY)


def _name_constraints(permitted: tuple[str, ...]) -> x509.NameConstraints:
    dns = [x509.DNSName(name) for name in permitted] + [x509.DNSName("." + name) for name in permitted]
    ips = [x509.IPAddress(network) for network in LOOPBACK_NETWORKS]
    return x509.NameConstraints(permitted_subtrees=dns + ips, excluded_subtrees=None)


def root_permitted_names(certificate: x509.Certificate) -> tuple[str, ...] | None:
    """The DNS names a root's NameConstraints permit (leading dots folded), or None without the extension."""
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.NameConstraints).value
    except x509.ExtensionNotFound:
        return None
    names = {normalize_internal_name(entry.value) for entry in constraints.permitted_subtrees or ()
             if isinstance(entry, x509.DNSName)}
    return tuple(sorted(names))


def make_root(permitted: tuple[str, ...], now: datetime.datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pyproxy local CA"),
        x509.NameAttribute(NameOID.COMMON_NAME, f"pyproxy local CA {socket.gethostname()[:40]} {now:%Y-%m-%d}"),
    ])
    public = key.public_key()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE).not_valid_after(now + ROOT_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(_name_constraints(permitted), critical=True)
        .sign(key, hashes.SHA256())
    )
    return certificate, key


def _write_private(path: str, data: bytes, mode: int) -> None:
    """Write a new file with ``mode`` from the start (never briefly readable by others), then rename it in."""
    temporary = f"{path}.tmp{os.getpid()}"
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(descriptor, data)
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    os.replace(temporary, path)


def key_file_problem(path: str) -> str | None:
    """A root key others can read (group or world permission bits) is refused, as ssh refuses such keys."""
    mode = os.stat(path).st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        return (f"{path} is readable by other users (mode {stat.S_IMODE(mode):04o}); "
                f"the CA key must be private: chmod 600 {path}")
    return None


def _load_root(ca_dir: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = root_paths(ca_dir)
    for path in (cert_path, key_path):
        if not os.path.exists(path):  # the other one is there: making a new root would orphan it
            raise LocalCaError(f"{path} is missing: restore it, or move {ca_dir} away so that a new root "
                               f"is made (then run `pyproxy trust` again)")
    readable = key_file_problem(key_path)
    if readable:
        raise LocalCaError(readable)
    certificate = _read_root_part(cert_path, "PEM certificate", x509.load_pem_x509_certificate)
    key = _read_root_part(key_path, "unencrypted PEM private key",
                          lambda data: serialization.load_pem_private_key(data, password=None))
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != certificate.public_key():
        raise LocalCaError(f"{key_path} is not the key of {cert_path}")
    return certificate, key


def _read_root_part(path: str, what: str, parse):
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as exc:
        raise LocalCaError(f"{path} cannot be read ({exc.strerror or exc})") from None
    try:
        return parse(data)
    except (ValueError, TypeError):
        raise LocalCaError(f"{path} is damaged: it holds no {what}") from None


def _constraints_problem(ca_dir: str, certificate: x509.Certificate,
                         permitted: tuple[str, ...]) -> LocalCaError | None:
    have = root_permitted_names(certificate)
    if have == permitted:
        return None
    return LocalCaError(
            f"the root in {ca_dir} permits {', '.join(have or ('nothing',))} but tls.internal_names asks for "
            f"{', '.join(permitted)}: changing internal_names needs a new root. Run `pyproxy untrust`, move "
            f"{ca_dir} away, then start again (a new root is made) and run `pyproxy trust`",
            key="tls.internal_names")


def problem(ca_dir: str, internal_names: tuple[str, ...]) -> LocalCaError | None:
    """What would stop ``open_root`` from working, found without creating or changing anything."""
    cert_path, key_path = root_paths(ca_dir)
    if not os.path.exists(ca_dir):
        parent = _existing_parent(ca_dir)
        if not os.access(parent, os.W_OK | os.X_OK):
            return LocalCaError(f"cannot create the CA directory {ca_dir}: {parent} is not writable")
        return None
    if not os.path.isdir(ca_dir):
        return LocalCaError(f"{ca_dir} is not a directory")
    if not os.access(ca_dir, os.R_OK | os.W_OK | os.X_OK):
        return LocalCaError(f"the CA directory {ca_dir} is not readable and writable by this user")
    if not os.path.exists(cert_path) and not os.path.exists(key_path):
        return None
    try:
        certificate, _ = _load_root(ca_dir)
    except LocalCaError as exc:
        return exc
    return _constraints_problem(ca_dir, certificate, permitted_names(internal_names))


def _existing_parent(path: str) -> str:
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    return parent


def open_root(ca_dir: str, internal_names: tuple[str, ...], now: Callable[[], datetime.datetime] | None = None,
              check_names: bool = True) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Load the root from ``ca_dir``, creating it (and the directory, 0700) on first use.
    A lock file serialises creation between processes (workers, a second proxy). With check_names
    (serving), a root whose constraints differ from internal_names is refused. Raises LocalCaError."""
    now = now or _utcnow
    try:
        os.makedirs(ca_dir, mode=0o700, exist_ok=True)
        with open(os.open(os.path.join(ca_dir, LOCK_FILE), os.O_WRONLY | os.O_CREAT, 0o600), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            cert_path, key_path = root_paths(ca_dir)
            if not os.path.exists(cert_path) and not os.path.exists(key_path):
                _create_root(ca_dir, permitted_names(internal_names), now())
    except OSError as exc:
        raise LocalCaError(f"cannot create the local CA in {ca_dir} ({exc.strerror or exc})") from None
    certificate, key = _load_root(ca_dir)
    mismatch = check_names and _constraints_problem(ca_dir, certificate, permitted_names(internal_names))
    if mismatch:
        raise mismatch
    return certificate, key


def _create_root(ca_dir: str, permitted: tuple[str, ...], now: datetime.datetime) -> None:
    certificate, key = make_root(permitted, now)
    cert_path, key_path = root_paths(ca_dir)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    _write_private(key_path, key_pem, 0o600)  # the key first: a root.crt alone would be unusable
    _write_private(cert_path, certificate.public_bytes(serialization.Encoding.PEM), 0o644)
    log.warning("created a new local CA in %s (permits %s); run `pyproxy trust` so browsers and tools accept it",
                ca_dir, ", ".join(permitted))


def fingerprint(certificate: x509.Certificate) -> str:
    return certificate.fingerprint(hashes.SHA256()).hex()


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


# ---------------------------------------------------------------------------------------------
# Leaves: issued on demand, cached in memory, renewed lazily
# ---------------------------------------------------------------------------------------------

def make_leaf(root: x509.Certificate, root_key, name: str, now: datetime.datetime) -> tuple[bytes, datetime.datetime]:
    """PEM of a new key and leaf certificate for ``name`` (NO_SNI: localhost and the loopback IPs)."""
    key = ec.generate_private_key(ec.SECP256R1())
    if name == NO_SNI:
        names = [x509.DNSName("localhost")] + [x509.IPAddress(address) for address in LOOPBACK_ADDRESSES]
        common_name = "localhost"
    else:
        names = [x509.DNSName(name)]
        common_name = name[:64]  # the CN field's limit; the SAN holds the full name
    not_after = now + LEAF_LIFETIME
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(root.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE).not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(root.public_key()), critical=False)
        .sign(root_key, hashes.SHA256())
    )
    pem = (key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
           + certificate.public_bytes(serialization.Encoding.PEM))
    return pem, not_after


@dataclass
class _Leaf:
    context: ssl.SSLContext | None = None
    renew_at: datetime.datetime | None = None
    ready: threading.Event = field(default_factory=threading.Event)


class LocalCA:
    """Issues and caches leaf certificates as ready-made server SSLContexts, one per name.

    ``make_context(pem_path)`` builds a server context from a PEM file holding key and chain (the ssl
    module only loads certificates from files, so each leaf passes through a private temporary file).
    """

    def __init__(self, ca_dir: str, internal_names: tuple[str, ...], make_context: Callable[[str], ssl.SSLContext],
                 now: Callable[[], datetime.datetime] | None = None):
        self.now = now or _utcnow
        self.ca_dir = ca_dir
        self.root, self._root_key = open_root(ca_dir, internal_names, self.now)
        self.permitted = permitted_names(internal_names)
        self._make_context = make_context
        self._leaves: dict[str, _Leaf] = {}
        self._lock = threading.Lock()
        self.issued = 0  # leaves issued so far (renewals included)

    def allows(self, name: str) -> bool:
        """Will this CA issue for ``name``? Only names its root's constraints permit: anything else would
        be refused by clients anyway, and the proxy must not become an open CA."""
        return name == NO_SNI or (HOST_NAME.fullmatch(name) is not None and name_is_permitted(name, self.permitted))

    def context_for(self, name: str) -> ssl.SSLContext | None:
        """A server context with a valid leaf for ``name``, issuing one if needed; None if not allowed."""
        name = name.lower().rstrip(".")
        if not self.allows(name):
            return None
        now = self.now()
        with self._lock:
            leaf = self._leaves.get(name)
            mine = leaf is None or (leaf.ready.is_set() and (leaf.context is None or now >= leaf.renew_at))
            if mine:  # this thread issues; others asking meanwhile wait for it
                previous = leaf
                leaf = _Leaf()
                self._leaves.pop(name, None)  # re-inserted last: the dict's order is the age order
                self._leaves[name] = leaf
                self._forget_oldest()
        if mine:
            self._issue(name, leaf, previous)
        elif not leaf.ready.wait(ISSUE_WAIT):
            return None
        return leaf.context

    def _forget_oldest(self) -> None:
        """Bound the cache (a client could ask for a.localhost, b.localhost, ... forever). Called with
        the lock held; a forgotten name is simply issued again if asked for."""
        while len(self._leaves) > MAX_CACHED_LEAVES:
            del self._leaves[next(iter(self._leaves))]

    def new_context(self, name: str) -> ssl.SSLContext:
        """A context with a fresh leaf for ``name``, not cached (a listener's base context)."""
        pem, _ = make_leaf(self.root, self._root_key, name, self.now())
        return self._load(pem)

    def _issue(self, name: str, leaf: _Leaf, previous: _Leaf | None) -> None:
        try:
            now = self.now()
            pem, not_after = make_leaf(self.root, self._root_key, name, now)
            leaf.context = self._load(pem)
            leaf.renew_at = not_after - LEAF_LIFETIME + RENEW_AFTER
            with self._lock:
                self.issued += 1
            log.debug("issued a certificate for %s, valid until %s", name or "the loopback addresses", not_after)
        except Exception:  # never a traceback into the handshake: the client sees a failed handshake
            log.exception("could not issue a certificate for %s", name)
            if previous is not None and previous.context is not None:
                leaf.context, leaf.renew_at = previous.context, previous.renew_at
        finally:
            leaf.ready.set()

    def _load(self, pem: bytes) -> ssl.SSLContext:
        descriptor, path = tempfile.mkstemp(prefix="pyproxy-leaf-", suffix=".pem")  # mode 0600
        try:
            os.write(descriptor, pem)
            os.close(descriptor)
            descriptor = -1
            return self._make_context(path)
        finally:
            if descriptor >= 0:
                os.close(descriptor)
            os.unlink(path)


_authorities: dict[tuple, LocalCA] = {}
_authorities_lock = threading.Lock()


def shared_ca(ca_dir: str, internal_names: tuple[str, ...], make_context: Callable[[str], ssl.SSLContext]) -> LocalCA:
    """One LocalCA per directory, names and kind of context in this process, so a reload keeps the
    issued leaves (listeners whose contexts differ, in ALPN say, get leaves of their own)."""
    key = (os.path.abspath(ca_dir), permitted_names(internal_names), make_context)
    with _authorities_lock:
        authority = _authorities.get(key)
        if authority is None:
            authority = _authorities[key] = LocalCA(ca_dir, internal_names, make_context)
        return authority
