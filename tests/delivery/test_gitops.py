"""FineTuneJobs managed from Git: what a GitOps tool (Argo CD, Flux) sees.

- re-applying the same manifest changes nothing: no new Job, no status churn, and the
  operator never writes the spec (only the status subresource);
- an edited spec is refused by the API server's validation with a message naming the
  field and what to do; `spec.suspend` is the one field Git may change, and it works;
- `kubectl get ftj` tells the story at a glance.

"Nothing changes" is a negative, so it is observed over a measured window: the window
lasts until the operator has logged two more completed resyncs (every 5 s in tests, each
reconciling every FineTuneJob), and the object and its Jobs are polled throughout.
"""

from __future__ import annotations

import pytest
from kubetest import Kube, bound_pvc, condition, finetunejob_manifest, wait_for
from operator_harness import RESYNC_MARKER

pytestmark = pytest.mark.cluster


def manifest(
    name: str, *, suspend: bool | None = None, max_steps: int = 10, unschedulable: bool = False
) -> dict:
    doc = finetunejob_manifest(name, training={"maxSteps": max_steps})
    if suspend is not None:
        doc["spec"]["suspend"] = suspend
    if unschedulable:
        # No node has this label: the Job exists and its pod waits, the job stays in flight.
        doc["spec"]["resources"]["nodeSelector"] = {"finetune.dev/test-node": "nowhere"}
    return doc


@pytest.fixture
def volumes(kube: Kube) -> None:
    """The claims the manifests name: pods schedule only once their PVCs are bound."""
    for claim in ("data", "adapters"):
        bound_pvc(kube, claim)


def git_apply(kube: Kube, doc: dict, *, check: bool = True):
    """What a GitOps tool does: a (client-side) `kubectl apply` of the file from Git."""
    return kube.apply(doc, check=check)


def observe_two_resyncs(operator, check, what: str, timeout: float = 60) -> None:
    """Run `check` (which asserts) until the operator has finished two more resyncs.

    Each resync reconciles every FineTuneJob; the operator logs RESYNC_MARKER after one.
    """
    start = operator.log_text().count(RESYNC_MARKER)

    def two_more_passes() -> bool:
        check()
        return operator.log_text().count(RESYNC_MARKER) >= start + 2

    wait_for(two_more_passes, timeout=timeout, interval=0.5, what=what)
    check()


def training_jobs(kube: Kube, name: str) -> list[str]:
    return sorted(
        j["metadata"]["name"]
        for j in kube.items("jobs")
        if j["metadata"].get("labels", {}).get("finetune.dev/finetunejob") == name
        or j["metadata"]["name"].startswith(f"{name}-train")
    )


def assert_operator_never_wrote_spec(obj: dict) -> None:
    """Managed fields: everything other than the user's apply is a status write."""
    for entry in obj["metadata"].get("managedFields") or []:
        if entry["manager"].startswith("kubectl"):
            continue
        assert entry.get("subresource") == "status", (
            f"{entry['manager']} wrote {sorted(entry.get('fieldsV1', {}))} outside status"
        )


def wait_phase(kube: Kube, name: str, phase: str, timeout: float = 60) -> dict:
    return wait_for(
        lambda: (o := kube.get("finetunejob", name)).get("status", {}).get("phase") == phase and o,
        timeout=timeout,
        what=f"FineTuneJob {name} phase {phase}",
    )


def test_reapplying_the_same_manifest_changes_nothing(kube: Kube, volumes, operator_process):
    doc = manifest("from-git")
    git_apply(kube, doc)
    wait_phase(kube, "from-git", "Succeeded")
    jobs = training_jobs(kube, "from-git")
    assert len(jobs) == 1

    # Settled: the status stays put over two resync passes.
    settled = kube.get("finetunejob", "from-git")["metadata"]["resourceVersion"]

    def unchanged() -> None:
        assert kube.get("finetunejob", "from-git")["metadata"]["resourceVersion"] == settled
        assert training_jobs(kube, "from-git") == jobs

    observe_two_resyncs(operator_process, unchanged, "two resyncs of a finished job")

    out = git_apply(kube, doc).stdout
    assert "unchanged" in out, out
    observe_two_resyncs(
        operator_process, unchanged, "two resyncs after re-applying the same manifest"
    )
    obj = kube.get("finetunejob", "from-git")
    assert obj["metadata"]["generation"] == 1
    assert obj["status"]["observedGeneration"] == 1
    assert_operator_never_wrote_spec(obj)
    # Nothing of the operator's lands in metadata either (kopf keeps no state there).
    assert not [
        k for k in obj["metadata"].get("annotations", {}) if "finetune.dev" in k or "kopf" in k
    ]
    assert not obj["metadata"].get("finalizers")


def test_edited_spec_is_refused_with_a_clear_message(kube: Kube, volumes, operator_process):
    git_apply(kube, manifest("in-flight", unschedulable=True))
    wait_for(lambda: kube.get_or_none("job", "in-flight-train"), what="the training Job")
    before = kube.get("finetunejob", "in-flight")

    res = git_apply(kube, manifest("in-flight", unschedulable=True, max_steps=20), check=False)
    assert res.returncode != 0
    assert "spec.training is immutable once the FineTuneJob is created" in res.stderr, res.stderr
    assert "create a new FineTuneJob instead" in res.stderr
    assert "spec.suspend" in res.stderr  # says what may change
    after = kube.get("finetunejob", "in-flight")
    assert after["spec"]["training"]["maxSteps"] == 10
    assert after["metadata"]["generation"] == before["metadata"]["generation"] == 1
    assert training_jobs(kube, "in-flight") == ["in-flight-train"]


def test_suspend_works_from_git(kube: Kube, volumes, operator_process):
    git_apply(kube, manifest("paused-in-git", suspend=True))
    job = wait_for(
        lambda: (
            (j := kube.get_or_none("job", "paused-in-git-train"))
            and j["spec"].get("suspend") is True
            and j
        ),
        what="a suspended Job",
    )
    wait_for(
        lambda: (
            (c := condition(kube.get("finetunejob", "paused-in-git"), "Suspended"))
            and c["status"] == "True"
        ),
        what="the Suspended condition",
    )
    assert kube.items("pods", "job-name=paused-in-git-train") == []

    git_apply(kube, manifest("paused-in-git", suspend=False))
    wait_for(
        lambda: kube.get("job", "paused-in-git-train")["spec"].get("suspend") is False,
        what="the Job to be resumed",
    )
    done = wait_phase(kube, "paused-in-git", "Succeeded")
    assert kube.get("job", "paused-in-git-train")["metadata"]["uid"] == job["metadata"]["uid"]
    assert done["metadata"]["generation"] == 2  # the user's one edit, nothing of the operator
    assert done["status"]["observedGeneration"] == 2
    assert condition(done, "Suspended")["status"] == "False"
    assert_operator_never_wrote_spec(done)


def test_kubectl_get_ftj_tells_the_story(kube: Kube, volumes, operator_process):
    git_apply(kube, manifest("at-a-glance"))
    done = wait_phase(kube, "at-a-glance", "Succeeded")
    git_apply(kube, manifest("waiting", suspend=True))
    wait_for(
        lambda: kube.get("finetunejob", "waiting").get("status", {}).get("plan"),
        what="the plan of the suspended job",
    )
    lines = kube.kubectl("get", "ftj").stdout.splitlines()
    header = lines[0].split()
    assert header[:4] == ["NAME", "METHOD", "PHASE", "PROGRESS"], lines[0]
    assert "AGE" in header
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    method = done["status"]["plan"]["method"]
    assert rows["at-a-glance"][1:3] == [method, "Succeeded"]
    assert rows["waiting"][1] == kube.get("finetunejob", "waiting")["status"]["plan"]["method"]
    assert rows["waiting"][2] == kube.get("finetunejob", "waiting")["status"]["phase"]
