"""Connection: the state table, buffered reads (split at every point), EOF, kernel timeouts, writes,
and the zero-copy relay between real sockets."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core import Connection, ConnectionClosed, ConnectionState, IllegalTransition, LimitExceeded
from core import zerocopy

S = ConnectionState
# The lifecycle as the design states it, written out independently of core's own table so that a
# change to the table shows up here (NEW → READING → PROCESSING → WRITING → IDLE/READING/TUNNEL).
EXPECTED_MOVES = {
    S.NEW: {S.READING, S.CLOSED},
    S.READING: {S.PROCESSING, S.IDLE, S.CLOSED},  # IDLE: a partial request parked until more arrives
    S.PROCESSING: {S.WRITING, S.HELD, S.CLOSED},  # HELD: a stalled transfer carried on by the relay
    S.WRITING: {S.IDLE, S.READING, S.TUNNEL, S.HELD, S.CLOSED},
    S.HELD: {S.PROCESSING, S.WRITING, S.CLOSED},
    S.IDLE: {S.READING, S.CLOSED},
    S.TUNNEL: {S.CLOSED},
    S.CLOSED: set(),
}
IO_TIMEOUT = 5.0  # bound for every blocking op in these tests


@pytest.fixture
def pair():
    """(Connection over one end of a socketpair, the other end)."""
    left, right = socket.socketpair()
    right.settimeout(IO_TIMEOUT)
    conn = Connection(left, peer=("pair", 0))
    conn.set_timeouts(IO_TIMEOUT)
    yield conn, right
    conn.close()
    right.close()


class ScriptedSocket:
    """Hands out pre-cut chunks, one per recv, so a test controls exactly where reads split."""

    def __init__(self, chunks):
        self.chunks = list(chunks)
        self.recv_sizes = []

    def recv(self, size):
        self.recv_sizes.append(size)
        if not self.chunks:
            return b""
        chunk = self.chunks.pop(0)
        if len(chunk) > size:
            chunk, rest = chunk[:size], chunk[size:]
            self.chunks.insert(0, rest)
        return chunk

    def fileno(self):
        return -1

    def close(self):
        pass


def scripted(chunks) -> Connection:
    return Connection(ScriptedSocket(chunks), peer=("scripted", 0))


# -- state machine ------------------------------------------------------------------------------

def test_state_table_covers_every_state():
    assert set(EXPECTED_MOVES) == set(ConnectionState)


@pytest.mark.parametrize("start", list(ConnectionState), ids=lambda s: s.name)
def test_every_move_from_every_state(start):
    for target in ConnectionState:
        left, right = socket.socketpair()
        with contextlib.closing(right):
            conn = Connection(left, peer=None)
            conn.state = start  # place it directly: the walk to `start` is tested below
            if target in EXPECTED_MOVES[start]:
                conn.transition(target)
                assert conn.state is target
            else:
                with pytest.raises(IllegalTransition):
                    conn.transition(target)
                assert conn.state is start, "a refused move must not change the state"
            left.close()


def test_the_idle_clock_restarts_each_time_the_connection_comes_to_rest():
    """last_active is what the reaper measures idle_timeout from: set at accept and at every move to
    IDLE; the moves of a request in between leave it (they need no clock read)."""
    ticks = iter(range(100))
    left, right = socket.socketpair()
    with contextlib.closing(right):
        conn = Connection(left, peer=None, clock=lambda: next(ticks))
        assert conn.last_active == 0
        walk = [S.READING, S.PROCESSING, S.WRITING, S.IDLE, S.READING, S.PROCESSING, S.WRITING,
                S.IDLE, S.READING, S.PROCESSING, S.WRITING, S.READING, S.PROCESSING, S.WRITING,
                S.TUNNEL, S.CLOSED]
        seen = []
        for state in walk:
            conn.transition(state)
            seen.append(conn.last_active)
        assert conn.closed
        assert seen == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2]


def test_transition_to_closed_releases_the_socket():
    """A handler may end with transition(CLOSED); the socket must not leak (close() is then a no-op)."""
    left, right = socket.socketpair()
    right.settimeout(IO_TIMEOUT)
    with contextlib.closing(right):
        conn = Connection(left, peer=None)
        forgotten = []
        conn.on_close = forgotten.append
        conn.transition(S.READING)
        conn.transition(S.CLOSED)
        conn.close()
        assert left.fileno() == -1
        assert right.recv(1) == b""  # the peer sees EOF
        assert forgotten == [conn]


def test_claim_only_moves_from_the_expected_state():
    left, right = socket.socketpair()
    with contextlib.closing(right), contextlib.closing(left):
        conn = Connection(left, peer=None)
        assert not conn.claim(S.IDLE, S.CLOSED)
        assert conn.state is S.NEW
        assert conn.claim(S.NEW, S.CLOSED)
        assert conn.closed


def test_close_is_idempotent_and_calls_on_close_once(pair):
    conn, right = pair
    calls = []
    conn.on_close = calls.append
    conn.close()
    conn.close()
    assert calls == [conn]
    assert right.recv(1) == b""


# -- reading ------------------------------------------------------------------------------------

def test_read_until_delimiter_split_across_recvs():
    conn = scripted([b"GET / HT", b"TP/1.1\r", b"\n\r", b"\nBODY"])
    assert conn.read_until(b"\r\n\r\n", 100) == b"GET / HTTP/1.1\r\n\r\n"
    assert conn.read_exact(4) == b"BODY"


def test_read_until_one_byte_at_a_time_keeps_the_rest_buffered():
    stream = b"first\r\nsecond\r\nthird"
    conn = scripted([bytes([b]) for b in stream])
    assert conn.read_until(b"\r\n", 64) == b"first\r\n"
    assert conn.read_until(b"\r\n", 64) == b"second\r\n"
    with pytest.raises(ConnectionClosed):
        conn.read_until(b"\r\n", 64)
    assert conn.read_some() == b"third"  # what arrived before EOF is not lost


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=20))
def test_read_until_at_random_split_points(cuts):
    lines = [b"alpha\r\n", b"\r\n", b"b\rc\nd\r\n", b"x" * 30 + b"\r\n"]
    stream = b"".join(lines)
    chunks, rest = [], stream
    for cut in cuts:
        if not rest:
            break
        chunks.append(rest[:cut])
        rest = rest[cut:]
    if rest:
        chunks.append(rest)
    conn = scripted(chunks)
    assert [conn.read_until(b"\r\n", 64) for _ in lines] == lines
    with pytest.raises(ConnectionClosed):
        conn.read_until(b"\r\n", 64)


def test_read_until_limit_is_inclusive_of_the_delimiter():
    assert scripted([b"abc\n"]).read_until(b"\n", 4) == b"abc\n"
    with pytest.raises(LimitExceeded):
        scripted([b"abcd\n"]).read_until(b"\n", 4)


def test_read_until_limit_without_delimiter_does_not_wait_for_more():
    sock = ScriptedSocket([b"a" * 10, b"never read\n"])
    conn = Connection(sock, peer=None)
    with pytest.raises(LimitExceeded):
        conn.read_until(b"\n", 10)
    assert sock.chunks == [b"never read\n"]


@pytest.mark.parametrize("chunks", [[b"abcdefg\n"], [b"abc", b"defg\n"], [b"ab", b"cd", b"efg\n"]])
def test_read_until_over_limit_keeps_the_bytes_buffered(chunks):
    conn = scripted(chunks)
    with pytest.raises(LimitExceeded):
        conn.read_until(b"\n", 5)
    assert conn.read_exact(8) == b"abcdefg\n"


def test_read_exact_across_chunks_and_eof():
    conn = scripted([b"012", b"3456", b"789"])
    assert conn.read_exact(5) == b"01234"
    assert conn.read_exact(4) == b"5678"
    with pytest.raises(ConnectionClosed):
        conn.read_exact(2)


def test_unread_pushes_bytes_back_in_front():
    conn = scripted([b"world\n"])
    conn.unread(b"hello ")
    assert conn.has_buffered()
    assert conn.read_until(b"\n", 64) == b"hello world\n"
    conn.unread(b"")
    assert not conn.has_buffered()
    conn.unread(b"b")
    conn.unread(b"a")
    assert conn.read_exact(2) == b"ab"


def test_read_some_serves_the_buffer_before_the_socket():
    conn = scripted([b"from socket"])
    conn.unread(b"buffered")
    assert conn.read_some(3) == b"buf"
    assert conn.read_some() == b"fered"
    assert conn.read_some() == b"from socket"
    assert conn.read_some() == b""


def test_real_socket_reads_and_eof(pair):
    conn, right = pair
    right.sendall(b"line one\nline")
    assert conn.read_until(b"\n", 100) == b"line one\n"
    right.sendall(b" two\n" + b"z" * 1000)
    assert conn.read_until(b"\n", 100) == b"line two\n"
    assert conn.read_exact(1000) == b"z" * 1000
    right.shutdown(socket.SHUT_WR)
    with pytest.raises(ConnectionClosed):
        conn.read_until(b"\n", 100)
    with pytest.raises(ConnectionClosed):
        conn.read_exact(1)
    assert conn.read_some() == b""


# -- timeouts and writes ------------------------------------------------------------------------

class CountingSocket:
    """A socket stand-in that records the options set on it."""

    def __init__(self):
        self.options = []

    def setsockopt(self, level, option, value):
        self.options.append(option)

    def fileno(self):
        return 99


def test_set_timeouts_sets_only_the_direction_that_changed():
    sock = CountingSocket()
    conn = Connection(sock, ("127.0.0.1", 1), timeouts=(None, 0.05))  # as inherited from a listener
    conn.set_timeouts(5.0, 0.05)
    assert sock.options == [socket.SO_RCVTIMEO]
    conn.set_timeouts(5.0, 0.05)
    conn.set_write_timeout(0.05)
    assert sock.options == [socket.SO_RCVTIMEO]  # nothing changed: no syscall
    conn.set_timeouts(1.0, 1.0)
    assert sock.options == [socket.SO_RCVTIMEO, socket.SO_RCVTIMEO, socket.SO_SNDTIMEO]


def test_read_timeout_raises_timeout_error(pair):
    conn, right = pair
    conn.set_timeouts(0.1)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        conn.read_until(b"\n", 100)
    elapsed = time.monotonic() - started
    assert 0.05 <= elapsed < IO_TIMEOUT
    right.sendall(b"late\n")  # the connection still works after a timeout
    assert conn.read_until(b"\n", 100) == b"late\n"


def test_read_exact_timeout(pair):
    conn, right = pair
    conn.set_timeouts(0.1)
    right.sendall(b"ab")
    with pytest.raises(TimeoutError):
        conn.read_exact(3)


def test_write_timeout_raises_timeout_error(pair):
    conn, _right = pair
    conn.set_timeouts(IO_TIMEOUT, 0.1)
    with pytest.raises(TimeoutError):
        conn.sendall(b"x" * (64 * 1024 * 1024))  # nobody reads: the buffers fill up


def test_sendall_delivers_everything(pair):
    conn, right = pair
    payload = os.urandom(3 * 1024 * 1024)
    received = bytearray()
    reader = threading.Thread(target=lambda: received.extend(recv_exact(right, len(payload))))
    reader.start()
    conn.sendall(payload)
    reader.join(IO_TIMEOUT)
    assert bytes(received) == payload


def recv_exact(sock: socket.socket, count: int) -> bytes:
    parts = []
    while count:
        chunk = sock.recv(min(count, 1 << 20))
        if not chunk:
            break
        parts.append(chunk)
        count -= len(chunk)
    return b"".join(parts)


# -- zero-copy relay ----------------------------------------------------------------------------

@pytest.fixture
def tcp_pairs():
    """Two connected TCP pairs over loopback: (src_client, src_server), (dst_server, dst_client)."""
    made = []

    def tcp_pair():
        with socket.create_server(("127.0.0.1", 0)) as listener:
            client = socket.create_connection(listener.getsockname(), timeout=IO_TIMEOUT)
            server, _ = listener.accept()
        server.settimeout(None)
        made.extend([client, server])
        return client, server

    src_client, src_server = tcp_pair()
    dst_client, dst_server = tcp_pair()
    yield (src_client, src_server), (dst_server, dst_client)
    for sock in made:
        sock.close()


@pytest.mark.parametrize("use_splice", [True, False], ids=["splice", "copy"])
def test_splice_from_copies_exact_bytes(tcp_pairs, monkeypatch, use_splice):
    (src_client, src_server), (dst_server, dst_client) = tcp_pairs
    if use_splice and not zerocopy.HAVE_SPLICE:
        pytest.skip("os.splice not available")
    monkeypatch.setattr(zerocopy, "HAVE_SPLICE", use_splice)
    count = 5 * 1024 * 1024 + 123
    payload = os.urandom(count)
    trailer = b"NEXT-REQUEST"
    conn = Connection(dst_server, peer=None)
    conn.set_timeouts(IO_TIMEOUT)
    src_server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, b"\x05" + b"\0" * 15)
    writer = threading.Thread(target=src_client.sendall, args=(payload + trailer,))
    received = bytearray()
    reader = threading.Thread(target=lambda: received.extend(recv_exact(dst_client, count)))
    writer.start()
    reader.start()
    assert conn.splice_from(src_server, count) == count
    writer.join(IO_TIMEOUT)
    reader.join(IO_TIMEOUT)
    assert len(received) == count and bytes(received) == payload
    src_server.settimeout(IO_TIMEOUT)
    assert recv_exact(src_server, len(trailer)) == trailer  # not one byte more was taken


@pytest.mark.parametrize("use_splice", [True, False], ids=["splice", "copy"])
def test_splice_from_raises_peer_closed_on_short_source(tcp_pairs, monkeypatch, use_splice):
    (src_client, src_server), (dst_server, dst_client) = tcp_pairs
    monkeypatch.setattr(zerocopy, "HAVE_SPLICE", use_splice and zerocopy.HAVE_SPLICE)
    conn = Connection(dst_server, peer=None)
    src_client.sendall(b"only ten b")
    src_client.shutdown(socket.SHUT_WR)
    with pytest.raises(zerocopy.PeerClosed):
        conn.splice_from(src_server, 100)
    assert recv_exact(dst_client, 10) == b"only ten b"
    # After a failed splice the thread's pipe is replaced, so a later relay starts clean.
    conn2_src_client, conn2_src_server = socket.socketpair()
    with contextlib.closing(conn2_src_client), contextlib.closing(conn2_src_server):
        conn2_src_client.sendall(b"fresh")
        assert conn.splice_from(conn2_src_server, 5) == 5
        assert recv_exact(dst_client, 5) == b"fresh"


def test_splice_from_refuses_when_input_is_buffered(tcp_pairs):
    (_src_client, src_server), (dst_server, _dst_client) = tcp_pairs
    conn = Connection(dst_server, peer=None)
    conn.unread(b"pending")
    with pytest.raises(RuntimeError):
        conn.splice_from(src_server, 10)


def test_splice_from_zero_bytes_is_a_no_op(tcp_pairs):
    (_src_client, src_server), (dst_server, _dst_client) = tcp_pairs
    assert Connection(dst_server, peer=None).splice_from(src_server, 0) == 0


def test_a_thread_that_spliced_leaves_no_pipe_behind_when_it_ends(tcp_pairs):
    # Each thread keeps one splice pipe for its transfers. Pool threads retire after a burst, and the
    # pipe of one that ended stayed open: two descriptors leaked per retired thread, burst after burst.
    if not zerocopy.HAVE_SPLICE:
        pytest.skip("os.splice not available")
    (src_client, src_server), (dst_server, dst_client) = tcp_pairs
    src_server.settimeout(None)
    dst_server.settimeout(None)
    payload = b"x" * 1000
    results, pipe_files = [], []

    def transfer():
        src_client.sendall(payload)
        results.append(zerocopy.relay(src_server, dst_server, len(payload)))
        pipe_files.extend((fd, os.fstat(fd).st_ino) for fd in zerocopy._thread_pipe())

    worker = threading.Thread(target=transfer)
    worker.start()
    worker.join(IO_TIMEOUT)
    assert results == [len(payload)] and len(pipe_files) == 2
    dst_client.settimeout(IO_TIMEOUT)
    assert recv_exact(dst_client, len(payload)) == payload
    for fd, inode in pipe_files:  # closed (or the number reused since by another file): not the pipe
        with contextlib.suppress(OSError):
            assert os.fstat(fd).st_ino != inode, f"the ended thread's pipe is still open (fd {fd})"
