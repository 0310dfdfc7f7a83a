"""Transition Events are named after the transition they describe, so a pass after a crash
posts the one that was lost and no pass posts one twice (events.py). Pure functions and a
fake `k8s.post_event`; tests/test_operator_lifecycle.py crashes a real operator's pass."""

from __future__ import annotations

import asyncio
import re
from datetime import UTC, datetime, timedelta

import pytest

from finetune_api.constants import ConditionType as C
from finetune_api.constants import Phase, Reason
from finetune_operator import conditions, events, k8s
from finetune_operator.conditions import format_time, set_condition
from finetune_operator.reconcile import adapterdeployment, adaptermerge, finetunejob
from finetune_operator.status import Outcome, apply_outcome

DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


def obj(name: str = "job", uid: str = "uid-1") -> dict:
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": "ns", "uid": uid, "resourceVersion": "1"},
    }


class Clock:
    """conditions.now, moved by hand: transitions a second or more apart, as in a cluster."""

    def __init__(self, start: datetime):
        self.moment = start

    def __call__(self) -> str:
        return format_time(self.moment)

    def tick(self, seconds: float = 5) -> None:
        self.moment += timedelta(seconds=seconds)


@pytest.fixture
def clock(monkeypatch) -> Clock:
    c = Clock(datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=10))
    monkeypatch.setattr(conditions, "now", c)
    return c


def job_status(status: dict, phase: Phase, reason: str, message: str = "") -> dict:
    return apply_outcome(
        {**status, "jobName": "job-train"}, Outcome(phase, reason, message), generation=1
    )


def key_of(status: dict) -> str:
    return finetunejob.transition_event(status).key


def test_the_same_transition_has_the_same_name_and_a_new_one_a_new_name(clock):
    pending = job_status({}, Phase.PENDING, Reason.PODS_STARTING, "the worker pod is starting")
    clock.tick()
    # Passes that change the reason but not the phase: still the same transition.
    still = job_status(pending, Phase.PENDING, Reason.RETRYING_AFTER_FAILURE, "retrying")
    assert key_of(still) == key_of(pending)
    name = events.event_name(obj(), key_of(pending))
    assert events.event_name(obj(), key_of(still)) == name
    # The same object read again (a new resourceVersion) names the same Event.
    again = obj()
    again["metadata"]["resourceVersion"] = "2"
    assert events.event_name(again, key_of(pending)) == name

    clock.tick()
    queued = job_status(still, Phase.QUEUED, "Unschedulable", "no node")
    clock.tick()
    # Back to Pending: a new transition into the same phase, so a new Event.
    pending_again = job_status(queued, Phase.PENDING, Reason.PODS_STARTING, "starting")
    clock.tick()
    running = job_status(pending_again, Phase.RUNNING, Reason.TRAINING, "training")
    names = [events.event_name(obj(), key_of(s)) for s in (pending, queued, pending_again, running)]
    assert len(set(names)) == 4
    # A re-created object of the same name does not find the old one's Events.
    assert events.event_name(obj(uid="uid-2"), key_of(pending)) != name


def test_names_are_valid_event_names_even_for_the_longest_object_names():
    long = obj(name="a" * 253)
    name = events.event_name(long, "phase=Failed@2024-01-01T00:00:00Z")
    assert len(name) <= 253 and DNS_SUBDOMAIN.match(name)
    assert events.event_name(obj("too-small"), "k").startswith("too-small.")


def test_the_event_keeps_the_reason_message_and_type_of_the_phase(clock):
    failed = apply_outcome(
        {}, Outcome(Phase.FAILED, Reason.CUDA_OUT_OF_MEMORY, "CUDA out of memory"), 1
    )
    t = finetunejob.transition_event(failed)
    assert (t.type, t.reason, t.message) == (
        "Warning",
        Reason.CUDA_OUT_OF_MEMORY,
        "Failed: CUDA out of memory",
    )
    assert t.at == format_time(clock.moment)
    assert finetunejob.transition_event({}) is None  # no phase yet: nothing to tell


class FakePoster:
    """k8s.post_event against an API server that keeps the Events it was given, and
    k8s.list_metadata of those Events."""

    def __init__(self):
        self.stored: dict[str, dict] = {}
        self.calls = 0
        self.lists: list[tuple] = []
        self.fail = False

    async def list_metadata(
        self, api_version, kind, namespace, label_selector=None, field_selector=None
    ):
        self.lists.append((api_version, kind, namespace, field_selector))
        if self.fail:
            raise TimeoutError("no answer")
        return [{"name": name} for name in self.stored]

    async def __call__(self, obj, *, name, type, reason, message, at=None):
        self.calls += 1
        if self.fail:
            return False  # k8s.post_event logged why
        self.stored.setdefault(name, {"type": type, "reason": reason, "message": message})
        return True  # created, or 409: there already


@pytest.fixture
def poster(monkeypatch) -> FakePoster:
    fake = FakePoster()
    monkeypatch.setattr(k8s, "post_event", fake)
    monkeypatch.setattr(k8s, "list_metadata", fake.list_metadata)
    return fake


def test_a_pass_after_a_failed_post_or_a_restart_posts_what_is_missing_once(clock, poster):
    posted, existing = events.Posted(), events.Existing()
    status = apply_outcome({}, Outcome(Phase.FAILED, Reason.PLAN_DOES_NOT_FIT, "2Gi"), 1)
    transition = finetunejob.transition_event(status)

    # The pass that wrote the status could not post (or died before it did); neither could
    # it list the namespace's Events.
    poster.fail = True
    asyncio.run(events.ensure(obj(), transition, posted, existing))
    assert poster.stored == {}
    # The next pass derives the same transition from the status, lists the namespace's
    # Events (this operator's, metadata only), does not find it and posts it.
    poster.fail = False
    asyncio.run(events.ensure(obj(), transition, posted, existing))
    assert list(poster.stored.values()) == [
        {"type": "Warning", "reason": Reason.PLAN_DOES_NOT_FIT, "message": "Failed: 2Gi"}
    ]
    assert poster.lists[-1] == ("v1", "Event", "ns", "source=finetune-operator")
    # Passes after it know it is there: no API call.
    calls, lists = poster.calls, len(poster.lists)
    for _ in range(3):
        asyncio.run(events.ensure(obj(), transition, posted, existing))
    assert (poster.calls, len(poster.lists)) == (calls, lists)
    # A restarted operator remembers nothing: one list of the namespace's Events finds it
    # there, and nothing is posted, then or later.
    restarted, listed_again = events.Posted(), events.Existing()
    for _ in range(3):
        asyncio.run(events.ensure(obj(), transition, restarted, listed_again))
    assert (poster.calls, len(poster.lists)) == (calls, lists + 1) and len(poster.stored) == 1
    # A new transition of the same object is not in the list: posted, without listing again.
    later = finetunejob.transition_event(
        apply_outcome(status, Outcome(Phase.PENDING, Reason.PODS_STARTING, "retry"), 2)
    )
    asyncio.run(events.ensure(obj(), later, restarted, listed_again))
    assert (poster.calls, len(poster.lists)) == (calls + 1, lists + 1)


def test_a_transition_older_than_the_event_ttl_is_not_announced_again(clock, poster):
    status = apply_outcome({}, Outcome(Phase.SUCCEEDED, Reason.TRAINING_COMPLETE, "done"), 1)
    transition = finetunejob.transition_event(status)
    assert not events.too_old(transition)
    later = clock.moment + timedelta(seconds=events.MAX_AGE_S + 1)
    assert events.too_old(transition, now=later)
    clock.moment = datetime.now(UTC) - timedelta(seconds=events.MAX_AGE_S + 60)
    old = finetunejob.transition_event(
        apply_outcome({}, Outcome(Phase.SUCCEEDED, Reason.TRAINING_COMPLETE, "done"), 1)
    )
    asyncio.run(events.ensure(obj(), old, events.Posted()))
    assert poster.calls == 0


def test_the_memory_is_bounded():
    posted = events.Posted(limit=2)
    for uid in ("a", "b", "c"):
        posted.confirm(uid, "k")
    assert (posted.get("a"), posted.get("b"), posted.get("c")) == (None, "k", "k")


def test_a_finished_merge_tells_its_last_transition_from_its_conditions(clock):
    outcome = Outcome(Phase.FAILED, Reason.FINE_TUNE_JOB_FAILED, "job 'x' failed")
    status = apply_outcome({}, outcome, 1)
    status["conditions"] = [c for c in status["conditions"] if c["type"] in adaptermerge.LIFECYCLE]
    in_pass = adaptermerge.transition_event(status, outcome)
    later = adaptermerge.transition_event(status)
    assert in_pass == later
    assert (later.type, later.reason, later.message) == (
        "Warning",
        Reason.FINE_TUNE_JOB_FAILED,
        "Failed: job 'x' failed",
    )


def ready(status: dict, value: bool, reason: str, message: str = "", generation: int = 1) -> dict:
    conds = set_condition(status.get("conditions") or [], C.READY, value, reason, message, 1)
    return {"conditions": conds, "observedGeneration": generation}


def test_adapter_deployment_events_follow_ready_flips_and_invalid_generations(clock):
    t = adapterdeployment.ready_transition
    waiting = ready({}, False, Reason.REPLICAS_NOT_READY, "creating the server")
    # Never ready: not being ready yet is no news.
    assert t(waiting, was_ready=False) is None
    clock.tick()
    up = ready(waiting, True, Reason.REPLICAS_READY, "1/1 ready")
    first = t(up, was_ready=False)
    assert (first.type, first.reason, first.message) == ("Normal", "ReplicasReady", "1/1 ready")
    clock.tick()
    down = ready(up, False, Reason.REPLICAS_NOT_READY, "0/1 ready")
    flip = t(down, was_ready=True)
    assert flip.type == "Warning" and flip.key != first.key
    # An invalid spec is news once per generation, ready before or not.
    bad = ready(down, False, Reason.INVALID_SPEC, "spec.x", generation=2)
    worse = ready(bad, False, Reason.INVALID_SPEC, "spec.y", generation=3)
    assert t(bad, was_ready=False).key == t(bad, was_ready=True).key
    assert len({flip.key, t(bad, was_ready=False).key, t(worse, was_ready=False).key}) == 3
