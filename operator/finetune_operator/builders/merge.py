"""Pure builders for an AdapterMerge's children: the merge config and the merge Job.

The merge runs the same worker image as training (`finetune-worker merge`) with the same
conventions: config from a ConfigMap, secrets as files, restricted security context, the
worker's exit codes in the pod failure policy.
"""

from __future__ import annotations

import yaml

from finetune_api.adaptermerge import AdapterMerge
from finetune_api.common import API_VERSION
from finetune_api.constants import LABEL_ADAPTERMERGE, LABEL_COMPONENT, MANAGED_BY
from finetune_api.finetunejob import ModelSource
from finetune_api.merge_config import MergeConfig

from ..constants import DEFAULT_WORKER_IMAGE, HF_TOKEN_PATH
from .storage import VolumePlan, locate
from .training import (
    CONFIG_DIR,
    SCRATCH_DIR,
    failure_policy,
    worker_container,
    worker_pod_spec,
    worker_volumes,
)

MERGE_CONFIG_FILENAME = "merge-config.yaml"


def names(merge_name: str) -> dict[str, str]:
    return {"job": f"{merge_name}-merge", "config": f"{merge_name}-merge-config"}


def labels(merge_name: str) -> dict[str, str]:
    return {**MANAGED_BY, LABEL_ADAPTERMERGE: merge_name, LABEL_COMPONENT: "merge"}


def _claims(adapter_uri: str, output_uri: str, base: ModelSource) -> VolumePlan:
    pvcs = VolumePlan()
    pvcs.use(locate(output_uri), write=True)
    pvcs.use(locate(adapter_uri), write=False)
    if base.uri:
        pvcs.use(locate(base.uri), write=False)
    return pvcs


def merge_config(am: AdapterMerge, adapter_uri: str, base: ModelSource) -> dict:
    pvcs = _claims(adapter_uri, am.spec.output.uri, base)
    out = locate(am.spec.output.uri)
    doc = {
        "apiVersion": API_VERSION,
        "kind": "MergeConfig",
        "merge": {
            "namespace": am.metadata.namespace,
            "name": am.metadata.name,
            "uid": am.metadata.uid,
        },
        "baseModel": base.model_dump(mode="json", by_alias=True, exclude_none=True),
        "adapterDir": locate(adapter_uri).local_path or f"{SCRATCH_DIR}/adapter",
        "outputDir": out.local_path or f"{SCRATCH_DIR}/merged",
        "dtype": am.spec.dtype,
        "claimMounts": pvcs.mount_paths(),
    }
    if am.spec.hf_token_secret_ref:
        doc["hfTokenFile"] = HF_TOKEN_PATH
    return MergeConfig.model_validate(doc).model_dump(mode="json", by_alias=True, exclude_none=True)


def build_config_map(am: AdapterMerge, adapter_uri: str, base: ModelSource) -> dict:
    n = names(am.metadata.name)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": n["config"],
            "namespace": am.metadata.namespace,
            "labels": labels(am.metadata.name),
        },
        "data": {
            MERGE_CONFIG_FILENAME: yaml.safe_dump(
                merge_config(am, adapter_uri, base), sort_keys=True
            )
        },
    }


def merge_memory_request(total_params: int | None) -> str:
    """Host memory for a merge: the bf16 base twice (loaded, and the merged copy being
    written) plus 1 GiB for the runtime; 32Gi (an 8B model) when the size is unknown.
    A fixed 32Gi would make a small model's merge unschedulable on a small node."""
    if not total_params:
        return "32Gi"
    gib = -(-(2 * 2 * total_params) // 2**30) + 1
    return f"{gib}Gi"


def build_merge_job(
    am: AdapterMerge,
    adapter_uri: str,
    base: ModelSource,
    *,
    default_image: str = DEFAULT_WORKER_IMAGE,
    total_params: int | None = None,
) -> dict:
    n = names(am.metadata.name)
    spec = am.spec
    volumes, mounts = worker_volumes(
        n["config"],
        _claims(adapter_uri, spec.output.uri, base),
        hf_token_ref=spec.hf_token_secret_ref,
        storage_ref=spec.storage_secret_ref,
    )
    # Merging in bf16 fits in host memory; a GPU only speeds it up.
    requests: dict[str, str] = {"cpu": "2", "memory": merge_memory_request(total_params)}
    res = spec.resources
    if res and res.cpu:
        requests["cpu"] = str(res.cpu)
    if res and res.memory:
        requests["memory"] = str(res.memory)
    if res and res.gpu:
        requests[res.gpu.resource_name] = str(res.gpu.count)
    container = worker_container(
        spec.image or default_image,
        ["finetune-worker", "merge", "--config", f"{CONFIG_DIR}/{MERGE_CONFIG_FILENAME}"],
        mounts,
        requests,
    )
    pod_spec = worker_pod_spec(None, container, volumes, None)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": n["job"],
            "namespace": am.metadata.namespace,
            "labels": labels(am.metadata.name),
        },
        "spec": {
            "backoffLimit": 1,
            "completions": 1,
            "parallelism": 1,
            "podFailurePolicy": failure_policy(),
            "template": {"metadata": {"labels": labels(am.metadata.name)}, "spec": pod_spec},
        },
    }
