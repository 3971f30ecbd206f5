"""Pin a worker process (all its threads) to one CPU.

Why: under the GIL a process runs Python on one core at a time anyway, and its busy threads hand the
interpreter to each other at every blocking syscall. When those threads sit on different cores,
every hand-off is a cross-core wake-up (an IPI, and the GIL's and the request's cache lines move
with it); on one core it is a cheap local switch. Measured with wrk -t1 -c50, one worker process on
a 2-core machine: ~9,500 req/s unpinned, ~14,500 pinned (scripts/bench, scenario 1). nginx offers
the same as ``worker_cpu_affinity auto`` and HAProxy as ``cpu-map``.

Linux only (``os.sched_setaffinity``); elsewhere pinning is skipped.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("pyproxy.core.cpu")


def available_cpus() -> list[int]:
    """The CPUs this process may run on (a container's cpuset counts), in order."""
    if not hasattr(os, "sched_getaffinity"):
        return []
    return sorted(os.sched_getaffinity(0))


def current_cpu() -> int | None:
    """The CPU the calling process last ran on (/proc/self/stat field 39), or None if unknown."""
    try:
        with open("/proc/self/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()  # the command name may hold spaces
        return int(fields[36])  # field 39 overall; fields[0] is field 3 (state)
    except (OSError, IndexError, ValueError):
        return None


def cpu_for_worker(slot: int | None, cpus: list[int]) -> int | None:
    """The CPU for worker ``slot`` (0-based) out of ``cpus``; ``slot=None`` is a single-process proxy.

    Workers take the CPUs in turn (worker k on the k-th CPU, like nginx's ``auto``). A single process
    stays on the CPU the scheduler started it on, so two proxies on one machine do not both land on
    the first CPU.
    """
    if not cpus:
        return None
    if slot is not None:
        return cpus[slot % len(cpus)]
    cpu = current_cpu()
    return cpu if cpu in cpus else cpus[0]


def pin_process(cpu: int) -> bool:
    """Pin every thread of this process (and threads it starts later) to ``cpu``. False if not possible."""
    if not hasattr(os, "sched_setaffinity"):
        return False
    try:
        tids = [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:
        tids = [0]  # the calling thread; threads started later inherit its mask
    for tid in tids:
        try:
            os.sched_setaffinity(tid, {cpu})
        except ProcessLookupError:
            continue  # that thread has just ended
        except OSError as exc:  # EINVAL: that CPU is not ours (the cpuset changed): run unpinned
            log.warning("could not pin to CPU %d: %s", cpu, exc)
            return False
    return True


def pin_worker(setting, slot: int | None = None) -> int | None:
    """Apply a ``cpu_affinity`` setting ("auto", "off" or a list of CPU numbers) to this process.

    Call it before the process starts its threads (they inherit the mask; existing ones are pinned
    too). Returns the CPU pinned to, or None.
    """
    if setting == "off":
        return None
    cpus = available_cpus() if setting == "auto" else list(setting)
    cpu = cpu_for_worker(slot, cpus)
    if cpu is None or not pin_process(cpu):
        return None
    return cpu
