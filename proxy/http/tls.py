"""TLS termination for client listeners: one ``TlsTerminator`` per listener with ``tls_cert``/``tls_key``.

The handshake runs on a worker thread (never in the accept loop), without waiting: ``handshake(conn)``
wraps ``conn.sock`` in place on the first call and advances the handshake as far as the bytes already
received allow. When the client's next flight has not arrived, it answers ``HANDSHAKE_PENDING`` and the
caller parks the connection in the selector, as it parks half a request head, so a client trickling
its ClientHello (slowloris over TLS) holds no thread. A client that connects and sends nothing is
closed by core's reaper after ``header_timeout`` (it is never dispatched); one that stalls mid-handshake
is closed at the deadline the caller parks it with.

Timeouts: core sets kernel timeouts (SO_RCVTIMEO/SO_SNDTIMEO) on blocking sockets, but they do not
bound reads on a TLS socket: when the kernel's recv returns EAGAIN, OpenSSL reports WANT_READ and
CPython's ``SSLSocket.read`` retries on a blocking socket until the peer sends something. So the
wrapped socket (``TimedSSLSocket``) takes the values core asks for through ``setsockopt`` and applies
them as Python-level timeouts (poll before each operation) to the reads and writes they belong to.
"""

from __future__ import annotations

import datetime
import logging
import select
import socket
import ssl
import struct
import sys
from dataclasses import dataclass

from cryptography import x509

from proxy.http.local_ca import NO_SNI, LocalCA, shared_ca
from proxy.http.responses import plain_response

log = logging.getLogger("pyproxy.tls")

ALPN_PROTOCOLS = ["h2", "http/1.1"]  # RFC 7301; h2 first: a client offering both gets HTTP/2
HTTP1_ONLY = ["http/1.1"]  # a listener with http2 = false
HANDSHAKE_PENDING = "pending"  # handshake()'s answer while the client's next flight is still to come
MAX_HANDSHAKE_STEPS = 8  # bounds the waits for a full send buffer (each up to WRITE_WAIT)
WRITE_WAIT = 1.0  # seconds one full send buffer may take to drain during a handshake
_TIMEVAL = struct.Struct("ll")
PLAIN_HTTP_REPLY = plain_response(400, "400 plain HTTP sent to an HTTPS port: use https://", close=True)
_TIMEOUT_OPTIONS = (socket.SO_RCVTIMEO, socket.SO_SNDTIMEO)
# A certificate file this close to its end is worth a warning: a week to renew it before clients refuse it.
EXPIRY_NOTICE = datetime.timedelta(days=7)
PLAIN_HTTP_DRAIN_READS = 16  # reads of unread request bytes dropped before the 400, at most


class TimedSSLSocket(ssl.SSLSocket):
    """An SSLSocket whose kernel-timeout options become per-direction Python timeouts (see module doc)."""

    _read_timeout: float | None = None
    _write_timeout: float | None = None

    def setsockopt(self, level, option, value, *rest):
        if level == socket.SOL_SOCKET and option in _TIMEOUT_OPTIONS and isinstance(value, (bytes, bytearray)):
            seconds, micros = _TIMEVAL.unpack(value)
            timeout = (seconds + micros / 1e6) or None  # 0 means "no timeout" to the kernel
            if option == socket.SO_RCVTIMEO:
                self._read_timeout = timeout
            else:
                self._write_timeout = timeout
            return None
        return super().setsockopt(level, option, value, *rest)

    def settimeout(self, value):
        """An explicit timeout (e.g. 0.0 for the tunnel relay) applies both ways until core sets others."""
        self._read_timeout = self._write_timeout = value
        super().settimeout(value)

    def _for_reading(self) -> None:
        if self.gettimeout() != self._read_timeout:
            super().settimeout(self._read_timeout)

    def _for_writing(self) -> None:
        if self.gettimeout() != self._write_timeout:
            super().settimeout(self._write_timeout)

    def recv(self, buflen=1024, flags=0):
        self._for_reading()
        return super().recv(buflen, flags)

    def recv_into(self, buffer, nbytes=None, flags=0):
        self._for_reading()
        return super().recv_into(buffer, nbytes, flags)

    def send(self, data, flags=0):
        self._for_writing()
        return super().send(data, flags)

    def sendall(self, data, flags=0):
        self._for_writing()
        return super().sendall(data, flags)


@dataclass(frozen=True)
class Certificate:
    """A certificate chain and its key; ``hosts`` are the SNI names it serves (empty: the default)."""

    tls_cert: str
    tls_key: str
    hosts: tuple[str, ...] = ()


class EncryptedKeyError(ssl.SSLError):
    """The key file is protected by a passphrase, which pyproxy has no way to be given."""

    reason = "the key is encrypted with a passphrase; give an unencrypted key (openssl pkey -in KEY -out KEY.plain)"


def _refuse_passphrase():
    # Without a password callback OpenSSL asks for the passphrase on the terminal: a start or a
    # reload from a shell would wait there forever, holding the accept loop.
    raise EncryptedKeyError(EncryptedKeyError.reason)


def server_context(cert: str, key: str | None, alpn=ALPN_PROTOCOLS) -> ssl.SSLContext:
    """Modern server defaults: TLS 1.2+, the ssl module's cipher list, server cipher preference."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_COMPRESSION
    context.set_alpn_protocols(alpn)
    context.load_cert_chain(cert, key, password=_refuse_passphrase)
    context.sslsocket_class = TimedSSLSocket
    return context


def leaf_context(pem_path: str) -> ssl.SSLContext:
    """A server context from one PEM file holding a leaf's key and certificate (the local CA's)."""
    return server_context(pem_path, None)


def leaf_context_http1(pem_path: str) -> ssl.SSLContext:
    """The same for a listener with http2 = false: the context the SNI callback switches to is the one
    whose ALPN list the handshake answers from."""
    return server_context(pem_path, None, HTTP1_ONLY)


class TlsTerminator:
    """Terminates TLS for one listener: a default certificate plus optional ones picked by SNI.

    With ``authority`` (``tls = "internal"``) there is no default certificate: names without a
    certificate file get a leaf from the local CA, issued in the SNI callback (so on the handshake's
    worker thread, never in the accept loop), and a name the CA does not issue for is refused with
    the ``unrecognized_name`` alert."""

    def __init__(self, default: Certificate | None, by_name: tuple[Certificate, ...] = (),
                 authority: LocalCA | None = None, alpn=ALPN_PROTOCOLS):
        self.authority = authority
        if default is not None:
            self.context = server_context(default.tls_cert, default.tls_key, alpn)
        else:  # the loopback leaf, so the context is complete; the callback picks a current one
            self.context = authority.new_context(NO_SNI)
        self._exact: dict[str, ssl.SSLContext] = {}
        self._wildcard: dict[str, ssl.SSLContext] = {}  # "example.com" for "*.example.com"
        for certificate in by_name:
            context = server_context(certificate.tls_cert, certificate.tls_key, alpn)
            for host in certificate.hosts:
                if host.startswith("*."):
                    self._wildcard.setdefault(host[2:], context)
                else:
                    self._exact.setdefault(host, context)
        if self._exact or self._wildcard or authority is not None:
            self.context.sni_callback = self._select_certificate
            _quiet_undecodable_server_names()

    @classmethod
    def from_listen_config(cls, listen, tls_settings=None) -> "TlsTerminator":
        """``tls_settings`` ([tls]: internal_ca_dir, internal_names) is needed for ``tls = "internal"``.
        Raises LocalCaError when the local CA cannot be created or loaded."""
        extra = tuple(Certificate(entry.tls_cert, entry.tls_key, entry.hosts)
                      for entry in getattr(listen, "sni", ()))
        alpn = ALPN_PROTOCOLS if getattr(listen, "http2", True) else HTTP1_ONLY
        if getattr(listen, "tls_internal", False):
            authority = shared_ca(tls_settings.internal_ca_dir, tls_settings.internal_names,
                                  leaf_context if alpn is ALPN_PROTOCOLS else leaf_context_http1)
            return cls(None, extra, authority, alpn)
        return cls(Certificate(listen.tls_cert, listen.tls_key), extra, alpn=alpn)

    def context_for(self, server_name: str | None) -> ssl.SSLContext | None:
        """The context whose certificate serves ``server_name``: exact name, then "*.parent", then the
        local CA's leaf (``tls = "internal"``) or the default. None: no certificate for that name."""
        found = self._from_files(server_name)
        if found is not None:
            return found
        if self.authority is not None:
            return self.authority.context_for(server_name or NO_SNI)
        return self.context

    def _from_files(self, server_name: str | None) -> ssl.SSLContext | None:
        if not server_name:
            return None
        name = server_name.lower().rstrip(".")
        found = self._exact.get(name)
        if found is None and "." in name:
            found = self._wildcard.get(name.split(".", 1)[1])  # a wildcard covers one label (RFC 6125 §6.4.3)
        return found

    def _select_certificate(self, ssl_object, server_name, _context) -> int | None:
        chosen = self.context_for(server_name)
        if chosen is None:
            log.debug("TLS: no certificate for %r: not a name the local CA issues for", server_name)
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        if chosen is not self.context:
            ssl_object.context = chosen
        return None  # continue the handshake (without tls = "internal", an unknown name gets the default)

    def handshake(self, conn):
        """Advance the TLS handshake without blocking: True once complete, False if it failed,
        HANDSHAKE_PENDING while it waits for the client's next bytes (park the connection)."""
        wrapped = conn.sock
        if not isinstance(wrapped, ssl.SSLSocket):
            try:
                # TLS keeps its timeouts in Python: drop the kernel ones the listener passed on.
                conn.clear_timeouts()
                conn.sock.settimeout(0.0)
                wrapped = self.context.wrap_socket(conn.sock, server_side=True, do_handshake_on_connect=False)
            except OSError as exc:
                log.debug("TLS setup for %s failed: %s", conn.peer, exc)
                return False
            conn.sock = wrapped  # same fd: core's epoll registration and fileno bookkeeping stay valid
        for _ in range(MAX_HANDSHAKE_STEPS):
            try:
                wrapped.do_handshake()
            except ssl.SSLWantReadError:
                return HANDSHAKE_PENDING
            except ssl.SSLWantWriteError:
                # Our flight did not fit the send buffer (a client not reading): wait a moment for room.
                if not _writable(wrapped, WRITE_WAIT):
                    log.debug("TLS handshake with %s failed: the client takes no data", conn.peer)
                    return False
                continue
            except (ssl.SSLError, OSError) as exc:
                log.debug("TLS handshake with %s failed: %s", conn.peer, exc)
                if getattr(exc, "reason", None) == "HTTP_REQUEST":  # OpenSSL saw "GET /..." for a ClientHello
                    _answer_plain_http(wrapped)
                return False
            except AttributeError:  # SSLSocket.shutdown() drops its OpenSSL state: a drain force-closed it
                log.debug("TLS handshake with %s ended: the connection was shut down", conn.peer)
                return False
            wrapped.settimeout(None)
            _reset_timeout_cache(conn)
            return True
        return False


def validity_warnings(listens, now: datetime.datetime | None = None) -> list[str]:
    """A line for each certificate file of these listeners that has expired, is not valid yet, or
    expires within EXPIRY_NOTICE. Warnings, not errors: serving an expired certificate may be on
    purpose (a test setup), and clients say so themselves. The local CA renews its own certificates."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    warnings = []
    for listen in listens:
        files = [listen.tls_cert] if listen.tls_cert else []
        files += [entry.tls_cert for entry in getattr(listen, "sni", ())]
        for path in files:
            problem = _validity_problem(path, now)
            if problem:
                warnings.append(f"server.listen {listen.address}: certificate {path} {problem}")
    return warnings


def _validity_problem(path: str, now: datetime.datetime) -> str | None:
    try:
        with open(path, "rb") as file:
            certificate = x509.load_pem_x509_certificates(file.read())[0]  # the server's own comes first
    except (OSError, ValueError, IndexError):
        return None  # loading the listener reports an unreadable file
    names = ", ".join(_names_of(certificate)) or "no host names"
    start, end = certificate.not_valid_before_utc, certificate.not_valid_after_utc
    if now >= end:
        return f"({names}) expired on {_day(end)}: clients refuse it; renew it, then reload"
    if now < start:
        return f"({names}) is not valid until {_day(start)}: clients refuse it until then (is the clock right?)"
    if end - now <= EXPIRY_NOTICE:
        return f"({names}) expires on {_day(end)}: renew it, then reload"
    return None


def _names_of(certificate: x509.Certificate) -> list[str]:
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return [str(name.value) for name in names if isinstance(name, (x509.DNSName, x509.IPAddress))]
    except x509.ExtensionNotFound:
        return [attribute.value for attribute in certificate.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)]


def _day(moment: datetime.datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def _quiet_undecodable_server_names() -> None:
    """The ssl module decodes a client's SNI name as ASCII before calling the SNI callback; a name that
    is not fails the handshake (right) and prints "Exception ignored ... Traceback" on stderr through
    sys.unraisablehook (wrong: any client can send one, as often as it likes). That one case becomes
    a debug line; every other unraisable exception still reaches the hook that was there."""
    previous = sys.unraisablehook
    if getattr(previous, "quiets_server_names", False):
        return

    def hook(unraisable) -> None:
        error = unraisable.exc_value
        if isinstance(error, UnicodeDecodeError) and error.encoding == "ascii" and isinstance(unraisable.object, bytes):
            log.debug("TLS: refused a handshake whose server name is not ASCII: %r", unraisable.object[:256])
            return
        previous(unraisable)

    hook.quiets_server_names = True
    sys.unraisablehook = hook


def _answer_plain_http(sock) -> None:
    """A plain-HTTP request on a TLS listener gets a short 400 in plain text, as nginx and Go's server
    answer, instead of a bare close ("empty reply from server"). Written on the fd beneath the TLS
    layer, never waiting; the request bytes still unread are dropped first, so the close that
    follows sends a FIN, not a reset that could destroy the answer."""
    raw = socket.socket  # the base-class methods act on the fd, not through OpenSSL
    try:
        for _ in range(PLAIN_HTTP_DRAIN_READS):  # a client that keeps sending cannot keep the worker here
            if not raw.recv(sock, 65536, socket.MSG_DONTWAIT):
                break
    except OSError:  # EAGAIN: nothing more waiting; or the client is gone
        pass
    try:
        raw.send(sock, PLAIN_HTTP_REPLY, socket.MSG_DONTWAIT)
    except OSError as exc:
        log.debug("plain-HTTP answer not sent: %s", exc)


def _writable(sock, timeout: float) -> bool:
    poller = select.poll()
    poller.register(sock, select.POLLOUT)
    return bool(poller.poll(timeout * 1000))


def _reset_timeout_cache(conn) -> None:
    """Connection.set_timeouts skips values it believes are set; the new socket has none yet."""
    conn._read_timeout = None
    conn._write_timeout = None
