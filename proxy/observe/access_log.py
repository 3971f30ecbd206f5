"""Access log: one line per proxied request, written off the request path.

Request threads only append ``(wall time, record)`` to a bounded deque (no lock, no formatting); one
writer thread formats what has piled up and writes it in one go. If the disk (or a piped stdout)
stalls and the deque fills, lines are dropped and counted (``dropped``, also in /metrics) rather than
making clients wait for the log. ``access = "off"`` installs no observer at all: nothing is queued or
formatted. Request bodies never reach the log: ``RequestRecord`` has none.

Formats:
- ``combined``: Apache/nginx combined (the size is the body's, head excluded: nginx's $body_bytes_sent),
  then upstream, server, duration in seconds and request id:
  ``client - - [10/Oct/2000:13:55:36 +0000] "GET /a HTTP/1.1" 200 512 "referer" "agent" api 127.0.0.1:9001 0.012 9f2c…``
- ``json``: one object per line with time, client, method, path, status, bytes (heads included),
  body_bytes, duration_ms, upstream, server, request_id (plus host, version, user_agent, referer).
- on a terminal, ``combined`` becomes a human-friendly line instead (local time, status coloured by
  class, aligned method/path columns, upstream → server, duration): what you want in the shell while
  developing. Piped or redirected output stays plain ``combined``; ``NO_COLOR`` turns colour off.
"""

from __future__ import annotations

import collections
import datetime
import errno
import functools
import io
import json
import logging
import math
import os
import stat
import sys
import threading
import time
from typing import Callable, TextIO

from proxy.http.proxy_protocol import ThrottledLog

log = logging.getLogger("pyproxy.access")

DEFAULT_QUEUE_SIZE = 10000  # lines buffered before dropping: ~seconds of a busy proxy's traffic
# POSIX: a pipe write of at most PIPE_BUF bytes is atomic. Worker processes share stdout: a larger
# write can be split and interleaved with another worker's, cutting lines in two (journald, docker logs).
PIPE_BUF = getattr(os, "PIPE_BUF", None) or 4096
STOP_TIMEOUT = 5.0
BATCH_LINES = 256  # lines formatted and written per write(2) at most, then flushed
# More than a batch queued means the writer is behind (a stalled pipe, a full disk): a record queued
# then is copied down to the fields a line reads (LoggedFields), so a full queue holds short strings,
# not every request's parsed head (numbers in docs/performance.md).
COMPACT_AFTER = BATCH_LINES
_STOP = object()
_REOPEN = object()  # wakes the writer: open the file again by name (SIGUSR1, SIGHUP)


def _escape(value: str | None) -> str:
    """A field's content: escape what would break the line, as nginx does (\\xHH): quotes, backslashes,
    control characters, and every byte past ASCII. Header values are bytes read as latin-1, so "é"
    sent in UTF-8 is two characters here: written as they are, they became "Ã©" in the file."""
    if value is None:
        return "-"
    if value.isascii() and value.isprintable() and '"' not in value and "\\" not in value:
        return value
    return "".join(ch if ch.isascii() and ch.isprintable() and ch not in '"\\' else _hex_escape(ch) for ch in value)


def _hex_escape(ch: str) -> str:
    raw = ch.encode("latin-1") if ord(ch) < 256 else ch.encode("utf-8")  # the byte the client sent
    return "".join(f"\\x{byte:02X}" for byte in raw)


def _as_sent(value: str | None) -> str | None:
    """JSON's text: a header value's latin-1 characters turned back into the bytes the client sent, read
    as UTF-8 (a byte that is not UTF-8 becomes \\xHH), instead of "Ã©" for "é"."""
    if value is None or value.isascii():
        return value
    try:
        return value.encode("latin-1").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # not from the wire (latin-1 can hold every byte): already text
        return value


# -- time stamps: formatted once per second, not once per line ----------------------------------------

def _split_time(when: float) -> tuple[int, int]:
    """(whole seconds, microseconds) of a timestamp, rounded as datetime.fromtimestamp rounds it, so
    a stamp built from them is the one datetime would print."""
    second = math.floor(when)
    micro = round((when - second) * 1e6)
    if micro >= 1_000_000:
        second, micro = second + 1, micro - 1_000_000
    return second, micro


@functools.lru_cache(maxsize=8)
def _combined_stamp(second: int) -> str:
    return datetime.datetime.fromtimestamp(second, datetime.timezone.utc).strftime("%d/%b/%Y:%H:%M:%S +0000")


@functools.lru_cache(maxsize=8)
def _iso_second(second: int) -> str:
    return datetime.datetime.fromtimestamp(second, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")


@functools.lru_cache(maxsize=8)
def _local_clock(second: int) -> str:
    return datetime.datetime.fromtimestamp(second).strftime("%H:%M:%S")


_JSON = json.JSONEncoder(ensure_ascii=False)
_json_string = json.encoder.encode_basestring  # json.dumps(..., ensure_ascii=False)'s escaping, in C


def _json(value) -> str:
    """One JSON value exactly as json.dumps(value, ensure_ascii=False) writes it; the common types
    without building an encoder (json.dumps builds one per call, a third of a line's cost)."""
    if value is None:
        return "null"
    kind = type(value)
    if kind is str:
        return _json_string(value)
    if kind is int:
        return int.__repr__(value)
    if kind is float and math.isfinite(value):
        return float.__repr__(value)
    return _JSON.encode(value)


def format_combined(record, when: float) -> str:
    stamp = _combined_stamp(_split_time(when)[0])
    request_line = _escape(f"{record.method} {record.target} {record.version}")
    return (f'{record.client_ip} - - [{stamp}] "{request_line}" {record.status} {record.body_bytes} '
            f'"{_escape(record.referer)}" "{_escape(record.user_agent)}" '
            f'{_escape(record.upstream)} {_escape(record.server)} {record.duration:.3f} {_escape(record.request_id)}')


def format_json(record, when: float) -> str:
    second, micro = _split_time(when)
    return (f'{{"time": "{_iso_second(second)}.{micro // 1000:03d}Z", "client": {_json(record.client_ip)}, '
            f'"method": {_json(record.method)}, "path": {_json(_as_sent(record.target))}, '
            f'"version": {_json(record.version)}, "host": {_json(_as_sent(record.host))}, '
            f'"status": {_json(record.status)}, "bytes": {_json(record.bytes_sent)}, "body_bytes": {_json(record.body_bytes)}, '
            f'"duration_ms": {_json(round(record.duration * 1000, 3))}, "upstream": {_json(record.upstream)}, '
            f'"server": {_json(record.server)}, "request_id": {_json(_as_sent(record.request_id))}, '
            f'"user_agent": {_json(_as_sent(record.user_agent))}, "referer": {_json(_as_sent(record.referer))}}}')


# ANSI SGR colours by status class: 2xx green, 3xx cyan, 4xx yellow, 5xx red (0xx: proxy gave up early).
STATUS_COLOURS = {2: "32", 3: "36", 4: "33", 5: "31"}
PATH_COLUMN = 40  # wide enough for most paths; longer ones are cut with "…" to keep columns aligned


def format_terminal(record, when: float, colour: bool = True) -> str:
    """One aligned, coloured line for a person watching a terminal."""
    stamp = _local_clock(_split_time(when)[0])
    status = str(record.status or "-")
    if colour:
        status = f"\033[{STATUS_COLOURS.get(record.status // 100, '0')}m{status}\033[0m"
    target = _escape(record.target)
    if len(target) > PATH_COLUMN:
        target = target[: PATH_COLUMN - 1] + "…"
    where = f"{record.upstream} → {record.server}" if record.server else (record.upstream or "-")
    return (f"{stamp}  {status}  {record.method:<7} {target:<{PATH_COLUMN}}  {where:<34} "
            f"{record.duration * 1000:8.1f} ms")


FORMATTERS: dict[str, Callable] = {"combined": format_combined, "json": format_json}


class LoggedFields:
    """The fields the line formats read, copied from a record: a record keeps the request's parsed
    head (for User-Agent and Referer) and the response head it sent, tens of KiB with large headers."""

    __slots__ = ("client_ip", "method", "target", "version", "host", "status", "bytes_sent", "body_bytes",
                 "duration", "upstream", "server", "request_id", "user_agent", "referer")

    def __init__(self, record):
        self.client_ip, self.method, self.target, self.version = (record.client_ip, record.method,
                                                                  record.target, record.version)
        self.host, self.status, self.bytes_sent, self.body_bytes = (record.host, record.status,
                                                                    record.bytes_sent, record.body_bytes)
        self.duration, self.upstream, self.server, self.request_id = (record.duration, record.upstream,
                                                                      record.server, record.request_id)
        self.user_agent, self.referer = record.user_agent, record.referer


class AccessLog:
    """An observer (``observe(record)``) and a service (``start()``/``stop()``) owning the writer thread."""

    def __init__(self, target: str, fmt: str = "combined", max_queue: int = DEFAULT_QUEUE_SIZE,
                 wall_clock=time.time):
        if fmt not in FORMATTERS:
            raise ValueError(f"unknown access log format {fmt!r} (expected one of: {', '.join(FORMATTERS)})")
        self.target = target
        self.format = FORMATTERS[fmt]
        self.wall_clock = wall_clock
        self.max_queue = max_queue
        self.written = 0
        self.dropped = 0
        # Appends and pops of a deque are atomic: request threads append, the writer pops. Stop and
        # reopen markers go in the same deque, in order with the lines, and are never dropped.
        self._pending: collections.deque = collections.deque()
        self._wakeup = threading.Event()  # set when something was queued; the writer clears it
        self._drop_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stream: TextIO | io.FileIO | None = None  # a file's is binary (see _open)
        self._reopen_wanted = False  # set by reopen(); the writer thread acts on it
        self._shared_pipe = False  # writes go out in whole lines of at most PIPE_BUF bytes (see _pieces)
        self._cut_line = False  # a failed write left part of a line in the file (see _write_file)
        self._failures = ThrottledLog(log, limit=1)  # a full disk: one line a minute, not one per write
        self._late: collections.deque | None = None  # the queue of a log this one took over (adopt)

    # -- hot path ------------------------------------------------------------------------------------
    def observe(self, record) -> None:
        pending = self._pending
        queued = len(pending)
        # Checked without a lock: threads racing here can overshoot the bound by one line each.
        if queued >= self.max_queue:
            with self._drop_lock:
                self.dropped += 1
            return
        if queued >= COMPACT_AFTER:
            record = LoggedFields(record)
        pending.append((self.wall_clock(), record))
        if not self._wakeup.is_set():  # a plain read; setting it (a lock) only when the writer sleeps
            self._wakeup.set()

    __call__ = observe

    # -- service -------------------------------------------------------------------------------------
    def start(self) -> None:
        self._stream = self._open()
        self._shared_pipe = _is_pipe(self._stream)
        if self.format is format_combined and _is_terminal(self._stream):
            colour = not os.environ.get("NO_COLOR")
            self.format = lambda record, when: format_terminal(record, when, colour)
        self._thread = threading.Thread(target=self._write_loop, name="pyproxy-access-log", daemon=True)
        self._thread.start()

    def reopen(self) -> None:
        """Write further lines to a file opened again by name (nginx's ``kill -USR1``): after logrotate
        renamed the file, lines go to a new one at the configured path. Lines queued before the call
        go to the old file, later ones to the new; none is lost or written twice."""
        if self._thread is None or self.target in ("stdout", "stderr"):
            return
        self._reopen_wanted = True
        self._pending.append(_REOPEN)  # in order with the lines
        self._wakeup.set()

    def adopt(self, retired: "AccessLog") -> None:
        """Write the lines handed to ``retired`` (stopped) from now on: a request thread that read the
        observer list just before a reload swapped it calls the old log's observe, maybe after that
        log stopped; its line would wait in a queue no writer drains."""
        self._late = retired._pending
        retired._wakeup = self._wakeup
        self._wakeup.set()

    def _take_late_lines(self) -> None:
        """Move lines from the adopted queue to the front of ours: they are older than what is there."""
        late, items = self._late, []
        while late:
            item = late.popleft()
            if item is not _STOP and item is not _REOPEN:
                items.append(item)
        self._pending.extendleft(reversed(items))

    def stop(self) -> bool:
        """Write what is queued and stop; False if the writer was stuck (its lines are not written)."""
        if self._thread is None:
            return False
        self._pending.append(_STOP)  # after every line already queued
        self._wakeup.set()
        thread, self._thread = self._thread, None
        thread.join(timeout=STOP_TIMEOUT)
        stuck = thread.is_alive()
        if stuck:  # never write beside a stuck writer
            log.warning("access log writer is stuck; %d lines not written", len(self._pending))
        else:
            self._write_leftovers()
        if self._stream is not None and self.target not in ("stdout", "stderr"):
            self._stream.close()
        return not stuck

    def _write_leftovers(self) -> None:
        """Lines queued behind the stop marker (a request that finished just as a reload swapped logs)."""
        if self._late:
            self._take_late_lines()
        leftovers = []
        while self._pending:
            item = self._pending.popleft()
            if item is not _STOP and item is not _REOPEN:
                leftovers.append(item)
        self._write([line for item in leftovers for line in (self._format_line(*item),) if line is not None])

    def _open(self) -> TextIO | io.FileIO:
        if self.target in ("stdout", "stderr"):
            # None when the process started with that descriptor closed (``>&-``).
            return getattr(sys, self.target) or _ClosedStream(self.target)
        # Unbuffered: the bytes of a write the disk refused are dropped with it, not kept in a buffer
        # and written later (out of order, after being counted dropped) or again when the file closes.
        return open(self.target, "ab", buffering=0)

    def _write_loop(self) -> None:
        while True:
            self._wakeup.wait()
            # Cleared before draining: a line appended after the drain's last pop finds it clear and
            # sets it again, so no line waits for a later one to wake the writer.
            self._wakeup.clear()
            if self._late:
                self._take_late_lines()
            if self._drain():
                return

    def _drain(self) -> bool:
        """Format and write everything queued, BATCH_LINES per write; True once the stop marker came."""
        pending = self._pending
        while pending:
            lines = []
            for _ in range(min(len(pending), BATCH_LINES)):
                item = pending.popleft()
                if item is _STOP:
                    self._write(lines)
                    return True
                if item is _REOPEN:
                    self._write(lines)  # what came before the reopen goes to the old file
                    lines = []
                    self._reopen_stream()
                else:
                    line = self._format_line(*item)
                    if line is not None:
                        lines.append(line)
            self._write(lines)
        return False

    def _reopen_stream(self) -> None:
        """On the writer thread. A file that cannot be opened keeps the old one (one error line)."""
        if not self._reopen_wanted:
            return  # a second marker for a reopen already done
        self._reopen_wanted = False
        try:
            fresh = self._open()
        except OSError as exc:
            log.error("cannot reopen the access log %s: %s; still writing to the file opened before",
                      self.target, exc.strerror or exc)
            return
        old, self._stream = self._stream, fresh
        self._cut_line = False  # a line cut short stays in the old file
        old.close()
        log.info("access log %s reopened", self.target)

    def _format_line(self, when: float, record) -> str | None:
        try:
            return self.format(record, when) + "\n"
        except Exception:  # a formatting bug must not kill the writer (and silently drop every later line)
            log.exception("cannot format access log line for %r", record)
            return None

    def _write(self, lines: list[str]) -> None:
        if not lines:
            return
        written = 0
        try:
            for piece in (_pieces(lines) if self._shared_pipe else ("".join(lines),)):
                if isinstance(self._stream, io.RawIOBase):  # a file, unbuffered
                    self._write_file(piece.encode("utf-8", "backslashreplace"))
                else:
                    self._stream.write(piece)
                    self._stream.flush()  # one write(2) per piece
                written += piece.count("\n")
        except (OSError, ValueError) as exc:  # disk full, closed pipe: count, keep serving
            written += getattr(exc, "whole_lines", 0)
            with self._drop_lock:
                self.dropped += len(lines) - written
            self._failures.warning("access log write failed: %s", exc)
        self.written += written

    def _write_file(self, data: bytes) -> None:
        """All of ``data``, across short writes. A full disk can cut a write short mid-line: the
        error raised then says how many ``whole_lines`` went in, and the cut line is ended before the
        next write, so that no later line is glued to it."""
        if self._cut_line:
            self._stream.write(b"\n")
            self._cut_line = False
        sent = 0
        try:
            while sent < len(data):
                sent += self._stream.write(memoryview(data)[sent:])
        except OSError as exc:
            self._cut_line = sent > 0 and data[sent - 1] != ord("\n")
            exc.whole_lines = data.count(b"\n", 0, sent)
            raise


class _ClosedStream:
    """Stands in for a closed stdout or stderr: every write fails, so the lines are dropped and
    counted (and reported) like those of any failing write."""

    def __init__(self, name: str):
        self.name = name

    def write(self, text: str) -> int:
        raise OSError(errno.EBADF, f"{self.name} is closed")

    def flush(self) -> None:
        pass


def _is_pipe(stream) -> bool:
    """A pipe or socket (stdout under systemd or docker), where only small writes are atomic. Regular
    files are appended to with O_APPEND, one write per batch, which Linux does not interleave."""
    try:
        return not stat.S_ISREG(os.fstat(stream.fileno()).st_mode) and not stream.isatty()
    except (AttributeError, OSError, ValueError):  # no file descriptor (a test's StringIO)
        return False


def _pieces(lines: list[str]):
    """Whole lines joined up to PIPE_BUF bytes each (a longer line goes alone: it cannot be atomic)."""
    piece, size = [], 0
    for line in lines:
        length = len(line.encode("utf-8")) if not line.isascii() else len(line)
        if piece and size + length > PIPE_BUF:
            yield "".join(piece)
            piece, size = [], 0
        piece.append(line)
        size += length
    if piece:
        yield "".join(piece)


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def make_access_log(log_config) -> AccessLog | None:
    """The access log a [log] table asks for; None for access = "off" (no observer, no thread)."""
    if log_config.access == "off":
        return None
    return AccessLog(log_config.access, log_config.format)
