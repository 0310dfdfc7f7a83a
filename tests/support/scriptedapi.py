"""A stand-in for k8s.Client.request that fails on cue, for the tests of
the operator's retries (k8s.py) and its per-object retry queue (requeue.py)."""

from __future__ import annotations

from typing import Any

from finetune_operator.k8s import ApiError


def api_error(status: int, retry_after: str | None = None) -> ApiError:
    return ApiError(status, "test", headers={"Retry-After": retry_after} if retry_after else {})


class ScriptedApi:
    """request raises each of `failures` in turn; after them it answers `then`, raising it
    when it is an exception."""

    def __init__(self, failures, then: Any):
        self.failures = list(failures)
        self.then = then
        self.calls = 0

    async def request(self, *args, **kwargs):
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        if isinstance(self.then, BaseException):
            raise self.then
        return self.then
