"""The access log's cheap path: request threads only queue, the writer formats in batches, time stamps
are formatted once per second, and the JSON line is built without an encoder per line."""

from __future__ import annotations

import datetime
import json
import threading
from types import SimpleNamespace

import pytest

from proxy.observe import access_log
from proxy.observe.access_log import AccessLog, format_combined, format_json
from tests.support.timing import wait_for
from tests.support.records import WHEN, Record

pytestmark = pytest.mark.timeout(60)

DEADLINE = 30.0


REAL_DATETIME = datetime.datetime


class CountingDatetime(REAL_DATETIME):
    """datetime.datetime, counting how often a timestamp is turned into a date."""

    calls = 0

    @classmethod
    def fromtimestamp(cls, *args, **kwargs):
        CountingDatetime.calls += 1
        return REAL_DATETIME.fromtimestamp(*args, **kwargs)


FORMATTERS = [format_combined, format_json, access_log.format_terminal]


@pytest.mark.parametrize("formatter", FORMATTERS)
def test_a_second_of_lines_formats_its_time_stamp_once(monkeypatch, formatter):
    monkeypatch.setattr(access_log, "datetime", SimpleNamespace(datetime=CountingDatetime,
                                                                timezone=datetime.timezone))
    CountingDatetime.calls = 0
    second = WHEN + 10**6 * (1 + FORMATTERS.index(formatter))  # one no other test formatted (stamps are kept)
    lines = {formatter(Record(target=f"/{n}"), second + n / 1000) for n in range(1000)}
    assert len(lines) == 1000
    assert CountingDatetime.calls <= 1


def old_json(record, when: float) -> str:
    """The JSON line as json.dumps wrote it before: the reference for the hand-built one."""
    stamp = datetime.datetime.fromtimestamp(when, datetime.timezone.utc).isoformat(timespec="milliseconds")
    return json.dumps({
        "time": stamp.replace("+00:00", "Z"), "client": record.client_ip, "method": record.method,
        "path": access_log._as_sent(record.target), "version": record.version,
        "host": access_log._as_sent(record.host), "status": record.status, "bytes": record.bytes_sent,
        "body_bytes": record.body_bytes, "duration_ms": round(record.duration * 1000, 3), "upstream": record.upstream, "server": record.server,
        "request_id": access_log._as_sent(record.request_id), "user_agent": access_log._as_sent(record.user_agent),
        "referer": access_log._as_sent(record.referer)}, ensure_ascii=False)


TRICKY_RECORDS = [
    Record(),
    Record(user_agent='evil" "x\x1b\\', referer="http://r/é".encode().decode("latin-1"), upstream=None,
           server=None, request_id=None, host=None, status=0, bytes_sent=0, body_bytes=0, duration=0.0),
    Record(target="/\u2028\x00\x7f\xff", user_agent="\ud800", duration=123456.7891234, bytes_sent=10**20,
           body_bytes=10**20 - 100),
    Record(method="-", target="-", duration=1e-9, status=101),
]
TIMES = [WHEN, WHEN + 0.0005, WHEN + 0.0015, WHEN + 0.9994999, WHEN + 0.9999995, WHEN + 0.99999949,
         1733452800.123456, 1733452800.9999996, 0.0]


@pytest.mark.parametrize("when", TIMES)
def test_json_lines_are_what_json_dumps_wrote(when):
    for record in TRICKY_RECORDS:
        assert format_json(record, when) == old_json(record, when)


@pytest.mark.parametrize("when", TIMES)
def test_combined_stamp_is_datetimes(when):
    expected = datetime.datetime.fromtimestamp(when, datetime.timezone.utc).strftime("%d/%b/%Y:%H:%M:%S +0000")
    assert f"[{expected}]" in format_combined(Record(), when)


def test_lines_from_many_threads_are_all_written_or_counted_as_dropped(tmp_path):
    path = tmp_path / "access.log"
    log = AccessLog(str(path), max_queue=500)
    log.start()
    threads, per_thread = 4, 2000
    start = threading.Event()

    def requests_finishing(index: int) -> None:
        start.wait(DEADLINE)
        for n in range(per_thread):
            log.observe(Record(target=f"/{index}/{n}"))

    workers = [threading.Thread(target=requests_finishing, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    start.set()
    for worker in workers:
        worker.join(DEADLINE)
        assert not worker.is_alive()
    log.stop()
    lines = path.read_text().splitlines()
    assert len(lines) == log.written and log.written + log.dropped == threads * per_thread
    assert log.written > 0
    assert len(set(lines)) == len(lines)  # no line written twice


def test_a_line_queued_while_the_writer_drains_is_written_without_a_later_one(tmp_path):
    """The writer clears its wake-up flag before draining: a line that lands just after a drain
    wakes it again, instead of waiting (unwritten) for the next request."""
    path = tmp_path / "access.log"
    log = AccessLog(str(path))
    log.start()
    try:
        for n in range(50):
            log.observe(Record(target=f"/{n}"))
            wait_for(lambda: log.written == n + 1, what=f"line {n} written while no other line came")
    finally:
        log.stop()
    assert len(path.read_text().splitlines()) == 50
