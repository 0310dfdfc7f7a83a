"""Which children of a FineTuneJob exist, known without asking the API server per child.

A pass used to POST every child and read each back after the 409: ten requests per pass
for an up-to-date job, most of the operator's work under load. Now the operator keeps,
per namespace, the names of the children it has seen:

* one labelled list per child kind fills a namespace's entry (metadata only, one request
  per kind for all the jobs of the namespace), when a pass first needs it and again once it
  is older than `max_age` (the resync interval), so knowledge is never older than that;
* every child this operator creates, or finds already there (409), is recorded at once.

A child the inventory knows is not posted again. One it does not know goes through
`k8s.create_if_absent` as before, so stale knowledge costs at most a 409, never a
duplicate. A child deleted behind the operator's back is recreated by the first pass after
the next list of its namespace (at most `max_age` later). After a restart the inventory is
empty: the first pass lists, and creates only what is missing.

The one I/O is through k8s.py; the bookkeeping (`Known`) is plain data with a clock.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable

from finetune_api.constants import LABEL_FINETUNEJOB, LABEL_MANAGED_BY, OPERATOR_NAME

from . import k8s

log = logging.getLogger(__name__)

# The kinds of a FineTuneJob's children other than its Job (builders/training.py). The Job
# is read by every pass anyway (its status is the job's), so it is never taken from here.
KINDS: tuple[tuple[str, str], ...] = (
    ("v1", "ConfigMap"),
    ("v1", "ServiceAccount"),
    ("rbac.authorization.k8s.io/v1", "Role"),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"),
    ("v1", "Service"),
)
# Children of FineTuneJobs only: not the serving Deployments' Services or merge Jobs.
SELECTOR = f"{LABEL_MANAGED_BY}={OPERATOR_NAME},{LABEL_FINETUNEJOB}"
# A namespace not listed or touched for this many `max_age`s is forgotten (its jobs are
# gone, or its next pass lists it again): memory follows the live objects, not history.
FORGET_AFTER = 3

Key = tuple[str, str, str]  # apiVersion, kind, name


def key_of(obj: dict) -> tuple[str, Key]:
    md = obj["metadata"]
    return md["namespace"], (obj["apiVersion"], obj["kind"], md["name"])


class Known:
    """Per namespace: the children seen, each with when it was seen, and when the
    namespace was last listed."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._seen: dict[str, dict[Key, float]] = {}
        self._listed: dict[str, float] = {}
        self._touched: dict[str, float] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def has(self, obj: dict) -> bool:
        namespace, key = key_of(obj)
        return key in self._seen.get(namespace, {})

    def record(self, obj: dict) -> None:
        namespace, key = key_of(obj)
        now = self.clock()
        self._seen.setdefault(namespace, {})[key] = now
        self._touched[namespace] = now

    def fresh(self, namespace: str, max_age: float) -> bool:
        listed = self._listed.get(namespace)
        return listed is not None and self.clock() - listed < max_age

    def replace(self, namespace: str, listed: Iterable[Key], started: float) -> None:
        """The namespace's children are `listed`, as of a list sent at `started`. Children
        recorded after that moment are kept: the list may have been served before they
        were created."""
        recent = {k: t for k, t in self._seen.get(namespace, {}).items() if t >= started}
        self._seen[namespace] = {**dict.fromkeys(listed, started), **recent}
        self._listed[namespace] = started
        self._touched[namespace] = started

    def forget_idle(self, max_age: float) -> None:
        cutoff = self.clock() - FORGET_AFTER * max_age
        for namespace in [n for n, t in self._touched.items() if t < cutoff]:
            self._seen.pop(namespace, None)
            self._listed.pop(namespace, None)
            self._touched.pop(namespace, None)
            lock = self._locks.get(namespace)
            if lock is not None and not lock.locked():
                del self._locks[namespace]

    def lock(self, namespace: str) -> asyncio.Lock:
        return self._locks.setdefault(namespace, asyncio.Lock())

    def namespaces(self) -> list[str]:
        return list(self._seen)

    def clear(self) -> None:
        self._seen.clear()
        self._listed.clear()
        self._touched.clear()


KNOWN = Known()


async def refresh(namespace: str, max_age: float, known: Known | None = None) -> None:
    """List the namespace's children unless that was done less than `max_age` ago. Passes
    of a burst wait for the one list in flight instead of each sending their own."""
    known = known or KNOWN
    if known.fresh(namespace, max_age):
        return
    async with known.lock(namespace):
        if known.fresh(namespace, max_age):
            return  # listed while this pass waited
        started = known.clock()
        listed: list[Key] = []
        for api_version, kind in KINDS:
            names = await k8s.list_names(api_version, kind, namespace, SELECTOR)
            listed.extend((api_version, kind, n) for n in names)
        known.replace(namespace, listed, started)
    known.forget_idle(max_age)


async def not_known(children: list[dict], max_age: float, known: Known | None = None) -> list[dict]:
    """Those of `children` (all in one namespace) the inventory does not know, in order.
    Only kind and metadata are read, so a child whose body is costly to render can be asked
    about with a stub first."""
    known = known or KNOWN
    if not children:
        return []
    await refresh(children[0]["metadata"]["namespace"], max_age, known)
    return [child for child in children if not known.has(child)]


async def create(child: dict, known: Known | None = None) -> tuple[dict, bool]:
    """`k8s.create_if_absent`, and remember that the child exists."""
    obj, created = await k8s.create_if_absent(child)
    (known or KNOWN).record(child)
    if created:
        md = child["metadata"]
        log.info("created %s %s/%s", child["kind"], md["namespace"], md["name"])
    return obj, created
