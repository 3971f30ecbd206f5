"""core: pyproxy's protocol-agnostic networking layer.

- ``SocketServer``: listening sockets and the accept loop; parks idle keep-alive connections in an
  epoll set (no thread held), reaps them after a timeout, handles signals and the phased shutdown.
- ``ThreadPool``: bounded worker threads that grow when work waits and retire when idle.
- ``Connection`` / ``ConnectionState``: a client socket with buffered reads, writes, kernel-side
  timeouts, zero-copy relay, and its lifecycle state machine.

``core`` knows nothing about HTTP: it calls a handler with each ``Connection``, as CPython's
``socketserver.BaseServer`` calls its ``RequestHandlerClass``. ``proxy`` imports ``core``, never
the other way round.
"""

from .connection import Connection, ConnectionClosed, ConnectionState, IllegalTransition, LimitExceeded
from .socket_server import Listener, SocketServer, bind_listener
from .thread_pool import ThreadPool

__all__ = [
    "SocketServer",  # the accept loop: listeners, parking, signals, shutdown
    "Connection",  # a client socket with buffered I/O and a state machine
    "ConnectionState",  # NEW → READING → PROCESSING → WRITING → IDLE/CLOSED (+ TUNNEL)
    "ThreadPool",  # bounded, growing and shrinking worker threads
    "Listener", "bind_listener", "ConnectionClosed", "LimitExceeded", "IllegalTransition",
]
