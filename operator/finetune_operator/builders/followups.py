"""Pure builders for a successful FineTuneJob's follow-ups: AdapterMerge, AdapterDeployment."""

from __future__ import annotations

from finetune_api.common import API_VERSION
from finetune_api.finetunejob import FineTuneJob

from .training import labels


def merged_output_uri(ftj: FineTuneJob) -> str:
    """Default merge output: next to the adapter, with a `-merged` suffix."""
    return ftj.spec.output.uri.rstrip("/") + "-merged"


def build_adapter_merge(ftj: FineTuneJob, status: dict) -> dict | None:
    follow = ftj.spec.follow_up
    if not (follow and follow.merge and follow.merge.enabled):
        return None
    spec = {
        "fineTuneJobRef": {"name": ftj.metadata.name},
        "output": {"uri": follow.merge.output or merged_output_uri(ftj)},
        "dtype": follow.merge.dtype,
    }
    if ftj.spec.hf_token_secret_ref:
        spec["hfTokenSecretRef"] = ftj.spec.hf_token_secret_ref.model_dump(by_alias=True)
    if ftj.spec.storage_secret_ref:
        spec["storageSecretRef"] = ftj.spec.storage_secret_ref.model_dump(by_alias=True)
    if ftj.spec.image:
        spec["image"] = ftj.spec.image
    return {
        "apiVersion": API_VERSION,
        "kind": "AdapterMerge",
        "metadata": {
            "name": f"{ftj.metadata.name}-merge",
            "namespace": ftj.metadata.namespace,
            "labels": labels(ftj.metadata.name, "merge"),
        },
        "spec": spec,
    }


def build_adapter_deployment(ftj: FineTuneJob, status: dict) -> dict | None:
    follow = ftj.spec.follow_up
    if not (follow and follow.deploy and follow.deploy.enabled):
        return None
    deploy = follow.deploy
    spec = {
        "baseModel": ftj.spec.model.model_dump(mode="json", by_alias=True, exclude_none=True),
        "adapters": [{"name": ftj.metadata.name, "fineTuneJobRef": {"name": ftj.metadata.name}}],
        "runtime": deploy.runtime,
        "replicas": deploy.replicas,
        "maxLoraRank": max(ftj.spec.lora.r, 8),
    }
    if deploy.resources:
        spec["resources"] = deploy.resources.model_dump(
            mode="json", by_alias=True, exclude_none=True
        )
    if ftj.spec.hf_token_secret_ref:
        spec["hfTokenSecretRef"] = ftj.spec.hf_token_secret_ref.model_dump(by_alias=True)
    return {
        "apiVersion": API_VERSION,
        "kind": "AdapterDeployment",
        "metadata": {
            "name": deploy.name or ftj.metadata.name,
            "namespace": ftj.metadata.namespace,
            "labels": labels(ftj.metadata.name, "deployment"),
        },
        "spec": spec,
    }
