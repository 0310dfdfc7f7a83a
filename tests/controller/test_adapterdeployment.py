"""AdapterDeployments on a real control plane: shared vLLM servers, refusals, clean-up.

The operator runs as its own process; the Deployment controller, scheduler and kwok turn
the server Deployments into pods that become Ready on fake GPU nodes (no vLLM runs: the
rendered arguments are checked against vLLM's CLI in test_serving.py).
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

import pytest
from kubetest import Kube, bound_pvc, condition, wait_for

pytestmark = pytest.mark.cluster
BASE = "meta-llama/Meta-Llama-3-8B"
SERVERS = "finetune.dev/component=adapter-server"
# Per-deployment tolerations (harmless on the untainted fake nodes) exercise
# spec.resources.tolerations on the way to the server's pod template.
RESOURCES = {
    "tolerations": [
        {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoSchedule"}
    ]
}


def adapter_deployment(name: str, adapters: list[dict], **spec) -> dict:
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "AdapterDeployment",
        "metadata": {"name": name},
        "spec": {"baseModel": {"name": BASE}, "adapters": adapters, "resources": RESOURCES, **spec},
    }


def servers(kube: Kube) -> list[dict]:
    return kube.items("deployments", SERVERS)


def lora_modules(deployment: dict) -> list[str]:
    """The values of the single `--lora-modules` flag."""
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args.count("--lora-modules") == 1, args
    start = args.index("--lora-modules") + 1
    values = []
    for arg in args[start:]:
        if arg.startswith("--"):
            break
        values.append(arg)
    return values


def owners(obj: dict) -> list[str]:
    return sorted(r["name"] for r in obj["metadata"].get("ownerReferences") or [])


def ad_status(kube: Kube, name: str) -> dict:
    return kube.get("adapterdeployment", name).get("status") or {}


def wait_ready(kube: Kube, name: str, timeout: float = 90) -> dict:
    def ready():
        obj = kube.get("adapterdeployment", name)
        c = condition(obj, "Ready")
        return c and c["status"] == "True" and obj

    return wait_for(ready, timeout=timeout, what=f"AdapterDeployment {name} Ready")


def test_adapters_on_one_base_share_one_server_and_a_second_base_gets_its_own(
    kube: Kube, operator_process
):
    kube.apply(
        [
            adapter_deployment("support", [{"name": "support", "uri": "hf://acme/support-lora"}]),
            adapter_deployment(
                "alpaca", [{"name": "alpaca", "uri": "hf://acme/alpaca-lora"}], replicas=2
            ),
            adapter_deployment("sql", [{"name": "sql", "uri": "hf://acme/sql-lora"}]),
        ]
    )
    shared = wait_for(
        lambda: (s := servers(kube)) and len(lora_modules(s[0])) == 3 and s,
        timeout=60,
        what="one server listing all three adapters",
    )
    assert len(shared) == 1
    server = shared[0]
    assert lora_modules(server) == [
        "alpaca=acme/alpaca-lora",
        "sql=acme/sql-lora",
        "support=acme/support-lora",
    ]
    assert owners(server) == ["alpaca", "sql", "support"]
    assert server["spec"]["replicas"] == 2  # the most any member asks for
    name = server["metadata"]["name"]
    service = kube.get("service", name)
    assert service["spec"]["selector"] == server["spec"]["selector"]["matchLabels"]

    # kwok runs the pods: readiness is real Deployment status, reported per adapter.
    for ad in ("support", "alpaca", "sql"):
        obj = wait_ready(kube, ad)
        st = obj["status"]
        assert st["endpoint"] == f"http://{name}.{kube.namespace}.svc:8000/v1"
        assert st["loadedAdapters"] == [ad]
        assert st["readyReplicas"] == 2 and st["deploymentName"] == name
        assert st["adapters"][0]["state"] == "Loaded"
        assert condition(obj, "Degraded")["status"] == "False"

    kube.apply(
        adapter_deployment(
            "mistral",
            [{"name": "code", "uri": "hf://acme/code"}],
            baseModel={"name": "mistralai/Mistral-7B-v0.3"},
        )
    )
    both = wait_for(
        lambda: len(s := servers(kube)) == 2 and s,
        timeout=60,
        what="a second server for the second base model",
    )
    other = next(s for s in both if s["metadata"]["name"] != name)
    assert lora_modules(other) == ["code=acme/code"]
    assert owners(other) == ["mistral"]
    args = other["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[0] == "mistralai/Mistral-7B-v0.3"
    assert len(lora_modules(kube.get("deployment", name))) == 3


def test_removing_adapters_updates_the_server_and_deleting_the_last_removes_it(
    kube: Kube, operator_process
):
    kube.apply(
        [
            adapter_deployment(
                "a",
                [{"name": "one", "uri": "hf://acme/one"}, {"name": "two", "uri": "hf://acme/two"}],
            ),
            adapter_deployment("b", [{"name": "three", "uri": "hf://acme/three"}]),
        ]
    )
    server = wait_for(
        lambda: (s := servers(kube)) and len(lora_modules(s[0])) == 3 and s[0],
        timeout=60,
        what="the shared server with three adapters",
    )
    name = server["metadata"]["name"]
    before = server["spec"]["template"]
    wait_ready(kube, "a")

    # Remove one adapter from a spec: the template rolls without it.
    kube.apply(adapter_deployment("a", [{"name": "one", "uri": "hf://acme/one"}]))
    updated = wait_for(
        lambda: len(lora_modules(d := kube.get("deployment", name))) == 2 and d,
        timeout=60,
        what="the server without adapter 'two'",
    )
    assert lora_modules(updated) == ["one=acme/one", "three=acme/three"]
    assert updated["spec"]["template"] != before
    wait_for(
        lambda: ad_status(kube, "a").get("loadedAdapters") == ["one"],
        timeout=90,
        what="status.loadedAdapters of a without 'two'",
    )

    # Delete one AdapterDeployment: its adapters and its owner reference leave the server.
    kube.delete("adapterdeployment", "a")
    wait_for(
        lambda: (
            lora_modules(d := kube.get("deployment", name)) == ["three=acme/three"]
            and owners(d) == ["b"]
        ),
        timeout=60,
        what="the server serving only b",
    )
    assert owners(kube.get("service", name)) == ["b"]

    # Delete the last one: the server and its Service go.
    kube.delete("adapterdeployment", "b")
    wait_for(
        lambda: (
            kube.get_or_none("deployment", name) is None
            and kube.get_or_none("service", name) is None
        ),
        timeout=60,
        what="the server to be removed with its last AdapterDeployment",
    )


def finished_job(
    kube: Kube, name: str, *, model: str = BASE, r: int = 16, output: str | None = None
) -> dict:
    """A FineTuneJob marked Succeeded by the test (no training here), as the worker would."""
    from finetune_api import FineTuneJob, spec_hash

    doc = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"name": model},
            "dataset": {"uri": "pvc://data/alpaca.jsonl", "format": "alpaca"},
            "lora": {"r": r},
            "training": {"maxSteps": 10},
            "suspend": True,
            "resources": {"gpu": {"count": 1, "memory": "80Gi"}},
            "output": {"uri": output or f"hf://acme/{name}"},
        },
    }
    kube.apply(doc)
    shash = spec_hash(FineTuneJob.model_validate(doc).spec)
    kube.patch_status(
        "finetunejob",
        name,
        {
            "status": {
                "phase": "Succeeded",
                "specHash": shash,
                "adapter": {"uri": doc["spec"]["output"]["uri"], "sha256": "ab" * 32},
            }
        },
    )
    return wait_for(
        lambda: (o := kube.get("finetunejob", name))["status"].get("phase") == "Succeeded" and o,
        timeout=30,
        what=f"FineTuneJob {name} Succeeded",
    )


def test_incompatible_adapters_are_refused_with_their_reason(kube: Kube, operator_process):
    finished_job(kube, "mistral-tuned", model="mistralai/Mistral-7B-v0.3")
    finished_job(kube, "wide", r=128)
    finished_job(kube, "fits", r=32)
    kube.apply(
        adapter_deployment(
            "mixed",
            [
                {"name": "mistral-tuned", "fineTuneJobRef": {"name": "mistral-tuned"}},
                {"name": "wide", "fineTuneJobRef": {"name": "wide"}},
                {"name": "fits", "fineTuneJobRef": {"name": "fits"}},
            ],
            maxLoraRank=64,
        )
    )

    obj = wait_degraded(kube, "mixed", what="Degraded with the refusals")
    degraded = condition(obj, "Degraded")
    assert degraded["reason"] == "BaseModelMismatch"
    assert "'mistral-tuned' was trained on 'mistralai/Mistral-7B-v0.3'" in degraded["message"]
    assert "'wide' has rank 128, above spec.maxLoraRank (64)" in degraded["message"]
    states = {a["name"]: a for a in obj["status"]["adapters"]}
    assert states["mistral-tuned"]["reason"] == "BaseModelMismatch"
    assert states["wide"]["reason"] == "RankAboveLimit"
    assert states["fits"]["state"] in ("Accepted", "Loaded")
    assert states["fits"]["fineTuneJob"]["name"] == "fits"
    assert states["fits"]["sha256"] == "ab" * 32
    # Only the compatible adapter reaches the server, at the rank it needs.
    server = wait_for(lambda: (s := servers(kube)) and s[0], timeout=60, what="the server")
    assert lora_modules(server) == ["fits=acme/fits"]
    args = server["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--max-lora-rank") + 1] == "32"
    obj = wait_ready(kube, "mixed")
    assert obj["status"]["loadedAdapters"] == ["fits"]


def test_adapter_waits_for_its_finetunejob_then_is_served(kube: Kube, operator_process):
    kube.apply(adapter_deployment("early", [{"name": "late", "fineTuneJobRef": {"name": "late"}}]))
    obj = wait_for(
        lambda: (
            (o := kube.get("adapterdeployment", "early")).get("status")
            and condition(o, "Ready")
            and o
        ),
        timeout=60,
        what="a status",
    )
    assert condition(obj, "Ready")["reason"] == "FineTuneJobNotFound"
    assert servers(kube) == []
    finished_job(kube, "late")
    server = wait_for(
        lambda: (s := servers(kube)) and s[0], timeout=60, what="the server once the job succeeded"
    )
    assert lora_modules(server) == ["late=acme/late"]


def test_finetunejob_follow_up_deploys_and_deleting_the_job_removes_the_server(
    kube: Kube, operator_process
):
    # The FineTuneJob's follow-up creates an AdapterDeployment owned by the job.
    from finetune_api import FineTuneJob, spec_hash

    doc = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "tuned"},
        "spec": {
            "model": {"name": BASE},
            "dataset": {"uri": "pvc://data/alpaca.jsonl", "format": "alpaca"},
            "training": {"maxSteps": 10},
            "suspend": True,
            "resources": {"gpu": {"count": 1, "memory": "80Gi"}},
            "output": {"uri": "hf://acme/tuned"},
            "followUp": {"deploy": {"enabled": True, "resources": RESOURCES}},
        },
    }
    kube.apply(doc)
    kube.patch_status(
        "finetunejob",
        "tuned",
        {
            "status": {
                "phase": "Succeeded",
                "specHash": spec_hash(FineTuneJob.model_validate(doc).spec),
                "adapter": {"uri": "hf://acme/tuned"},
            }
        },
    )
    created = wait_for(
        lambda: kube.get_or_none("adapterdeployment", "tuned"),
        timeout=60,
        what="the follow-up AdapterDeployment",
    )
    assert created["spec"]["adapters"][0]["fineTuneJobRef"]["name"] == "tuned"
    server = wait_for(lambda: (s := servers(kube)) and s[0], timeout=60, what="its server")
    assert lora_modules(server) == ["tuned=acme/tuned"]
    name = server["metadata"]["name"]
    kube.delete("finetunejob", "tuned")
    wait_for(
        lambda: kube.get_or_none("adapterdeployment", "tuned") is None,
        timeout=60,
        what="the AdapterDeployment to go with its FineTuneJob",
    )
    wait_for(
        lambda: (
            kube.get_or_none("deployment", name) is None
            and kube.get_or_none("service", name) is None
        ),
        timeout=60,
        what="the server to go with the last adapter",
    )


def test_adapter_failing_its_checks_in_the_pod_degrades_the_deployment(
    kube: Kube, operator_process, manual_node
):
    # The storage Secret must exist: a missing one holds every adapter back (it is named).
    kube.kubectl("create", "secret", "generic", "s3", "--from-literal=AWS_ACCESS_KEY_ID=x")
    kube.apply(
        adapter_deployment(
            "checked",
            [{"name": "support", "uri": "s3://adapters/support"}],
            storageSecretRef={"name": "s3"},
            resources={
                "nodeSelector": {"finetune.dev/test-node": "manual"},
                "tolerations": [{"operator": "Exists"}],
            },
        )
    )
    pod = wait_for(
        lambda: [
            p for p in kube.items("pods", SERVERS) if p["spec"].get("nodeName") == manual_node
        ],
        timeout=60,
        what=f"a server pod bound to {manual_node}",
    )[0]
    inits = [c["name"] for c in pod["spec"]["initContainers"]]
    assert inits == ["fetch", "verify-adapters"]
    # What a kubelet reports when the verify init container exits non-zero and restarts.
    message = (
        "AdapterChecksumMismatch: adapter 'support': files differ from their manifest "
        "checksums in /adapters/support: ['adapter_model.safetensors']"
    )
    kube.patch_status(
        "pod",
        pod["metadata"]["name"],
        {
            "status": {
                "phase": "Pending",
                "initContainerStatuses": [
                    {
                        "name": "fetch",
                        "image": pod["spec"]["initContainers"][0]["image"],
                        "imageID": "",
                        "ready": True,
                        "restartCount": 0,
                        "state": {
                            "terminated": {
                                "exitCode": 0,
                                "reason": "Completed",
                                "startedAt": "2026-01-01T00:00:00Z",
                                "finishedAt": "2026-01-01T00:00:01Z",
                            }
                        },
                    },
                    {
                        "name": "verify-adapters",
                        "image": pod["spec"]["initContainers"][1]["image"],
                        "imageID": "",
                        "ready": False,
                        "restartCount": 2,
                        "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                        "lastState": {
                            "terminated": {
                                "exitCode": 1,
                                "reason": "Error",
                                "message": message,
                                "startedAt": "2026-01-01T00:00:02Z",
                                "finishedAt": "2026-01-01T00:00:03Z",
                            }
                        },
                    },
                ],
            }
        },
    )

    obj = wait_degraded(kube, "checked", what="Degraded from the pod's failed adapter check")
    c = condition(obj, "Degraded")
    assert c["reason"] == "AdapterLoadFailed"
    assert "verify-adapters" in c["message"] and message in c["message"]
    assert condition(obj, "Ready")["status"] == "False"
    assert obj["status"]["loadedAdapters"] == []


# --- issue 21: isolation, reasons, checks, rolls, ownership of names ---------------------------


def _set_quantity_rules(kube: Kube, kind: str, field: str, *, relaxed: bool) -> None:
    """Apply the generated CRD of `kind` as the `crds` fixture does (server-side, manager
    `tests`), without the rules of `spec.resources.<field>` when `relaxed`: applying it
    again unrelaxed leaves the CRD exactly as the session's other tests expect."""
    import yaml

    path = Path(__file__).resolve().parents[2] / "crds" / f"finetune.dev_{kind}.yaml"
    doc = yaml.safe_load(path.read_text())
    if relaxed:
        doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"][
            "resources"
        ]["properties"][field].pop("x-kubernetes-validations")
    kube.kubectl(
        "apply",
        "--server-side",
        "--field-manager=tests",
        "-f",
        "-",
        input=yaml.safe_dump(doc),
        namespaced=False,
    )


def test_one_invalid_adapterdeployment_does_not_stop_the_others(kube: Kube, operator_process):
    """An object the models refuse (here: stored while the CRD lacked today's quantity rule)
    is told which field is wrong, and every other AdapterDeployment goes on."""
    kube.apply(adapter_deployment("before", [{"name": "one", "uri": "hf://acme/one"}]))
    wait_ready(kube, "before")
    crd = "adapterdeployments"
    bad = adapter_deployment(
        "bad", [{"name": "two", "uri": "hf://acme/two"}], resources={**RESOURCES, "cpu": "-2"}
    )
    # Today's CRD refuses it, naming the field.
    refused = kube.create(bad, check=False)
    assert refused.returncode != 0 and "spec.resources.cpu" in refused.stderr, refused.stderr
    _set_quantity_rules(kube, crd, "cpu", relaxed=True)
    try:
        wait_for(
            lambda: kube.create(bad, check=False).returncode == 0,
            timeout=30,
            what="the relaxed CRD to take the old object",
        )
    finally:
        _set_quantity_rules(kube, crd, "cpu", relaxed=False)
    wait_for(
        lambda: (
            kube.create({**bad, "metadata": {"name": "bad-again"}}, check=False).returncode != 0
        ),
        timeout=30,
        what="the CRD's quantity rule back in force",
    )

    def invalid():
        obj = kube.get("adapterdeployment", "bad")
        c = condition(obj, "Ready")
        return c and c["reason"] == "InvalidSpec" and obj

    obj = wait_for(invalid, timeout=60, what="the invalid AdapterDeployment's condition")
    ready = condition(obj, "Ready")
    assert ready["status"] == "False"
    assert "spec.resources.cpu" in ready["message"] and "'-2'" in ready["message"]
    assert condition(obj, "Degraded")["reason"] == "InvalidSpec"
    wait_for(
        lambda: any(
            e.get("reason") == "InvalidSpec"
            and e["type"] == "Warning"
            and e["involvedObject"]["name"] == "bad"
            for e in kube.items("events")
        ),
        timeout=30,
        what="a Warning Event on the invalid object",
    )

    # The others go on: a new one is served, an existing one still reconciles.
    kube.apply(adapter_deployment("after", [{"name": "three", "uri": "hf://acme/three"}]))
    wait_ready(kube, "after")
    server = kube.get("deployment", ad_status(kube, "after")["deploymentName"])
    assert lora_modules(server) == ["one=acme/one", "three=acme/three"]
    assert all("two=acme/two" not in lora_modules(s) for s in servers(kube))


@pytest.fixture
def files_operator(cluster, crds, kube: Kube, tmp_path):
    """An operator of its own that reads adapter files (`FINETUNE_PVC_ROOT`: the claim
    `c` is the directory `<root>/c`), watching only this test's namespace, which the
    session's operator does not watch. Yields the root."""
    from operator_harness import OperatorProcess

    root = tmp_path / "volumes"
    root.mkdir()
    proc = OperatorProcess(
        cluster,
        tmp_path,
        namespaces=kube.namespace,
        extra_env={"FINETUNE_PVC_ROOT": str(root), "FINETUNE_RESYNC_SECONDS": "1"},
    )
    proc.start()
    bound_pvc(kube, "adapters")
    try:
        yield root
    finally:
        proc.stop()


def write_adapter(
    directory: Path, *, base: str | None = BASE, r: int = 16, manifest: bool = True
) -> str | None:
    """An adapter directory as the worker (manifest) or plain PEFT (no manifest) leaves
    it; returns the manifest's digest."""
    from finetune_api.adapter_manifest import (
        AdapterManifest,
        BaseModelRef,
        describe_files,
    )

    directory.mkdir(parents=True, exist_ok=True)
    config = {"r": r, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"]}
    if base:
        config["base_model_name_or_path"] = base
    (directory / "adapter_config.json").write_text(json.dumps(config))
    (directory / "adapter_model.safetensors").write_bytes(os.urandom(2048))
    if not manifest:
        return None
    m = AdapterManifest(
        spec_hash="e" * 64,
        base_model=BaseModelRef(name=base),
        method="lora",
        r=r,
        alpha=32,
        target_modules=["q_proj", "v_proj"],
        files=describe_files(directory),
        created_at=datetime.now(UTC),
    )
    m.write(directory)
    return m.digest


def wait_degraded(kube: Kube, name: str, *, reason: str | None = None, what: str) -> dict:
    """The AdapterDeployment once Degraded is True (with `reason`, if given)."""

    def degraded():
        obj = kube.get("adapterdeployment", name)
        c = condition(obj, "Degraded")
        return c and c["status"] == "True" and (reason is None or c["reason"] == reason) and obj

    return wait_for(degraded, timeout=60, what=what)


def adapter_state(kube: Kube, deployment: str, adapter: str) -> dict:
    return next(
        (a for a in ad_status(kube, deployment).get("adapters") or [] if a["name"] == adapter), {}
    )


def test_messages_name_the_users_uri_not_the_operators_path(kube: Kube, files_operator):
    root = files_operator
    write_adapter(root / "adapters" / "good")
    kube.apply(
        adapter_deployment(
            "paths",
            [
                {"name": "good", "uri": "pvc://adapters/good"},
                {"name": "absent", "uri": "pvc://adapters/absent"},
            ],
        )
    )

    obj = wait_degraded(
        kube, "paths", reason="AdapterFilesMissing", what="the missing adapter refused"
    )
    message = condition(obj, "Degraded")["message"]
    assert "pvc://adapters/absent does not exist" in message, message
    assert str(root) not in message
    absent = adapter_state(kube, "paths", "absent")
    assert "pvc://adapters/absent" in absent["message"] and str(root) not in absent["message"]


def test_a_missing_claim_is_named_and_its_adapter_waits_while_the_others_serve(
    kube: Kube, operator_process
):
    kube.apply(
        adapter_deployment(
            "claims",
            [
                {"name": "hub", "uri": "hf://acme/hub"},
                {"name": "local", "uri": "pvc://late-claim/local"},
            ],
        )
    )
    obj = wait_ready(kube, "claims")  # the adapter that needs nothing missing is served
    rr = condition(obj, "ReferencesResolved")
    assert (rr["status"], rr["reason"]) == ("False", "VolumeClaimNotFound")
    assert "PVC 'late-claim' (spec.adapters[1].uri)" in rr["message"]
    local = adapter_state(kube, "claims", "local")
    assert (local["state"], local["reason"]) == ("Pending", "VolumeClaimNotFound")
    assert "PVC 'late-claim'" in local["message"]
    assert "still waiting for local" in condition(obj, "Ready")["message"]
    # No pod waits on the missing claim: the server holds only what can start.
    name = obj["status"]["deploymentName"]
    assert lora_modules(kube.get("deployment", name)) == ["hub=acme/hub"]

    bound_pvc(kube, "late-claim")  # the resync notices it (claims are not watched)
    wait_for(
        lambda: (
            lora_modules(kube.get("deployment", name))
            == ["hub=acme/hub", "local=/mnt/late-claim/local"]
        ),
        timeout=60,
        what="the adapter served once its claim exists",
    )
    wait_for(
        lambda: (
            condition(kube.get("adapterdeployment", "claims"), "ReferencesResolved")["status"]
            == "True"
        ),
        timeout=60,
        what="ReferencesResolved True",
    )


def test_a_pod_that_cannot_be_scheduled_says_why(kube: Kube, operator_process):
    kube.apply(
        adapter_deployment(
            "nowhere",
            [{"name": "x", "uri": "hf://acme/x"}],
            resources={**RESOURCES, "gpu": {"product": "NVIDIA-NO-SUCH-GPU"}},
        )
    )

    def unschedulable():
        c = condition(kube.get("adapterdeployment", "nowhere"), "Ready")
        return c and "cannot be scheduled" in c["message"] and c

    ready = wait_for(unschedulable, timeout=60, what="the scheduler's reason in Ready")
    assert (ready["status"], ready["reason"]) == ("False", "ReplicasNotReady")
    assert (
        "node(s) didn't match" in ready["message"] or "nodes are available" in (ready["message"])
    ), ready["message"]


def test_a_plain_peft_adapter_is_checked_against_its_own_base(kube: Kube, files_operator):
    root = files_operator
    write_adapter(root / "adapters" / "mistral", base="mistralai/Mistral-7B-v0.3", manifest=False)
    write_adapter(root / "adapters" / "llama", manifest=False)
    kube.apply(
        adapter_deployment(
            "peft",
            [
                {"name": "mistral", "uri": "pvc://adapters/mistral"},
                {"name": "llama", "uri": "pvc://adapters/llama"},
            ],
        )
    )

    obj = wait_degraded(kube, "peft", what="the Mistral adapter refused")
    degraded = condition(obj, "Degraded")
    assert degraded["reason"] == "BaseModelMismatch"
    assert (
        "'mistralai/Mistral-7B-v0.3' (base_model_name_or_path in its adapter_config.json)"
        in degraded["message"]
    )
    server = wait_for(lambda: (s := servers(kube)) and s[0], timeout=60, what="the server")
    assert lora_modules(server) == ["llama=/mnt/adapters/llama"]


def adapters_annotation(kube: Kube) -> str:
    server = wait_for(lambda: (s := servers(kube)) and s[0], timeout=60, what="the server")
    return server["spec"]["template"]["metadata"]["annotations"]["finetune.dev/adapters"]


def test_replacing_an_adapters_files_rolls_the_server(kube: Kube, files_operator):
    import shutil

    root = files_operator
    digest = write_adapter(root / "adapters" / "worker")
    write_adapter(root / "adapters" / "peft", manifest=False)
    kube.apply(
        adapter_deployment(
            "files",
            [
                {"name": "worker", "uri": "pvc://adapters/worker"},
                {"name": "peft", "uri": "pvc://adapters/peft"},
            ],
        )
    )
    wait_ready(kube, "files")
    states = {a["name"]: a for a in ad_status(kube, "files")["adapters"]}
    assert states["worker"]["sha256"] == digest
    peft_digest = states["peft"]["sha256"]
    assert peft_digest and len(peft_digest) == 64
    assert adapters_annotation(kube) == f"peft={peft_digest[:16]},worker={digest[:16]}"

    # A new training run writes the directory again (files and manifest): the server rolls.
    shutil.rmtree(root / "adapters" / "worker")
    new_digest = write_adapter(root / "adapters" / "worker")
    wait_for(
        lambda: f"worker={new_digest[:16]}" in adapters_annotation(kube),
        timeout=60,
        what="the pod template to carry the new digest",
    )
    # Plain PEFT weights rewritten in place: the same.
    (root / "adapters" / "peft" / "adapter_model.safetensors").write_bytes(os.urandom(2048))
    wait_for(
        lambda: f"peft={peft_digest[:16]}" not in adapters_annotation(kube),
        timeout=60,
        what="the pod template to follow the rewritten weights",
    )
    wait_for(
        lambda: (a := adapter_state(kube, "files", "worker")).get("sha256") == new_digest and a,
        timeout=60,
        what="status.adapters[].sha256 to follow",
    )


def test_a_served_name_never_moves_to_another_adapter(kube: Kube, files_operator):
    root = files_operator
    write_adapter(root / "adapters" / "one")
    write_adapter(root / "adapters" / "two")
    kube.apply(
        adapter_deployment(
            "first",
            [
                {"name": "shared", "uri": "pvc://adapters/one"},
                {"name": "keep1", "uri": "hf://acme/keep1"},
            ],
        )
    )
    wait_ready(kube, "first")
    kube.apply(
        adapter_deployment(
            "second",
            [
                {"name": "shared", "uri": "pvc://adapters/two"},
                {"name": "keep2", "uri": "hf://acme/keep2"},
            ],
        )
    )
    wait_for(
        lambda: (
            (a := adapter_state(kube, "second", "shared")).get("reason") == "AdapterNameConflict"
            and a
        ),
        timeout=60,
        what="the newer one refused",
    )
    name = ad_status(kube, "first")["deploymentName"]
    wait_for(
        lambda: (
            lora_modules(kube.get("deployment", name))
            == ["keep1=acme/keep1", "keep2=acme/keep2", "shared=/mnt/adapters/one"]
        ),
        timeout=60,
        what="the server with both deployments",
    )

    # The owner's directory disappears for a while: its adapter leaves the server, the
    # name does not go to the other adapter.
    (root / "adapters" / "one").rename(root / "adapters" / "one-away")
    wait_for(
        lambda: adapter_state(kube, "first", "shared").get("reason") == "AdapterFilesMissing",
        timeout=60,
        what="the owner's adapter refused",
    )
    wait_for(
        lambda: (
            lora_modules(kube.get("deployment", name)) == ["keep1=acme/keep1", "keep2=acme/keep2"]
        ),
        timeout=60,
        what="the server without the unreadable adapter",
    )
    assert adapter_state(kube, "second", "shared")["reason"] == "AdapterNameConflict"
    (root / "adapters" / "one-away").rename(root / "adapters" / "one")
    wait_for(
        lambda: "shared=/mnt/adapters/one" in lora_modules(kube.get("deployment", name)),
        timeout=60,
        what="the owner's adapter back",
    )
    # No revision of the server ever bound the name to the other adapter's files.
    revisions = kube.items("replicasets", f"finetune.dev/server={name}")
    assert revisions
    for rs in revisions:
        assert "shared=/mnt/adapters/two" not in lora_modules(rs), lora_modules(rs)
