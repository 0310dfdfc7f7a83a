"""A pass that fails for a reason that passes is run again, with backoff: a per-object
rate-limited retry, as controller-runtime's work queue does.

kopf re-runs only its change handlers (create/update/resume). This operator's handlers are
all `@kopf.on.event` (main.py says why), which kopf calls once per event: an exception,
kopf.TemporaryError included, is logged and forgotten ("If the handler fails, it fails and
is never retried", kopf's process_watching_cause). So a pass that met an API server still
answering 429 or 503 after k8s._call's own attempts waited for the next event or the periodic
resync (FINETUNE_RESYNC_SECONDS, 60 s by default), with its Job created but its status
unwritten.

Here such a pass is scheduled again for its object: after the server's Retry-After when it
sent one, else after exponential backoff with jitter that grows with the object's consecutive
failures (from PASS_RETRY_BASE_S to PASS_RETRY_CAP_S) and starts over once a pass succeeds.
A pass that fails for another reason (a 403, a 422, a bug) is not repeated soon, as it would
fail the same way: the next event or resync runs it, and the failure is counted.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from . import k8s

log = logging.getLogger(__name__)

PASS_RETRY_BASE_S = 1.0
PASS_RETRY_CAP_S = 300.0

Key = tuple[str, str, str]
"""kind, namespace, name"""


def retry_reason(exc: BaseException) -> tuple[str, str | None] | None:
    """(label, Retry-After) when the pass that raised `exc` is worth running again soon:
    the API said "not now" (k8s.transient), or the object kept changing under the pass
    (write conflicts on every attempt). None: it would fail the same way."""
    if isinstance(exc, k8s.Conflict):
        return "conflict", None
    if getattr(exc, "transient", False):  # planning.PlanningFailed: the Hub did not answer
        return "upstream", None
    return k8s.transient(exc)


class RetryQueue:
    """Per-object failure counts and at most one scheduled re-run per object."""

    def __init__(
        self,
        *,
        base: float = PASS_RETRY_BASE_S,
        cap: float = PASS_RETRY_CAP_S,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ):
        self.base = base
        self.cap = cap
        self._sleep = sleep
        self.failures: dict[Key, int] = {}
        self.tasks: dict[Key, asyncio.Task] = {}
        self._due: dict[Key, float] = {}

    def delay(self, key: Key, retry_after: str | None = None) -> float:
        """Seconds until `key`'s next pass after its latest failure."""
        attempt = max(self.failures.get(key, 1) - 1, 0)
        return k8s.retry_delay(attempt, retry_after, base=self.base, cap=self.cap)

    def retry(self, key: Key, retry_after: str | None, run: Callable[[], Awaitable[None]]) -> float:
        """Count a transient failure of `key`'s pass and schedule `run` after the delay.
        -> seconds until the next pass (an earlier one already scheduled is kept)."""
        self.failures[key] = self.failures.get(key, 0) + 1
        delay = self.delay(key, retry_after)
        loop = asyncio.get_running_loop()
        due = loop.time() + delay
        if key in self.tasks and self._due[key] <= due:
            return max(self._due[key] - loop.time(), 0.0)
        self._cancel(key)
        self._due[key] = due
        self.tasks[key] = loop.create_task(self._later(key, delay, run))
        return delay

    def succeeded(self, key: Key) -> None:
        """A pass of `key` went through: backoff starts over, nothing more is due."""
        self.failures.pop(key, None)
        self._cancel(key)

    def cancel_all(self) -> None:
        for key in list(self.tasks):
            self._cancel(key)

    def _cancel(self, key: Key) -> None:
        task = self.tasks.pop(key, None)
        self._due.pop(key, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    async def _later(self, key: Key, delay: float, run: Callable[[], Awaitable[None]]) -> None:
        await self._sleep(delay)
        # No longer scheduled once running: a failure of this pass schedules the next one.
        if self.tasks.get(key) is asyncio.current_task():
            self.tasks.pop(key)
            self._due.pop(key, None)
        try:
            await run()
        except Exception:  # run_reconcile handles its own; this is a last resort
            log.exception("re-run of %s %s/%s failed", *key)
