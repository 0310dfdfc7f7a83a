"""`spec_hash`: a stable identity for "the training this FineTuneJob asks for".

The operator records it in status and in the worker config; the worker writes it into the
adapter manifest and refuses to resume from a checkpoint made for a different hash. Only
fields that change the trained weights (or the plan that shapes them) are included:
scheduling knobs (suspend, deadlines, retries, queue, node placement), credentials,
follow-ups and the image are left out, so changing them never invalidates a checkpoint.
"""

from __future__ import annotations

import hashlib
import json

from .common import parse_quantity
from .finetunejob import FineTuneJobSpec

TRAINING_FIELDS = (
    "model",
    "dataset",
    "method",
    "allowed_methods",
    "lora",
    "quantization",
    "training",
    "output",
)


def spec_hash(spec: FineTuneJobSpec) -> str:
    """Hex sha256 of the canonical JSON of the training-relevant fields, defaults filled in.

    Defaults are filled in so that `r: 16` written out and `r` left to its default hash the
    same; keys are sorted and separators fixed so the hash is stable across processes.
    """
    data = spec.model_dump(
        by_alias=True, exclude_none=True, mode="json", include=set(TRAINING_FIELDS)
    )
    # The GPU budget shapes the plan (micro-batch, checkpointing, method under `auto`);
    # in bytes, so `24Gi` and `24576Mi` are the same budget.
    # The GPU product also decides whether `auto` may choose fp8, but it is a scheduling field
    # that existing jobs already carry: hashing it would re-plan them on an operator upgrade,
    # under a running Job. The spec is immutable, so the plan recorded for it stays its plan.
    # Without a product the GPU nodes decide, when the job is planned; they are not the spec,
    # so nodes that come or go later never re-plan it (an fp8 plan's pods require FP8 nodes).
    # Compiling the layers changes how the same mathematics is launched, not the weights: a
    # checkpoint made compiled resumes eager and the other way round.
    data.get("training", {}).pop("compileLayers", None)
    gpu = spec.resources.gpu
    data["gpu"] = {"count": gpu.count, "memoryBytes": parse_quantity(gpu.memory)}
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()
