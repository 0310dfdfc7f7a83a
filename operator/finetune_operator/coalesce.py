"""One pass at a time per object, and at most one more waiting behind it.

Events of one FineTuneJob come from several watches (the object, its Job, its pods): a burst
of them used to queue a full pass each behind the running one, every one reading and
deciding the same thing again. A pass is level-based (it reads the current state), so one
pass that starts after an event has seen it: while a pass runs, the first new request
queues one more, and requests arriving while that one waits are answered by it and return
at once. A request is never lost: the pass it relies on starts after it arrived.

Keys are forgotten when no pass runs or waits, so memory follows the work in flight.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
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
