"""GPU product labels to compute capability, and GPU nodes' labels to whether every node a job
could land on has FP8: what tells the planner a GPU has FP8."""

from __future__ import annotations

import pytest

from finetune_operator.planner.gpus import (
    compute_capability,
    fp8_on_nodes,
    has_fp8,
    node_compute_capability,
)
from finetune_operator.planner.memory import GiB


@pytest.mark.parametrize(
    "product, capability",
    [
        # GPU Feature Discovery's `nvidia.com/gpu.product` values
        ("Tesla-V100-SXM2-16GB", (7, 0)),
        ("Tesla-T4", (7, 5)),
        ("NVIDIA-A100-SXM4-80GB", (8, 0)),
        ("NVIDIA-A100-PCIE-40GB", (8, 0)),
        ("NVIDIA-A30", (8, 0)),
        ("NVIDIA-A10", (8, 6)),
        ("NVIDIA-A10G", (8, 6)),
        ("NVIDIA-L4", (8, 9)),
        ("NVIDIA-L40", (8, 9)),
        ("NVIDIA-L40S", (8, 9)),
        ("NVIDIA-GeForce-RTX-4090", (8, 9)),
        ("NVIDIA-RTX-6000-Ada-Generation", (8, 9)),
        ("NVIDIA-H100-80GB-HBM3", (9, 0)),
        ("NVIDIA-H100-PCIe", (9, 0)),
        ("NVIDIA-H100-NVL", (9, 0)),
        ("NVIDIA-H200", (9, 0)),
        ("NVIDIA-H20", (9, 0)),
        ("NVIDIA-H800", (9, 0)),
        ("NVIDIA-GH200-480GB", (9, 0)),
        ("NVIDIA-B100", (10, 0)),
        ("NVIDIA-B200", (10, 0)),
        ("NVIDIA-GB200", (10, 0)),
        # Case and separators do not matter; what follows the family does not either.
        ("nvidia-h100-80gb-hbm3", (9, 0)),
        ("NVIDIA H100 80GB HBM3", (9, 0)),
        ("NVIDIA-H100-80GB-HBM3-SHARED", (9, 0)),
        ("NVIDIA-A100-SXM4-40GB-MIG-1g.5gb", (8, 0)),
        # Whole words and the longest family: not A10, not L40, not the Turing RTX 6000.
        ("Quadro-RTX-6000", (7, 5)),
    ],
)
def test_known_products_have_their_compute_capability(product, capability):
    assert compute_capability(product) == capability
    assert has_fp8(product) is (capability >= (8, 9))


@pytest.mark.parametrize("product", [None, "", "LOCAL-CPU", "NVIDIA", "NVIDIA-A1000", "H100X"])
def test_unknown_products_are_unknown_not_assumed(product):
    assert compute_capability(product) is None
    assert has_fp8(product) is None


# --- GPU nodes: their GPU Feature Discovery labels ------------------------------------------


def gfd(
    product: str, memory_mib: int, compute: tuple[int, int] | None = None, **extra: str
) -> dict[str, str]:
    """A node's labels as GFD writes them (compute capability: `compute`, or none)."""
    labels = {
        "nvidia.com/gpu.present": "true",
        "nvidia.com/gpu.product": product,
        "nvidia.com/gpu.memory": str(memory_mib),
        **extra,
    }
    if compute:
        labels["nvidia.com/gpu.compute.major"] = str(compute[0])
        labels["nvidia.com/gpu.compute.minor"] = str(compute[1])
    return labels


H100 = gfd("NVIDIA-H100-80GB-HBM3", 81559, (9, 0))
H200 = gfd("NVIDIA-H200", 143771, (9, 0))
L4 = gfd("NVIDIA-L4", 23034, (8, 9))
A100_80 = gfd("NVIDIA-A100-SXM4-80GB", 81920, (8, 0))
A100_40 = gfd("NVIDIA-A100-SXM4-40GB", 40960, (8, 0))
A10G = gfd("NVIDIA-A10G", 23028, (8, 6))


def test_a_nodes_compute_labels_say_its_capability_else_its_product_through_the_table():
    assert node_compute_capability(H100) == (9, 0)
    assert node_compute_capability(L4) == (8, 9)
    # The labels win: GFD reads them from the driver, the table only knows names.
    assert node_compute_capability(gfd("NVIDIA-NEXT-GEN", 200000, (11, 0))) == (11, 0)
    # Without them (an older GFD, or a node labelled by hand) the product is looked up.
    assert node_compute_capability(gfd("NVIDIA-H100-80GB-HBM3", 81559)) == (9, 0)
    assert node_compute_capability(gfd("NVIDIA-A100-SXM4-80GB", 81920)) == (8, 0)
    broken = {**gfd("NVIDIA-A100-SXM4-80GB", 81920), "nvidia.com/gpu.compute.major": "nine"}
    assert node_compute_capability(broken) == (8, 0)
    assert node_compute_capability(gfd("LOCAL-CPU", 65536)) is None
    assert node_compute_capability({}) is None


def test_fp8_when_every_node_that_could_take_the_job_has_it():
    nodes = {"h100-0": H100, "h100-1": H100, "h200-0": H200}
    verdict = fp8_on_nodes(nodes, 24 * GiB)
    assert verdict.fp8
    assert verdict.detail == (
        "every node that could take the job (3 with at least 24576 MiB per GPU) has FP8 "
        "tensor cores"
    )
    # Ada's 8.9 is enough.
    assert fp8_on_nodes({"l4-0": L4}, 16 * GiB).fp8


def test_one_node_without_fp8_among_those_that_could_take_the_job_keeps_fp8_out():
    nodes = {"h100-0": H100, "a100-0": A100_80, "h200-0": H200}
    verdict = fp8_on_nodes(nodes, 24 * GiB)
    assert not verdict.fp8
    assert verdict.detail == (
        "nodes without FP8 tensor cores could take the job (a100-0: compute capability 8.0)"
    )
    # A node whose capability nothing tells is not assumed to have FP8.
    unknown = fp8_on_nodes({"h100-0": H100, "odd-0": gfd("LOCAL-CPU", 90000)}, 24 * GiB)
    assert not unknown.fp8 and "odd-0: compute capability unknown" in unknown.detail
    # Many: three named, the rest counted.
    many = fp8_on_nodes({f"a100-{i}": A100_80 for i in range(5)}, 24 * GiB)
    assert many.detail.endswith("a100-2: compute capability 8.0 and 2 more)")


def test_nodes_too_small_for_the_budget_per_gpu_cannot_take_the_job_and_do_not_count():
    nodes = {"h100-0": H100, "a100-40": A100_40, "a10g-0": A10G, "l4-0": L4}
    assert fp8_on_nodes(nodes, 60 * GiB).fp8  # only the H100 has 60 GiB
    assert not fp8_on_nodes(nodes, 40 * GiB).fp8  # the 40 GB A100 has 40960 MiB: it could
    # The pods' affinity's rule: the label (MiB) at least the budget in whole MiB.
    exact = {"a100-40": A100_40, "h100-0": H100}
    assert not fp8_on_nodes(exact, 40960 * 2**20).fp8
    assert fp8_on_nodes(exact, 40961 * 2**20).fp8
    # Nothing with the memory: nothing to go by.
    none = fp8_on_nodes(nodes, 100 * GiB)
    assert not none.fp8
    assert none.detail == (
        "no node labelled by GPU Feature Discovery has at least 102400 MiB per GPU"
    )


def test_only_nodes_with_the_node_selectors_labels_could_take_the_job():
    pool = {"pool": "h100"}
    nodes = {
        "h100-0": {**H100, **pool},
        "h100-1": {**H100, **pool},
        "a100-0": {**A100_80, "pool": "a100"},
        "a100-1": A100_80,
    }
    assert not fp8_on_nodes(nodes, 24 * GiB).fp8
    selected = fp8_on_nodes(nodes, 24 * GiB, pool)
    assert selected.fp8
    assert "(2 with at least 24576 MiB per GPU and spec.resources.nodeSelector's labels)" in (
        selected.detail
    )
    assert not fp8_on_nodes(nodes, 24 * GiB, {"pool": "a100"}).fp8
    nothing = fp8_on_nodes(nodes, 24 * GiB, {"pool": "b200"})
    assert not nothing.fp8 and nothing.detail.startswith("no node labelled")


def test_without_compute_labels_the_product_label_decides():
    nodes = {"h100-0": H100, "h100-bare": gfd("NVIDIA-H100-80GB-HBM3", 81559)}
    assert fp8_on_nodes(nodes, 24 * GiB).fp8
    nodes["a100-bare"] = gfd("NVIDIA-A100-SXM4-80GB", 81920)
    mixed = fp8_on_nodes(nodes, 24 * GiB)
    assert not mixed.fp8
    assert "(a100-bare: compute capability 8.0)" in mixed.detail


def test_fp8_needs_a_node_with_the_compute_labels_its_pods_are_pinned_by():
    """The product says the GPUs have FP8, but an fp8 plan's pods require the compute labels:
    with no node carrying them the plan could never be scheduled."""
    bare = {
        "h100-bare": gfd("NVIDIA-H100-80GB-HBM3", 81559),
        "h200-bare": gfd("NVIDIA-H200", 143771),
    }
    verdict = fp8_on_nodes(bare, 24 * GiB)
    assert not verdict.fp8
    assert verdict.detail == (
        "no node with at least 24576 MiB per GPU has the nvidia.com/gpu.compute.major and "
        "nvidia.com/gpu.compute.minor labels that the pods of an fp8 plan require"
    )
    assert fp8_on_nodes({**bare, "h200-0": H200}, 24 * GiB).fp8


def test_nodes_that_could_not_be_read_say_nothing():
    verdict = fp8_on_nodes(None, 24 * GiB)
    assert not verdict.fp8
    assert verdict.detail == "the operator could not list the cluster's nodes"
    assert not fp8_on_nodes({}, 24 * GiB).fp8
