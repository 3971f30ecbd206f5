"""Child processes in their own process groups, stopped reliably, and measured through /proc."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

STOP_GRACE_S = 5.0
TICKS = os.sysconf("SC_CLK_TCK")
LOG_TAIL_BYTES = 4096


class StartError(RuntimeError):
    """A server did not come up; the message is the reason shown in the table."""


@dataclass
class ManagedProcess:
    name: str
    popen: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def exit_reason(self) -> str:
        code = self.popen.poll()
        return f"exited with code {code}: {last_log_line(self.log_path)}"


def start_process(name: str, argv: list[str], log_dir: Path, cwd: Path | None = None) -> ManagedProcess:
    """Start argv in a new session (so Ctrl-C reaches only us and we stop it as a group)."""
    log_path = log_dir / f"{name}.log"
    with open(log_path, "wb") as log:
        popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                 cwd=cwd, start_new_session=True)
    return ManagedProcess(name, popen, log_path)


def stop_process(process: ManagedProcess, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM the whole group, SIGKILL it if it lingers; safe to call twice."""
    pgid = process.pid  # start_new_session: the leader's pid is the group id
    _signal_group(pgid, signal.SIGTERM)
    try:
        process.popen.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        _signal_group(pgid, signal.SIGKILL)
        process.popen.wait(timeout=grace_s)
    # Workers can outlive their master for a moment; take the group down with it.
    _signal_group(pgid, signal.SIGKILL)


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        return  # already gone: nothing to stop


def last_log_line(path: Path) -> str:
    """The last non-empty line of a log: usually the error that stopped the process."""
    try:
        with open(path, "rb") as log:
            log.seek(0, os.SEEK_END)
            log.seek(max(0, log.tell() - LOG_TAIL_BYTES))
            tail = log.read().decode(errors="replace")
    except OSError as error:
        return f"(log unreadable: {error})"
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def process_tree(root_pid: int) -> list[int]:
    """root_pid and all its descendants, from the ppid field of /proc/PID/stat."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            parent = _parent_pid(int(entry))
            if parent is not None:
                children.setdefault(parent, []).append(int(entry))
    tree, frontier = [], [root_pid]
    while frontier:  # bounded: each pid is visited once, the process table is finite
        pid = frontier.pop()
        tree.append(pid)
        frontier.extend(children.get(pid, []))
    return tree


def _parent_pid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as stat:
            text = stat.read()
    except OSError:  # the process ended while we looked
        return None
    # The command name is in parentheses and may contain spaces; fields after it are plain.
    fields = text[text.rindex(")") + 2:].split()
    return int(fields[1])


@dataclass(frozen=True)
class TreeUsage:
    processes: int
    rss_bytes: int
    threads: int


def tree_usage(root_pid: int) -> TreeUsage:
    """Sum of VmRSS and Threads over the process tree (shared pages of forked workers count twice)."""
    rss_kib = threads = processes = 0
    for pid in process_tree(root_pid):
        status = _read_status(pid)
        if status:
            processes += 1
            rss_kib += int(status.get("VmRSS", "0 kB").split()[0])
            threads += int(status.get("Threads", "0"))
    return TreeUsage(processes, rss_kib * 1024, threads)


def _read_status(pid: int) -> dict[str, str]:
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8") as status:
            lines = status.read().splitlines()
    except OSError:  # the process ended while we looked
        return {}
    pairs = (line.split(":", 1) for line in lines if ":" in line)
    return {key: value.strip() for key, value in pairs}


def wait_until(predicate, timeout_s: float, interval_s: float = 0.05) -> bool:
    """Poll predicate until true or timeout; returns its last answer."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return bool(predicate())


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process, all its threads included."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICKS, int(fields[12]) / TICKS


def context_switches(pid: int) -> int:
    """Voluntary + involuntary context switches of every thread: each GIL handoff costs some."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            for line in (task / "status").read_text().splitlines():
                if line.endswith("ctxt_switches:") or "ctxt_switches:" in line:
                    total += int(line.split()[1])
        except OSError:  # the thread exited meanwhile
            continue
    return total
