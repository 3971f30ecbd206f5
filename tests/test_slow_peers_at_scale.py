"""A thousand clients that never read their response and a thousand uploads stalled half-way do not
stop the proxy: a normal client is still answered at once, and the proxy stays small.

The proxy runs as a subprocess so that its threads and resident memory can be read from /proc on
their own; the backend is an asyncio server (thousands of connections on one thread).

Kernel memory sets the mix of slow readers. On loopback a socket's send buffer grows to 4 MiB
(tcp_wmem) whatever the reader's window, so a response up to about that size goes into the kernel
whole and the proxy is done with it (the connection is parked as any idle one). Only larger responses
stall the proxy's writes, and each such reader then ties up about 9 MiB of kernel buffers along the
way (measured): a thousand of them would pass the machine's TCP memory limit (tcp_mem), for any proxy.
So most slow readers here ask for 512 KiB, and a few dozen for 8 MiB, whose transfers are held.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
import tomli_w

from tests.support.ports import free_port
from tests.support.processes import proc_status
from tests.support.proxy import CLIENT_TIMEOUT
from tests.support.timing import wait_for

pytestmark = pytest.mark.timeout(300)

SLOW_READERS = 1000
HELD_READERS = 40  # of the slow readers, those asking for LARGE_RESPONSE_SIZE (held transfers)
STALLED_UPLOADS = 1000
BATCH = 250  # opened at once, then the proxy settles them: a slow reader costs a worker the patience once
THREAD_IDLE_TIMEOUT = "1s"  # the threads a burst added retire this soon (30 s by default)
RESPONSE_SIZE = 512 * 1024
LARGE_RESPONSE_SIZE = 8 * 1024 * 1024
UPLOAD_SIZE = 1024 * 1024
SENT_BEFORE_STALL = 100 * 1024
NORMAL_REQUESTS = 200
MAX_THREADS = 64
MAX_RSS = 300 * 1024 * 1024
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class AsyncBackend:
    """GET /big: RESPONSE_SIZE bytes; POST: reads the whole body, answers its length; else "ok"."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="async-backend", daemon=True)
        self.server = None
        self.port = 0

    def start(self) -> "AsyncBackend":
        self.thread.start()
        future = asyncio.run_coroutine_threadsafe(asyncio.start_server(self._serve, "127.0.0.1", 0, backlog=4096),
                                                  self.loop)
        self.server = future.result(10)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader, writer) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1)) if b"ength:" in head else 0
                if length:
                    await reader.readexactly(length)
                    body = str(length).encode()
                elif head.startswith(b"GET /big "):
                    body, size = None, RESPONSE_SIZE
                elif head.startswith(b"GET /large "):
                    body, size = None, LARGE_RESPONSE_SIZE
                else:
                    body = b"ok"
                size = size if body is None else len(body)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
                if body is None:
                    piece = b"x" * 65536
                    for _ in range(size // len(piece)):
                        writer.write(piece)
                        await writer.drain()  # bounded buffering: the proxy reads at its pace
                else:
                    writer.write(body)
                await writer.drain()
        writer.close()

    def stop(self) -> None:
        async def close():
            self.server.close()
        asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def connections(admin_port: int, state: str) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=CLIENT_TIMEOUT) as response:
        text = response.read().decode()
    found = re.search(r'pyproxy_client_connections\{state="%s"\} (\d+)' % state, text)
    return int(found.group(1)) if found else 0


def settled(admin_port: int) -> int:
    """Connections that hold no worker: held transfers and parked keep-alive ones."""
    return connections(admin_port, "held") + connections(admin_port, "idle")


@pytest.fixture
def proxy_in_front_of_async_backend(tmp_path):
    backend = AsyncBackend().start()
    port, admin_port = free_port(), free_port()
    document = {
        "server": {"listen": f"127.0.0.1:{port}", "max_threads": 256, "thread_idle_timeout": THREAD_IDLE_TIMEOUT},
        "admin": {"listen": f"127.0.0.1:{admin_port}"},
        "log": {"access": "off", "level": "warning"},
        "upstreams": {"web": {"servers": [f"127.0.0.1:{backend.port}"], "read_timeout": "60s"}},
        "routes": [{"path": "/", "upstream": "web"}],
    }
    config = tmp_path / "proxy.toml"
    config.write_bytes(tomli_w.dumps(document).encode())
    process = subprocess.Popen([sys.executable, "-m", "proxy.serve.cli", "-c", str(config)], cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: _answers(port, process), timeout=15, what="the proxy to listen")
        yield process, port, admin_port
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        process.stderr.close()
        backend.stop()


def _answers(port: int, process: subprocess.Popen) -> bool:
    assert process.poll() is None, process.stderr.read().decode()
    try:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
        try:
            connection.request("GET", "/")
            return connection.getresponse().status == 200
        finally:
            connection.close()
    except OSError:
        return False


def open_slow_reader(port: int, path: str = "/big") -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # not reading fills up at once
    sock.settimeout(CLIENT_TIMEOUT)
    sock.connect(("127.0.0.1", port))
    sock.sendall(b"GET %s HTTP/1.1\r\nHost: t\r\n\r\n" % path.encode())
    return sock


def open_held_reader(port: int) -> socket.socket:
    return open_slow_reader(port, "/large")


def open_stalled_upload(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT)
    sock.sendall(b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % UPLOAD_SIZE
                 + b"u" * SENT_BEFORE_STALL)
    return sock


def test_slow_readers_and_stalled_uploads_do_not_stop_the_proxy(proxy_in_front_of_async_backend):
    process, port, admin_port = proxy_in_front_of_async_backend
    clients = []
    try:
        openers = ([open_held_reader] * HELD_READERS + [open_slow_reader] * (SLOW_READERS - HELD_READERS)
                   + [open_stalled_upload] * STALLED_UPLOADS)
        peak_threads = 0
        for start in range(0, len(openers), BATCH):
            clients.extend(opener(port) for opener in openers[start:start + BATCH])
            peak_threads = max(peak_threads, proc_status(process.pid, "Threads"))
            wait_for(lambda: settled(admin_port) >= len(clients), timeout=30,
                     what=f"{len(clients)} connections held or parked")
        # The burst grew the pool while each slow reader waited out the patience; those threads retire.
        wait_for(lambda: proc_status(process.pid, "Threads") < MAX_THREADS, timeout=30,
                 what="the threads a burst added to retire")

        latencies, errors = [], 0
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=CLIENT_TIMEOUT)
        for _ in range(NORMAL_REQUESTS):
            started = time.monotonic()
            try:
                connection.request("GET", "/")
                response = connection.getresponse()
                ok = response.status == 200 and response.read() == b"ok"
            except OSError:
                ok = False
                connection.close()
            errors += not ok
            latencies.append(time.monotonic() - started)
        connection.close()

        threads = proc_status(process.pid, "Threads")
        rss = proc_status(process.pid, "VmRSS") * 1024
        latencies.sort()
        p99 = latencies[int(len(latencies) * 0.99) - 1]
        print(f"\n{SLOW_READERS} slow readers + {STALLED_UPLOADS} stalled uploads connected: normal GET p50 "
              f"{latencies[len(latencies) // 2] * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, max "
              f"{latencies[-1] * 1000:.1f} ms, {errors} errors; proxy {threads} threads (peak {peak_threads} while "
              f"they arrived), {rss / 2**20:.0f} MiB RSS")
        assert errors == 0
        assert latencies[-1] < 2.0  # generous: without holding, these requests time out
        assert threads < MAX_THREADS
        assert rss < MAX_RSS
        # The large responses and the uploads are held; the small responses too where the kernel's
        # buffers did not take them whole (less room under TCP memory pressure), the rest parked idle.
        assert connections(admin_port, "held") >= HELD_READERS + STALLED_UPLOADS
        # Exactly the slow clients, once the proxy has seen the closes of the others (the normal
        # client's, the readiness probes'): on a busy machine that can take a moment.
        wait_for(lambda: settled(admin_port) == len(clients), timeout=30,
                 what=f"exactly the {len(clients)} slow connections held or parked")
    finally:
        for sock in clients:
            sock.close()
