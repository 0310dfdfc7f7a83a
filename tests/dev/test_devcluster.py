"""Smoke tests: the local control plane is a real Kubernetes control plane.

Each test exercises one component for real: the apiserver (CRDs, status subresource,
RBAC), the controller-manager (job and garbage-collector controllers), the scheduler
(binding to a GPU node by GPU Feature Discovery labels) and kwok (pod lifecycle).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from kubetest import Kube, condition, wait_for

from finetune_dev.devcluster import controlplane

pytestmark = pytest.mark.cluster
ROOT = Path(__file__).resolve().parents[2]
FINETUNE_CRDS = (
    "finetunejobs.finetune.dev",
    "adaptermerges.finetune.dev",
    "adapterdeployments.finetune.dev",
)

WIDGET_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.smoke.finetune.dev"},
    "spec": {
        "group": "smoke.finetune.dev",
        "names": {"kind": "Widget", "plural": "widgets", "singular": "widget"},
        "scope": "Namespaced",
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {"type": "object", "properties": {"size": {"type": "integer"}}},
                            "status": {
                                "type": "object",
                                "properties": {"seen": {"type": "boolean"}},
                            },
                        },
                    }
                },
            }
        ],
    },
}


def test_crd_with_status_subresource_round_trips(kube: Kube):
    kube.apply(WIDGET_CRD)
    wait_for(
        lambda: (
            condition(
                kube.get("crd", WIDGET_CRD["metadata"]["name"], namespaced=False), "Established"
            )["status"]
            == "True"
        ),
        what="the Widget CRD to be Established",
    )
    widget = {
        "apiVersion": "smoke.finetune.dev/v1",
        "kind": "Widget",
        "metadata": {"name": "w1"},
        "spec": {"size": 3},
    }
    wait_for(lambda: kube.apply(widget, check=False).returncode == 0, what="creating a Widget")
    got = kube.get("widget", "w1")
    assert got["spec"] == {"size": 3}
    # Status goes through the subresource only: the main resource ignores it...
    kube.kubectl("patch", "widget", "w1", "--type=merge", "-p", '{"status": {"seen": true}}')
    assert "status" not in kube.get("widget", "w1")
    kube.patch_status("widget", "w1", {"status": {"seen": True}})
    after = kube.get("widget", "w1")
    assert after["status"] == {"seen": True}
    # ...and writing it does not bump the generation.
    assert after["metadata"]["generation"] == got["metadata"]["generation"]


def test_gpu_job_is_scheduled_by_gfd_labels_and_completed_by_kwok(kube: Kube):
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "gpu-smoke"},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "affinity": {
                        "nodeAffinity": {
                            "requiredDuringSchedulingIgnoredDuringExecution": {
                                "nodeSelectorTerms": [
                                    {
                                        "matchExpressions": [
                                            {
                                                "key": "nvidia.com/gpu.memory",
                                                "operator": "Gt",
                                                "values": ["80000"],
                                            },
                                            {
                                                "key": "nvidia.com/gpu.product",
                                                "operator": "In",
                                                "values": ["NVIDIA-H100-80GB-HBM3"],
                                            },
                                        ]
                                    }
                                ]
                            }
                        }
                    },
                    "containers": [
                        {
                            "name": "worker",
                            "image": "example.invalid/worker:1",
                            "resources": {"limits": {"nvidia.com/gpu": "1"}},
                        }
                    ],
                }
            },
        },
    }
    kube.apply(job)
    pod = wait_for(
        lambda: [p for p in kube.items("pods", "job-name=gpu-smoke") if p["spec"].get("nodeName")],
        what="the Job's pod to be created and bound",
    )[0]
    assert pod["spec"]["nodeName"] == "gpu-h100-0"
    wait_for(
        lambda: (condition(kube.get("job", "gpu-smoke"), "Complete") or {}).get("status") == "True",
        timeout=60,
        what="the Job to complete",
    )
    assert kube.get("job", "gpu-smoke")["status"]["succeeded"] == 1


def test_pod_that_fits_no_gpu_node_stays_pending(kube: Kube):
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "too-big"},
        "spec": {
            "tolerations": [{"operator": "Exists"}],
            "containers": [
                {"name": "c", "image": "x", "resources": {"limits": {"nvidia.com/gpu": "9"}}}
            ],
        },
    }
    kube.apply(pod)
    cond = wait_for(
        lambda: condition(kube.get("pod", "too-big"), "PodScheduled"),
        what="the scheduler to report on the pod",
    )
    assert cond["status"] == "False" and cond["reason"] == "Unschedulable"
    assert "nvidia.com/gpu" in cond["message"]


def test_deleting_the_owner_garbage_collects_children(kube: Kube):
    kube.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "owner"}})
    owner = kube.get("configmap", "owner")
    kube.apply(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": "child",
                "ownerReferences": [
                    {
                        "apiVersion": "v1",
                        "kind": "ConfigMap",
                        "name": "owner",
                        "uid": owner["metadata"]["uid"],
                    }
                ],
            },
        }
    )
    assert kube.get_or_none("configmap", "child") is not None
    kube.delete("configmap", "owner")
    wait_for(
        lambda: kube.get_or_none("configmap", "child") is None,
        timeout=60,
        what="the garbage collector to delete the child",
    )


def test_rbac_is_enforced_for_service_accounts(kube: Kube):
    kube.kubectl("create", "serviceaccount", "nobody")
    token = kube.kubectl("create", "token", "nobody").stdout.strip()
    # A token-only identity: the same server and CA, no client certificate.
    res = kube.kubectl("get", "pods", check=False, kubeconfig=_token_kubeconfig(kube, token))
    assert res.returncode != 0
    assert "forbidden" in res.stderr.lower()
    assert f"system:serviceaccount:{kube.namespace}:nobody" in res.stderr


def _token_kubeconfig(kube: Kube, token: str) -> str:
    import yaml

    cfg = yaml.safe_load(Path(kube.kubeconfig).read_text())
    cfg["users"] = [{"name": "dev-admin", "user": {"token": token}}]
    path = os.path.join(kube.cluster.directory, f"token-{kube.namespace}.kubeconfig")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return path


def test_up_is_idempotent_and_down_leaves_nothing(tmp_path):
    directory = tmp_path / "second"
    first = controlplane.up(directory, gpu_nodes=0)
    again = controlplane.up(directory, gpu_nodes=0)
    assert again.server == first.server and again.pids == first.pids
    # Bare unless asked: the session fixtures apply crds/ themselves.
    names = Kube(first).kubectl("get", "crd", "-o", "name", namespaced=False).stdout.split()
    assert not [n for n in names if n.endswith(".finetune.dev")], names
    pids = list(first.pids.values())
    assert controlplane.down(directory)
    assert not directory.exists()
    assert not [p for p in pids if controlplane._alive(p)]


def test_a_crashed_component_is_reported_and_replaced(tmp_path, capfd):
    directory = tmp_path / "crashy"
    first = controlplane.up(directory, gpu_nodes=0)
    try:
        os.killpg(first.pids["kube-scheduler"], signal.SIGKILL)
        wait_for(
            lambda: not controlplane._alive(first.pids["kube-scheduler"]),
            what="the scheduler to die",
        )
        second = controlplane.up(directory, gpu_nodes=0)
        assert second.server != first.server or second.pids != first.pids
        assert "stale" in capfd.readouterr().err
        state = json.loads((directory / "state.json").read_text())
        assert all(controlplane._alive(p) for p in state["pids"].values())
    finally:
        controlplane.down(directory, quiet=True)


def test_a_foreign_directory_is_not_overwritten(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(controlplane.ClusterError, match="not a dev cluster directory"):
        controlplane.up(tmp_path)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def dev(*args: str) -> subprocess.CompletedProcess:
    """`finetune-dev cluster ...` as people run it."""
    return subprocess.run(
        [sys.executable, "-m", "finetune_dev.cli", "cluster", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_dev_up_installs_the_crds_so_an_example_applies_at_once(tmp_path):
    directory = tmp_path / "people"
    try:
        res = dev("up", "--dir", str(directory), "--gpu-nodes", "0")
        assert res.returncode == 0, res.stderr
        cluster = controlplane.Cluster.load(directory)
        assert res.stdout.strip() == f"export KUBECONFIG={cluster.kubeconfig}"
        kube = Kube(cluster)
        for name in FINETUNE_CRDS:
            crd = json.loads(
                kube.kubectl(
                    "get", "crd", name, "-o", "json", "--show-managed-fields", namespaced=False
                ).stdout
            )
            assert condition(crd, "Established")["status"] == "True", name
            managers = {m["manager"] for m in crd["metadata"]["managedFields"]}
            assert controlplane.CRD_FIELD_MANAGER in managers, managers
        # No polling: `finetune-dev cluster up` returns only once the CRDs are served.
        applied = kube.kubectl("apply", "-f", str(ROOT / "examples" / "finetunejob-minimal.yaml"))
        assert "finetunejob.finetune.dev/minimal created" in applied.stdout
        assert kube.get("ftj", "minimal")["spec"]["resources"]["gpu"]["memory"] == "24Gi"
        # Running it again reuses the cluster and re-applies the same CRDs without conflict.
        again = dev("up", "--dir", str(directory), "--gpu-nodes", "0")
        assert again.returncode == 0, again.stderr
        assert controlplane.Cluster.load(directory).server == cluster.server
        assert "installed CRDs" in again.stderr
    finally:
        controlplane.down(directory, quiet=True)


def test_dev_up_no_crds_asks_for_a_bare_cluster(monkeypatch, tmp_path, capsys):
    from finetune_dev.devcluster import cli

    asked = []

    def fake_up(directory, **options):
        asked.append(options)
        return controlplane.Cluster(directory=str(tmp_path), kubeconfig="kc", server="s")

    monkeypatch.setattr(controlplane, "up", fake_up)
    assert cli.main(["up", "--no-crds"]) == 0
    assert cli.main(["up"]) == 0
    assert [a["with_crds"] for a in asked] == [False, True]
