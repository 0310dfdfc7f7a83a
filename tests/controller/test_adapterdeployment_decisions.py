"""AdapterDeployment decisions without a cluster: which adapters are served, which wait,
which are refused and why, and the status that reports it.

The `pvc_root` setting (dev and demo) lets the operator read adapter directories itself;
here it points at a temp dir holding adapters with manifests written by the API's own
`AdapterManifest`, so the file and checksum checks run before any pod exists.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

from finetune_api.adapter_manifest import AdapterManifest, BaseModelRef, describe_files
from finetune_api.adapterdeployment import AdapterDeployment
from finetune_operator.builders.server_group import ServingDefaults, server_config, server_name
from finetune_operator.reconcile import adapterdeployment as rec
from finetune_operator.reconcile.settings import OperatorSettings

BASE = "meta-llama/Meta-Llama-3-8B"


def ad_body(
    name: str, adapters: list[dict], *, created: str = "2026-01-01T00:00:00Z", **spec
) -> dict:
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "AdapterDeployment",
        "metadata": {
            "name": name,
            "namespace": "team",
            "uid": f"uid-{name}",
            "generation": 1,
            "creationTimestamp": created,
        },
        "spec": {"baseModel": {"name": BASE}, "adapters": adapters, **spec},
    }


def desired(body: dict) -> rec.Desired:
    ad = AdapterDeployment.model_validate(body)
    config = server_config(ad, ServingDefaults())
    return rec.Desired(body, ad, config, server_name(config))


def ftj_body(
    name: str,
    phase: str | None,
    *,
    r: int = 16,
    model: str = BASE,
    revision: str | None = None,
    sha256: str | None = None,
    dora: bool = False,
) -> dict:
    spec = {
        "model": {"name": model, **({"revision": revision} if revision else {})},
        "dataset": {"uri": "pvc://data/a.jsonl", "format": "alpaca"},
        "lora": {"r": r, "targetModules": ["q_proj", "v_proj"], "useDoRA": dora},
        "training": {"maxSteps": 10},
        "resources": {"gpu": {"memory": "24Gi"}},
        "output": {"uri": f"pvc://adapters/{name}"},
    }
    status = {}
    if phase:
        status["phase"] = phase
    if phase == "Succeeded":
        status["adapter"] = {"uri": f"pvc://adapters/{name}", "sha256": sha256 or "0" * 64}
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": "team", "uid": f"uid-{name}"},
        "spec": spec,
        "status": status,
    }


def decide(
    d: rec.Desired, jobs: dict | None = None, settings: OperatorSettings | None = None
) -> list[rec.AdapterDecision]:
    settings = settings or OperatorSettings()
    return [
        rec.decide_adapter(src, d.ad, d.config, jobs or {}, settings) for src in d.ad.spec.adapters
    ]


def test_finetunejob_adapters_wait_for_success_and_carry_job_and_checksum():
    d = desired(
        ad_body(
            "a",
            [
                {"name": "ok", "fineTuneJobRef": {"name": "done"}},
                {"name": "later", "fineTuneJobRef": {"name": "running"}},
                {"name": "gone", "fineTuneJobRef": {"name": "missing"}},
                {"name": "bad", "fineTuneJobRef": {"name": "failed"}},
            ],
        )
    )
    jobs = {
        "done": ftj_body("done", "Succeeded", sha256="ab" * 32),
        "running": ftj_body("running", "Running"),
        "failed": ftj_body("failed", "Failed"),
    }
    ok, later, gone, bad = decide(d, jobs)
    assert ok.state == "Accepted" and ok.served is not None
    assert ok.served.uri == "pvc://adapters/done" and ok.served.max_rank == 16
    assert ok.sha256 == "ab" * 32 and ok.fine_tune_job["name"] == "done"
    assert (later.state, later.reason) == ("Pending", "AdapterNotReady")
    assert "phase Running" in later.message
    assert (gone.state, gone.reason) == ("Pending", "FineTuneJobNotFound")
    assert (bad.state, bad.reason) == ("Refused", "FineTuneJobFailed")


def test_spec_level_incompatibilities_are_refused_before_anything_is_served():
    d = desired(
        ad_body(
            "a",
            [
                {"name": "other-base", "fineTuneJobRef": {"name": "m"}},
                {"name": "too-big", "fineTuneJobRef": {"name": "big"}},
                {"name": "dora", "fineTuneJobRef": {"name": "dora"}},
                {"name": "pinned", "fineTuneJobRef": {"name": "pinned"}},
            ],
            maxLoraRank=32,
        )
    )
    jobs = {
        "m": ftj_body("m", "Succeeded", model="mistralai/Mistral-7B-v0.3"),
        "big": ftj_body("big", "Succeeded", r=64),
        "dora": ftj_body("dora", "Succeeded", dora=True),
        "pinned": ftj_body("pinned", "Succeeded", revision="v2"),
    }
    decisions = decide(d, jobs)
    assert [(x.state, x.reason) for x in decisions] == [
        ("Refused", "BaseModelMismatch"),
        ("Refused", "RankAboveLimit"),
        ("Refused", "UnsupportedAdapterFeature"),
        ("Refused", "BaseModelMismatch"),
    ]
    assert "raise spec.maxLoraRank to at least 64" in decisions[1].message
    assert all(x.served is None for x in decisions)


def write_adapter(directory: Path, *, base: str = BASE, r: int = 16) -> AdapterManifest:
    directory.mkdir(parents=True)
    (directory / "adapter_config.json").write_text(json.dumps({"r": r, "lora_alpha": 32}))
    (directory / "adapter_model.safetensors").write_bytes(os.urandom(2048))
    manifest = AdapterManifest(
        spec_hash="e" * 64,
        base_model=BaseModelRef(name=base),
        method="qlora",
        r=r,
        alpha=32,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        files=describe_files(directory),
        created_at=datetime.now(UTC),
    )
    manifest.write(directory)
    return manifest


def test_pvc_root_runs_file_and_checksum_checks_in_the_operator(tmp_path):
    settings = OperatorSettings(pvc_root=str(tmp_path))
    good = write_adapter(tmp_path / "adapters" / "good")
    write_adapter(tmp_path / "adapters" / "corrupt")
    (tmp_path / "adapters" / "corrupt" / "adapter_model.safetensors").write_bytes(b"x")
    write_adapter(tmp_path / "adapters" / "mistral", base="mistralai/Mistral-7B-v0.3")
    write_adapter(tmp_path / "adapters" / "r128", r=128)
    d = desired(
        ad_body(
            "a",
            [
                {"name": "good", "uri": "pvc://adapters/good"},
                {"name": "corrupt", "uri": "pvc://adapters/corrupt"},
                {"name": "absent", "uri": "pvc://adapters/absent"},
                {"name": "mistral", "uri": "pvc://adapters/mistral"},
                {"name": "r128", "uri": "pvc://adapters/r128"},
                {"name": "from-job", "fineTuneJobRef": {"name": "job"}},
            ],
        )
    )
    # The job recorded a digest that is not the one on disk: a different adapter is there.
    jobs = {"job": ftj_body("job", "Succeeded", sha256="1" * 64)}
    jobs["job"]["status"]["adapter"]["uri"] = "pvc://adapters/good"
    decisions = {x.name: x for x in decide(d, jobs, settings)}
    assert decisions["good"].state == "Accepted"
    assert decisions["good"].rank == 16 and decisions["good"].served.max_rank == 16
    assert (decisions["corrupt"].reason, decisions["absent"].reason) == (
        "AdapterChecksumMismatch",
        "AdapterFilesMissing",
    )
    # Messages name the URI people wrote, not where the operator sees the volume.
    assert "pvc://adapters/absent does not exist" in decisions["absent"].message
    assert "pvc://adapters/corrupt" in decisions["corrupt"].message
    assert all(str(tmp_path) not in x.message for x in decisions.values())
    assert decisions["mistral"].reason == "BaseModelMismatch"
    assert decisions["r128"].reason == "RankAboveLimit"
    assert decisions["from-job"].reason == "AdapterChecksumMismatch"
    assert good.digest[:12] in decisions["from-job"].message
    assert all(decisions[n].served is None for n in decisions if n != "good")


def test_adapter_names_are_unique_per_server_and_the_oldest_keeps_a_name():
    older = desired(
        ad_body(
            "older", [{"name": "support", "uri": "hf://acme/s1"}], created="2026-01-01T00:00:00Z"
        )
    )
    newer = desired(
        ad_body(
            "newer",
            [{"name": "support", "uri": "hf://acme/s2"}, {"name": "sql", "uri": "hf://acme/x"}],
            created="2026-01-02T00:00:00Z",
        )
    )
    for d in (older, newer):
        d.decisions = decide(d)
    group = [newer, older]
    rec._refuse_name_conflicts(group)
    assert older.decisions[0].state == "Accepted"
    assert (newer.decisions[0].state, newer.decisions[0].reason) == (
        "Refused",
        "AdapterNameConflict",
    )
    assert "AdapterDeployment 'older'" in newer.decisions[0].message
    assert newer.decisions[1].state == "Accepted"
    assert older.member() is not None and len(newer.member().adapters) == 1
    # A base model served from a volume is named after its directory; an adapter may not
    # take that name.
    local = desired(
        ad_body(
            "local",
            [{"name": "llama3", "uri": "hf://acme/l"}],
            baseModel={"uri": "pvc://models/llama3"},
        )
    )
    local.decisions = decide(local)
    rec._refuse_name_conflicts([local])
    assert local.decisions[0].reason == "AdapterNameConflict"
    assert "the base model's name" in local.decisions[0].message


def deployment(
    name: str, *, replicas: int = 1, ready: int = 1, generation: int = 2, observed: int = 2
) -> dict:
    return {
        "metadata": {"name": name, "generation": generation},
        "spec": {"replicas": replicas},
        "status": {
            "observedGeneration": observed,
            "replicas": replicas,
            "updatedReplicas": replicas,
            "readyReplicas": ready,
        },
    }


def cond(status: dict, type_: str) -> dict:
    return next(c for c in status["conditions"] if c["type"] == type_)


def test_status_reports_ready_loaded_adapters_endpoint_and_refusals():
    d = desired(
        ad_body(
            "a",
            [
                {"name": "one", "uri": "hf://acme/one"},
                {"name": "two", "fineTuneJobRef": {"name": "big"}},
            ],
            maxLoraRank=8,
        )
    )
    d.decisions = decide(d, {"big": ftj_body("big", "Succeeded", r=16, sha256="cd" * 32)})
    status = rec.desired_status(d, deployment(d.server), [], {})
    assert cond(status, "Ready")["status"] == "True"
    assert cond(status, "Degraded")["status"] == "True"
    assert cond(status, "Degraded")["reason"] == "RankAboveLimit"
    assert status["loadedAdapters"] == ["one"]
    assert status["endpoint"] == f"http://{d.server}.team.svc:8000/v1"
    assert status["baseModelName"] == BASE and status["deploymentName"] == d.server
    two = status["adapters"][1]
    assert two["state"] == "Refused" and two["fineTuneJob"]["name"] == "big"
    assert two["sha256"] == "cd" * 32 and two["rank"] == 16

    rolling = rec.desired_status(d, deployment(d.server, observed=1), [], status)
    assert cond(rolling, "Ready")["status"] == "False"
    assert rolling["loadedAdapters"] == [] and rolling["adapters"][0]["state"] == "Accepted"
    # lastTransitionTime moves only when the status value flips.
    again = rec.desired_status(d, deployment(d.server), [], status)
    assert cond(again, "Ready")["lastTransitionTime"] == cond(status, "Ready")["lastTransitionTime"]


def test_failed_adapter_verification_in_the_pod_degrades_the_deployment():
    d = desired(ad_body("a", [{"name": "one", "uri": "pvc://adapters/one"}]))
    d.decisions = decide(d)
    pod = {
        "metadata": {"name": "vllm-x-1"},
        "status": {
            "initContainerStatuses": [
                {
                    "name": "verify-adapters",
                    "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                    "lastState": {
                        "terminated": {
                            "exitCode": 1,
                            "message": "AdapterChecksumMismatch: adapter 'one': files differ",
                        }
                    },
                }
            ]
        },
    }
    status = rec.desired_status(d, deployment(d.server, ready=0), [pod], {})
    degraded = cond(status, "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "AdapterLoadFailed")
    assert "AdapterChecksumMismatch: adapter 'one'" in degraded["message"]
    assert cond(status, "Ready")["reason"] == "ReplicasNotReady"


def test_nothing_servable_says_why():
    d = desired(ad_body("a", [{"name": "later", "fineTuneJobRef": {"name": "j"}}]))
    d.decisions = decide(d, {"j": ftj_body("j", "Running")})
    status = rec.desired_status(d, None, [], {})
    ready = cond(status, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "AdapterNotReady")
    assert "waiting for FineTuneJob 'j'" in ready["message"]
    assert status["endpoint"] is None and cond(status, "Degraded")["status"] == "False"


def test_an_adapter_on_a_missing_claim_waits_and_the_claim_is_named():
    from finetune_operator import references

    d = desired(
        ad_body(
            "a", [{"name": "hub", "uri": "hf://acme/hub"}, {"name": "local", "uri": "pvc://late/x"}]
        )
    )
    ref = rec.adapter_reference(1, d.ad.spec.adapters[1], {})
    assert (ref.name, ref.field) == ("late", "spec.adapters[1].uri")
    d.missing = [references.check(ref, None)]
    d.decisions = [
        rec.decide_adapter(src, d.ad, d.config, {}, OperatorSettings(), d.missing)
        for src in d.ad.spec.adapters
    ]
    hub, local = d.decisions
    assert hub.state == "Accepted"
    assert (local.state, local.reason) == ("Pending", "VolumeClaimNotFound")
    assert "PVC 'late' (spec.adapters[1].uri)" in local.message
    status = rec.desired_status(d, deployment(d.server), [], {})
    rr = cond(status, "ReferencesResolved")
    assert (rr["status"], rr["reason"]) == ("False", "VolumeClaimNotFound")


def test_unschedulable_server_pods_are_reported_with_the_schedulers_reason():
    d = desired(ad_body("a", [{"name": "one", "uri": "pvc://adapters/one"}]))
    d.decisions = decide(d)
    pod = {
        "metadata": {"name": "vllm-x-1"},
        "status": {
            "phase": "Pending",
            "conditions": [
                {
                    "type": "PodScheduled",
                    "status": "False",
                    "reason": "Unschedulable",
                    "message": (
                        '0/3 nodes are available: persistentvolumeclaim "adapters" not found.'
                    ),
                }
            ],
        },
    }
    status = rec.desired_status(d, deployment(d.server, ready=0), [pod], {})
    ready = cond(status, "Ready")
    assert ready["reason"] == "ReplicasNotReady"
    assert (
        "pod vllm-x-1 cannot be scheduled (Unschedulable): 0/3 nodes are available: "
        'persistentvolumeclaim "adapters" not found' in ready["message"]
    )


def test_a_name_stays_with_its_owner_while_the_owners_adapter_is_not_servable():
    older = desired(
        ad_body(
            "older", [{"name": "shared", "uri": "hf://acme/s1"}], created="2026-01-01T00:00:00Z"
        )
    )
    newer = desired(
        ad_body(
            "newer", [{"name": "shared", "uri": "hf://acme/s2"}], created="2026-01-02T00:00:00Z"
        )
    )
    for d in (older, newer):
        d.decisions = decide(d)
    # The owner's files are unreadable this pass: refused, but the name is still its own.
    owner = older.decisions[0]
    owner.state, owner.reason, owner.served = "Refused", "AdapterFilesMissing", None
    rec._refuse_name_conflicts([newer, older])
    assert older.decisions[0].reason == "AdapterFilesMissing"
    assert (newer.decisions[0].state, newer.decisions[0].reason) == (
        "Refused",
        "AdapterNameConflict",
    )
    assert newer.member() is None
