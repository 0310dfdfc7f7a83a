"""The AdapterDeployment kind: serve a base model with one or more LoRA adapters (vLLM).

Adapters are loaded by name next to one copy of the base weights, so many fine-tunes share
one GPU. Unlike the other kinds, the spec is mutable: adding an adapter or scaling
replicas is the normal way to use it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, model_validator

from .common import (
    API_VERSION,
    Condition,
    DNSLabel,
    LocalObjectReference,
    LocalSecretReference,
    ObjectMeta,
    ObjectReference,
    SecretKeySelector,
    SourceURI,
    SpecModel,
    StatusModel,
    cel,
    conditions_schema_extra,
    object_name_rule,
    validations,
)
from .finetunejob import DeploymentResources, ModelSource

KIND = "AdapterDeployment"
PLURAL = "adapterdeployments"


class AdapterSource(SpecModel):
    """One adapter to serve: from a URI or from a FineTuneJob."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "has(self.uri) != has(self.fineTuneJobRef)",
                "exactly one of adapters[].uri and adapters[].fineTuneJobRef must be set",
            ),
        )
    )

    name: DNSLabel
    """Name clients pass as `model` in requests to select this adapter."""
    uri: SourceURI | None = None
    """An adapter directory: `pvc://claim/path`, `s3://bucket/key` or `hf://owner/name`."""
    fine_tune_job_ref: LocalObjectReference | None = None
    """Serve the adapter of this FineTuneJob once it has succeeded."""

    @model_validator(mode="after")
    def _one_source(self) -> AdapterSource:
        if (self.uri is None) == (self.fine_tune_job_ref is None):
            raise ValueError(
                f"adapter {self.name!r}: exactly one of adapters[].uri and "
                f"adapters[].fineTuneJobRef must be set"
            )
        return self


class AdapterDeploymentSpec(SpecModel):
    """The base model, the adapters served on it, and the serving replicas."""

    base_model: ModelSource
    """The base model every adapter was trained on."""
    adapters: Annotated[
        list[AdapterSource],
        Field(
            max_length=64,
            json_schema_extra={
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["name"],
            },
        ),
    ] = Field(default_factory=list)
    """The adapters to serve, by unique name (at most 64)."""
    runtime: Literal["vllm"] = "vllm"
    """Serving runtime; only vLLM."""
    replicas: Annotated[int, Field(ge=0, le=100)] = 1
    """Serving replicas; 0 scales the server away."""
    resources: DeploymentResources = Field(default_factory=DeploymentResources)
    """What each serving replica requests."""
    max_lora_rank: Annotated[int, Field(ge=1, le=1024)] = 64
    """Largest adapter rank the server accepts; memory for it is reserved up front."""
    hf_token_secret_ref: SecretKeySelector | None = None
    """Hugging Face token for a gated base model or adapters."""
    storage_secret_ref: LocalSecretReference | None = None
    """Object storage credentials for s3:// URIs."""
    image: Annotated[str, Field(min_length=1, max_length=1024)] | None = None
    """Serving image override."""

    @model_validator(mode="after")
    def _unique_adapter_names(self) -> AdapterDeploymentSpec:
        names = [a.name for a in self.adapters]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"spec.adapters: names must be unique; repeated: {duplicates}")
        return self


class AdapterState(StatusModel):
    """One adapter of the spec as the operator sees it: served, waiting, or refused and why."""

    name: str
    """The `model` name clients send to select this adapter."""
    state: Literal["Loaded", "Accepted", "Pending", "Refused"]
    """Loaded: ready replicas run a server that lists it. Accepted: passed the checks, the
    server is rolling out with it. Pending: its FineTuneJob has not succeeded yet.
    Refused: failed a compatibility check (see reason and message)."""
    reason: str | None = None
    """Why it is in this state (CamelCase)."""
    message: str | None = None
    """What happened and what to do, for people."""
    uri: str | None = None
    """Where the adapter's files are read from."""
    fine_tune_job: ObjectReference | None = None
    """The FineTuneJob that trained it, for `fineTuneJobRef` adapters."""
    sha256: str | None = None
    """Digest over the adapter's files (the adapter manifest's), when known."""
    rank: int | None = None
    """LoRA rank read from the adapter's config."""


class AdapterDeploymentStatus(StatusModel):
    """Readiness of the serving replicas and which adapters they loaded."""

    observed_generation: int | None = None
    """The `.metadata.generation` this status was computed from."""
    conditions: Annotated[list[Condition], Field(json_schema_extra=conditions_schema_extra())] = (
        Field(default_factory=list)
    )
    """Ready, Available, Progressing, Degraded: each with a reason and message."""
    replicas: int | None = None
    """Serving pods that exist."""
    ready_replicas: int | None = None
    """Serving pods that are ready."""
    loaded_adapters: list[str] = Field(default_factory=list)
    """Adapters the server reports as loaded."""
    endpoint: str | None = None
    """OpenAI-compatible base URL inside the cluster, e.g. `http://name.ns.svc:8000/v1`."""
    deployment_name: str | None = None
    """The Deployment running the server."""
    service_name: str | None = None
    """The Service in front of it."""
    base_model_name: str | None = None
    """The `model` name that selects the base model without any adapter."""
    adapters: list[AdapterState] = Field(default_factory=list)
    """Every adapter of the spec with its state, source FineTuneJob and checksum."""


class AdapterDeployment(SpecModel):
    """Serve a base model with LoRA adapters."""

    # Service names must start with a letter (DNS-1035), hence letter_first.
    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra=validations(
            object_name_rule(KIND, "Deployment, Service and pods", letter_first=True),
        ),
    )

    api_version: Literal["finetune.dev/v1alpha1"] = API_VERSION
    kind: Literal["AdapterDeployment"] = KIND
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: AdapterDeploymentSpec
    status: AdapterDeploymentStatus | None = None


def crd_extras() -> dict[str, Any]:
    return {
        "kind": KIND,
        "plural": PLURAL,
        "singular": "adapterdeployment",
        "short_names": ["adep"],
        "categories": ["finetune"],
        "scale": {"specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas"},
        "printer_columns": [
            {"name": "Ready", "type": "integer", "jsonPath": ".status.readyReplicas"},
            {"name": "Replicas", "type": "integer", "jsonPath": ".spec.replicas"},
            {"name": "Endpoint", "type": "string", "jsonPath": ".status.endpoint"},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ],
    }
