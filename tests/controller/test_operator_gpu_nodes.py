"""`method: auto` without `resources.gpu.product`: fp8 where every GPU node that could take the
job has FP8 tensor cores by its GPU Feature Discovery labels, never where one could not, and
the pods of an fp8 plan land only on such nodes.

First the operator's side of reading the nodes, in this process with the list faked: a burst
of plans lists them once per interval; a refused list plans without fp8, warns once and
never fails planning. Then the whole path on the real control plane: kwok GPU nodes labelled
the way GFD labels them, in a pool of the test's own (a nodeSelector label and a taint, so
that only the test's jobs land there and only its nodes count for them), planned by the
session's operator and placed by the real scheduler.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid

import pytest
from kubetest import Kube, bound_pvc, finetunejob_manifest, wait_for

from finetune_dev.devcluster.controlplane import fake_gpu_node

H100 = {
    "nvidia.com/gpu.present": "true",
    "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
    "nvidia.com/gpu.memory": "81559",
    "nvidia.com/gpu.compute.major": "9",
    "nvidia.com/gpu.compute.minor": "0",
}
POOL_KEY = "finetune.dev/test-node"
TERMS_PATH = ("affinity", "nodeAffinity", "requiredDuringSchedulingIgnoredDuringExecution")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_of_plans_lists_the_gpu_nodes_once_per_interval(monkeypatch):
    from finetune_operator import gpunodes, k8s

    calls = []

    async def list_metadata(api_version, kind, namespace, label_selector=None, field_selector=None):
        calls.append((api_version, kind, namespace, label_selector, field_selector))
        await asyncio.sleep(0)  # the rest of the burst arrives while this list is in flight
        return [{"name": "h100-0", "labels": H100}]

    monkeypatch.setattr(k8s, "list_metadata", list_metadata)
    clock = Clock()
    nodes = gpunodes.GpuNodes(clock=clock)

    async def bursts() -> list[int]:
        lists = []
        for advance in (0, 59, 1):
            clock.now += advance
            seen = await asyncio.gather(*(gpunodes.gpu_node_labels(60, nodes) for _ in range(20)))
            assert all(s == {"h100-0": H100} for s in seen)
            lists.append(len(calls))
        # No caching at all: every plan lists (what the tests' operator runs with).
        await gpunodes.gpu_node_labels(0, nodes)
        await gpunodes.gpu_node_labels(0, nodes)
        lists.append(len(calls))
        return lists

    assert asyncio.run(bursts()) == [1, 1, 2, 4]
    # Only nodes GFD labelled, metadata only (list_metadata's Accept header).
    # schedulable nodes only: a cordoned one takes no new pods
    assert calls[0] == ("v1", "Node", None, "nvidia.com/gpu.memory", "spec.unschedulable=false")


def _refused() -> Exception:
    from finetune_operator.k8s import ApiError

    return ApiError(
        403,
        "Forbidden",
        json.dumps(
            {
                "message": 'nodes is forbidden: User "system:serviceaccount:x:y" cannot list '
                'resource "nodes" in API group "" at the cluster scope'
            }
        ),
    )


def test_a_refused_node_list_plans_without_fp8_warns_once_and_never_fails(monkeypatch, caplog):
    from finetune_api import FineTuneJob
    from finetune_operator import gpunodes, k8s
    from finetune_operator.planning import plan_job
    from finetune_operator.reconcile.settings import OperatorSettings

    answer: dict = {"error": _refused()}

    async def list_metadata(api_version, kind, namespace, label_selector=None, field_selector=None):
        if answer["error"]:
            raise answer["error"]
        return [{"name": "h100-0", "labels": H100}]

    monkeypatch.setattr(k8s, "list_metadata", list_metadata)
    monkeypatch.setattr(gpunodes, "GPU_NODES", gpunodes.GpuNodes())
    doc = finetunejob_manifest("no-product", memory="24Gi")
    doc["metadata"]["namespace"] = "team-a"
    job = FineTuneJob.model_validate(doc)
    settings = OperatorSettings.from_env(
        {"FINETUNE_ALLOW_HUB": "false", "FINETUNE_GPU_NODES_CACHE_SECONDS": "0"}
    )

    def plan():
        return asyncio.run(plan_job(job, settings))

    with caplog.at_level(logging.DEBUG, logger="finetune_operator.gpunodes"):
        refused = [plan(), plan()]
        answer["error"] = TimeoutError()
        timed_out = plan()
    for p in (*refused, timed_out):
        assert p.method in ("lora", "qlora")
        assert "fp8 not considered: the operator could not list the cluster's nodes" in p.reason
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
    # The API server's words name the missing permission (charttest.RBAC_DENIAL finds them).
    assert 'cannot list resource "nodes"' in warnings[0].getMessage()
    assert "403 Forbidden" in warnings[0].getMessage()

    # Listed again: the nodes decide, and a later refusal is worth a warning again.
    answer["error"] = None
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="finetune_operator.gpunodes"):
        assert plan().method == "fp8"
        answer["error"] = _refused()
        assert plan().method != "fp8"
    assert [r.levelno for r in caplog.records] == [logging.INFO, logging.WARNING]


# --- on the real control plane --------------------------------------------------------------


@pytest.fixture
def kube(kube: Kube) -> Kube:
    for claim in ("data", "adapters"):
        bound_pvc(kube, claim)
    return kube


@pytest.fixture
def gpu_pool(cluster):
    """-> (the pool's label value, add(name, product, memory MiB, compute) -> node name).

    The nodes are kwok's (it marks them Ready and runs their pods), labelled like GFD, and
    removed at the end: a GPU node left behind would change what other tests' jobs plan."""
    pool = f"fp8-{uuid.uuid4().hex[:6]}"
    admin = Kube(cluster)
    added: list[str] = []

    def add(name: str, product: str, memory_mib: int, compute: tuple[int, int]) -> str:
        node = fake_gpu_node(
            f"{pool}-{name}", product=product, memory_mib=memory_mib, compute=compute
        )
        node["metadata"]["labels"][POOL_KEY] = pool
        node["spec"]["taints"] = [{"key": POOL_KEY, "value": pool, "effect": "NoSchedule"}]
        admin.apply(node)
        added.append(node["metadata"]["name"])
        return node["metadata"]["name"]

    yield pool, add
    for name in added:
        admin.kubectl("delete", "node", name, "--ignore-not-found", namespaced=False)


def pool_job(name: str, pool: str) -> dict:
    """Llama-3-8B at 24 GiB per GPU, no product: with an FP8 GPU the speed model prefers
    fp8 (docs/memory-model.md), without one LoRA."""
    return finetunejob_manifest(
        name,
        resources={
            "gpu": {"count": 1, "memory": "24Gi"},
            "nodeSelector": {POOL_KEY: pool},
            "tolerations": [
                {"key": POOL_KEY, "operator": "Equal", "value": pool, "effect": "NoSchedule"}
            ],
        },
    )


def planned(kube: Kube, name: str) -> dict:
    return wait_for(
        lambda: (kube.get("finetunejob", name).get("status") or {}).get("plan"),
        timeout=30,
        what=f"the plan of {name}",
    )


def node_terms(kube: Kube, name: str) -> list[list[tuple]]:
    job = wait_for(lambda: kube.get_or_none("job", f"{name}-train"), what=f"the Job of {name}")
    required = job["spec"]["template"]["spec"]
    for key in TERMS_PATH:
        required = required[key]
    return [
        [(e["key"], e["operator"], e["values"]) for e in term["matchExpressions"]]
        for term in required["nodeSelectorTerms"]
    ]


@pytest.mark.cluster
def test_auto_without_a_product_plans_fp8_only_where_every_gpu_node_for_it_has_fp8(
    kube: Kube, operator_process, gpu_pool
):
    pool, add = gpu_pool
    h100 = add("h100", "NVIDIA-H100-80GB-HBM3", 81559, (9, 0))
    kube.apply(pool_job("on-h100", pool))
    plan = planned(kube, "on-h100")
    assert plan["method"] == "fp8", plan["reason"]
    assert (
        "fp8 considered: every node that could take the job (1 with at least 24576 MiB per GPU "
        "and spec.resources.nodeSelector's labels) has FP8 tensor cores" in plan["reason"]
    )
    # Its pods require compute capability 8.9 or newer by the GFD labels, next to the memory.
    memory = ("nvidia.com/gpu.memory", "Gt", ["24575"])
    assert node_terms(kube, "on-h100") == [
        [memory, ("nvidia.com/gpu.compute.major", "Gt", ["8"])],
        [
            memory,
            ("nvidia.com/gpu.compute.major", "In", ["8"]),
            ("nvidia.com/gpu.compute.minor", "Gt", ["8"]),
        ],
    ]
    # ... which the scheduler honours: the pod lands on the H100.
    wait_for(
        lambda: [
            p
            for p in kube.items("pods", "job-name=on-h100-train")
            if p["spec"].get("nodeName") == h100
        ],
        timeout=60,
        what=f"the worker pod bound to {h100}",
    )

    # An A100 joins the pool: the next job could land on it, so auto leaves fp8 out, saying why.
    a100 = add("a100", "NVIDIA-A100-SXM4-80GB", 81920, (8, 0))
    kube.apply(pool_job("mixed", pool))
    plan = planned(kube, "mixed")
    assert plan["method"] in ("lora", "qlora"), plan["reason"]
    assert (
        "fp8 not considered: nodes without FP8 tensor cores could take the job "
        f"({a100}: compute capability 8.0)" in plan["reason"]
    ), plan["reason"]
    assert node_terms(kube, "mixed") == [[memory]]
    # The first job keeps its plan: it is made once per spec, and its pods need FP8 anyway.
    operator_process.wait_for_resyncs(1)
    assert kube.get("finetunejob", "on-h100")["status"]["plan"]["method"] == "fp8"


@pytest.mark.cluster
def test_the_plan_command_reads_the_cluster_nodes_as_the_operator_does(
    cluster, gpu_pool, tmp_path, monkeypatch, capsys
):
    """`finetune-operator plan --cluster` plans with the GPU nodes of KUBECONFIG's cluster,
    so what it prints is what the operator would record; without it the nodes are unknown."""
    import yaml

    from finetune_operator.planner.cli import main

    pool, add = gpu_pool
    add("h100", "NVIDIA-H100-80GB-HBM3", 81559, (9, 0))
    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump(pool_job("cli", pool)))
    monkeypatch.setenv("KUBECONFIG", cluster.kubeconfig)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)

    def plan(*flags: str) -> dict:
        assert main(["-f", str(manifest), *flags]) == 0
        return json.loads(capsys.readouterr().out)["plan"]

    assert plan("--cluster")["method"] == "fp8"
    offline = plan()
    assert offline["method"] != "fp8" and "fp8 not considered" in offline["reason"]
    a100 = add("a100", "NVIDIA-A100-SXM4-80GB", 81920, (8, 0))
    mixed = plan("--cluster")
    assert mixed["method"] != "fp8" and f"{a100}: compute capability 8.0" in mixed["reason"]
    # Cordoned, the A100 takes no new pods: fp8 again (its pods would never land there).
    admin = Kube(cluster)
    admin.kubectl("cordon", a100, namespaced=False)
    cordoned = plan("--cluster")
    assert cordoned["method"] == "fp8" and a100 not in cordoned["reason"], cordoned["reason"]
    admin.kubectl("uncordon", a100, namespaced=False)
    assert plan("--cluster")["method"] != "fp8"

    # A cluster it cannot reach is bad input (exit 2), named as such.
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    assert main(["-f", str(manifest), "--cluster"]) == 2
    assert "--cluster: no credentials" in capsys.readouterr().err
