"""k8s.py's answer to "not now": 429 (with Retry-After), 5xx and dropped connections are
repeated with backoff; answers that mean "no" are not. The API client is replaced by one that
fails on cue: this checks the retry policy of the one module doing API I/O; the operator's
behaviour against a real API server is tested in the cluster suites."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from scriptedapi import ScriptedApi, api_error

from finetune_operator import k8s, metrics


@pytest.fixture
def flaky(monkeypatch):
    slept: list[float] = []

    async def no_wait(seconds):
        slept.append(seconds)

    def install(failures):
        api = ScriptedApi(failures, then={"ok": True})

        async def connect():
            return api

        monkeypatch.setattr(k8s, "connect", connect)
        monkeypatch.setattr(k8s.asyncio, "sleep", no_wait)
        return api, slept

    return install


def retries(method: str, code: str) -> float:
    return metrics.API_TRANSIENT_RETRIES.labels(method=method, code=code)._value.get()


def test_throttling_is_waited_out_as_the_server_asks(flaky):
    api, slept = flaky([api_error(429, "2"), api_error(503)])
    before = retries("GET", "429")
    assert asyncio.run(k8s._call("GET", "/api/v1/namespaces/x/pods")) == {"ok": True}
    assert api.calls == 3
    assert slept[0] == 2.0  # Retry-After honoured
    assert 0.5 * k8s.RETRY_BASE_S * 2 <= slept[1] <= k8s.RETRY_BASE_S * 2  # backoff, attempt 1
    assert retries("GET", "429") == before + 1


def test_a_dropped_connection_is_repeated_too(flaky):
    api, _ = flaky([aiohttp.ServerDisconnectedError(), TimeoutError()])
    assert asyncio.run(k8s._call("POST", "/api/v1/namespaces/x/configmaps")) == {"ok": True}
    assert api.calls == 3


@pytest.mark.parametrize("status", [400, 403, 404, 409, 422])
def test_an_answer_that_means_no_is_not_repeated(flaky, status):
    api, slept = flaky([api_error(status)])
    with pytest.raises(k8s.ApiError) as caught:
        asyncio.run(k8s._call("GET", "/api/v1/namespaces/x/pods/p"))
    assert caught.value.status == status and api.calls == 1 and slept == []


def test_retries_stop_after_the_last_attempt(flaky):
    api, slept = flaky([api_error(500)] * k8s.RETRY_ATTEMPTS)
    with pytest.raises(k8s.ApiError):
        asyncio.run(k8s._call("PATCH", "/apis/finetune.dev/v1alpha1/x"))
    assert api.calls == k8s.RETRY_ATTEMPTS and len(slept) == k8s.RETRY_ATTEMPTS - 1
    assert max(slept) <= k8s.RETRY_CAP_S


def test_the_delay_grows_to_its_cap_and_a_date_falls_back_to_backoff():
    assert [k8s.retry_delay(a) <= k8s.RETRY_CAP_S for a in range(12)] == [True] * 12
    assert k8s.retry_delay(10) >= 0.5 * k8s.RETRY_CAP_S
    assert k8s.retry_delay(0, "3600") == k8s.RETRY_AFTER_CAP_S
    assert k8s.retry_delay(0, "Wed, 21 Oct 2015 07:28:00 GMT") <= k8s.RETRY_BASE_S
