"""`WorkerConfig`: the file the operator mounts into the worker pod, and its loader.

It carries everything the worker needs and nothing it must look up: the job's identity
(to patch status and label artifacts), the user's spec (the same `FineTuneJobSpec` the API
server validated), the plan the operator chose, where things live inside the pod, and how
often to report. Secrets are files on mounted volumes; only their paths appear here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import Field, ValidationError

from .common import API_VERSION, SpecModel
from .finetunejob import FineTuneJobSpec, TrainingPlan

KIND = "WorkerConfig"


class JobIdentity(SpecModel):
    namespace: str
    name: str
    uid: str


class WorkerPaths(SpecModel):
    output_dir: str
    """Local directory the adapter is written to (uploaded to spec.output.uri if remote)."""
    checkpoint_dir: str
    """Directory for checkpoints; on a volume that survives pod restarts."""
    hf_token_file: str | None = None
    """File holding the Hugging Face token (a mounted Secret key)."""
    storage_credentials_dir: str | None = None
    """Directory of object-storage credential files (a mounted Secret)."""
    claim_mounts: dict[str, str] = Field(default_factory=dict)
    """PVC claim name -> mount path, for resolving `pvc://claim/path` URIs."""

    def resolve_pvc(self, uri: str) -> Path:
        """`pvc://claim/some/path` -> the local path inside the pod."""
        if not uri.startswith("pvc://"):
            raise ValueError(f"{uri!r} is not a pvc:// URI")
        claim, _, rest = uri[len("pvc://") :].partition("/")
        if claim not in self.claim_mounts:
            raise ValueError(
                f"{uri!r}: claim {claim!r} is not mounted in this pod (mounted: "
                f"{sorted(self.claim_mounts) or 'none'}); the operator must mount every "
                f"claim the spec names"
            )
        return Path(self.claim_mounts[claim]) / rest


class ReportSettings(SpecModel):
    status_patch: bool = True
    """Patch the FineTuneJob's status subresource directly (needs the pod's service account)."""
    min_interval_seconds: Annotated[float, Field(ge=0)] = 10
    """At most one progress patch per this many seconds (the final one is always sent)."""


class WorkerConfig(SpecModel):
    api_version: Literal["finetune.dev/v1alpha1"] = API_VERSION
    kind: Literal["WorkerConfig"] = KIND
    job: JobIdentity
    spec: FineTuneJobSpec
    plan: TrainingPlan
    paths: WorkerPaths
    report: ReportSettings = Field(default_factory=ReportSettings)
    spec_hash: str
    """`api.spec_hash(spec)` as computed by the operator."""


class WorkerConfigError(ValueError):
    """The worker config cannot be used; the message names the file and the field."""


def load_worker_config(path: str | Path) -> WorkerConfig:
    """Read and validate a worker config (YAML or JSON)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise WorkerConfigError(
            f"worker config {path} does not exist; the operator mounts it from a ConfigMap, "
            f"so check the pod's volumes"
        ) from None
    except OSError as exc:
        raise WorkerConfigError(f"worker config {path} cannot be read: {exc}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise WorkerConfigError(f"worker config {path} is not valid YAML/JSON: {exc}") from None
    if not isinstance(data, dict):
        raise WorkerConfigError(
            f"worker config {path} must be a mapping with apiVersion, kind, job, spec, plan, "
            f"paths and specHash; found {type(data).__name__}"
        )
    try:
        return WorkerConfig.model_validate(data)
    except ValidationError as exc:
        raise WorkerConfigError(
            f"worker config {path} is invalid:\n{describe_errors(exc)}"
        ) from None


def describe_errors(exc: ValidationError) -> str:
    """One line per problem: `spec.training.seqLength: Input should be ... (got 8)`."""
    lines = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"]) or "<root>"
        value = error.get("input")
        # Whole objects would flood the message; scalars show what was actually written.
        got = f" (got {value!r})" if isinstance(value, str | int | float | bool) else ""
        lines.append(f"  {where}: {error['msg']}{got}")
    return "\n".join(lines)
