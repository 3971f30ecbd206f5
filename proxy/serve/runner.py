"""Wire an Application to core's SocketServer and run it in this process.

``ProxyProcess`` owns one accept loop, its thread pool and everything that runs beside it (admin
listener, health checks, access log). ``serve`` is what ``pyproxy -c FILE`` ends up calling.
"""

from __future__ import annotations

import logging
import signal
import ssl
import threading
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from core import SocketServer, ThreadPool
from core.socket_server import bind_listener

from proxy.observe.admin import install_observability
from proxy.serve.app import Application
from proxy.upstream.discovery import DnsDiscovery
from proxy.upstream.pool import PoolSweeper, upstream_tls_context
from proxy.config.schema import (
    Config, ConfigError, ListenConfig, ServerSettings, TlsSettings, key_path, load_config,
)
from proxy.http import local_ca
from proxy.http.local_ca import LocalCaError
from proxy.config.units import format_address
from proxy.serve.handler import CLIENT_PATIENCE, HttpHandler
from proxy.serve.http2 import Http2Server
from proxy.http.responses import write_overloaded
from proxy.http.tls import EncryptedKeyError, TlsTerminator, server_context, validity_warnings
from proxy.serve.watch import POLL_INTERVAL, Watcher, describe_changes

log = logging.getLogger("pyproxy")

POOL_QUEUE_PER_THREAD = 8  # queued connections per allowed thread before the proxy sheds load (closes new ones)
# [server] keys a running process cannot take: the number of processes, the CPU pinning (set per
# thread by sched_setaffinity, before any thread starts) and the size of the rate limit table (shared
# memory mapped before the workers fork). A reload logs them instead of ignoring them.
RESTART_ONLY = ("workers", "cpu_affinity", "rate_limit_keys")
# [server] keys a reload hands to the running accept loop and pool (apply_server_limits). The others
# apply elsewhere: listen (reconciled here, or new workers), the rest of Settings and trusted_proxies
# (Application.reload rebuilds app.settings and the runtime, which requests read afresh).
LIVE_IN_CORE = ("max_connections", "idle_timeout", "header_timeout", "graceful_timeout",
                "min_threads", "max_threads", "thread_idle_timeout")
# The signals a serving process acts on (docs/configuration.md, "Signals").
SERVING_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)


def pool_queue_limit(max_threads: int) -> int:
    return max(64, max_threads * POOL_QUEUE_PER_THREAD)


def server_changes(old: ServerSettings, new: ServerSettings, keys=RESTART_ONLY) -> list[str]:
    """``server.workers (2 -> 4)`` for each of ``keys`` (default: the restart-only ones) that changed."""
    return [f"server.{key} ({_shown(getattr(old, key))} -> {_shown(getattr(new, key))})"
            for key in keys if getattr(old, key) != getattr(new, key)]


def _shown(value) -> str:
    return "[" + ", ".join(map(str, value)) + "]" if isinstance(value, tuple) else str(value)


def accepted_timeouts(settings: ServerSettings) -> tuple[float, float]:
    """The kernel timeouts a new client socket starts with (inherited from its listener): those the
    handler sets before it reads the first request head, so that it needs no system call for them."""
    return settings.header_timeout, CLIENT_PATIENCE


def apply_server_limits(server: SocketServer, pool: ThreadPool, settings: ServerSettings) -> None:
    """Give a running accept loop and pool the [server] limits of a reloaded config."""
    server.set_limits(max_connections=settings.max_connections, idle_timeout=settings.idle_timeout,
                      header_timeout=settings.header_timeout, graceful_timeout=settings.graceful_timeout)
    timeouts = accepted_timeouts(settings)
    if timeouts != server.accepted_timeouts:
        server.accepted_timeouts = timeouts  # for listeners added later, and the ones there now:
        for listener in server.listeners:
            listener.pass_on_timeouts(*timeouts)
    pool.resize(settings.min_threads, settings.max_threads, pool_queue_limit(settings.max_threads),
                idle_timeout=settings.thread_idle_timeout)


def tls_terminator(listen: ListenConfig, tls: TlsSettings) -> TlsTerminator:
    """The listener's TLS terminator; a certificate that cannot be loaded is a ConfigError, and so is
    a local CA (tls = "internal") that cannot be created or loaded."""
    try:
        return TlsTerminator.from_listen_config(listen, tls)
    except LocalCaError as exc:
        raise ConfigError([f"{exc.key}: {exc}"]) from None
    except (ssl.SSLError, OSError) as exc:
        problems = certificate_file_problems(listen)
        if not problems:  # loads alone but not together: say what OpenSSL said
            reason = getattr(exc, "reason", None) or exc
            problems = [f"server.listen {listen.address}: tls_cert/tls_key cannot be loaded ({reason})"]
        raise ConfigError(problems) from exc


def certificate_file_problems(listen: ListenConfig) -> list[str]:
    """Each certificate and key pair of a listener (its default, then its sni entries) that cannot be
    loaded, one line each naming the pair and what is wrong with it."""
    pairs = [("", listen.tls_cert, listen.tls_key)] if listen.tls_cert else []
    pairs += [(f"sni {', '.join(entry.hosts)}: ", entry.tls_cert, entry.tls_key) for entry in listen.sni]
    problems = []
    for where, cert, key in pairs:
        try:
            server_context(cert, key)
        except (ssl.SSLError, OSError) as exc:
            problems.append(f"server.listen {listen.address}: {where}tls_cert/tls_key cannot be loaded: "
                            f"{certificate_problem(cert, key, exc)}")
    return problems


def certificate_problem(cert: str, key: str, exc: Exception) -> str:
    """What is wrong with one certificate file and its key, in the words an operator acts on."""
    if isinstance(exc, EncryptedKeyError):
        return (f"{key} is encrypted with a passphrase, which pyproxy cannot ask for; give it an "
                f"unencrypted key (openssl pkey -in {key} -out {key}.plain)")
    if getattr(exc, "reason", None) == "KEY_VALUES_MISMATCH":
        position = key_position_in_chain(cert, key)
        if position:
            return (f"{cert} lists its certificates in the wrong order: the key matches certificate "
                    f"{position + 1}, the server's own must come first, then its intermediates")
        return f"{key} is not the key of the first certificate in {cert}"
    if isinstance(exc, ssl.SSLError):  # OpenSSL's own words ("PEM lib") do not say which file
        if _read_chain(cert) is None:
            return f"{cert} holds no PEM certificate"
        if _read_public_key(key) is None:
            return f"{key} holds no PEM private key"
    reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
    return f"{reason} (are both files PEM, {cert} the certificate chain and {key} its key?)"


def key_position_in_chain(cert: str, key: str) -> int | None:
    """The index of the certificate in ``cert`` that ``key`` belongs to; None if none or unreadable."""
    chain, public = _read_chain(cert), _read_public_key(key)
    if not chain or public is None:
        return None
    return next((index for index, certificate in enumerate(chain) if certificate.public_key() == public), None)


def _read_chain(path: str) -> list | None:
    try:
        with open(path, "rb") as file:
            return x509.load_pem_x509_certificates(file.read())
    except (OSError, ValueError):
        return None


def _read_public_key(path: str):
    try:
        with open(path, "rb") as file:
            return serialization.load_pem_private_key(file.read(), password=None).public_key()
    except (OSError, ValueError, TypeError):
        return None


def tls_problems(config: Config, create_ca: bool = True) -> list[str]:
    """Listener certificates and upstream CA files that cannot be loaded. The config loader only sees
    that the files exist; run, check and every reload load them, so check passes only what will start
    and a reload with a broken file changes nothing. With create_ca false (check), the local CA is
    inspected but not created."""
    problems: list[str] = []
    for listen in config.server.listen:
        if listen.tls_internal and not create_ca:
            found = local_ca.problem(config.tls.ca_dir, config.tls.internal_names)
            if found is not None and f"{found.key}: {found}" not in problems:  # one CA: said once
                problems.append(f"{found.key}: {found}")
            problems.extend(certificate_file_problems(listen))  # its sni = [...] files
        elif listen.tls:
            try:
                tls_terminator(listen, config.tls)
            except ConfigError as exc:
                problems.extend(exc.problems)
    for upstream in config.upstreams.values():
        if upstream.tls_ca:
            try:
                upstream_tls_context(upstream)
            except (ssl.SSLError, OSError) as exc:
                reason = getattr(exc, "reason", None) or exc
                problems.append(f"{key_path('upstreams', upstream.name)}.tls_ca: {upstream.tls_ca} "
                                f"holds no usable PEM certificate ({reason})")
    return problems


def tls_terminators(config: Config) -> dict[str, TlsTerminator]:
    """Every TLS listener's terminator by address, its files loaded now. Raises ConfigError naming
    every certificate or CA file that cannot be loaded."""
    problems = tls_problems(config)
    if problems:
        raise ConfigError(problems)
    return {listen.address: tls_terminator(listen, config.tls) for listen in config.server.listen if listen.tls}


def load_for_reload(path: str | None) -> Config | None:
    """Read and validate the config file for a reload; None (logged) if there is none or it is invalid."""
    if not path:
        return None
    try:
        return load_config(path)
    except ConfigError as exc:
        log.error("reload failed, keeping the old config:\n%s", exc)
        return None


def bind_config_listener(listen: ListenConfig, reuse_port: bool = False, port: int | None = None):
    """The listening socket of one ``server.listen`` entry (``port`` overrides its port)."""
    return bind_listener(listen.host, listen.port if port is None else port, reuse_port=reuse_port)


def bind_worker_listeners(listen: ListenConfig, count: int, claimed=None) -> list:
    """``count`` SO_REUSEPORT sockets on one address, one per worker process: the kernel hashes each
    new connection to one of them, so workers share connections evenly whichever is awake.

    The address is first claimed with an ordinary socket (``claimed``, or one bound here) and that
    socket closed: an address another program holds fails with EADDRINUSE as it would without
    SO_REUSEPORT, instead of silently sharing its traffic. Port 0 takes the claimed socket's port.
    Raises OSError, with nothing left open."""
    probe = claimed if claimed is not None else bind_config_listener(listen)
    port = probe.getsockname()[1]
    probe.close()
    socks: list = []
    try:
        for _ in range(count):
            socks.append(bind_config_listener(listen, reuse_port=True, port=port))
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return socks


class ProxyProcess:
    """One serving process: accept loop + pool + handler, plus the services plugged in beside it."""

    def __init__(self, config: Config, *, listeners=None, install_signals: bool = False,
                 config_path: str | None = None, admin_socket=None, observability: bool = True,
                 rate_table=None, discovered: dict | None = None, resolve_names: bool = True,
                 terminators: dict | None = None):
        """``rate_table``: a worker gets its supervisor's shared rate limit table. ``resolve_names`` False:
        a worker, whose supervisor resolves the discovered names for it and hands over the current sets
        (``discovered``) and every change. ``terminators`` (by address): TLS loaded by the supervisor
        with this config, so a worker started later serves what its siblings serve, whatever the
        files on disk hold now."""
        self.config_path = config_path
        self.app = Application(config, rate_table=rate_table, discovered=discovered)
        server_cfg = config.server
        self.pool = ThreadPool(min_threads=server_cfg.min_threads, max_threads=server_cfg.max_threads,
                               max_queue=pool_queue_limit(server_cfg.max_threads),
                               idle_timeout=server_cfg.thread_idle_timeout, name="pyproxy-worker")
        handler = HttpHandler(self.app)
        self.server = SocketServer(handler, listeners=(), pool=self.pool,
                                   max_connections=server_cfg.max_connections,
                                   idle_timeout=server_cfg.idle_timeout,
                                   header_timeout=server_cfg.header_timeout,
                                   graceful_timeout=server_cfg.graceful_timeout,
                                   on_overload=write_overloaded, on_expired=handler.on_expired,
                                   accepted_timeouts=accepted_timeouts(server_cfg))
        self.app.draining_event = self.server.draining
        handler.http2 = Http2Server(handler, self.pool)
        self.server.on_drain = handler.on_drain
        self.app.http2_counts = handler.http2.counts
        self.listeners_by_address: dict[str, object] = {}
        if listeners is None:
            listeners = [(listen, bind_config_listener(listen)) for listen in server_cfg.listen]
        for listen, sock in listeners:
            self._add_listener(listen, sock, (terminators or {}).get(listen.address))
        self.services: list = []  # objects with start() and stop(): admin, health checks, logs
        # Idle upstream connections past keepalive_timeout close without waiting for the next request.
        self.services.append(PoolSweeper(lambda: self.app.runtime.all_pools()))
        # False in a worker process: the supervisor owns the listening sockets (proxy.serve.supervisor)
        self.manage_listeners = True
        # False in a worker process: its supervisor says once what a reload changed and what it cannot
        self.reports_changes = True
        self.install_signals = install_signals
        if install_signals:
            # Now, not when the loop starts: the sockets already accept, and a SIGHUP (a deploy's
            # reload) arriving before the handler exists would kill the process (default action).
            # Recorded signals wait for the loop.
            self.server.install_signal_handlers(SERVING_SIGNALS)
            self.server.signal_handlers[signal.SIGHUP] = self.on_sighup
            self.server.signal_handlers[signal.SIGUSR1] = self.reopen_logs
        # Metrics and access log observers, health checker, admin listener (proxy.observe.admin). A worker
        # under a supervisor would take the observers only: install_observability(health=False, admin=False).
        self.observability = install_observability(self, admin_socket=admin_socket) if observability else None
        if resolve_names:  # first: the names are resolved before the admin listener and health checks start
            self.services.insert(0, self._name_discovery())

    def _name_discovery(self) -> DnsDiscovery:
        """DNS discovery on its own thread; its first round runs as the services start, before traffic."""
        discovery = DnsDiscovery(lambda: self.app.config,
                                 lambda key, targets: self.app.apply_discovered(key, targets, only_if_configured=True))
        self.app.reload_listeners.append(lambda old, new: discovery.kick())  # new names: resolved at once
        return discovery

    def _add_listener(self, listen: ListenConfig, sock, terminator: TlsTerminator | None = None) -> None:
        if listen.tls:
            self.app.tls_contexts[listen] = terminator or tls_terminator(listen, self.app.config.tls)
        self.server.add_listener(sock, tag=listen)
        self.listeners_by_address[listen.address] = listen

    @property
    def addresses(self):
        return self.server.addresses

    def add_service(self, service) -> None:
        self.services.append(service)

    # -- reload --------------------------------------------------------------------------------
    def on_sighup(self) -> None:
        """SIGHUP: reload; the access log file is reopened either way (a valid reload does it in
        LogSwitch), so a logrotate postrotate ``kill -HUP`` works while the config is being edited."""
        if not self.reload_from_file():
            self.reopen_logs()

    def reopen_logs(self) -> None:
        """SIGUSR1 (nginx's convention): every service writing a file opens it again by name, so
        logrotate can rename the file without copytruncate."""
        for service in list(self.services):
            reopen = getattr(service, "reopen", None)
            if reopen is not None:
                reopen()

    def reload_from_file(self) -> bool:
        """SIGHUP: re-read the config; keep the old one if the new one is invalid."""
        if self.server.stopping:  # the drain closes the listeners: a reload would open them again
            log.info("reload ignored: the proxy is draining")
            return False
        config = load_for_reload(self.config_path)
        if config is None:
            return False
        try:
            self.reload(config)
        except ConfigError as exc:  # a certificate that cannot be loaded: nothing was changed
            log.error("reload failed, keeping the old config:\n%s", exc)
            return False
        return True

    def reload(self, config: Config) -> None:
        """Apply a validated config. Certificates and CA files are (re)loaded first, renewed files
        included, as nginx does on reload: one that cannot be loaded raises ConfigError before anything
        changes."""
        terminators = tls_terminators(config)
        added = self._bind_added_listeners(config) if self.manage_listeners else {}
        old = self.app.config
        self.app.reload(config)
        apply_server_limits(self.server, self.pool, config.server)
        if self.manage_listeners:
            self._reconcile_listeners(old, config, terminators, added)
        self._swap_certificates(config, terminators)
        log.info("config reloaded: %d routes, %d upstreams", len(config.routes), len(config.upstreams))
        if self.reports_changes:
            for line in describe_changes(old, config):
                log.info("  %s", line)
        for line in server_changes(old.server, config.server, LIVE_IN_CORE):
            log.info("  applied: %s", line)
        if self.reports_changes:  # a worker's supervisor says these once
            for line in server_changes(old.server, config.server):
                log.warning("needs a restart: %s", line)
            for line in validity_warnings(config.server.listen):
                log.warning(line)

    def _swap_certificates(self, config: Config, terminators: dict) -> None:
        """Listeners that stay open serve the certificates just loaded, from their next handshake on."""
        wanted = {listen.address: listen for listen in config.server.listen}
        for listener in self.server.listeners:
            tag = listener.tag
            if not isinstance(tag, ListenConfig) or tag.address not in wanted:
                continue
            if tag.address in terminators:
                self.app.tls_contexts[tag] = terminators[tag.address]
            else:
                self.app.tls_contexts.pop(tag, None)  # the address now serves plain HTTP

    def watch_config(self, interval: float = POLL_INTERVAL) -> Watcher:
        """--watch: reload whenever the file changes, on the loop thread like a SIGHUP."""
        watcher = Watcher(self.config_path, lambda: self.server.call_soon(self.reload_from_file),
                          interval=interval)
        self.add_service(watcher)
        return watcher

    def _listening_on(self) -> set[str]:
        return {l.tag.address for l in self.server.listeners if isinstance(l.tag, ListenConfig)}

    def _bind_added_listeners(self, config: Config) -> dict:
        """The sockets of the addresses ``config`` adds, bound before anything changes: one that cannot
        be bound fails the whole reload with a ConfigError (nothing left open), as in nginx. An address
        that takes over the port of one the reload drops is bound after that one closes instead."""
        current = self._listening_on()
        dropped_ports = {listen.port for listen in self.app.config.server.listen
                         if listen.address not in {new.address for new in config.server.listen}}
        added = {}
        try:
            for index, listen in enumerate(config.server.listen):
                if listen.address not in current and listen.port not in dropped_ports:
                    added[listen.address] = bind_config_listener(listen)
        except OSError as exc:
            for sock in added.values():
                sock.close()
            raise ConfigError([f"{self.config_path or 'config'}: server.listen[{index}]: cannot listen on "
                               f"{listen.address}: {exc.strerror or exc}"]) from None
        return added

    def _reconcile_listeners(self, old: Config, new: Config, terminators: dict, added: dict) -> None:
        """Open listeners the new config adds (``added``: those bound already), close those it drops;
        unchanged ones are untouched. A new TLS listener takes its terminator from ``terminators``,
        loaded and checked already."""
        wanted = {listen.address: listen for listen in new.server.listen}
        for listener in self.server.listeners:
            tag = listener.tag
            if isinstance(tag, ListenConfig) and tag.address not in wanted:
                self.server.remove_listener(listener)
                log.info("stopped listening on %s", tag.address)
        current = self._listening_on()
        for address, listen in wanted.items():
            if address not in current:
                try:
                    sock = added.pop(address, None) or bind_config_listener(listen)
                    self._add_listener(listen, sock, terminators.get(address))
                    log.info("listening on %s", address)
                except OSError as exc:
                    log.error("cannot listen on %s: %s", address, exc)

    # -- run -------------------------------------------------------------------------------------
    def serve_forever(self) -> None:
        for service in self.services:
            service.start()
        try:
            self.server.serve_forever()
        finally:
            for service in reversed(self.services):
                service.stop()
            self.app.close()

    def start_in_thread(self) -> threading.Thread:
        """For tests and embedding: run the loop on a background thread."""
        thread = threading.Thread(target=self.serve_forever, name="pyproxy-accept", daemon=True)
        thread.start()
        return thread

    def stop(self, force: bool = False) -> None:
        self.server.request_shutdown(force=force)


def configure_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def describe_listeners(process: ProxyProcess) -> str:
    return ", ".join(f"{_scheme(listener.tag)}://{format_address(*listener.address[:2])}"
                     for listener in process.server.listeners)


def _scheme(tag) -> str:
    return "https" if isinstance(tag, ListenConfig) and tag.tls else "http"


def config_name(path: str) -> str:
    return Path(path).name
