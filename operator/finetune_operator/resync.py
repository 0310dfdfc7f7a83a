"""The periodic resync, spread over its interval instead of one serial walk.

The resync is the level-based safety net: every object gets a pass at least once per
interval, events or not. It used to list everything and then reconcile the objects one
after the other: under load one walk took longer than the interval itself (228 s for 982
objects, with statuses minutes behind), and it came as one burst on top of the events.

Now each object's pass has a fixed place in the interval, a hash of its uid: objects spread
evenly, and one object's passes stay an interval apart from one cycle to the next. A pass
starts at its place, or as soon as a slot is free when passes run slower than their places
come (at most `concurrency` resync passes at once, so the resync never floods the API
server, whatever the number of objects). A cycle that falls behind still visits every
object; the next one starts when it is done.

Pure scheduling, with the clock and sleep passed in: `main.py` lists the objects and
supplies the pass.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import TypeVar

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)
Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True)
class Cycle:
    took: float
    """Seconds from the start to the last visit done (about the interval: visits spread)."""
    behind: float
    """How late the latest visit started after its place: more than a little means the
    passes are slower than their places come."""


def offset(uid: str, interval: float) -> float:
    """Seconds into each interval at which the object with `uid` is visited: in
    [0, interval), the same in every cycle, uniform over uids."""
    digest = hashlib.sha256(uid.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * interval


def schedule(items: Iterable[tuple[K, str]], interval: float) -> list[tuple[float, K]]:
    """(offset, key) for each (key, uid), earliest first."""
    return sorted(((offset(uid, interval), key) for key, uid in items), key=lambda p: p[0])


async def run_cycle(
    items: Iterable[tuple[K, str]],
    interval: float,
    visit: Callable[[K], Awaitable[None]],
    *,
    concurrency: int,
    clock: Clock = time.monotonic,
    sleep: Sleep = asyncio.sleep,
) -> Cycle:
    """Visit every key once, each at its offset from now (or later while `concurrency`
    visits are running). Returns when the last visit is done."""
    start = clock()
    slots = asyncio.Semaphore(concurrency)
    running: set[asyncio.Task] = set()
    behind = 0.0

    async def one(key: K) -> None:
        try:
            await visit(key)
        except Exception:  # one object's failure is its own; the cycle goes on
            log.exception("resync pass of %s failed", key)
        finally:
            slots.release()

    try:
        for at, key in schedule(items, interval):
            delay = start + at - clock()
            if delay > 0:
                await sleep(delay)
            await slots.acquire()
            behind = max(behind, clock() - (start + at))
            task = asyncio.create_task(one(key))
            running.add(task)
            task.add_done_callback(running.discard)
        if running:
            await asyncio.gather(*running)
    except asyncio.CancelledError:
        # The operator is stopping: its passes go with it, before the API client closes.
        for task in running:
            task.cancel()
        raise
    return Cycle(took=clock() - start, behind=behind)


async def run_forever(
    interval: float,
    cycle: Callable[[], Awaitable[None]],
    *,
    clock: Clock = time.monotonic,
    sleep: Sleep = asyncio.sleep,
    cycles: int | None = None,
) -> None:
    """Run `cycle` every `interval` seconds, the first one interval after the start (the
    watches' initial listing has just reconciled everything). A cycle that overran its
    interval is followed at once by the next; a failed one is logged and the next one
    runs on time. `cycles` bounds the loop (tests); cancelling it stops it."""
    next_start = clock() + interval
    done = 0
    while cycles is None or done < cycles:
        delay = next_start - clock()
        if delay > 0:
            await sleep(delay)
        started = clock()
        try:
            await cycle()
        except Exception:
            log.exception("periodic resync failed; the next one starts in %.0fs", interval)
        next_start = started + interval
        done += 1
