"""GPU product labels to compute capability: what tells the planner a GPU has FP8."""

from __future__ import annotations

import pytest

from finetune_operator.planner.gpus import compute_capability, has_fp8


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
