"""The group of AdapterDeployments that share one vLLM server: which server an
AdapterDeployment joins, and the defaults its pods start from.

A server is shared: every AdapterDeployment in a namespace that asks for the same base
model and the same runtime settings (image, resources, placement, secrets) lands on one
vLLM Deployment with LoRA enabled, named `vllm-<hash of those settings>`. This module
computes those settings (`server_config`) and the name; `serving.py` builds the
Deployment and Service, `vllm.py` what runs in them.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from finetune_api.adapter_checks import base_model_identity
from finetune_api.adapterdeployment import AdapterDeployment
from finetune_api.constants import DEFAULT_GPU_RESOURCE

from ..constants import DEFAULT_FETCH_IMAGE, DEFAULT_SERVING_IMAGE


@dataclass
class ServingDefaults:
    """Cluster-wide defaults for serving pods (Helm values `serving.*`, passed to the
    operator as JSON in FINETUNE_SERVING_DEFAULTS). An AdapterDeployment's own fields win."""

    image: str = DEFAULT_SERVING_IMAGE
    fetch_image: str = DEFAULT_FETCH_IMAGE
    """Copies s3:// adapters and base models into the pod before vLLM starts."""
    gpu_resource_name: str = DEFAULT_GPU_RESOURCE
    cpu: str | None = None
    memory: str | None = None
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict] = field(default_factory=list)
    max_loras_per_batch: int = 8
    """`--max-loras`: adapters in one batch (GPU slots); the rest wait in CPU memory."""
    extra_args: list[str] = field(default_factory=list)
    """Appended to every server's vLLM arguments (e.g. `--gpu-memory-utilization=0.9`)."""
    max_surge: int = 1
    max_unavailable: int = 0
    """Rollout: by default a new pod must be ready before an old one stops, so an adapter
    that fails its checks in the pod never takes the shared server down (it needs spare
    GPUs for one pod; set maxSurge 0, maxUnavailable 1 where there are none)."""

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, image: str | None = None
    ) -> ServingDefaults:
        env = os.environ if environ is None else environ
        raw = env.get("FINETUNE_SERVING_DEFAULTS", "").strip()
        values: dict[str, Any] = {}
        if raw:
            try:
                values = json.loads(raw)
            except ValueError as exc:
                raise ValueError(
                    f"FINETUNE_SERVING_DEFAULTS is not valid JSON ({exc}); expected an object "
                    'such as {"tolerations": [], "cpu": "8"}'
                ) from exc
        keys = {
            "image": "image",
            "fetchImage": "fetch_image",
            "gpuResourceName": "gpu_resource_name",
            "cpu": "cpu",
            "memory": "memory",
            "nodeSelector": "node_selector",
            "tolerations": "tolerations",
            "maxLorasPerBatch": "max_loras_per_batch",
            "extraArgs": "extra_args",
            "maxSurge": "max_surge",
            "maxUnavailable": "max_unavailable",
        }
        unknown = sorted(set(values) - set(keys))
        if unknown:
            raise ValueError(
                f"FINETUNE_SERVING_DEFAULTS has unknown keys {unknown}; known: {sorted(keys)}"
            )
        kwargs = {keys[k]: v for k, v in values.items() if v is not None}
        if image and "image" not in kwargs:
            kwargs["image"] = image
        return cls(**kwargs)


def server_config(ad: AdapterDeployment, defaults: ServingDefaults) -> dict:
    """Everything that decides what server pods look like, with defaults filled in.

    Two AdapterDeployments with equal configs share one server. Deliberately left out:
    the adapters, `maxLoraRank` (the server's rank is the largest its adapters need) and
    `replicas` (the server runs as many as its most demanding member asks for, so scaling
    one AdapterDeployment scales its server instead of moving it to a cold new one).
    """
    spec = ad.spec
    res = spec.resources
    base = spec.base_model.model_dump(
        mode="json", by_alias=True, exclude_none=True, exclude={"architecture"}
    )
    return {
        "namespace": ad.metadata.namespace,
        "runtime": spec.runtime,
        "baseModel": base,
        "image": spec.image or defaults.image,
        "gpu": {
            "count": res.gpu.count,
            "product": res.gpu.product,
            "resourceName": res.gpu.resource_name or defaults.gpu_resource_name,
        },
        "cpu": res.cpu or defaults.cpu,
        "memory": res.memory or defaults.memory,
        "nodeSelector": dict(
            res.node_selector if res.node_selector is not None else defaults.node_selector
        ),
        "tolerations": (
            [t.model_dump(by_alias=True, exclude_none=True) for t in res.tolerations]
            if res.tolerations is not None
            else list(defaults.tolerations)
        ),
        "hfTokenSecretRef": (
            spec.hf_token_secret_ref.model_dump(by_alias=True) if spec.hf_token_secret_ref else None
        ),
        "storageSecretRef": spec.storage_secret_ref.name if spec.storage_secret_ref else None,
    }


def server_name(config: dict) -> str:
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return "vllm-" + hashlib.sha256(canonical.encode()).hexdigest()[:10]


def served_base_name(config: dict) -> str:
    """The `model` clients send for the base without an adapter."""
    identity = base_model_identity(config["baseModel"]) or "base"
    if config["baseModel"].get("name") or config["baseModel"].get("uri", "").startswith("hf://"):
        return identity
    return identity.rstrip("/").rsplit("/", 1)[-1] or "base"
