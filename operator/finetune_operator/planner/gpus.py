"""GPU products the planner knows: a `nvidia.com/gpu.product` label to a compute capability.

The operator cannot see the node a pod will land on, only `spec.resources.gpu.product`,
which it turns into node affinity on that label; so what the product name says about the GPU
is all the planner may rely on. GPU Feature Discovery writes the label from the driver's
product name with spaces as dashes (`NVIDIA-H100-80GB-HBM3`, `NVIDIA-A100-SXM4-80GB`,
`Tesla-T4`, `NVIDIA-GeForce-RTX-4090`, `NVIDIA-RTX-6000-Ada-Generation`) and appends
`-SHARED` for time-sliced GPUs and `-MIG-...` for MIG slices.

The matching rule: case is ignored; the name is split into words at dashes, underscores and
spaces; the vendor and brand words in front (NVIDIA, Tesla, GeForce, Quadro) are dropped; the
family in FAMILIES with the most words that the rest begins with, word for word, names the
GPU. Whole words keep `L40S` apart from `L40` and `A100` from `A10`; the longest family keeps
the Ada `RTX-6000-Ada-Generation` apart from the Turing `Quadro-RTX-6000`. Whatever follows
the family (memory, form factor, `-SHARED`, a MIG profile) does not change the architecture.
A name that matches no family is unknown: the planner then assumes nothing about it.
"""

from __future__ import annotations

import re

from finetune_api.constants import FP8_MIN_COMPUTE_CAPABILITY

FAMILIES: dict[str, tuple[int, int]] = {
    # Volta, Turing
    "V100": (7, 0),
    "T4": (7, 5),
    "RTX-6000": (7, 5),
    "RTX-8000": (7, 5),
    # Ampere
    "A100": (8, 0),
    "A800": (8, 0),
    "A30": (8, 0),
    "A10": (8, 6),
    "A10G": (8, 6),
    "A16": (8, 6),
    "A40": (8, 6),
    "RTX-A4000": (8, 6),
    "RTX-A5000": (8, 6),
    "RTX-A6000": (8, 6),
    "RTX-3090": (8, 6),
    # Ada
    "L4": (8, 9),
    "L20": (8, 9),
    "L40": (8, 9),
    "L40S": (8, 9),
    "RTX-4090": (8, 9),
    "RTX-4000-ADA": (8, 9),
    "RTX-5000-ADA": (8, 9),
    "RTX-6000-ADA": (8, 9),
    # Hopper
    "H100": (9, 0),
    "H800": (9, 0),
    "H200": (9, 0),
    "H20": (9, 0),
    "GH200": (9, 0),
    # Blackwell
    "B100": (10, 0),
    "B200": (10, 0),
    "GB200": (10, 0),
    "B300": (10, 3),
    "GB300": (10, 3),
    "RTX-5090": (12, 0),
    "RTX-PRO-6000": (12, 0),
}
"""Product family (its words joined by dashes, upper case) -> CUDA compute capability."""

VENDOR_WORDS = frozenset({"NVIDIA", "TESLA", "GEFORCE", "QUADRO"})
_SEPARATORS = re.compile(r"[-_\s]+")
_FAMILY_WORDS = sorted(
    ((tuple(name.split("-")), cc) for name, cc in FAMILIES.items()), key=lambda f: -len(f[0])
)


def compute_capability(product: str | None) -> tuple[int, int] | None:
    """The compute capability of a GPU product name, or None when it is absent or unknown."""
    words = [w for w in _SEPARATORS.split((product or "").upper()) if w]
    while words and words[0] in VENDOR_WORDS:
        words.pop(0)
    for family, capability in _FAMILY_WORDS:  # longest first
        if tuple(words[: len(family)]) == family:
            return capability
    return None


def has_fp8(product: str | None) -> bool | None:
    """Whether the product has FP8 tensor cores; None when the planner cannot tell."""
    capability = compute_capability(product)
    return None if capability is None else capability >= FP8_MIN_COMPUTE_CAPABILITY
