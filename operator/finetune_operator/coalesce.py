"""When passes run: one at a time per object with at most one more waiting behind it
(`Coalescer`), and a bounded number at once over all objects, by priority (`Slots`).

Events of one FineTuneJob come from several watches (the object, its Job, its pods): a burst
of them used to queue a full pass each behind the running one, every one reading and
deciding the same thing again. A pass is level-based (it reads the current state), so one
pass that starts after an event has seen it: while a pass runs, the first new request
queues one more, and requests arriving while that one waits are answered by it and return
at once. A request is never lost: the pass it relies on starts after it arrived.

Keys are forgotten when no pass runs or waits, so memory follows the work in flight.

`Slots` bounds the passes over all objects. A burst of a thousand new jobs, all
interleaved, would each finish near the end of the burst; in turn, the first ones get their
Jobs at once. Passes go by `Priority`: first a FineTuneJob whose Job just finished (its
status is one short pass from current), then one whose status names no Job yet (a restarted
operator's watches deliver every object again, and the jobs still waiting for their Job must
not queue behind hundreds of up-to-date ones), then the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
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


class Priority(enum.IntEnum):
    """Which passes take a free slot first (lowest first)."""

    FINISHING = 0
    """A FineTuneJob whose Job or pod finished while its status did not say so yet: one short
    pass makes the status current. Jobs finish at the controller-manager's pace, a few per
    second at most, so these passes cost the others little; behind a burst of new jobs they
    waited as long as the burst."""
    NEW = 1
    """A FineTuneJob still without its Job."""
    OTHER = 2


class Slots:
    """At most `limit` holders at once; waiters are served by priority, then in the order they
    came. A waiter's priority can be raised while it waits (`raise_priority`): the coalescer
    answers a request with the pass already waiting for its object, which must then go as
    early as the request would have."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.busy = 0
        self._queues: tuple[deque[asyncio.Future], ...] = tuple(deque() for _ in Priority)
        self._waiting: dict[Hashable, tuple[asyncio.Future, Priority]] = {}
        self._raised: dict[Hashable, Priority] = {}

    @contextlib.asynccontextmanager
    async def hold(
        self, priority: Priority = Priority.OTHER, key: Hashable | None = None
    ) -> AsyncIterator[None]:
        if key is not None:
            priority = min(priority, self._raised.pop(key, priority))
        if self.busy < self.limit and not any(self._queues):
            self.busy += 1
        else:
            waiter = asyncio.get_running_loop().create_future()
            self._queues[priority].append(waiter)
            if key is not None:
                self._waiting[key] = (waiter, priority)
            try:
                await waiter  # a releasing holder hands its slot over: `busy` stays
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._release()  # handed over just as we were cancelled: pass it on
                else:  # still in line, in the queue of its (possibly raised) priority
                    next(q for q in self._queues if waiter in q).remove(waiter)
                raise
            finally:
                if key is not None:
                    self._waiting.pop(key, None)
        try:
            yield
        finally:
            self._release()

    def raise_priority(self, key: Hashable, priority: Priority) -> None:
        """Serve the next pass for `key` no later than a `priority` one: moved up the line if
        it waits for a slot, else marked for when it asks for one. Called before a request
        goes to the coalescer, which may answer it with a pass that waits for a slot, or that
        waits behind the running pass of the same object and asks for its slot later."""
        waiting = self._waiting.get(key)
        if waiting is None:
            self._raised[key] = min(priority, self._raised.get(key, priority))
            return
        waiter, current = waiting
        if priority < current:
            self._queues[current].remove(waiter)
            self._queues[priority].append(waiter)
            self._waiting[key] = (waiter, priority)

    def _release(self) -> None:
        for queue in self._queues:
            while queue:
                waiter = queue.popleft()
                if not waiter.done():
                    waiter.set_result(None)
                    return
        self.busy -= 1
