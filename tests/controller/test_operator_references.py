"""Waiting for the Secrets and PVCs a FineTuneJob names: the pure decision (no cluster), and
the deadline on a real control plane with an operator whose wait is short."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from kubetest import Kube, bound_pvc, condition, finetunejob_manifest, wait_for

from finetune_api import FineTuneJob
from finetune_operator import references

T0 = datetime(2030, 1, 1, tzinfo=UTC)


def job(**spec) -> FineTuneJob:
    doc = finetunejob_manifest("refs", **spec)
    doc["metadata"]["namespace"] = "team"
    return FineTuneJob.model_validate(doc)


def test_every_secret_and_claim_the_spec_names_is_a_reference():
    refs = references.references(
        job(hfTokenSecretRef={"name": "hf", "key": "tok"}, storageSecretRef={"name": "s3"})
    )
    assert [(r.kind, r.name, r.field, r.key) for r in refs] == [
        ("Secret", "hf", "spec.hfTokenSecretRef", "tok"),
        ("Secret", "s3", "spec.storageSecretRef", None),
        ("PersistentVolumeClaim", "adapters", "spec.output.uri", None),
        ("PersistentVolumeClaim", "data", "spec.dataset.uri", None),
    ]


def test_check_names_what_is_missing():
    secret = references.Reference("Secret", "hf", "spec.hfTokenSecretRef", "token")
    assert references.check(secret, None).reason == "SecretNotFound"
    keyless = references.check(secret, {"data": {"other": "eA=="}})
    assert keyless.reason == "SecretKeyNotFound"
    assert keyless.describe() == "key 'token' in Secret 'hf' (spec.hfTokenSecretRef)"
    assert references.check(secret, {"data": {"token": "eA=="}}) is None
    claim = references.Reference("PersistentVolumeClaim", "data", "spec.dataset.uri")
    assert references.check(claim, None).reason == "VolumeClaimNotFound"
    assert references.check(claim, {"spec": {}}) is None


def _missing(name="hf"):
    ref = references.Reference("Secret", name, "spec.hfTokenSecretRef", "token")
    return [references.check(ref, None)]


def test_a_missing_reference_waits_until_the_deadline_then_fails():
    waiting = references.resolve(
        {}, _missing(), namespace="team", generation=1, wait_seconds=600, now=T0
    )
    cond = condition({"status": waiting}, "ReferencesResolved")
    assert waiting["phase"] == "Pending"
    assert (cond["status"], cond["reason"]) == ("False", "SecretNotFound")
    assert "Secret 'hf' with key 'token'" in cond["message"]
    assert "2030-01-01T00:10:00Z" in cond["message"]  # the deadline, stated
    assert condition({"status": waiting}, "Failed")["status"] == "False"
    # A later pass before the deadline: still waiting, and the same words (no new write).
    again = references.resolve(
        waiting,
        _missing(),
        namespace="team",
        generation=1,
        wait_seconds=600,
        now=T0 + timedelta(seconds=599),
    )
    assert again == waiting
    # At the deadline: Failed, saying what to do.
    failed = references.resolve(
        waiting,
        _missing(),
        namespace="team",
        generation=1,
        wait_seconds=600,
        now=T0 + timedelta(seconds=600),
    )
    assert failed["phase"] == "Failed" and failed["completionTime"]
    fcond = condition({"status": failed}, "Failed")
    assert (fcond["status"], fcond["reason"]) == ("True", "SecretNotFound")
    assert "re-create this FineTuneJob" in fcond["message"]


def test_resolved_references_are_a_true_condition_and_leave_the_phase_alone():
    waiting = references.resolve(
        {}, _missing(), namespace="team", generation=1, wait_seconds=600, now=T0
    )
    resolved = references.resolve(
        waiting, [], namespace="team", generation=1, wait_seconds=600, now=T0
    )
    cond = condition({"status": resolved}, "ReferencesResolved")
    assert (cond["status"], cond["reason"]) == ("True", "ReferencesFound")
    assert resolved["phase"] == waiting["phase"]  # the rest of the pass decides


@pytest.mark.cluster
def test_the_wait_has_a_deadline_and_a_failure_is_final(cluster, crds, kube: Kube, tmp_path):
    """An operator of its own (its wait shortened to 4 s) watching only this test's
    namespace, which the session's operator does not watch."""
    from operator_harness import OperatorProcess

    proc = OperatorProcess(
        cluster,
        tmp_path,
        namespaces=kube.namespace,
        extra_env={"FINETUNE_REFERENCE_WAIT_SECONDS": "4", "FINETUNE_RESYNC_SECONDS": "1"},
    )
    proc.start()
    try:
        bound_pvc(kube, "data")
        bound_pvc(kube, "adapters")
        kube.apply(finetunejob_manifest("too-late", hfTokenSecretRef={"name": "hf-never"}))
        failed = wait_for(
            lambda: (
                (o := kube.get("finetunejob", "too-late")).get("status", {}).get("phase")
                == "Failed"
                and o
            ),
            timeout=60,
            what="phase Failed",
        )
        cond = condition(failed, "Failed")
        assert cond["reason"] == "SecretNotFound"
        assert "Secret 'hf-never' with key 'token'" in cond["message"]
        assert "after 4s" in cond["message"]
        wait_for(
            lambda: any(
                e.get("reason") == "SecretNotFound" and e["involvedObject"]["name"] == "too-late"
                for e in kube.items("events")
            ),
            what="a SecretNotFound Event",
        )
        # The Secret arriving now changes nothing: the failure is final.
        kube.kubectl("create", "secret", "generic", "hf-never", "--from-literal=token=x")
        proc.wait_for_resyncs(3)
        assert kube.get("finetunejob", "too-late")["status"]["phase"] == "Failed"
        assert kube.get_or_none("job", "too-late-train") is None
    finally:
        proc.stop()
