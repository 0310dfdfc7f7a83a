"""Transition Events: each posted once, level-based, whatever crashes in between.

A pass writes the status first and posts the Event about the transition after it. An
operator killed between the two used to lose the Event for good: the next pass saw no change
(the status was already written) and posted nothing. Now every pass works out which
transition the object's current status describes and makes sure its Event exists:

* The Event is named after the transition (`<object>.<hash of uid and transition>`), so
  posting it again is harmless: the API server answers 409 AlreadyExists, which counts as
  posted. No pass can post the same transition twice.
* A transition is identified by the status alone (the phase and when its conditions last
  flipped), so a pass after a restart derives the same name the crashed pass would have used.
* The operator remembers, per object, the last transition whose Event it confirmed, so a
  pass with nothing new makes no API call. After a restart that memory is empty: the first
  pass in a namespace lists the names of the Events this operator posted there (metadata
  only, one request), and an Event found there is not posted again. A restart of an
  operator with 1,000 jobs used to cost 1,000 POSTs answered 409.
* A transition older than `MAX_AGE_S` gets no Event from a later pass: the API server keeps
  Events an hour by default (`--event-ttl`), so an Event that old would be gone already, and a
  restarted operator must not re-announce last week's `Succeeded`.

The functions here are pure except `ensure` and `Existing.has`, whose only I/O is
`k8s.post_event` and one list of a namespace's Events.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from . import k8s
from .conditions import parse_time

MAX_AGE_S = 3600.0
NAME_MAX = 253
HASH_CHARS = 16


@dataclass(frozen=True)
class Transition:
    """One Event-worthy change of an object's status, and the Event that tells of it."""

    key: str
    """What changed, stable for as long as the status stays in this state."""
    at: str | None
    """When it changed (metav1 time), from the conditions; None if no condition says."""
    type: str
    reason: str
    message: str


def event_name(obj: dict, key: str) -> str:
    """The Event's metadata.name: the object's name (kubectl's convention, so `kubectl get
    events` lists it next to the object's other Events) and a hash of its uid and the
    transition. The uid keeps a re-created object of the same name from finding the old
    object's Events."""
    md = obj["metadata"]
    digest = hashlib.sha256(f"{md.get('uid')}\n{key}".encode()).hexdigest()[:HASH_CHARS]
    return f"{md['name'][: NAME_MAX - HASH_CHARS - 1]}.{digest}"


def latest_transition(conditions: list[dict], types: Iterable[str]) -> str | None:
    """The latest lastTransitionTime among the conditions of `types`: when the state they
    make up last changed."""
    wanted = set(types)
    times = []
    for c in conditions:
        if c.get("type") in wanted and c.get("lastTransitionTime"):
            try:
                times.append((parse_time(c["lastTransitionTime"]), c["lastTransitionTime"]))
            except ValueError:
                continue  # not the format we write; the other conditions still say
    return max(times)[1] if times else None


def phase_transition(
    status: dict, lifecycle: Iterable[str], *, type: str, reason: str, message: str
) -> Transition | None:
    """The transition into the status' current phase. `lifecycle` are the condition types
    whose values follow the phase (each is True in exactly one phase), so one of them flips
    whenever the phase changes and none does while it stays: the latest of their transition
    times is when the phase began."""
    phase = status.get("phase")
    if not phase:
        return None
    at = latest_transition(status.get("conditions") or [], lifecycle)
    return Transition(f"phase={phase}@{at}", at, type, reason, message)


def too_old(transition: Transition, now: datetime | None = None) -> bool:
    if transition.at is None:
        return False
    try:
        at = parse_time(transition.at)
    except ValueError:
        return False
    return ((now or datetime.now(UTC)) - at).total_seconds() > MAX_AGE_S


class Posted:
    """The last transition confirmed per object uid (posted, or found already there).

    Bounded: the oldest entries go first; a forgotten object costs one 409 on its next pass.
    """

    def __init__(self, limit: int = 10000):
        self.limit = limit
        self._keys: OrderedDict[str, str] = OrderedDict()

    def get(self, uid: str) -> str | None:
        return self._keys.get(uid)

    def confirm(self, uid: str, key: str) -> None:
        self._keys[uid] = key
        self._keys.move_to_end(uid)
        while len(self._keys) > self.limit:
            self._keys.popitem(last=False)

    def clear(self) -> None:
        self._keys.clear()


POSTED = Posted()


class Existing:
    """Per namespace, the names of the Events this operator has posted there: listed once
    (metadata only, `source=` this operator) when a pass first needs it, then added to as
    Events are posted; listed again once the list is older than MAX_AGE_S, the age past
    which no Event is posted anyway (and the API server has dropped older ones)."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self._names: dict[str, tuple[float, set[str]]] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def has(self, namespace: str, name: str) -> bool:
        entry = self._names.get(namespace)
        if entry is None or self.clock() - entry[0] > MAX_AGE_S:
            # A burst's passes wait for the one list in flight instead of each sending one.
            async with self._locks.setdefault(namespace, asyncio.Lock()):
                entry = self._names.get(namespace)
                if entry is None or self.clock() - entry[0] > MAX_AGE_S:
                    started = self.clock()
                    try:
                        listed = await k8s.list_metadata(
                            "v1", "Event", namespace, field_selector=f"source={k8s.FIELD_MANAGER}"
                        )
                    except k8s.REQUEST_FAILURES:
                        return False  # post it: a 409 says as much
                    entry = self._names[namespace] = (started, {md["name"] for md in listed})
        return name in entry[1]

    def add(self, namespace: str, name: str) -> None:
        entry = self._names.get(namespace)
        if entry is not None:
            entry[1].add(name)

    def clear(self) -> None:
        self._names.clear()
        self._locks.clear()


EXISTING = Existing()


async def ensure(
    obj: dict,
    transition: Transition | None,
    posted: Posted = POSTED,
    existing: Existing = EXISTING,
) -> None:
    """Post the Event of `transition` about `obj` unless it is known to exist already.

    Called by every pass with the transition the status (as written, or as found) describes,
    so a pass after a crash posts what the crashed one could not. A failure is logged by
    k8s.post_event and left for the next pass.
    """
    uid = obj["metadata"].get("uid")
    if transition is None or not uid or posted.get(uid) == transition.key:
        return
    if too_old(transition):
        posted.confirm(uid, transition.key)
        return
    name = event_name(obj, transition.key)
    namespace = obj["metadata"]["namespace"]
    if await existing.has(namespace, name) or await k8s.post_event(
        obj,
        name=name,
        type=transition.type,
        reason=transition.reason,
        message=transition.message,
        at=transition.at,
    ):
        posted.confirm(uid, transition.key)
        existing.add(namespace, name)
