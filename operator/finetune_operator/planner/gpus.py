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

Without a product the pods may land on any GPU node that has the memory, so `method: auto`
may consider fp8 only when every such node has FP8 tensor cores (`fp8_on_nodes`). The
operator reads the nodes' GFD labels and passes them in; a node's compute capability is its
`nvidia.com/gpu.compute.major` / `.minor` labels, or where GFD did not write them its product
label through the table above. An fp8 plan's pods then require compute capability 8.9 or newer
by the compute labels (builders/training.py), so the decision stays true after scheduling, and
so at least one of the nodes must carry them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from finetune_api.constants import FP8_MIN_COMPUTE_CAPABILITY

from ..constants import (
    GPU_COMPUTE_MAJOR_LABEL,
    GPU_COMPUTE_MINOR_LABEL,
    GPU_MEMORY_LABEL,
    GPU_PRODUCT_LABEL,
)
from .memory import MiB

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


def format_capability(capability: tuple[int, int]) -> str:
    """A compute capability as NVIDIA writes it: (8, 9) -> "8.9"."""
    return f"{capability[0]}.{capability[1]}"


def has_fp8(product: str | None) -> bool | None:
    """Whether the product has FP8 tensor cores; None when the planner cannot tell."""
    capability = compute_capability(product)
    return None if capability is None else capability >= FP8_MIN_COMPUTE_CAPABILITY


def labelled_compute_capability(labels: Mapping[str, str]) -> tuple[int, int] | None:
    """A node's compute capability as its `nvidia.com/gpu.compute.major`/`.minor` labels say
    (what an fp8 plan's pods are pinned by); None without both as numbers."""
    major, minor = labels.get(GPU_COMPUTE_MAJOR_LABEL, ""), labels.get(GPU_COMPUTE_MINOR_LABEL, "")
    return (int(major), int(minor)) if major.isdigit() and minor.isdigit() else None


def node_compute_capability(labels: Mapping[str, str]) -> tuple[int, int] | None:
    """A node's GPU compute capability from its GPU Feature Discovery labels: the compute
    labels, or where they are absent (or not numbers) its product label through the table;
    None when neither tells."""
    return labelled_compute_capability(labels) or compute_capability(labels.get(GPU_PRODUCT_LABEL))


def min_gpu_memory_mib(memory_bytes: int) -> int:
    """The least `nvidia.com/gpu.memory` (MiB) of a node whose GPUs hold a budget of
    `memory_bytes` each: what the worker pods' node affinity requires, and so which nodes
    could take the job."""
    return memory_bytes // MiB


@dataclass(frozen=True)
class NodeFp8:
    """What the GPU nodes that could take a job say about FP8: whether all of them have FP8
    tensor cores, and in words why or why not (for the plan's reason)."""

    fp8: bool
    detail: str


def fp8_on_nodes(
    nodes: Mapping[str, Mapping[str, str]] | None,
    memory_bytes: int,
    node_selector: Mapping[str, str] | None = None,
) -> NodeFp8:
    """Whether every node that could take a job has FP8 tensor cores.

    `nodes`: the cluster's nodes, name -> labels; None when they could not be read. A node
    could take the job when GFD labelled its GPU memory at least the budget per GPU (the rule
    of the pods' node affinity) and it has every label of `spec.resources.nodeSelector`. The
    scheduler may choose any of them, so fp8 needs at least one and all of them at compute
    capability 8.9 or newer; a node whose capability is unknown counts as lacking FP8.
    Cordoned nodes are not in `nodes` (gpunodes lists schedulable ones). Taints are not looked
    at: a tainted node the job could not use anyway can only keep fp8 out, never let it in
    where the job might land without FP8.

    A node's product label stands in for its compute labels when GFD did not write them, but
    only to judge it: an fp8 plan's pods require the compute labels, so at least one of the
    nodes must carry them, or the plan would never be scheduled.
    """
    if nodes is None:
        return NodeFp8(False, "the operator could not list the cluster's nodes")
    need = min_gpu_memory_mib(memory_bytes)
    selector = dict(node_selector or {})
    which = f"at least {need} MiB per GPU" + (
        " and spec.resources.nodeSelector's labels" if selector else ""
    )
    candidates: dict[str, tuple[int, int] | None] = {}
    for name, labels in sorted(nodes.items()):
        memory = labels.get(GPU_MEMORY_LABEL, "")
        if not memory.isdigit() or int(memory) < need:
            continue
        if any(labels.get(key) != value for key, value in selector.items()):
            continue
        candidates[name] = node_compute_capability(labels)
    if not candidates:
        return NodeFp8(False, f"no node labelled by GPU Feature Discovery has {which}")
    lacking = [
        (name, capability)
        for name, capability in candidates.items()
        if capability is None or capability < FP8_MIN_COMPUTE_CAPABILITY
    ]
    if lacking:
        shown = ", ".join(
            f"{name}: compute capability "
            + (format_capability(capability) if capability else "unknown")
            for name, capability in lacking[:3]
        )
        more = f" and {len(lacking) - 3} more" if len(lacking) > 3 else ""
        return NodeFp8(False, f"nodes without FP8 tensor cores could take the job ({shown}{more})")
    if not any(labelled_compute_capability(nodes[name]) for name in candidates):
        return NodeFp8(
            False,
            f"no node with {which} has the {GPU_COMPUTE_MAJOR_LABEL} and "
            f"{GPU_COMPUTE_MINOR_LABEL} labels that the pods of an fp8 plan require",
        )
    count = len(candidates)
    return NodeFp8(
        True,
        f"every node that could take the job ({count} with {which}) has FP8 tensor cores",
    )
