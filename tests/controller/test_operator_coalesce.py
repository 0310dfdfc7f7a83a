"""A burst of events for one object costs at most two passes: the one running and one
that starts after the burst (coalesce.py); a request is never answered by a pass that
started before it. Over all objects at most FINETUNE_MAX_CONCURRENT_PASSES passes run at
once, by priority (a FineTuneJob whose Job just finished, then one still without its Job,
then the rest), then in the order they came. And the FineTuneJob -> AdapterDeployment lookup
that runs on every FineTuneJob event is answered from what the AdapterDeployment watch said,
not a list.

Pure asyncio, no API server.
"""

from __future__ import annotations

import asyncio

from finetune_operator.coalesce import Coalescer, Priority, Slots
from finetune_operator.reconcile.adapterdeployment import References


def test_a_burst_during_a_pass_costs_one_more_pass_that_starts_after_it():
    passes = Coalescer()
    started: list[int] = []  # how many requests had arrived when each pass started
    arrived = 0
    gate = asyncio.Event()

    async def one_pass() -> None:
        started.append(arrived)
        if len(started) == 1:
            await gate.wait()  # the first pass is slow: the burst comes while it runs

    async def request() -> bool:
        nonlocal arrived
        arrived += 1
        return await passes.run("ftj", one_pass)

    async def main() -> list[bool]:
        first = asyncio.create_task(request())
        await asyncio.sleep(0)
        burst = [asyncio.create_task(request()) for _ in range(10)]
        await asyncio.sleep(0)
        gate.set()
        return [await first, *[await t for t in burst]]

    ran = asyncio.run(main())
    assert started == [1, 11]  # the second pass started after all eleven requests
    assert ran.count(True) == 2 and ran[0] is True
    assert len(passes) == 0  # nothing kept once idle


def test_a_request_during_the_queued_pass_gets_a_pass_of_its_own():
    passes = Coalescer()
    log: list[str] = []

    async def slow(tag: str):
        log.append(f"start {tag}")
        await asyncio.sleep(0.01)
        log.append(f"end {tag}")

    async def main() -> None:
        a = asyncio.create_task(passes.run("k", lambda: slow("a")))
        await asyncio.sleep(0)
        b = asyncio.create_task(passes.run("k", lambda: slow("b")))  # queued behind a
        await asyncio.sleep(0.015)  # b has started reading
        c = asyncio.create_task(passes.run("k", lambda: slow("c")))  # needs its own
        d = asyncio.create_task(passes.run("other", lambda: slow("d")))  # another object
        assert await asyncio.gather(a, b, c, d) == [True, True, True, True]

    asyncio.run(main())
    assert log.index("end a") < log.index("start b") < log.index("end b") < log.index("start c")
    assert log.index("start d") < log.index("end b")  # objects do not wait for each other


def test_a_failing_pass_releases_its_object():
    passes = Coalescer()

    async def boom() -> None:
        raise RuntimeError("the pass failed")

    async def ok() -> None:
        pass

    async def main() -> bool:
        try:
            await passes.run("k", boom)
        except RuntimeError:
            pass
        return await passes.run("k", ok)

    assert asyncio.run(main()) is True
    assert len(passes) == 0


def test_adapterdeployments_waiting_for_a_job_come_from_their_watch():
    refs = References()

    def ad(name: str, *jobs: str, namespace: str = "team") -> dict:
        adapters = [{"name": f"a-{j}", "fineTuneJobRef": {"name": j}} for j in jobs]
        adapters.append({"name": "from-a-uri", "uri": "pvc://adapters/x"})
        return {
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"adapters": adapters},
        }

    refs.note(ad("chat", "sft-1", "sft-2"))
    refs.note(ad("code", "sft-2"))
    refs.note(ad("elsewhere", "sft-2", namespace="other"))
    assert refs.referencing("team", "sft-2") == ["chat", "code"]
    assert refs.referencing("team", "sft-1") == ["chat"]
    assert refs.referencing("team", "nobody") == []
    refs.note(ad("chat", "sft-3"))  # its adapters changed
    assert refs.referencing("team", "sft-1") == []
    refs.note(ad("code"), deleted=True)
    assert refs.referencing("team", "sft-2") == []
    assert refs.referencing("other", "sft-2") == ["elsewhere"]


def test_at_most_max_concurrent_passes_run_at_once_in_arrival_order(monkeypatch):
    from finetune_operator import main
    from finetune_operator.reconcile.settings import OperatorSettings

    running = 0
    most = 0
    order: list[str] = []

    async def reconcile(namespace: str, name: str, settings) -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        order.append(name)
        for _ in range(3):
            await asyncio.sleep(0)
        running -= 1

    monkeypatch.setitem(main.RECONCILERS, "FineTuneJob", reconcile)
    settings = OperatorSettings.from_env({"FINETUNE_MAX_CONCURRENT_PASSES": "3"})
    assert settings.max_concurrent_passes == 3

    async def burst() -> None:
        monkeypatch.setattr(main, "_pass_slots", Slots(settings.max_concurrent_passes))
        names = [f"job-{i:02d}" for i in range(12)]
        await asyncio.gather(*(main.run_reconcile(settings, "FineTuneJob", "ns", n) for n in names))
        assert order == names

    asyncio.run(burst())
    assert most == 3


def test_passes_take_free_slots_by_priority_then_in_order():
    slots = Slots(2)
    order: list[str] = []

    async def job(tag: str, priority: Priority) -> None:
        async with slots.hold(priority):
            order.append(tag)
            for _ in range(3):
                await asyncio.sleep(0)

    async def main() -> None:
        # Two up-to-date jobs hold the slots; six more wait, then two still without a Job,
        # then one whose Job just finished.
        tasks = [asyncio.create_task(job(f"done-{i}", Priority.OTHER)) for i in range(8)]
        await asyncio.sleep(0)
        tasks += [asyncio.create_task(job(f"new-{i}", Priority.NEW)) for i in range(2)]
        await asyncio.sleep(0)
        tasks.append(asyncio.create_task(job("finishing", Priority.FINISHING)))
        await asyncio.gather(*tasks)

    asyncio.run(main())
    assert order[:5] == ["done-0", "done-1", "finishing", "new-0", "new-1"]
    assert order[5:] == [f"done-{i}" for i in range(2, 8)]
    assert slots.busy == 0


def test_a_waiting_pass_moves_up_when_its_priority_is_raised():
    slots = Slots(1)
    order: list[str] = []
    gate = asyncio.Event()

    async def job(tag: str) -> None:
        async with slots.hold(Priority.OTHER, ("FineTuneJob", "ns", tag)):
            order.append(tag)
            await gate.wait()

    async def main() -> None:
        tasks = [asyncio.create_task(job(f"job-{i}")) for i in range(5)]
        await asyncio.sleep(0)  # job-0 holds the one slot, the others wait in line
        slots.raise_priority(("FineTuneJob", "ns", "job-3"), Priority.FINISHING)
        # a pass not waiting yet (behind its object's running pass) gets the mark when it asks
        slots.raise_priority(("FineTuneJob", "ns", "later"), Priority.NEW)
        tasks.append(asyncio.create_task(job("later")))
        await asyncio.sleep(0)
        assert slots._raised == {}  # the mark went with the pass that asked
        gate.set()
        await asyncio.gather(*tasks)

    asyncio.run(main())
    assert order == ["job-0", "job-3", "later", "job-1", "job-2", "job-4"]
    assert slots.busy == 0 and not slots._waiting and not slots._raised


def test_a_request_answered_by_the_waiting_pass_lends_it_its_priority(monkeypatch):
    """The Job finishes while its FineTuneJob's pass waits behind a burst: the coalescer
    answers the Job's request with that waiting pass, which must then go first."""
    from finetune_operator import main
    from finetune_operator.reconcile.settings import OperatorSettings

    order: list[str] = []
    gate = asyncio.Event()

    async def reconcile(namespace: str, name: str, settings) -> None:
        order.append(name)
        if name == "busy":
            await gate.wait()

    monkeypatch.setitem(main.RECONCILERS, "FineTuneJob", reconcile)
    settings = OperatorSettings.from_env({"FINETUNE_MAX_CONCURRENT_PASSES": "1"})

    async def burst() -> None:
        monkeypatch.setattr(main, "_pass_slots", Slots(1))
        monkeypatch.setattr(main, "PASSES", Coalescer())
        run = main.run_reconcile
        tasks = [asyncio.create_task(run(settings, "FineTuneJob", "ns", "busy"))]
        await asyncio.sleep(0)
        tasks += [
            asyncio.create_task(run(settings, "FineTuneJob", "ns", f"new-{i}")) for i in range(3)
        ]
        tasks.append(asyncio.create_task(run(settings, "FineTuneJob", "ns", "trained")))
        await asyncio.sleep(0)
        # the Job of "trained" finishes: its pass is already waiting, at the back of the line
        finishing = run(settings, "FineTuneJob", "ns", "trained", priority=Priority.FINISHING)
        tasks.append(asyncio.create_task(finishing))
        await asyncio.sleep(0)
        gate.set()
        await asyncio.gather(*tasks)

    asyncio.run(burst())
    # "trained" had not started reading when its Job finished, so its waiting pass answers
    # the request, moved to the front; the coalescer also queues one more behind it (its
    # rule: a pass that holds its object's turn has started), which may run later.
    assert order[:3] == ["busy", "trained", "new-0"]
    assert [n for n in order if n.startswith("new")] == ["new-0", "new-1", "new-2"]


def test_a_waiter_cancelled_in_line_does_not_lose_a_slot():
    slots = Slots(1)

    async def main() -> list[str]:
        order = []
        gate = asyncio.Event()

        async def holder() -> None:
            async with slots.hold():
                await gate.wait()

        async def waiter(tag: str) -> None:
            async with slots.hold():
                order.append(tag)

        first = asyncio.create_task(holder())
        await asyncio.sleep(0)
        cancelled = asyncio.create_task(waiter("cancelled"))
        later = asyncio.create_task(waiter("later"))
        await asyncio.sleep(0)
        cancelled.cancel()
        gate.set()
        await asyncio.gather(first, later, cancelled, return_exceptions=True)
        return order

    assert asyncio.run(main()) == ["later"]
    assert slots.busy == 0


def test_a_finished_child_makes_its_jobs_pass_urgent_until_the_status_records_it():
    from finetune_operator.urgency import Urgency, job_finished, pod_finished

    complete = {"conditions": [{"type": "Complete", "status": "True"}]}
    assert job_finished(complete)
    assert job_finished({"conditions": [{"type": "SuccessCriteriaMet", "status": "True"}]})
    assert job_finished({"conditions": [{"type": "Failed", "status": "True"}]})
    assert not job_finished({"conditions": [{"type": "Suspended", "status": "True"}]})
    assert not job_finished({"conditions": [{"type": "Complete", "status": "False"}]})
    assert not job_finished(None) and not job_finished({"active": 1})
    assert pod_finished({"phase": "Succeeded"}) and pod_finished({"phase": "Failed"})
    assert not pod_finished({"phase": "Running"}) and not pod_finished(None)

    u = Urgency()
    a = ("team", "a")
    assert u.finetunejob(a, {}) == Priority.NEW  # no Job yet
    assert u.finetunejob(a, {"jobName": "a-train", "phase": "Running"}) == Priority.OTHER
    assert u.child_finished(a) == Priority.FINISHING  # status still says Running
    done = {"jobName": "a-train", "phase": "Succeeded", "completionTime": "2026-12-02T08:00:00Z"}
    assert u.finetunejob(a, done) == Priority.OTHER
    assert u.child_finished(a) == Priority.OTHER  # e.g. every finished Job after a restart

    # After a restart the watches list in no set order: the Job may come before its job.
    b = ("team", "b")
    assert u.child_finished(b) == Priority.OTHER
    assert u.finetunejob(b, {"jobName": "b-train", "phase": "Running"}) == Priority.FINISHING
    assert u.finetunejob(b, {"jobName": "b-train", "phase": "Running"}) == Priority.OTHER
    c = ("team", "c")
    assert u.child_finished(c) == Priority.OTHER
    assert u.finetunejob(c, done) == Priority.OTHER  # already recorded: nothing to hurry

    for key in (a, b, c):
        u.finetunejob(key, None, deleted=True)
    assert len(u) == 0
    # the finished pods of a deleted job go after it: nothing to hurry, nothing remembered
    assert u.child_finished(a, deleted=True) == Priority.OTHER
    assert len(u) == 0
