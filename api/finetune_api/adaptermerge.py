"""The AdapterMerge kind: fold a trained LoRA adapter into its base model's weights.

The adapter comes from a FineTuneJob in the same namespace (its status names the adapter
and the spec the base model) or from a URI plus the base model. The base is always
reloaded unquantised for the merge, so a QLoRA adapter merges into full-precision weights.
The spec is immutable: a merge is a one-shot computation.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, model_validator

from .common import (
    API_VERSION,
    Artifact,
    Condition,
    DType,
    LocalObjectReference,
    LocalSecretReference,
    ObjectMeta,
    Quantity,
    SecretKeySelector,
    SourceURI,
    SpecModel,
    StatusModel,
    StorageURI,
    Timestamp,
    cel,
    conditions_schema_extra,
    object_name_rule,
    validations,
)
from .constants import Phase
from .finetunejob import DeploymentGPU, ModelSource

KIND = "AdapterMerge"
PLURAL = "adaptermerges"


class MergeOutput(SpecModel):
    """Where the merged model goes."""

    uri: StorageURI
    """Where the merged model is written: `pvc://claim/path` or `s3://bucket/key`."""


class MergeResources(SpecModel):
    """Merging runs on the CPU unless a GPU is requested."""

    gpu: DeploymentGPU | None = None
    """GPUs for the merge; unset: the merge runs on the CPU."""
    cpu: Quantity | None = None
    """CPU request and limit, e.g. `4`."""
    memory: Quantity | None = None
    """Host memory; must hold the base model at `dtype` (about 16Gi for an 8B model in bf16)."""


class AdapterMergeSpec(SpecModel):
    """Which adapter to merge into which base, and where the result goes. Immutable."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "has(self.fineTuneJobRef) != has(self.adapterURI)",
                "exactly one of spec.fineTuneJobRef and spec.adapterURI must be set",
            ),
            cel(
                "!has(self.adapterURI) || has(self.baseModel)",
                "spec.baseModel is required when spec.adapterURI is set",
                field_path=".baseModel",
            ),
            cel("self == oldSelf", "spec is immutable; create a new AdapterMerge to merge again"),
        )
    )

    fine_tune_job_ref: LocalObjectReference | None = None
    """The FineTuneJob whose adapter to merge; it must have succeeded."""
    adapter_uri: SourceURI | None = Field(None, alias="adapterURI")
    """An adapter directory written elsewhere (needs baseModel)."""
    base_model: ModelSource | None = None
    """Base model; defaults to the FineTuneJob's model."""
    output: MergeOutput
    """Where the merged model goes."""
    dtype: DType = "bfloat16"
    """Dtype of the merged weights."""
    resources: MergeResources | None = None
    """What the merge pod requests."""
    hf_token_secret_ref: SecretKeySelector | None = None
    """Hugging Face token for a gated base model."""
    storage_secret_ref: LocalSecretReference | None = None
    """Object storage credentials for s3:// URIs."""
    image: Annotated[str, Field(min_length=1, max_length=1024)] | None = None
    """Worker image override (default: the operator's worker image)."""

    @model_validator(mode="after")
    def _one_adapter_source(self) -> AdapterMergeSpec:
        if (self.fine_tune_job_ref is None) == (self.adapter_uri is None):
            raise ValueError("exactly one of spec.fineTuneJobRef and spec.adapterURI must be set")
        if self.adapter_uri is not None and self.base_model is None:
            raise ValueError("spec.baseModel is required when spec.adapterURI is set")
        return self


class AdapterMergeStatus(StatusModel):
    """Progress of the merge Job and the merged artifact."""

    observed_generation: int | None = None
    """The `.metadata.generation` this status was computed from."""
    phase: Phase | None = None
    """One-word summary: Pending, Running, Succeeded or Failed."""
    conditions: Annotated[list[Condition], Field(json_schema_extra=conditions_schema_extra())] = (
        Field(default_factory=list)
    )
    """Running, Succeeded, Failed: each with a reason and message."""
    job_name: str | None = None
    """The batch Job running the merge."""
    merged: Artifact | None = None
    """The merged model."""
    start_time: Timestamp | None = None
    """When the merge started."""
    completion_time: Timestamp | None = None
    """When the merge succeeded or failed."""


class AdapterMerge(SpecModel):
    """Merge a LoRA adapter into its base model's weights."""

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra=validations(
            object_name_rule(KIND, "Job and pods"),
        ),
    )

    api_version: Literal["finetune.dev/v1alpha1"] = API_VERSION
    kind: Literal["AdapterMerge"] = KIND
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: AdapterMergeSpec
    status: AdapterMergeStatus | None = None


def crd_extras() -> dict[str, Any]:
    return {
        "kind": KIND,
        "plural": PLURAL,
        "singular": "adaptermerge",
        "short_names": ["amerge"],
        "categories": ["finetune"],
        "printer_columns": [
            {"name": "Job", "type": "string", "jsonPath": ".spec.fineTuneJobRef.name"},
            {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
            {"name": "Output", "type": "string", "jsonPath": ".spec.output.uri"},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ],
    }
