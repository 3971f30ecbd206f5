"""Scenario 6: hold many idle keep-alive client connections and measure the server meanwhile.

Each connection sends one GET /small, reads the whole response, then stays open and silent.
Opening is bounded by a deadline and a cap on connections in flight; measuring happens while
every opened connection is still held.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Callable, TypeVar

IN_FLIGHT = 200  # connections being opened at once; keeps the accept backlog shallow
PER_CONNECTION_TIMEOUT_S = 15.0
SETTLE_S = 1.0  # let the server park the connections before we look at it
REQUEST = b"GET /small HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: pyproxy-bench-idle\r\n\r\n"

Sample = TypeVar("Sample")


class ResponseError(RuntimeError):
    """The server answered something other than a complete 200 response."""


@dataclass
class IdleOutcome:
    wanted: int
    opened: int
    failures: dict[str, int]
    still_open: int
    sample: object


def hold_idle_connections(port: int, count: int, open_timeout_s: float,
                          measure: Callable[[], Sample]) -> IdleOutcome:
    return asyncio.run(_hold(port, count, open_timeout_s, measure))


async def _hold(port: int, count: int, open_timeout_s: float, measure: Callable[[], Sample]) -> IdleOutcome:
    limiter = asyncio.Semaphore(IN_FLIGHT)
    tasks = [asyncio.create_task(_open_one(port, limiter)) for _ in range(count)]
    done, pending = await asyncio.wait(tasks, timeout=open_timeout_s)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    streams, failures = _sort_outcomes(done)
    if pending:
        failures["not opened before the deadline"] = len(pending)
    try:
        await asyncio.sleep(SETTLE_S)
        sample = measure()
        still_open = sum(1 for reader, _ in streams if not reader.at_eof())
    finally:
        await _close_all(streams)
    return IdleOutcome(count, len(streams), failures, still_open, sample)


async def _open_one(port: int, limiter: asyncio.Semaphore):
    async with limiter:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port),
                                                PER_CONNECTION_TIMEOUT_S)
        try:
            writer.write(REQUEST)
            await asyncio.wait_for(_read_response(reader), PER_CONNECTION_TIMEOUT_S)
        except BaseException:
            writer.close()
            raise
        return reader, writer


async def _read_response(reader: asyncio.StreamReader) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or parts[1] != "200":
        raise ResponseError(f"status line {status_line!r}")
    length = _content_length(header_lines)
    if length is None:
        raise ResponseError("response without Content-Length")
    await reader.readexactly(length)


def _content_length(header_lines: list[str]) -> int | None:
    for line in header_lines:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            return int(value.strip())
    return None


def _sort_outcomes(done: set[asyncio.Task]) -> tuple[list, dict[str, int]]:
    streams, failures = [], {}
    for task in done:
        error = task.exception()
        if error is None:
            streams.append(task.result())
        else:
            kind = type(error).__name__
            failures[kind] = failures.get(kind, 0) + 1
    return streams, failures


async def _close_all(streams: list) -> None:
    for _, writer in streams:
        writer.close()
    await asyncio.gather(*(writer.wait_closed() for _, writer in streams), return_exceptions=True)
