"""Token buckets in a fixed-size table of shared memory, so every worker process counts against the
same buckets (``server.workers = N`` enforces one limit, not N).

The table is one ``memfd`` mapped ``MAP_SHARED``: made before the supervisor forks its workers, the
same pages are every worker's. It never grows: a slot is 32 bytes (key hash, tokens, last update,
when the bucket is full again), and slots come in groups of ``GROUP``; a key lives in the group its
hash picks. A key not in its group takes a free slot there: never used, or holding a bucket that has
refilled completely (an idle key has expired: a full bucket is the same as no bucket). With none free,
the least recently used bucket of the group is evicted (``evictions`` counts them): a flood of
distinct keys costs the flooder's own buckets, never memory.

Locking: a group is guarded by one of ``STRIPES`` locks, each a ``threading.Lock`` (the threads of
this process) held together with an ``fcntl`` byte-range lock on the memfd (the other processes).
fcntl locks belong to the process that holds them and the kernel drops them when it dies, so a worker
killed inside the critical section cannot wedge the others. Because they belong to the process, not the
thread, the kernel's deadlock check can see a cycle that is not one (a thread of worker 1 waits for a
stripe worker 2 holds while a thread of worker 2 waits for another stripe worker 1 holds) and answer
EDEADLK: a thread never holds two stripes, so that wait always ends, and the lock is asked for again.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import struct
import threading
import time

SLOT = struct.Struct("<Qddd")  # key hash (0: never used), tokens, last update, when full again
GROUP = 8  # slots a key may use: its probe window, and what one eviction chooses among
GROUP_LAYOUT = struct.Struct("<" + "Qddd" * GROUP)  # one read for the whole window
STRIPES = 64  # locks over the groups: two requests contend only if their groups share one
DEFAULT_SLOTS = 65536  # 2 MiB; the [server] rate_limit_keys default
FALSE_DEADLOCK_PAUSE = 0.0005  # before asking again for a stripe the kernel called a deadlock


class BucketTable:
    """The shared token buckets. ``take`` is the only operation; everything else is bookkeeping."""

    def __init__(self, slots: int = DEFAULT_SLOTS):
        self.groups = max(1, slots // GROUP)
        self.slots = self.groups * GROUP
        self._fd = os.memfd_create("pyproxy-rate-limits", os.MFD_CLOEXEC)
        os.ftruncate(self._fd, self.slots * SLOT.size)  # zero-filled: every slot starts unused
        self._memory = mmap.mmap(self._fd, self.slots * SLOT.size, mmap.MAP_SHARED)
        self._locks = [threading.Lock() for _ in range(STRIPES)]
        self._count_lock = threading.Lock()
        # This process's counts (forked workers each start from their own copy; /metrics adds them up).
        self.evictions = 0
        self.rejected = 0

    def take(self, key: int, capacity: int, rate: float, now: float) -> tuple[bool, float]:
        """Take one token from bucket ``key`` (a non-zero 64-bit hash) holding up to ``capacity``
        tokens, refilled with ``rate`` tokens a second. Returns (allowed, tokens left after it)."""
        group = key % self.groups
        offset = group * GROUP_LAYOUT.size
        stripe = group % STRIPES
        with self._locks[stripe]:
            self._lock_stripe(stripe)
            try:
                fields = GROUP_LAYOUT.unpack_from(self._memory, offset)
                index, tokens, updated = self._slot_for(fields, key, now)
                if tokens is None:
                    tokens = float(capacity)  # a new key starts with a full bucket
                else:
                    tokens = min(float(capacity), max(0.0, tokens) + max(0.0, now - updated) * rate)
                    # A time read before one that took the lock first (or a clock set back): the bucket's
                    # time stays where it is, else the next request would refill those seconds again.
                    now = max(now, updated)
                allowed = tokens >= 1.0
                if allowed:
                    tokens -= 1.0
                SLOT.pack_into(self._memory, offset + index * SLOT.size, key, tokens, now,
                               now + (capacity - tokens) / rate)
            finally:
                fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, stripe)
        if not allowed:
            self._count("rejected")
        return allowed, tokens

    def _lock_stripe(self, stripe: int) -> None:
        """The other processes' side of a stripe's lock (the caller holds this process's)."""
        while True:
            try:
                fcntl.lockf(self._fd, fcntl.LOCK_EX, 1, stripe)
                return
            except OSError as error:
                if error.errno != errno.EDEADLK:
                    raise
            time.sleep(FALSE_DEADLOCK_PAUSE)  # the holder is running its critical section: let it end

    def _slot_for(self, fields: tuple, key: int, now: float) -> tuple[int, float | None, float]:
        """Where ``key`` lives in its group: (slot index, its tokens or None for a fresh bucket, last update)."""
        keys = fields[0::4]
        if key in keys:  # the usual case, searched in C
            index = keys.index(key)
            return index, fields[4 * index + 1], fields[4 * index + 2]
        free = None
        oldest, oldest_time = 0, float("inf")
        for index in range(GROUP):
            slot_key, _, updated, full_at = fields[4 * index: 4 * index + 4]
            if free is None and (slot_key == 0 or full_at <= now):
                free = index  # unused, or its bucket has refilled: that key has expired
            if updated < oldest_time:
                oldest, oldest_time = index, updated
        if free is not None:
            return free, None, now
        self._count("evictions")
        return oldest, None, now

    def _count(self, name: str) -> None:
        with self._count_lock:
            setattr(self, name, getattr(self, name) + 1)

    def used(self, now: float) -> int:
        """Slots holding a bucket that has not refilled yet (what the tests look at)."""
        count = 0
        for group in range(self.groups):
            fields = GROUP_LAYOUT.unpack_from(self._memory, group * GROUP_LAYOUT.size)
            count += sum(1 for index in range(GROUP) if fields[4 * index] and fields[4 * index + 3] > now)
        return count

    def close(self) -> None:
        self._memory.close()
        os.close(self._fd)
