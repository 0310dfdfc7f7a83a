"""When passes run: one at a time per object with at most one more waiting behind it
(`Coalescer`), and a bounded number at once over all objects, urgent ones first (`Slots`).

Events of one FineTuneJob come from several watches (the object, its Job, its pods): a burst
of them used to queue a full pass each behind the running one, every one reading and
deciding the same thing again. A pass is level-based (it reads the current state), so one
pass that starts after an event has seen it: while a pass runs, the first new request
queues one more, and requests arriving while that one waits are answered by it and return
at once. A request is never lost: the pass it relies on starts after it arrived.

Keys are forgotten when no pass runs or waits, so memory follows the work in flight.

`Slots` bounds the passes over all objects. A burst of a thousand new jobs, all
interleaved, would each finish near the end of the burst; in turn, the first ones get their
Jobs at once. Urgent passes (a FineTuneJob whose status names no Job yet) go before the
others: a restarted operator's watches deliver every object again, and the jobs still
waiting for their Job must not queue behind hundreds of up-to-date ones.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from dataclasses import dataclass, field


@dataclass
class _Slot:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    queued: bool = False
    """A pass is waiting for the lock and has not started reading yet."""
    users: int = 0


class Coalescer:
    def __init__(self) -> None:
        self._slots: dict[Hashable, _Slot] = {}

    async def run(self, key: Hashable, one_pass: Callable[[], Awaitable[None]]) -> bool:
        """Run `one_pass` for `key` after the one running, unless a pass for `key` is
        already waiting to start. -> whether this call ran it."""
        slot = self._slots.setdefault(key, _Slot())
        if slot.queued:
            return False
        slot.queued = slot.lock.locked()
        slot.users += 1
        try:
            async with slot.lock:
                # From here on this pass reads fresh state: a request from now on needs a
                # pass of its own, after this one.
                slot.queued = False
                await one_pass()
            return True
        finally:
            slot.users -= 1
            if not slot.users:
                del self._slots[key]

    def __len__(self) -> int:
        return len(self._slots)


class Slots:
    """At most `limit` holders at once; waiters are served urgent first, then in the order
    they came."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.busy = 0
        self._urgent: deque[asyncio.Future] = deque()
        self._normal: deque[asyncio.Future] = deque()

    @contextlib.asynccontextmanager
    async def hold(self, urgent: bool = False) -> AsyncIterator[None]:
        if self.busy < self.limit and not (self._urgent or self._normal):
            self.busy += 1
        else:
            waiter = asyncio.get_running_loop().create_future()
            queue = self._urgent if urgent else self._normal
            queue.append(waiter)
            try:
                await waiter  # a releasing holder hands its slot over: `busy` stays
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._release()  # handed over just as we were cancelled: pass it on
                else:
                    queue.remove(waiter)
                raise
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        for queue in (self._urgent, self._normal):
            while queue:
                waiter = queue.popleft()
                if not waiter.done():
                    waiter.set_result(None)
                    return
        self.busy -= 1
