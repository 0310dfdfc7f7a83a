"""The periodic resync is spread over its interval, not one serial walk: each object has a
fixed place in the interval (a hash of its uid), so the passes come evenly and one object's
passes stay an interval apart; at most `concurrency` run at once; a cycle whose passes are
slower than their places still visits every object, and the next cycle follows it.

Pure scheduling (resync.py) on a fake clock: the sleeps advance it, nothing waits.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter

import pytest

from finetune_operator import resync
from finetune_operator.reconcile.settings import OperatorSettings

INTERVAL = 60.0


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        # What is ready runs first, at the current time; then the time passes.
        await asyncio.sleep(0)
        self.now += seconds


def objects(n: int, seed: int = 0) -> list[tuple[str, str]]:
    return [(f"job-{i}", str(uuid.UUID(int=seed * 100_000 + i))) for i in range(n)]


def test_offsets_are_stable_per_object_and_even_over_the_interval():
    items = objects(2000)
    offsets = [resync.offset(uid, INTERVAL) for _, uid in items]
    assert all(0 <= o < INTERVAL for o in offsets)
    assert offsets == [resync.offset(uid, INTERVAL) for _, uid in items]
    # Ten slices of the interval, 200 objects each on average: none is crowded or empty.
    per_slice = Counter(int(o // (INTERVAL / 10)) for o in offsets)
    assert sorted(per_slice) == list(range(10))
    assert all(140 <= n <= 260 for n in per_slice.values()), per_slice
    assert [k for _, k in resync.schedule(items, INTERVAL)] == [
        k for _, k in sorted(zip(offsets, (k for k, _ in items), strict=True))
    ]


def test_a_cycle_visits_every_object_once_at_its_place():
    t = FakeTime()
    t.now = 500.0
    visits: list[tuple[float, str]] = []

    async def visit(key: str) -> None:
        visits.append((t.now, key))

    items = objects(300)
    cycle = asyncio.run(
        resync.run_cycle(items, INTERVAL, visit, concurrency=4, clock=t.clock, sleep=t.sleep)
    )
    assert sorted(k for _, k in visits) == sorted(k for k, _ in items)
    uid = dict(items)
    for at, key in visits:
        assert at == pytest.approx(500.0 + resync.offset(uid[key], INTERVAL))
    assert cycle.took < INTERVAL and cycle.behind == pytest.approx(0)
    # Spread, not a burst: no tenth of the interval holds more than a fifth of the passes.
    per_slice = Counter(int((at - 500.0) // (INTERVAL / 10)) for at, _ in visits)
    assert max(per_slice.values()) <= len(items) / 5


def test_at_most_concurrency_passes_run_at_once_and_a_slow_cycle_still_visits_all():
    t = FakeTime()
    running = 0
    most = 0
    visited: list[str] = []

    async def slow_visit(key: str) -> None:
        # Far slower than the places come (60 s / 40 objects): the bound is what holds.
        nonlocal running, most
        running += 1
        most = max(most, running)
        for _ in range(5):
            await asyncio.sleep(0)
        t.now += 10.0
        running -= 1
        visited.append(key)

    items = objects(40, seed=1)
    cycle = asyncio.run(
        resync.run_cycle(items, INTERVAL, slow_visit, concurrency=3, clock=t.clock, sleep=t.sleep)
    )
    assert most == 3
    assert sorted(visited) == sorted(k for k, _ in items)
    assert cycle.took > INTERVAL and cycle.behind > INTERVAL / 4  # it says it fell behind


def test_every_object_is_visited_once_per_interval_cycle_after_cycle():
    t = FakeTime()
    items = objects(50, seed=2)
    visits: dict[str, list[float]] = {}
    starts: list[float] = []

    async def visit(key: str) -> None:
        visits.setdefault(key, []).append(t.now)

    async def cycle() -> None:
        starts.append(t.now)
        await resync.run_cycle(items, INTERVAL, visit, concurrency=4, clock=t.clock, sleep=t.sleep)

    asyncio.run(resync.run_forever(INTERVAL, cycle, clock=t.clock, sleep=t.sleep, cycles=4))
    # The first cycle one interval after the start (the watches just reconciled everything),
    # then back to back.
    assert starts == [INTERVAL, 2 * INTERVAL, 3 * INTERVAL, 4 * INTERVAL]
    for key, times in visits.items():
        assert len(times) == 4, key
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        assert gaps == pytest.approx([INTERVAL] * 3), key


def test_an_overrunning_or_failing_cycle_is_followed_by_the_next_at_once():
    t = FakeTime()
    starts: list[float] = []

    async def cycle() -> None:
        starts.append(t.now)
        if len(starts) == 1:
            t.now += 1.5 * INTERVAL  # overran
        elif len(starts) == 2:
            raise RuntimeError("the list failed")

    asyncio.run(resync.run_forever(INTERVAL, cycle, clock=t.clock, sleep=t.sleep, cycles=3))
    assert starts == [INTERVAL, 2.5 * INTERVAL, 3.5 * INTERVAL]


def test_resync_concurrency_comes_from_the_environment():
    assert OperatorSettings.from_env({}).resync_concurrency == 4
    assert OperatorSettings.from_env({"FINETUNE_RESYNC_CONCURRENCY": "16"}).resync_concurrency == 16
    with pytest.raises(ValueError, match="FINETUNE_RESYNC_CONCURRENCY='0'"):
        OperatorSettings.from_env({"FINETUNE_RESYNC_CONCURRENCY": "0"})


def test_a_cancelled_cycle_cancels_its_passes():
    t = FakeTime()
    cancelled: list[str] = []

    async def visit(key: str) -> None:
        try:
            await asyncio.Event().wait()  # a pass that is still under way
        except asyncio.CancelledError:
            cancelled.append(key)
            raise

    async def main() -> None:
        cycle = asyncio.create_task(
            resync.run_cycle(objects(3), 0.0, visit, concurrency=4, clock=t.clock, sleep=t.sleep)
        )
        for _ in range(5):
            await asyncio.sleep(0)
        cycle.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cycle

    asyncio.run(main())
    assert sorted(cancelled) == ["job-0", "job-1", "job-2"]
