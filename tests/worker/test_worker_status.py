"""The worker's status reporting against a real API server, as the pod's service account.

The operator grants the worker's service account `patch` on `finetunejobs/status` for its
own job only; the worker must write nothing but `status.progress` and `status.metrics`,
must leave the spec and the operator's status fields alone, and is refused (403) for any
other job.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from worker_configs import worker_config_dict

from finetune_api import AdapterManifest
from finetune_worker.status import KubeStatusClient, StatusPatchError, StatusReporter

# tiny_model_root and worker_config fixtures
pytestmark = pytest.mark.cluster


def _job(name: str) -> dict:
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"uri": "pvc://models/tiny"},
            "dataset": {"uri": "pvc://data/text.jsonl", "format": "text"},
            "training": {"maxSteps": 4},
            "resources": {"gpu": {"memory": "4Gi"}},
            "output": {"uri": "pvc://out/adapter"},
        },
    }


OPERATOR_STATUS = {
    "phase": "Running",
    "specHash": "operator-hash",
    "jobName": "tiny-train",
    "conditions": [
        {
            "type": "Running",
            "status": "True",
            "reason": "Training",
            "message": "the worker is training",
            "lastTransitionTime": "2026-11-29T12:00:00Z",
        }
    ],
}


@pytest.fixture
def worker_identity(crds, kube, namespace, tmp_path, monkeypatch):
    """Two jobs, a service account allowed to patch the status of `tiny` only, and the
    pod's environment (service host/port, token and CA files) pointing at the API server."""
    for name in ("tiny", "other"):
        kube.apply(_job(name))
        kube.patch_status("finetunejob", name, {"status": OPERATOR_STATUS})
    kube.apply(
        [
            {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "tiny-worker"}},
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "Role",
                "metadata": {"name": "tiny-worker"},
                "rules": [
                    {
                        "apiGroups": ["finetune.dev"],
                        "resources": ["finetunejobs/status"],
                        "resourceNames": ["tiny"],
                        "verbs": ["patch"],
                    }
                ],
            },
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": {"name": "tiny-worker"},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "Role",
                    "name": "tiny-worker",
                },
                "subjects": [
                    {"kind": "ServiceAccount", "name": "tiny-worker", "namespace": namespace}
                ],
            },
        ]
    )
    token = kube.kubectl("create", "token", "tiny-worker", "--duration=10m").stdout.strip()
    kubeconfig = yaml.safe_load(Path(kube.kubeconfig).read_text())
    cluster_entry = kubeconfig["clusters"][0]["cluster"]
    sa_dir = tmp_path / "serviceaccount"
    sa_dir.mkdir()
    (sa_dir / "token").write_text(token)
    (sa_dir / "ca.crt").write_text(Path(cluster_entry["certificate-authority"]).read_text())
    host, port = cluster_entry["server"].removeprefix("https://").rsplit(":", 1)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", host)
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", port)
    monkeypatch.setenv("FINETUNE_WORKER_SA_DIR", str(sa_dir))
    return namespace


def _without_worker_fields(obj: dict) -> dict:
    status = {k: v for k, v in obj["status"].items() if k not in ("progress", "metrics")}
    return {"spec": obj["spec"], "status": status, "labels": obj["metadata"].get("labels")}


def test_reporter_patches_only_progress_and_metrics_of_its_own_job(worker_identity, kube, caplog):
    caplog.set_level("DEBUG")  # `--log-level DEBUG`: still no token and no response body
    before = {name: kube.get("finetunejob", name) for name in ("tiny", "other")}
    client = KubeStatusClient.from_environment()
    assert client is not None
    reporter = StatusReporter(worker_identity, "tiny", client, min_interval_s=0)
    assert reporter.update(
        progress={
            "step": 3,
            "totalSteps": 10,
            "loss": 1.25,
            "learningRate": 0.0002,
            "etaSeconds": 70,
        },
        metrics={"tokensPerSecond": 812.5},
    )
    assert reporter.final(
        metrics={"peakVRAMBytes": 17179869184, "peakVRAM": "16.0Gi", "samplesPerSecond": 3.5}
    )
    after = kube.get("finetunejob", "tiny")
    assert after["status"]["progress"] == {
        "step": 3,
        "totalSteps": 10,
        "loss": 1.25,
        "learningRate": 0.0002,
        "etaSeconds": 70,
    }
    # a merge patch: the final metrics join the earlier ones
    assert after["status"]["metrics"] == {
        "tokensPerSecond": 812.5,
        "peakVRAMBytes": 17179869184,
        "peakVRAM": "16.0Gi",
        "samplesPerSecond": 3.5,
    }
    assert _without_worker_fields(after) == _without_worker_fields(before["tiny"])
    assert after["metadata"]["generation"] == before["tiny"]["metadata"]["generation"]

    with pytest.raises(StatusPatchError) as refused:
        client.patch_status(worker_identity, "other", {"progress": {"step": 99}})
    assert refused.value.code == 403
    assert "the pod's service account may not patch it" in str(refused.value)
    assert kube.get("finetunejob", "other")["status"] == before["other"]["status"]

    # A reporter without the RBAC grant warns once, clearly, and never raises: training
    # goes on and the termination message carries the numbers.
    caplog.clear()
    denied = StatusReporter(worker_identity, "other", client, min_interval_s=0)
    assert not denied.update(progress={"step": 1})
    assert not denied.update(progress={"step": 2})
    assert not denied.final(metrics={"tokensPerSecond": 1.0})
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "HTTP 403 Forbidden" in warnings[0], warnings
    token = (Path(os.environ["FINETUNE_WORKER_SA_DIR"]) / "token").read_text()
    assert token not in caplog.text and '"kind":"Status"' not in caplog.text
    assert "response body" not in caplog.text


def test_training_run_reports_progress_and_final_metrics(
    worker_identity, kube, tmp_path, tiny_model_root, monkeypatch
):
    from finetune_worker.cli import main

    before = kube.get("finetunejob", "tiny")
    raw = worker_config_dict(tmp_path, tiny_model_root, fmt="text", max_steps=4)
    raw["job"] = {"namespace": worker_identity, "name": "tiny", "uid": before["metadata"]["uid"]}
    raw["report"] = {"statusPatch": True, "minIntervalSeconds": 0}
    path = tmp_path / "worker-config.yaml"
    path.write_text(yaml.safe_dump(raw))
    log = tmp_path / "termination-log"
    monkeypatch.setenv("FINETUNE_WORKER_TERMINATION_LOG", str(log))
    assert main(["train", "--config", str(path)]) == 0
    after = kube.get("finetunejob", "tiny")
    progress, metrics = after["status"]["progress"], after["status"]["metrics"]
    assert progress["step"] == 4 and progress["totalSteps"] == 4 and progress["percent"] == 100
    assert progress["loss"] > 0 and "updatedAt" in progress
    summary = json.loads(log.read_text())
    assert summary["result"] == "Succeeded" and summary["exitCode"] == 0
    manifest = AdapterManifest.read(raw["paths"]["outputDir"])
    assert summary["adapter"] == {
        "uri": "pvc://out/adapter",
        "path": raw["paths"]["outputDir"],
        "sha256": manifest.digest,
        "sizeBytes": manifest.size_bytes,
    }
    assert metrics["tokensPerSecond"] == summary["metrics"]["tokensPerSecond"] > 0
    assert metrics["samplesPerSecond"] > 0
    assert _without_worker_fields(after) == _without_worker_fields(before)
