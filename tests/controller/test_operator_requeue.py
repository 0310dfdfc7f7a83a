"""A pass that fails for now is run again with backoff; one that would fail the same way is
counted and left to the next event or resync (requeue.py). kopf never re-runs an `on.event`
handler, so the handler is called here as kopf calls it, against an API client that fails on
cue, and what comes back is the operator's own retry."""

from __future__ import annotations

import asyncio

import kopf
import pytest
from scriptedapi import ScriptedApi, api_error

from finetune_operator import k8s, main, metrics, requeue
from finetune_operator.reconcile.settings import OperatorSettings

KEY = ("FineTuneJob", "ns", "job")


class Harness:
    def __init__(self, monkeypatch):
        self.slept: list[float] = []
        self.monkeypatch = monkeypatch
        self.gate: asyncio.Event | None = None

        async def no_wait(seconds):
            # A re-run waits for `release()`, not for the clock: the test sees it scheduled.
            self.slept.append(seconds)
            if self.gate is None:
                self.gate = asyncio.Event()
            await self.gate.wait()

        # The operator's queue, with a clock that does not wait.
        self.queue = requeue.RetryQueue(sleep=no_wait)
        monkeypatch.setattr(main, "RETRIES", self.queue)
        monkeypatch.setattr(k8s, "RETRY_ATTEMPTS", 1)  # _call gives up at once: a spent call

    def release(self) -> None:
        """From now on re-runs start as soon as they are scheduled."""
        if self.gate is None:
            self.gate = asyncio.Event()
        self.gate.set()

    def api(self, failures) -> ScriptedApi:
        # after the failures every object is gone (404): a pass reads nothing and ends
        api = ScriptedApi(failures, then=api_error(404))

        async def connect():
            return api

        self.monkeypatch.setattr(k8s, "connect", connect)
        return api


@pytest.fixture
def harness(monkeypatch) -> Harness:
    return Harness(monkeypatch)


def requeues(code: str) -> float:
    return metrics.RECONCILE_REQUEUES.labels(kind="FineTuneJob", code=code)._value.get()


def failures(error: str) -> float:
    return metrics.RECONCILE_FAILURES.labels(kind="FineTuneJob", error=error)._value.get()


async def handle_event() -> None:
    """What kopf does with an event of a FineTuneJob: call the handler once; then until the
    pass it started is done."""
    memo = kopf.Memo(operator_settings=OperatorSettings())
    await main.finetunejob_event(type="MODIFIED", name="job", namespace="ns", memo=memo)
    await main.started_passes()


def test_a_throttled_pass_runs_again_after_retry_after_then_backoff_starts_over(harness):
    api = harness.api([api_error(429, "7"), api_error(503)])
    before_429, before_503 = requeues("429"), requeues("503")

    async def scenario():
        await handle_event()  # returns: nothing escapes to kopf, which would drop it
        assert harness.queue.failures[KEY] == 1 and KEY in harness.queue.tasks
        # The re-runs: 503, scheduled again with backoff; then one that goes through.
        harness.release()
        while harness.queue.tasks:
            await next(iter(harness.queue.tasks.values()))

    asyncio.run(scenario())
    assert harness.slept[0] == 7.0  # the server's Retry-After
    second = requeue.PASS_RETRY_BASE_S * 2  # backoff for a second consecutive failure
    assert 0.5 * second <= harness.slept[1] <= second
    assert api.calls == 3
    assert requeues("429") == before_429 + 1 and requeues("503") == before_503 + 1
    # Succeeded: nothing left scheduled and the next failure starts from the base delay.
    assert harness.queue.failures == {} and harness.queue.tasks == {}


def test_a_dropped_connection_and_endless_conflicts_are_retried_too(harness, monkeypatch):
    before = requeues("conflict")

    async def always_conflicts(namespace, name, settings):
        raise k8s.Conflict("changed while reconciling")

    monkeypatch.setitem(main.RECONCILERS, "FineTuneJob", always_conflicts)

    async def scenario():
        await handle_event()
        task = harness.queue.tasks[KEY]
        task.cancel()

    asyncio.run(scenario())
    assert requeues("conflict") == before + 1
    assert requeue.retry_reason(TimeoutError()) == ("connection", None)
    assert requeue.retry_reason(api_error(502)) == ("502", None)


@pytest.mark.parametrize("status", [403, 422])
def test_a_pass_that_would_fail_the_same_way_is_counted_not_repeated(harness, status):
    harness.api([api_error(status)])
    before = failures("ApiError")

    async def scenario():
        await handle_event()
        assert harness.queue.tasks == {}

    asyncio.run(scenario())
    assert failures("ApiError") == before + 1
    assert harness.queue.failures == {} and harness.slept == []


def test_a_bug_is_a_permanent_failure_too(harness, monkeypatch):
    async def broken(namespace, name, settings):
        raise KeyError("metadata")

    monkeypatch.setitem(main.RECONCILERS, "FineTuneJob", broken)
    before = failures("KeyError")
    asyncio.run(handle_event())
    assert failures("KeyError") == before + 1 and harness.queue.tasks == {}


def test_the_delay_grows_with_consecutive_failures_to_its_cap():
    queue = requeue.RetryQueue()
    delays = []
    for n in range(1, 14):
        queue.failures[KEY] = n
        delays.append(queue.delay(KEY))
    for n, delay in enumerate(delays, start=1):
        full = min(requeue.PASS_RETRY_CAP_S, requeue.PASS_RETRY_BASE_S * 2 ** (n - 1))
        assert 0.5 * full <= delay <= full
    assert max(delays) <= requeue.PASS_RETRY_CAP_S
    # Retry-After wins (up to k8s.RETRY_AFTER_CAP_S), whatever the count.
    assert queue.delay(KEY, "2") == 2.0
    assert queue.delay(KEY, "99999") == k8s.RETRY_AFTER_CAP_S


def test_an_earlier_rerun_already_scheduled_is_kept_and_success_cancels_it():
    ran = []

    async def never_wakes(seconds):
        await asyncio.Event().wait()

    async def scenario():
        queue = requeue.RetryQueue(sleep=never_wakes)

        async def run():
            ran.append(True)

        first = queue.retry(KEY, "5", run)
        assert queue.retry(KEY, "30", run) <= first  # the 5 s one stays
        assert len(queue.tasks) == 1
        task = queue.tasks[KEY]
        queue.succeeded(KEY)
        await asyncio.sleep(0)
        assert task.cancelled() and queue.tasks == {} and queue.failures == {}

    asyncio.run(scenario())
    assert ran == []
