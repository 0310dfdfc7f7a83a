"""The operator on a real control plane: FineTuneJob -> Job -> status, follow-ups, failures.

The operator runs as its own process (`kopf run`), the Job controller creates pods, the
scheduler binds them to kwok fake GPU nodes, and kwok completes them. For failures the
test plays the kubelet on a node kwok does not manage ("manual"), writing the pod status
a real kubelet would write: exit codes and termination messages. Queueing runs the real
Kueue controller manager (the `kueue` fixture).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import yaml
from kubetest import Kube, bound_pvc, condition, finetunejob_manifest, wait_for

from conftest import MANUAL_NODE

pytestmark = pytest.mark.cluster
ROOT = Path(__file__).resolve().parents[2]


def ftj_manifest(name: str, *, memory: str = "24Gi", manual: bool = False, **spec) -> dict:
    doc = finetunejob_manifest(name, memory=memory, **spec)
    if manual:
        doc["spec"]["resources"]["nodeSelector"] = {"finetune.dev/test-node": "manual"}
        # The manual node is tainted so that only the pods meant for it land there.
        doc["spec"]["resources"]["tolerations"] = [
            {
                "key": "finetune.dev/test-node",
                "operator": "Equal",
                "value": "manual",
                "effect": "NoSchedule",
            }
        ]
    return doc


def planned_status(kube: Kube, name: str) -> dict:
    """The FineTuneJob's status once it holds the plan. The pass that creates the Job writes
    the status after it, so a test that saw the Job polls rather than reads once."""
    return wait_for(
        lambda: (ftj(kube, name).get("status") or {}).get("plan") and ftj(kube, name)["status"],
        timeout=30,
        what=f"the status of {name} with its plan",
    )


def act_as_kubelet(
    kube: Kube, job: str, *, exit_code: int, message: str = "", reason: str | None = None
) -> str:
    """Wait for the Job's pod on the manual node, then finish it like a kubelet would."""
    pod = wait_for(
        lambda: [
            p
            for p in kube.items("pods", f"job-name={job}")
            if p["spec"].get("nodeName") == MANUAL_NODE
            and p["status"].get("phase") in (None, "Pending", "Running")
        ],
        timeout=60,
        what=f"a pod of {job} bound to {MANUAL_NODE}",
    )[0]
    name = pod["metadata"]["name"]
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    terminated = {
        "exitCode": exit_code,
        "reason": reason or ("Completed" if exit_code == 0 else "Error"),
        "startedAt": now,
        "finishedAt": now,
    }
    if message:
        terminated["message"] = message
    kube.patch_status(
        "pod",
        name,
        {
            "status": {
                "phase": "Succeeded" if exit_code == 0 else "Failed",
                "containerStatuses": [
                    {
                        "name": "worker",
                        "image": pod["spec"]["containers"][0]["image"],
                        "imageID": "",
                        "ready": False,
                        "restartCount": 0,
                        "state": {"terminated": terminated},
                    }
                ],
            }
        },
    )
    return name


@pytest.fixture
def kube(kube: Kube) -> Kube:
    """The namespace's volumes the example manifests name."""
    for claim in ("data", "adapters"):
        bound_pvc(kube, claim)
    return kube


def ftj(kube: Kube, name: str) -> dict:
    return kube.get("finetunejob", name)


def wait_phase(kube: Kube, name: str, phase: str, timeout: float = 60) -> dict:
    return wait_for(
        lambda: (o := ftj(kube, name)).get("status", {}).get("phase") == phase and o,
        timeout=timeout,
        what=f"FineTuneJob {name} phase {phase}",
    )


def test_examples_become_jobs_that_kwok_completes(kube: Kube, operator_process):
    started = time.monotonic()
    doc = yaml.safe_load((ROOT / "examples" / "finetunejob-llama3-8b.yaml").read_text())
    ref = doc["spec"].get("hfTokenSecretRef")
    if ref:
        kube.kubectl(
            "create",
            "secret",
            "generic",
            ref["name"],
            f"--from-literal={ref.get('key', 'token')}=hf_not_a_real_token",
        )
    kube.apply(doc)
    name = doc["metadata"]["name"]
    job = wait_for(
        lambda: kube.get_or_none("job", f"{name}-train"),
        timeout=30,
        interval=0.05,
        what="the training Job",
    )
    created_after = time.monotonic() - started
    status = planned_status(kube, name)
    plan = status["plan"]
    # No product, but every GPU node of the dev cluster with 24 GiB (an H100, an H200) has FP8
    # tensor cores by its GFD labels: auto considers fp8, and at 24 GiB it is the fastest
    # (docs/memory-model.md). kwok completing the pod below shows its FP8 affinity matched.
    assert plan["method"] == "fp8", plan["reason"]
    assert condition(ftj(kube, name), "Planned")["status"] == "True"
    # The worker gets the plan through its config: same method, same micro-batch.
    cm = kube.get("configmap", f"{name}-worker-config")
    cfg = yaml.safe_load(cm["data"]["worker-config.yaml"])
    assert cfg["plan"]["method"] == plan["method"]
    assert cfg["plan"]["microBatchSize"] == plan["microBatchSize"]
    pod_spec = job["spec"]["template"]["spec"]
    gpu = doc["spec"]["resources"]["gpu"]
    assert pod_spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == str(
        gpu.get("count", 1)
    )
    assert job["metadata"]["ownerReferences"][0]["kind"] == "FineTuneJob"
    wait_for(
        lambda: [
            p
            for p in kube.items("pods", f"job-name={name}-train")
            if p["status"].get("phase") == "Succeeded"
        ],
        timeout=60,
        interval=0.05,
        what="kwok to complete the worker pod",
    )
    pod_done = time.monotonic()
    done = wait_for(
        lambda: (o := ftj(kube, name))["status"].get("phase") == "Succeeded" and o,
        timeout=60,
        interval=0.05,
        what="status Succeeded",
    )
    succeeded_after_pod = time.monotonic() - pod_done
    assert condition(done, "Succeeded")["status"] == "True"
    assert done["status"]["observedGeneration"] == done["metadata"]["generation"]
    _record_timing(created_after, succeeded_after_pod)


def test_a_minimal_finetunejob_trains_one_epoch(kube: Kube, operator_process):
    """Model, dataset, GPU memory and output: the API server fills in `training` and the
    worker is told to train one epoch."""
    from finetune_api import WorkerConfig

    doc = yaml.safe_load((ROOT / "examples" / "finetunejob-minimal.yaml").read_text())
    assert "training" not in doc["spec"]
    kube.apply(doc)
    stored = ftj(kube, "minimal")["spec"]["training"]
    assert stored["batchSize"] == 16 and "epochs" not in stored and "maxSteps" not in stored
    wait_for(lambda: kube.get_or_none("job", "minimal-train"), what="the training Job")
    cm = kube.get("configmap", "minimal-worker-config")
    config = WorkerConfig.model_validate(yaml.safe_load(cm["data"]["worker-config.yaml"]))
    assert config.spec.training.max_steps is None
    assert config.spec.training.effective_epochs == 1.0
    wait_phase(kube, "minimal", "Succeeded")


def _record_timing(created_after: float, succeeded_after_pod: float) -> None:
    out = os.environ.get("FINETUNE_TIMING_FILE")
    if out:
        with open(out, "a") as f:
            f.write(
                json.dumps(
                    {
                        "apply_to_job_s": round(created_after, 2),
                        "pod_done_to_succeeded_s": round(succeeded_after_pod, 2),
                    }
                )
                + "\n"
            )


def test_followups_are_created_once(kube: Kube, operator_process):
    doc = ftj_manifest(
        "with-followups",
        followUp={
            "merge": {"enabled": True},
            "deploy": {"enabled": True, "name": "with-followups"},
        },
    )
    kube.apply(doc)
    done = wait_phase(kube, "with-followups", "Succeeded")
    refs = wait_for(
        lambda: (
            (f := ftj(kube, "with-followups")["status"].get("followUp"))
            and "merge" in f
            and "deployment" in f
            and f
        ),
        what="follow-up references",
    )
    merges = kube.items("adaptermerges")
    deployments = kube.items("adapterdeployments")
    assert [m["metadata"]["name"] for m in merges] == [refs["merge"]["name"]]
    assert [d["metadata"]["name"] for d in deployments] == [refs["deployment"]["name"]]
    assert merges[0]["spec"]["fineTuneJobRef"]["name"] == "with-followups"
    assert merges[0]["metadata"]["ownerReferences"][0]["uid"] == done["metadata"]["uid"]
    # Deleted follow-ups are not re-created: "exactly once".
    kube.delete("adaptermerge", refs["merge"]["name"], wait=True)
    operator_process.wait_for_resyncs(2)
    assert kube.get_or_none("adaptermerge", refs["merge"]["name"]) is None


def raw_patch(kube: Kube, token: str, path: str, body: dict) -> int:
    """A merge-patch the way the worker sends it (no GET first, unlike kubectl)."""
    import ssl
    import urllib.error
    import urllib.request

    ca = Path(kube.cluster.directory) / "pki" / "ca.crt"
    req = urllib.request.Request(
        kube.cluster.server + path,
        method="PATCH",
        data=json.dumps(body).encode(),
        headers={
            "Authorization": f"Bearer {token}",
            "Content-Type": "application/merge-patch+json",
        },
    )
    try:
        with urllib.request.urlopen(req, context=ssl.create_default_context(cafile=str(ca))):
            return 200
    except urllib.error.HTTPError as exc:
        return exc.code


def test_worker_token_may_patch_only_its_own_status(kube: Kube, operator_process):
    for name in ("mine", "other"):
        kube.apply(ftj_manifest(name, suspend=True))
    wait_for(lambda: kube.get_or_none("rolebinding", "mine-worker"), what="worker binding")
    token = kube.kubectl("create", "token", "mine-worker").stdout.strip()
    base = f"/apis/finetune.dev/v1alpha1/namespaces/{kube.namespace}/finetunejobs"
    progress = {"status": {"progress": {"step": 3, "totalSteps": 10, "loss": 1.5}}}
    wait_for(
        lambda: raw_patch(kube, token, f"{base}/mine/status", progress) == 200,
        what="the worker's status patch to be allowed",
    )
    assert ftj(kube, "mine")["status"]["progress"]["step"] == 3
    assert raw_patch(kube, token, f"{base}/other/status", progress) == 403
    assert raw_patch(kube, token, f"{base}/mine", {"spec": {"suspend": False}}) == 403
    # The operator's own status writes leave the worker's progress alone.
    wait_for(lambda: condition(ftj(kube, "mine"), "Suspended"), what="Suspended condition")
    operator_process.wait_for_resyncs(1)
    assert ftj(kube, "mine")["status"]["progress"]["step"] == 3


def test_termination_message_alone_fills_metrics(kube: Kube, operator_process, manual_node):
    kube.apply(ftj_manifest("term-only", manual=True))
    wait_for(lambda: kube.get_or_none("job", "term-only-train"), what="the Job")
    summary = {
        "result": "Succeeded",
        "exitCode": 0,
        "metrics": {
            "peakVRAMBytes": 17179869184,
            "peakVRAM": "16Gi",
            "tokensPerSecond": 12345.6,
            "samplesPerSecond": 24.1,
        },
        "adapter": {"uri": "pvc://adapters/term-only", "sizeBytes": 1000, "sha256": "ab" * 32},
    }
    act_as_kubelet(kube, "term-only-train", exit_code=0, message=json.dumps(summary))
    done = wait_phase(kube, "term-only", "Succeeded")
    assert done["status"]["metrics"]["tokensPerSecond"] == 12345.6
    assert done["status"]["metrics"]["peakVRAMBytes"] == 17179869184
    assert done["status"]["adapter"]["sha256"] == "ab" * 32


@pytest.mark.parametrize(
    "code,reason",
    [(10, "InvalidConfig"), (11, "DataError"), (12, "CUDAOutOfMemory"), (13, "NonFiniteLoss")],
)
def test_worker_exit_code_maps_to_reason(kube: Kube, operator_process, manual_node, code, reason):
    name = f"exit-{code}"
    kube.apply(ftj_manifest(name, manual=True, backoffLimit=3))
    summary = {"result": "Failed", "exitCode": code, "message": f"failure {code} details"}
    act_as_kubelet(kube, f"{name}-train", exit_code=code, message=json.dumps(summary))
    failed = wait_phase(kube, name, "Failed")
    cond = condition(failed, "Failed")
    assert cond["reason"] == reason
    assert f"failure {code} details" in cond["message"]
    # `kubectl get ftj -o wide` shows the reason next to the phase.
    wide = kube.kubectl("get", "ftj", name, "-o", "wide").stdout.splitlines()
    assert "REASON" in wide[0] and reason in wide[1]
    # Permanent failures are not retried: the failure policy failed the Job at once.
    assert len(kube.items("pods", f"job-name={name}-train")) == 1
    # Every transition is an Event on the FineTuneJob (posted asynchronously by kopf).
    wait_for(
        lambda: any(
            e.get("reason") == reason and e["involvedObject"]["name"] == name
            for e in kube.items("events")
        ),
        what=f"a {reason} Event",
    )


def references_condition(kube: Kube, name: str) -> dict:
    return condition(ftj(kube, name), "ReferencesResolved") or {}


def test_missing_secret_and_claim_are_waited_for_then_the_job_starts(kube: Kube, operator_process):
    """Under GitOps a job's Secret and PVC often arrive after it: a wait that names them,
    not a failure, and the job starts once they are there."""
    doc = ftj_manifest(
        "late-refs",
        hfTokenSecretRef={"name": "hf-late"},
        dataset={"uri": "pvc://late-data/alpaca.jsonl", "format": "alpaca"},
    )
    kube.apply(doc)
    waiting = wait_for(
        lambda: (c := references_condition(kube, "late-refs")).get("status") == "False" and c,
        what="ReferencesResolved False",
    )
    assert waiting["reason"] == "SecretNotFound"
    assert "Secret 'hf-late' with key 'token' (spec.hfTokenSecretRef)" in waiting["message"]
    assert "PVC 'late-data' (spec.dataset.uri)" in waiting["message"]
    assert "FINETUNE_REFERENCE_WAIT_SECONDS" in waiting["message"]
    status = ftj(kube, "late-refs")["status"]
    assert (status["phase"], status["reason"]) == ("Pending", "SecretNotFound")
    assert kube.get_or_none("job", "late-refs-train") is None

    # The Secret arrives without the key the job reads: the wait says which key.
    kube.kubectl("create", "secret", "generic", "hf-late", "--from-literal=other=x")
    keyless = wait_for(
        lambda: (
            (c := references_condition(kube, "late-refs")).get("reason") == "SecretKeyNotFound"
            and c
        ),
        what="SecretKeyNotFound",
    )
    assert "key 'token' in Secret 'hf-late'" in keyless["message"]
    kube.kubectl(
        "patch",
        "secret",
        "hf-late",
        "--type=merge",
        "-p",
        json.dumps({"stringData": {"token": "hf_not_a_real_token"}}),
    )
    claim = wait_for(
        lambda: (
            (c := references_condition(kube, "late-refs")).get("reason") == "VolumeClaimNotFound"
            and c
        ),
        what="VolumeClaimNotFound",
    )
    assert "Secret" not in claim["message"]
    assert kube.get_or_none("job", "late-refs-train") is None

    bound_pvc(kube, "late-data")
    wait_for(lambda: kube.get_or_none("job", "late-refs-train"), what="the training Job")
    done = wait_phase(kube, "late-refs", "Succeeded")
    resolved = condition(done, "ReferencesResolved")
    assert (resolved["status"], resolved["reason"]) == ("True", "ReferencesFound")


def test_unknown_model_fails_with_a_clear_condition(kube: Kube, operator_process):
    unknown = ftj_manifest("unknown-model")
    unknown["spec"]["model"] = {"uri": "pvc://models/mystery"}
    kube.apply(unknown)
    failed = wait_phase(kube, "unknown-model", "Failed")
    planned = condition(failed, "Planned")
    assert planned["status"] == "False" and planned["reason"] == "ModelConfigUnavailable"
    assert "spec.model.architecture" in planned["message"]


def test_budget_too_small_says_what_would_fit(kube: Kube, operator_process):
    kube.apply(ftj_manifest("too-small", memory="2Gi"))
    failed = wait_phase(kube, "too-small", "Failed")
    planned = condition(failed, "Planned")
    assert planned["status"] == "False" and planned["reason"] == "InsufficientGPUMemory"
    assert "Gi" in planned["message"]
    assert kube.get_or_none("job", "too-small-train") is None
    # A job that never got a Job was neither admitted from a queue nor ever ran.
    assert condition(failed, "Queued")["reason"] == "NotQueued"
    assert condition(failed, "Running")["reason"] == "NotStarted"
    # One transition, one Event, however many passes follow.
    wait_for(
        lambda: any(
            e.get("reason") == "InsufficientGPUMemory"
            and e["involvedObject"]["name"] == "too-small"
            for e in kube.items("events")
        ),
        what="an InsufficientGPUMemory Event",
    )
    operator_process.wait_for_resyncs(2)
    events = [e for e in kube.items("events") if e["involvedObject"]["name"] == "too-small"]
    assert [(e["reason"], e.get("count", 1)) for e in events] == [("InsufficientGPUMemory", 1)]


def test_a_retry_whose_new_pod_is_pending_names_the_failure(
    kube: Kube, operator_process, manual_node
):
    kube.apply(ftj_manifest("retrying", manual=True, backoffLimit=2))
    summary = {"result": "Failed", "exitCode": 14, "message": "checkpoint write failed"}
    first = act_as_kubelet(kube, "retrying-train", exit_code=14, message=json.dumps(summary))
    # The Job controller starts a new pod on the manual node, where nothing runs it.
    wait_for(
        lambda: [
            p
            for p in kube.items("pods", "job-name=retrying-train")
            if p["metadata"]["name"] != first
        ],
        what="the replacement pod",
    )
    pending = wait_for(
        lambda: (
            (o := ftj(kube, "retrying"))["status"].get("reason") == "RetryingAfterFailure" and o
        ),
        what="RetryingAfterFailure",
    )
    assert pending["status"]["phase"] == "Pending"
    running = condition(pending, "Running")
    assert (running["status"], running["reason"]) == ("False", "RetryingAfterFailure")
    assert "StorageError" in running["message"]
    assert "checkpoint write failed" in running["message"]


def test_suspend_and_resume_drive_the_job(kube: Kube, operator_process, manual_node):
    kube.apply(ftj_manifest("pausable", manual=True))
    wait_for(lambda: kube.get_or_none("job", "pausable-train"), what="the Job")
    doc = ftj_manifest("pausable", manual=True, suspend=True)
    kube.apply(doc)
    wait_for(
        lambda: kube.get("job", "pausable-train")["spec"].get("suspend") is True,
        what="the Job to be suspended",
    )
    wait_for(
        lambda: (condition(ftj(kube, "pausable"), "Suspended") or {}).get("status") == "True",
        what="the Suspended condition",
    )
    kube.apply(ftj_manifest("pausable", manual=True, suspend=False))
    wait_for(
        lambda: kube.get("job", "pausable-train")["spec"].get("suspend") is False,
        what="the Job to resume",
    )


def test_deleting_the_finetunejob_removes_everything_it_owned(kube: Kube, operator_process):
    kube.apply(ftj_manifest("short-lived", suspend=True))
    wait_for(lambda: kube.get_or_none("job", "short-lived-train"), what="the Job")
    kube.delete("finetunejob", "short-lived")
    for kind, name in (
        ("job", "short-lived-train"),
        ("configmap", "short-lived-worker-config"),
        ("serviceaccount", "short-lived-worker"),
        ("role", "short-lived-worker"),
        ("rolebinding", "short-lived-worker"),
    ):
        wait_for(
            lambda kind=kind, name=name: kube.get_or_none(kind, name) is None,
            timeout=60,
            what=f"{kind} {name} to be garbage-collected",
        )


def test_sigkill_mid_reconcile_leaves_no_duplicates(kube: Kube, operator_process):
    names = [f"burst-{i}" for i in range(4)]
    kube.apply([ftj_manifest(n, suspend=True) for n in names])
    # Kill the operator while it is working through the burst, then start it again.
    wait_for(
        lambda: any(kube.get_or_none("configmap", f"{n}-worker-config") for n in names),
        timeout=30,
        what="the operator to start reconciling the burst",
    )
    operator_process.restart()
    for n in names:
        wait_for(
            lambda n=n: kube.get_or_none("job", f"{n}-train"), timeout=60, what=f"the Job of {n}"
        )
    jobs = kube.items("jobs")
    assert sorted(j["metadata"]["name"] for j in jobs) == sorted(f"{n}-train" for n in names)
    for kind in ("configmaps", "serviceaccounts", "roles", "rolebindings"):
        owned = kube.items(kind, "app.kubernetes.io/managed-by=finetune-operator")
        assert len(owned) == len(names), kind


def kueue_quota(kube: Kube, *, gpus: int, cpu: str, memory: str) -> str:
    """A ResourceFlavor and a ClusterQueue with this quota for the test's namespace only, and
    the LocalQueue `gpu-queue` there. The first two are cluster-scoped, so they are named
    after the namespace; they stay behind with the session's throwaway cluster. Returns the
    LocalQueue's name."""
    name = f"gpus-{kube.namespace}"[:63]
    quota = {"nvidia.com/gpu": str(gpus), "cpu": cpu, "memory": memory}
    kube.kubectl(
        "apply",
        "-f",
        "-",
        namespaced=False,
        input=yaml.safe_dump_all(
            [
                {
                    "apiVersion": "kueue.x-k8s.io/v1beta2",
                    "kind": "ResourceFlavor",
                    "metadata": {"name": name},
                },
                {
                    "apiVersion": "kueue.x-k8s.io/v1beta2",
                    "kind": "ClusterQueue",
                    "metadata": {"name": name},
                    "spec": {
                        "namespaceSelector": {
                            "matchLabels": {"kubernetes.io/metadata.name": kube.namespace}
                        },
                        "resourceGroups": [
                            {
                                "coveredResources": list(quota),
                                "flavors": [
                                    {
                                        "name": name,
                                        "resources": [
                                            {"name": r, "nominalQuota": q} for r, q in quota.items()
                                        ],
                                    }
                                ],
                            }
                        ],
                    },
                },
                {
                    "apiVersion": "kueue.x-k8s.io/v1beta2",
                    "kind": "LocalQueue",
                    "metadata": {"name": "gpu-queue", "namespace": kube.namespace},
                    "spec": {"clusterQueue": name},
                },
            ]
        ),
    )
    return "gpu-queue"


def workload_of(kube: Kube, job: str) -> dict | None:
    """The Kueue Workload that Kueue's job controller made for a Job."""
    for wl in kube.items("workloads.kueue.x-k8s.io"):
        if any(o.get("name") == job for o in wl["metadata"].get("ownerReferences") or []):
            return wl
    return None


def kubelet_starts(kube: Kube, job: str) -> str:
    """Act as the manual node's kubelet: the Job's pod there starts its container."""
    pod = wait_for(
        lambda: [
            p
            for p in kube.items("pods", f"job-name={job}")
            if p["spec"].get("nodeName") == MANUAL_NODE
            and p["status"].get("phase") in (None, "Pending")
        ],
        timeout=60,
        what=f"a pod of {job} bound to {MANUAL_NODE}",
    )[0]
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    kube.patch_status(
        "pod",
        pod["metadata"]["name"],
        {
            "status": {
                "phase": "Running",
                "startTime": now,
                "containerStatuses": [
                    {
                        "name": "worker",
                        "image": pod["spec"]["containers"][0]["image"],
                        "imageID": "",
                        "ready": True,
                        "started": True,
                        "restartCount": 0,
                        "state": {"running": {"startedAt": now}},
                    }
                ],
            }
        },
    )
    return pod["metadata"]["name"]


def test_kueue_admits_the_second_job_when_the_first_frees_the_gpu(
    kube: Kube, operator_process, manual_node, kueue
):
    """Real Kueue (its controller manager, built from sigs.k8s.io/kueue) against a
    ClusterQueue whose GPU quota fits exactly one job: the first is admitted and runs, the
    second waits in Queued/WaitingForQuota for as long as the first holds the GPU, and Kueue
    admits it once the first finishes."""

    def wait_for_kueue(check, what: str):
        try:
            return wait_for(check, timeout=60, what=what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{kueue.describe()}") from None

    def admitted(job: str) -> bool:
        wl = workload_of(kube, job)
        return bool(wl) and (condition(wl, "Admitted") or {}).get("status") == "True"

    resources = {"gpu": {"count": 1, "memory": "24Gi"}, "cpu": "2", "memory": "8Gi"}
    # Both jobs run on the node the test plays the kubelet of, so each runs until the test
    # finishes it.
    first = ftj_manifest("first", manual=True, resources={**resources, "queueName": "gpu-queue"})
    second = ftj_manifest("second", manual=True, resources={**resources, "queueName": "gpu-queue"})

    # Before its LocalQueue exists, Kueue cannot admit the first: the operator says Queued.
    kube.apply(first)
    queued = wait_phase(kube, "first", "Queued")
    assert condition(queued, "Queued")["reason"] == "WaitingForQuota"
    job = kube.get("job", "first-train")
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"

    def runs_once_admitted(name: str) -> None:
        """Kueue admits the job's Workload and un-suspends its Job; once its pod starts the
        FineTuneJob is Running with Queued=False, Admitted."""
        job = f"{name}-train"
        wait_for_kueue(lambda: admitted(job), f"Kueue to admit the {name} job's Workload")
        wait_for_kueue(
            lambda: kube.get("job", job)["spec"].get("suspend") is False,
            f"Kueue to un-suspend the {name} Job",
        )
        kubelet_starts(kube, job)
        running = wait_phase(kube, name, "Running")
        queued = condition(running, "Queued")
        assert (queued["status"], queued["reason"]) == ("False", "Admitted")

    # CPU and memory for both jobs, GPUs for one: the GPU is what the second waits for.
    assert kueue_quota(kube, gpus=1, cpu="8", memory="32Gi") == "gpu-queue"
    runs_once_admitted("first")

    # The second job asks for the one GPU the first holds.
    kube.apply(second)
    pending = wait_for_kueue(
        lambda: (
            (wl := workload_of(kube, "second-train"))
            and (condition(wl, "QuotaReserved") or {}).get("status") == "False"
            and "nvidia.com/gpu" in condition(wl, "QuotaReserved").get("message", "")
            and wl
        ),
        "Kueue to hold the second job's Workload for want of GPU quota",
    )
    queued = wait_phase(kube, "second", "Queued")
    assert condition(queued, "Queued")["status"] == "True"
    assert condition(queued, "Queued")["reason"] == "WaitingForQuota"
    # Still so as the first is about to finish: Kueue looked, found no GPU, and keeps it.
    assert kube.get("job", "second-train")["spec"]["suspend"] is True
    assert not admitted("second-train"), pending["status"]
    assert ftj(kube, "second")["status"]["phase"] == "Queued"
    assert ftj(kube, "first")["status"]["phase"] == "Running"

    # The first finishes: its Workload releases the GPU and Kueue admits the second.
    act_as_kubelet(kube, "first-train", exit_code=0)
    wait_phase(kube, "first", "Succeeded")
    runs_once_admitted("second")
    act_as_kubelet(kube, "second-train", exit_code=0)
    wait_phase(kube, "second", "Succeeded")
    # The operator never suspends a Kueue-admitted Job again.
    assert kube.get("job", "second-train")["spec"]["suspend"] is False


def test_a_multi_node_job_is_an_indexed_job_with_a_rendezvous_service(kube: Kube, operator_process):
    for claim in ("shared-data", "shared-adapters"):  # every pod mounts them, node by node
        bound_pvc(kube, claim, access_modes=("ReadWriteMany",))
    doc = ftj_manifest(
        "two-nodes",
        memory="80Gi",
        resources={"gpu": {"count": 2, "nodes": 2, "memory": "80Gi"}},
        training={"maxSteps": 10, "batchSize": 16},
        dataset={"uri": "pvc://shared-data/alpaca.jsonl", "format": "alpaca"},
        output={"uri": "pvc://shared-adapters/two-nodes"},
    )
    kube.apply(doc)
    job = wait_for(
        lambda: kube.get_or_none("job", "two-nodes-train"), timeout=30, what="the training Job"
    )
    plan = planned_status(kube, "two-nodes")["plan"]
    assert (plan["strategy"], plan["nodes"], plan["processesPerNode"], plan["worldSize"]) == (
        "ddp",
        2,
        2,
        4,
    )
    assert plan["microBatchSize"] * plan["gradientAccumulation"] * 4 == 16
    assert (job["spec"]["completionMode"], job["spec"]["completions"]) == ("Indexed", 2)
    service = kube.get("service", "two-nodes-workers")
    assert service["spec"]["clusterIP"] == "None"
    assert service["metadata"]["ownerReferences"][0]["kind"] == "FineTuneJob"
    # The Job controller gives each pod its index, as env and as hostname under the Service.
    pods = wait_for(
        lambda: len(p := kube.items("pods", "job-name=two-nodes-train")) == 2 and p,
        timeout=60,
        what="two worker pods",
    )
    for pod in pods:
        index = pod["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]
        assert pod["spec"]["hostname"] == f"two-nodes-train-{index}"
        assert pod["spec"]["subdomain"] == "two-nodes-workers"
        env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
        assert "JOB_COMPLETION_INDEX" in env
        command = pod["spec"]["containers"][0]["command"]
        assert command[command.index("--master-addr") + 1] == "two-nodes-train-0.two-nodes-workers"
    wait_phase(kube, "two-nodes", "Succeeded")
    kube.delete("finetunejob", "two-nodes")
    for kind, name in (("job", "two-nodes-train"), ("service", "two-nodes-workers")):
        wait_for(
            lambda kind=kind, name=name: kube.get_or_none(kind, name) is None,
            timeout=60,
            what=f"{kind} {name} to be garbage-collected",
        )


def test_a_multi_node_job_on_a_read_write_once_claim_fails_naming_the_field(
    kube: Kube, operator_process
):
    doc = ftj_manifest(
        "rwo-nodes",
        memory="80Gi",
        resources={"gpu": {"count": 1, "nodes": 2, "memory": "80Gi"}},
        training={"maxSteps": 10, "batchSize": 16},
    )
    kube.apply(doc)  # pvc://adapters and pvc://data are ReadWriteOnce here
    failed = wait_phase(kube, "rwo-nodes", "Failed")
    cond = condition(failed, "Failed")
    assert cond["reason"] == "VolumeNotShareable"
    assert "spec.output.uri names PVC 'adapters'" in cond["message"]
    assert "ReadWriteMany" in cond["message"]
    assert kube.get_or_none("job", "rwo-nodes-train") is None  # nothing half-started


def test_no_secret_value_reaches_the_operator_log(kube: Kube, operator_process):
    """The operator runs with --verbose here, as the chart's `operator.verbose: true` does:
    the Secret check reads the Secret, and the API client's debug log must not print it."""
    import base64

    canary = f"hf_canary_{kube.namespace}_do_not_log"
    kube.kubectl("create", "secret", "generic", "hf-canary", f"--from-literal=token={canary}")
    kube.apply(ftj_manifest("canary", hfTokenSecretRef={"name": "hf-canary", "key": "token"}))
    wait_for(
        lambda: kube.get_or_none("job", "canary-train"),
        timeout=60,
        what="the Job, created once the Secret was read",
    )
    operator_process.wait_for_resyncs(1)
    log = operator_process.log_text()
    assert "hf-canary" in log or "canary" in log  # the operator did work on this job
    for form in (canary, base64.b64encode(canary.encode()).decode()):
        assert form not in log, f"the Secret's value appears in the operator log ({form[:12]}...)"
