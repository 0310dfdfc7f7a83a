"""What a burst leaves on the heap.

An event handler starts its pass as a task and returns at once (main.start_pass), so kopf
lets go of the event's body while the pass still waits for a slot; the pass runs later all
the same, and the operator's shutdown stops the passes it started.

Freed memory goes back to the OS when the operator goes quiet after work (heap.py): the
pass that leaves no other pass running or waiting runs a full collection and glibc's
`malloc_trim(0)`, once per burst and at most once per interval, never while passes are
still running, never for an operator that did nothing since the last trim, and not at all
where the C library has no `malloc_trim`. The operator's start-up finds the real one here.

Pure asyncio with the trim and the clock injected; one check calls the real `malloc_trim`.
"""

from __future__ import annotations

import asyncio
import gc
import platform
import weakref

import kopf
import pytest

from finetune_operator import heap, main
from finetune_operator.coalesce import Slots
from finetune_operator.reconcile.settings import OperatorSettings


class Body(dict):
    """An event's body, as kopf hands it to the handler (a dict that can be watched)."""


def blocked_pass(monkeypatch) -> tuple[asyncio.Event, list[str]]:
    """Passes of FineTuneJobs that wait for the one slot, which a pass already under way
    holds until the returned gate opens; -> the gate and the names of the passes that ran."""
    ran: list[str] = []

    async def reconcile(namespace: str, name: str, settings) -> None:
        ran.append(name)

    monkeypatch.setitem(main.RECONCILERS, "FineTuneJob", reconcile)
    monkeypatch.setattr(main, "_STARTED", set())
    monkeypatch.setattr(main, "_pass_slots", Slots(1))
    gate = asyncio.Event()

    async def holder() -> None:
        async with main._pass_slots.hold():
            await gate.wait()

    asyncio.get_running_loop().create_task(holder())
    return gate, ran


def test_a_handler_returns_at_once_and_does_not_hold_the_event_while_its_pass_waits(
    monkeypatch,
):
    memo = kopf.Memo(operator_settings=OperatorSettings())

    async def scenario() -> None:
        gate, ran = blocked_pass(monkeypatch)
        await asyncio.sleep(0)  # the holder takes the slot
        body = Body(metadata={"name": "job", "namespace": "ns"}, spec={"big": "x" * 100_000})
        held = weakref.ref(body)
        handler = main.finetunejob_event(
            type="ADDED", name="job", namespace="ns", memo=memo, status={}, body=body
        )
        # Awaiting the pass in the handler would wait for the slot: the deadline says so.
        await asyncio.wait_for(handler, timeout=5)
        del body, handler
        gc.collect()
        assert held() is None  # nothing the pass keeps refers to the event
        assert ran == [] and len(main._STARTED) == 1  # the pass waits for its slot
        gate.set()
        await asyncio.wait_for(main.started_passes(), timeout=5)
        assert ran == ["job"] and not main._STARTED

    asyncio.run(scenario())


def test_the_shutdown_stops_the_passes_the_handlers_started(monkeypatch):
    memo = kopf.Memo(operator_settings=OperatorSettings())
    closed: list[bool] = []

    async def close() -> None:
        closed.append(True)

    monkeypatch.setattr(main.k8s, "close", close)

    async def scenario() -> None:
        gate, ran = blocked_pass(monkeypatch)
        await asyncio.sleep(0)
        labels = {main.LABEL_FINETUNEJOB: "job"}
        event = main.job_event(type="ADDED", labels=labels, namespace="ns", memo=memo)
        await asyncio.wait_for(event, 5)
        (task,) = main._STARTED
        await asyncio.wait_for(main.shutdown(memo=kopf.Memo()), timeout=5)
        assert task.cancelled() and not main._STARTED and ran == [] and closed == [True]
        gate.set()

    asyncio.run(scenario())


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Recorder:
    """The injected collection and trim: what was called, in order, and what the passes
    were doing at that moment."""

    def __init__(self, running: list[int] | None = None) -> None:
        self.calls: list[str] = []
        self.running_at_trim: list[int] = []
        self._running = running

    def collect(self) -> int:
        self.calls.append("collect")
        return 0

    def trim(self, pad: int) -> int:
        assert pad == 0
        self.calls.append("trim")
        if self._running is not None:
            self.running_at_trim.append(self._running[0])
        return 1


def trimmer(rec: Recorder, clock: FakeClock, interval: float = 60.0) -> heap.Trimmer:
    return heap.Trimmer(interval, trim=rec.trim, collect=rec.collect, clock=clock)


def test_a_quiet_moment_after_work_collects_then_trims_at_most_once_per_interval():
    rec, clock = Recorder(), FakeClock()
    t = trimmer(rec, clock)
    assert not t.quiet()  # no work yet: nothing to give back
    assert rec.calls == []
    t.worked()
    assert t.quiet()
    assert rec.calls == ["collect", "trim"]
    t.worked()
    clock.now += 59.0
    assert not t.quiet()  # within the interval
    clock.now += 1.0
    assert t.quiet()  # the work since the last trim is still owed one
    assert rec.calls == ["collect", "trim"] * 2
    clock.now += 600.0
    assert not t.quiet()  # idle since: nothing new to give back
    assert t.trims == 2


def test_without_malloc_trim_the_trimmer_does_nothing():
    rec, clock = Recorder(), FakeClock()
    t = heap.Trimmer(trim=None, collect=rec.collect, clock=clock)
    assert not t.available
    t.worked()
    assert not t.quiet()
    assert rec.calls == [] and t.trims == 0


def run_burst(monkeypatch, names: list[str], running: list[int]) -> None:
    """The passes of `names` at once, each a few turns of the loop long."""

    async def reconcile(namespace: str, name: str, settings) -> None:
        running[0] += 1
        for _ in range(3):
            await asyncio.sleep(0)
        running[0] -= 1

    monkeypatch.setitem(main.RECONCILERS, "FineTuneJob", reconcile)
    settings = OperatorSettings()

    async def burst() -> None:
        await asyncio.gather(*(main.run_reconcile(settings, "FineTuneJob", "ns", n) for n in names))

    asyncio.run(burst())


def test_the_last_pass_of_a_burst_trims_once_and_the_next_burst_after_the_interval(
    monkeypatch,
):
    running = [0]
    rec, clock = Recorder(running), FakeClock()
    monkeypatch.setattr(main, "HEAP", trimmer(rec, clock))
    monkeypatch.setattr(main, "_pass_slots", Slots(3))

    # 12 passes, 3 at a time: the slots drain once, when the last one is done.
    run_burst(monkeypatch, [f"job-{i:02d}" for i in range(12)], running)
    assert rec.calls == ["collect", "trim"]
    assert rec.running_at_trim == [0]

    # Another burst 30 s later: within the interval, no trim.
    clock.now += 30.0
    run_burst(monkeypatch, [f"late-{i}" for i in range(5)], running)
    assert rec.calls == ["collect", "trim"]

    # The next burst after the interval trims again, once, when it is over.
    clock.now += 31.0
    run_burst(monkeypatch, [f"next-{i}" for i in range(7)], running)
    assert rec.calls == ["collect", "trim"] * 2
    assert rec.running_at_trim == [0, 0]
    assert main._pass_slots.busy == 0


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_the_operator_start_up_finds_glibc_malloc_trim(monkeypatch):
    async def nothing(*_args, **_kwargs) -> None:
        return None

    monkeypatch.setattr(main.k8s, "connect", nothing)
    monkeypatch.setattr(main, "_start_metrics_server", lambda port: None)
    monkeypatch.setattr(main, "_resync_forever", nothing)
    monkeypatch.setattr(main, "_kopf_settings", [])
    monkeypatch.setattr(main, "_pass_slots", None)
    monkeypatch.setattr(main, "HEAP", heap.Trimmer())
    assert not main.HEAP.available  # importing main looks for nothing

    async def start() -> None:
        memo = kopf.Memo()
        await main.configure(settings=kopf.OperatorSettings(), memo=memo)
        await memo.resync

    asyncio.run(start())
    assert main.HEAP.available
    # The real call: glibc answers 0 or 1 (whether it gave memory back).
    assert heap.libc_malloc_trim()(0) in (0, 1)
    assert heap.rss_mib() > 0
