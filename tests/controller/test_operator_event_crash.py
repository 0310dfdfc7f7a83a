"""An operator that dies between a status write and its Event: the next operator posts the
Event, once, and no later pass or restart posts it again.

The crashed pass is the operator's own reconcile, run in this process against the test
control plane with every Event POST failing (what a kill -9 right after the status write
leaves behind: the status written, no Event). The namespace is not the session operator's
(no `operator_process` fixture: a `t-` namespace); a fresh operator process is started on it
afterwards, with nothing in memory, as after a restart.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from apirequests import requests_so_far
from kubetest import Kube, bound_pvc, finetunejob_manifest, wait_for

pytestmark = pytest.mark.cluster

# name -> (memory, phase the crashed pass writes, reason of its Event)
JOBS = {
    # The plan does not fit: a final state, its one Event the only news.
    "too-small": ("2Gi", "Failed", "InsufficientGPUMemory"),
    # Planned, Job created, its pod bound to the manual node where nothing runs it: Pending
    # for the whole test.
    "planned": ("24Gi", "Pending", "PodsStarting"),
}


def manifest(name: str, memory: str) -> dict:
    doc = finetunejob_manifest(name, memory=memory)
    doc["spec"]["resources"]["nodeSelector"] = {"finetune.dev/test-node": "manual"}
    doc["spec"]["resources"]["tolerations"] = [
        {"key": "finetune.dev/test-node", "operator": "Equal", "value": "manual"}
    ]
    return doc


def crashed_passes(kube: Kube, monkeypatch) -> None:
    """One pass per job, each of whose Event POSTs fails: status written, Event lost."""
    from finetune_operator import k8s
    from finetune_operator.reconcile import finetunejob
    from finetune_operator.reconcile.settings import OperatorSettings

    real_call = k8s._call
    refused = []

    async def events_refused(method, resource_path, **kwargs):
        if method == "POST" and resource_path.endswith("/events"):
            refused.append(kwargs["body"]["reason"])
            raise k8s.ApiError(500, "the operator died here")
        return await real_call(method, resource_path, **kwargs)

    monkeypatch.setattr(k8s, "_call", events_refused)
    monkeypatch.setattr(k8s, "RETRY_ATTEMPTS", 1)
    settings = OperatorSettings.from_env({"FINETUNE_ALLOW_HUB": "false"})

    async def run() -> None:
        # The test control plane's credentials, in the one client k8s.py uses.
        await k8s.connect(kube.kubeconfig)
        try:
            for name in JOBS:
                await finetunejob.reconcile(kube.namespace, name, settings)
        finally:
            await k8s.close()

    asyncio.run(run())
    assert sorted(refused) == sorted(reason for _, _, reason in JOBS.values())


def passes_after_a_restart(kube: Kube) -> Counter:
    """One pass per job in this process, its Event memory empty as after a restart. -> the
    requests of those passes."""
    from finetune_operator import events, k8s
    from finetune_operator.reconcile import finetunejob
    from finetune_operator.reconcile.settings import OperatorSettings

    settings = OperatorSettings.from_env({"FINETUNE_ALLOW_HUB": "false"})
    events.POSTED.clear()
    events.EXISTING.clear()

    async def run() -> Counter:
        await k8s.connect(kube.kubeconfig)
        before = requests_so_far()
        try:
            for name in JOBS:
                await finetunejob.reconcile(kube.namespace, name, settings)
        finally:
            await k8s.close()
        return requests_so_far() - before

    return asyncio.run(run())


def events_of(kube: Kube, name: str) -> list[dict]:
    return [e for e in kube.items("events") if e["involvedObject"]["name"] == name]


def test_an_event_lost_in_a_crash_is_posted_by_the_next_operator_exactly_once(
    cluster, crds, kube: Kube, manual_node, tmp_path, monkeypatch
):
    from operator_harness import OperatorProcess

    from finetune_operator import events
    from finetune_operator.reconcile import finetunejob

    for claim in ("data", "adapters"):
        bound_pvc(kube, claim)
    for name, (memory, _, _) in JOBS.items():
        kube.apply(manifest(name, memory))

    crashed_passes(kube, monkeypatch)
    for name, (_, phase, reason) in JOBS.items():
        status = kube.get("finetunejob", name)["status"]
        assert (status["phase"], status["reason"]) == (phase, reason)
        assert events_of(kube, name) == []

    restarted = OperatorProcess(cluster, tmp_path, namespaces=f"{kube.namespace}*")
    restarted.start()
    try:
        for name, (_, phase, reason) in JOBS.items():
            posted = wait_for(
                lambda name=name: events_of(kube, name),
                timeout=60,
                what=f"the {name} Event the crashed pass lost",
            )
            ftj = kube.get("finetunejob", name)
            expected = finetunejob.transition_event(ftj["status"])
            assert [(e["reason"], e["type"], e["message"]) for e in posted] == [
                (reason, expected.type, expected.message)
            ]
            assert expected.message.startswith(f"{phase}: ")
            # Named after the transition, so that any later pass finds it (409).
            assert posted[0]["metadata"]["name"] == events.event_name(ftj, expected.key)

        # Passes of the same operator, and of one restarted with nothing in memory: each
        # transition still has its one Event.
        restarted.wait_for_resyncs(2)
        restarted.restart()
        restarted.wait_for_resyncs(2)
        for name, (_, _, reason) in JOBS.items():
            assert [(e["reason"], e.get("count", 1)) for e in events_of(kube, name)] == [
                (reason, 1)
            ]
            assert kube.get("finetunejob", name)["status"]["reason"] == reason
        assert "could not post" not in restarted.log_text()
        restarted.stop()
        monkeypatch.undo()  # the Event POSTs of the crashed passes' fault, refused no more
        # Restarted once more with nothing in memory: one list of the namespace's Events
        # finds each job's, and none is posted again (each used to cost a POST and a 409).
        counts = passes_after_a_restart(kube)
        assert counts[("POST", "events")] == 0, counts
        assert counts[("GET", "events")] == 1, counts
    finally:
        restarted.stop()
