"""A pass creates only the children that are missing, and knows which those are without a
request per child: an up-to-date job costs three reads and no write; after a restart (an
empty inventory) one list per kind, then a create of exactly what is gone; a child deleted
behind the operator's back is recreated once its namespace is listed again.

The passes are the operator's own reconcile, run in this process against the test control
plane (a `t-` namespace, which the session operator does not watch), with the API requests
counted by the operator's own metric (`finetune_operator_api_requests_total`), the one the
scale benchmark reads. `Known` has a hand-driven clock: the test decides when knowledge
expires.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from apirequests import requests_so_far
from kubetest import Kube, bound_pvc, finetunejob_manifest

pytestmark = pytest.mark.cluster

NAME = "frugal"
CHILDREN = {
    "configmaps": f"{NAME}-worker-config",
    "serviceaccounts": f"{NAME}-worker",
    "roles": f"{NAME}-worker",
    "rolebindings": f"{NAME}-worker",
}
LISTED = ["configmaps", "serviceaccounts", "roles", "rolebindings", "services"]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_passes_request_only_what_they_need(cluster, crds, kube: Kube, monkeypatch):
    from finetune_operator import inventory, k8s
    from finetune_operator.reconcile import finetunejob
    from finetune_operator.reconcile.settings import OperatorSettings

    for claim in ("data", "adapters"):
        bound_pvc(kube, claim)
    # Suspended: the Job exists and nothing changes under it between passes.
    kube.apply(finetunejob_manifest(NAME, suspend=True))
    settings = OperatorSettings.from_env(
        {"FINETUNE_ALLOW_HUB": "false", "FINETUNE_RESYNC_SECONDS": "60"}
    )
    clock = Clock()
    monkeypatch.setattr(inventory, "KNOWN", inventory.Known(clock=clock))

    async def passes(between) -> list[Counter]:
        """One pass per step; `between[i]` runs before pass i. -> the requests of each."""
        await k8s.connect(kube.kubeconfig)
        seen = []
        try:
            for before in between:
                before()
                start = requests_so_far()
                await finetunejob.reconcile(kube.namespace, NAME, settings)
                seen.append(requests_so_far() - start)
        finally:
            await k8s.close()
        return seen

    def restart() -> None:
        monkeypatch.setattr(inventory, "KNOWN", inventory.Known(clock=clock))

    def delete(kind: str) -> None:
        kube.kubectl("delete", kind, CHILDREN[kind], "--wait=true")

    def expire() -> None:
        clock.now += settings.resync_seconds

    def nothing() -> None:
        pass

    first, listing, steady, steady2, after_restart, stale, relisted, no_job = asyncio.run(
        passes(
            [
                nothing,
                nothing,
                nothing,
                nothing,
                lambda: (delete("configmaps"), restart()),
                lambda: delete("roles"),
                expire,
                lambda: kube.kubectl("delete", "job", f"{NAME}-train", "--wait=true"),
            ]
        )
    )

    def writes(counts: Counter) -> Counter:
        return Counter({k: v for k, v in counts.items() if k[0] != "GET"})

    # The first pass creates each child once (the Job last), writes the status, posts the
    # phase's Event.
    assert writes(first) == Counter(
        {("POST", r): 1 for r in [*CHILDREN, "jobs", "events"]}
        | {("PATCH", "finetunejobs/status"): 1}
    )
    # The first pass that finds the Job lists the namespace's children: once per kind.
    assert writes(listing) == Counter()
    listed = Counter({("GET", r): 1 for r in ["finetunejobs", "jobs", "pods", *LISTED]})
    assert listing == listed, listing
    # Up to date: the job, its Job, its pods. Nothing else, and no write.
    for counts in (steady, steady2):
        assert counts == Counter({("GET", r): 1 for r in ["finetunejobs", "jobs", "pods"]})

    # Restarted with nothing in memory and the ConfigMap gone: one list per kind, and the
    # one missing child created.
    assert writes(after_restart) == Counter({("POST", "configmaps"): 1}), after_restart
    assert all(after_restart[("GET", r)] == 1 for r in LISTED)
    assert kube.get_or_none("configmap", CHILDREN["configmaps"]) is not None
    # A child deleted while the inventory is fresh is not seen at once (no request says
    # so, and it is not created) ...
    assert writes(stale) == Counter()
    # ... and is recreated by the first pass after its namespace is listed again.
    assert writes(relisted) == Counter({("POST", "roles"): 1}), relisted
    assert kube.get_or_none("role", CHILDREN["roles"]) is not None
    # Without a Job every child goes through create-if-absent (the existing ones answer 409)
    # and the Job is created again.
    assert writes(no_job)[("POST", "jobs")] == 1
    assert kube.get_or_none("job", f"{NAME}-train") is not None
    # One of each, whatever the passes did.
    for kind, name in CHILDREN.items():
        owned = kube.items(kind, f"finetune.dev/finetunejob={NAME}")
        assert [o["metadata"]["name"] for o in owned] == [name]
