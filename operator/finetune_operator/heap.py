"""Freed memory goes back to the OS when the operator goes quiet after work.

A burst (a thousand new FineTuneJobs at once) makes the operator allocate far more than it
keeps: watch events decoded and deep-copied, every pass's reads, the queued passes. Once
the burst is over most of it is free, but the process keeps it: glibc keeps free memory in
its heap for the next allocation, and CPython keeps its small objects' memory in arenas of
1 MiB that go back only when a whole arena is empty. glibc's `malloc_trim(0)` gives every
free page of every malloc arena back, not only the top of the heap; a full collection
first frees what the burst left in reference cycles, so that their memory is free too.

CPython's arenas are most of it, and no trim reaches them: after a burst of 1,000 jobs on
100 nodes 276 arenas were in use (31 MB of live objects in them, not one arena empty), and
the trim gave back 3-4 MiB of the 270 MiB. What keeps the arenas few is holding less at
once during a burst (main.start_pass: a handler does not keep kopf's event alive while its
pass waits); the trim returns what each resync cycle's reads leave behind. Measured:
docs/operations.md, "Scale".

When: `Trimmer.quiet()` is called when no pass is running or waiting any more (main.py),
and does its work only if passes ran since the last trim (an idle operator has nothing new
to give back) and not more often than once per `min_interval`: the collection stops the
event loop for about a tenth of a second at 1,000 jobs, and memory given back is faulted
in again by the next burst. In steady state that is about once a minute (the resync's
passes), after a burst once when it drains.

Only where the C library has `malloc_trim` (glibc): elsewhere (musl, macOS) the trimmer
does nothing.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

Trim = Callable[[int], int]

MIN_INTERVAL_SECONDS = 60.0


def libc_malloc_trim() -> Trim | None:
    """glibc's `malloc_trim`, or None where the C library has none."""
    try:
        fn = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError, TypeError):  # musl, macOS; Windows has no CDLL(None)
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


def rss_mib() -> float | None:
    """This process's resident size, where /proc says it (Linux)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


class Trimmer:
    """Gives freed memory back when the work goes quiet, at most once per `min_interval`
    seconds. `trim`, `collect` and `clock` are injectable (tests); `trim=None` (no
    `malloc_trim` in this C library) makes it do nothing."""

    def __init__(
        self,
        min_interval: float = MIN_INTERVAL_SECONDS,
        *,
        trim: Trim | None = None,
        collect: Callable[[], object] = gc.collect,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.min_interval = min_interval
        self._trim = trim
        self._collect = collect
        self._clock = clock
        self._last = float("-inf")
        self._work = 0
        self.trims = 0

    @property
    def available(self) -> bool:
        """Whether this C library can give memory back (glibc's malloc_trim)."""
        return self._trim is not None

    def worked(self) -> None:
        """A pass ran: the next quiet moment has something to give back."""
        self._work += 1

    def quiet(self) -> bool:
        """The work went quiet: collect and trim if passes ran since the last trim and the
        last one is `min_interval` ago. -> whether it trimmed."""
        if self._trim is None or not self._work:
            return False
        now = self._clock()
        if now - self._last < self.min_interval:
            return False
        self._last, self._work = now, 0
        before = rss_mib()
        started = time.perf_counter()
        self._collect()
        collected = time.perf_counter()
        self._trim(0)
        done = time.perf_counter()
        self.trims += 1
        after = rss_mib()
        if before is not None and after is not None:
            log.info(
                "gave %.0f MiB back to the OS (RSS %.0f -> %.0f MiB; collection %.0f ms, "
                "trim %.0f ms)",
                before - after,
                before,
                after,
                (collected - started) * 1000,
                (done - collected) * 1000,
            )
        return True
