"""HTTP/2 in tests: the proxy on a TLS (ALPN h2) or h2c listener, certificates from trustme, and
``H2Client``, a raw client on the ``h2`` package that sends exactly the frames a test asks for.

    pki = Pki.create(tmp_path)                                  # a CA and a certificate for 127.0.0.1
    proxy = start_h2_proxy({"web": [backend.address]}, pki)     # TLS listener, ALPN h2 + http/1.1
    proxy = start_h2_proxy(upstreams, None, listen={"h2c": True})  # plain listener with prior knowledge
    client = H2Client.connect(proxy.port)                      # h2c prior knowledge, settings exchanged
"""

from __future__ import annotations

import dataclasses
import os
import socket
import ssl

import h2.config
import h2.connection
import h2.events
import trustme
from hyperframe.frame import Frame, HeadersFrame

from core.socket_server import bind_listener
from proxy.config.schema import parse_config
from proxy.serve.runner import ProxyProcess
from tests.support.proxy import PROXY_STOP_TIMEOUT, RunningProxy, proxy_config_dict

CLIENT_TIMEOUT = 10.0  # every raw client socket operation is bounded by this
READ_ROUNDS = 2000  # H2Client.until reads at most this many times


@dataclasses.dataclass
class Pki:
    ca_file: str
    cert: str
    key: str

    @classmethod
    def create(cls, directory) -> "Pki":
        ca = trustme.CA()
        ca_file = os.path.join(directory, "ca.pem")
        ca.cert_pem.write_to_path(ca_file)
        issued = ca.issue_cert("127.0.0.1", "localhost")
        cert, key = os.path.join(directory, "leaf.crt"), os.path.join(directory, "leaf.key")
        issued.private_key_pem.write_to_path(key)
        with open(cert, "wb") as out:
            for blob in issued.cert_chain_pems:
                out.write(blob.bytes())
        return cls(ca_file, cert, key)


def start_h2_proxy(upstreams: dict, pki: Pki | None, listen: dict | None = None, server: dict | None = None,
                   routes: list | None = None, upstream_options: dict | None = None) -> RunningProxy:
    """A proxy on one listener: TLS with ``pki`` (h2 by ALPN unless listen says http2 = false), plain
    without (set ``listen={"h2c": True}`` for prior knowledge). ``proxy.url`` has the right scheme."""
    sock = bind_listener("127.0.0.1", 0)
    port = sock.getsockname()[1]
    entry = {"address": f"127.0.0.1:{port}", **(listen or {})}
    if pki is not None:
        entry.update(tls_cert=pki.cert, tls_key=pki.key)
    settings = {"listen": [entry], "header_timeout": "10s", **(server or {})}
    config = parse_config(proxy_config_dict(upstreams, routes, settings, upstream_options), "test.toml")
    process = ProxyProcess(config, listeners=[(config.server.listen[0], sock)])
    proxy = RunningProxy(process, process.start_in_thread(), port)
    if pki is not None:
        proxy.url = f"https://127.0.0.1:{port}"
    return proxy


def stop_quietly(proxy: RunningProxy) -> None:
    proxy.process.stop(force=True)
    proxy.thread.join(PROXY_STOP_TIMEOUT)


class H2Client:
    """A raw HTTP/2 client: the test decides every frame; ``until`` reads until an event shows up."""

    def __init__(self, sock: socket.socket, **config):
        self.sock = sock
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8",
                                                                     **config))
        self.events: list = []
        self.closed = False
        self.terminated = False  # a GOAWAY arrived: h2 takes no frame after it
        self._unread = b""  # the start of a frame whose end has not arrived yet
        self.auto_ack = True  # give each DATA frame's window back as it arrives (False: a client not reading)
        self.unparsed = b""  # raw bytes read past the frame ``frames_until_close(until=...)`` stopped at

    @classmethod
    def connect(cls, port: int, tls_context: ssl.SSLContext | None = None, prelude: bytes = b"",
                **config) -> "H2Client":
        """``prelude``: bytes sent before anything else (a PROXY protocol header)."""
        sock = socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT)
        if prelude:
            sock.sendall(prelude)
        if tls_context is not None:
            sock = tls_context.wrap_socket(sock, server_hostname="127.0.0.1")
        client = cls(sock, **config)
        client.h2.initiate_connection()
        client.flush()
        client.until(lambda e: isinstance(e, h2.events.RemoteSettingsChanged))
        return client

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.sock.sendall(data)

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, path: str = "/", method: str = "GET", headers=(), body: bytes | None = None,
                end: bool = True) -> int:
        stream_id = self.h2.get_next_available_stream_id()
        block = [(":method", method), (":path", path), (":scheme", "http"), (":authority", "h2.test"), *headers]
        self.h2.send_headers(stream_id, block, end_stream=end and body is None)
        if body is not None:
            self.h2.send_data(stream_id, body, end_stream=end)
        self.flush()
        return stream_id

    def read_once(self) -> list:
        data = self.sock.recv(65536)
        if not data:
            self.closed = True
            return []
        events = []
        for frame in self._whole_frames(data):
            if self.terminated:
                continue  # a server may still reset streams after its GOAWAY; h2 would raise on them
            events += self.h2.receive_data(frame)
            self.terminated = any(isinstance(event, h2.events.ConnectionTerminated) for event in events)
        for event in events:
            if self.auto_ack and isinstance(event, h2.events.DataReceived) and event.flow_controlled_length:
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        self.flush()
        self.events.extend(events)
        return events

    def _whole_frames(self, data: bytes):
        """Frame by frame, so the events of a GOAWAY are kept whatever follows it in the same read."""
        buffer = self._unread + data
        while len(buffer) >= 9:
            end = 9 + int.from_bytes(buffer[:3], "big")
            if len(buffer) < end:
                break
            yield buffer[:end]
            buffer = buffer[end:]
        self._unread = buffer

    def until(self, predicate, rounds: int = READ_ROUNDS):
        """Read until an event matching ``predicate`` arrives (returned), or the server closes (None)."""
        for event in self.events:
            if predicate(event):
                return event
        for _ in range(rounds):
            if self.closed:
                return None
            for event in self.read_once():
                if predicate(event):
                    return event
        raise AssertionError(f"no matching event in {rounds} reads")

    def response(self, stream_id: int) -> tuple[dict, bytes]:
        """The headers and the whole body of one stream (acknowledging the data as it comes)."""
        ended = self.until(lambda e: isinstance(e, (h2.events.StreamEnded, h2.events.StreamReset))
                           and e.stream_id == stream_id)
        assert isinstance(ended, h2.events.StreamEnded), f"stream {stream_id}: {ended}"
        headers: dict = {}
        body = b""
        for event in self.events:
            if getattr(event, "stream_id", None) != stream_id:
                continue
            if isinstance(event, h2.events.ResponseReceived):
                headers = dict(event.headers)
            elif isinstance(event, h2.events.DataReceived):
                body += event.data
        return headers, body

    def request_after_goaway(self, stream_id: int, path: str) -> None:
        """A request h2 would refuse to send once it saw our GOAWAY: what a client racing the GOAWAY sends."""
        block = self.h2.encoder.encode([(":method", "GET"), (":path", path), (":scheme", "http"),
                                        (":authority", "h2.test")])
        self.send_raw(HeadersFrame(stream_id, data=block, flags=["END_HEADERS", "END_STREAM"]).serialize())

    def frames_until_close(self, limit: int = 10_000, until=None) -> list:
        """Every frame the server sends until it closes (after a GOAWAY h2 itself accepts none): headers
        decoded in place of the raw block, as (frame, headers or None). ``until``: stop after the first
        frame it accepts instead (bytes read past it wait for the next call)."""
        data, frames = self.unparsed, []
        self.unparsed = b""
        while len(frames) < limit:
            while len(data) >= 9:
                frame, length = Frame.parse_frame_header(memoryview(data[:9]))
                if len(data) < 9 + length:
                    break
                frame.parse_body(memoryview(data[9:9 + length]))
                data = data[9 + length:]
                block = self.h2.decoder.decode(frame.data) if isinstance(frame, HeadersFrame) else None
                frames.append((frame, dict(block) if block else None))
                if until is not None and until(frame):
                    self.unparsed = data
                    return frames
            chunk = self.sock.recv(65536)
            if not chunk:
                return frames
            data += chunk
        raise AssertionError(f"more than {limit} frames")

    def goaway(self):
        return self.until(lambda e: isinstance(e, h2.events.ConnectionTerminated))

    def close(self) -> None:
        self.sock.close()
