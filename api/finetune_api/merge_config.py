"""`MergeConfig`: the file the operator mounts into an AdapterMerge's worker pod.

`finetune-worker merge --config <file>` reads it with these models, as `train` reads
`WorkerConfig`. Paths are inside the pod: the operator resolves `pvc://` URIs to mounts,
so the worker never guesses where a volume is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError

from .common import API_VERSION, DType, SpecModel
from .finetunejob import ModelSource
from .worker_config import JobIdentity, WorkerConfigError, describe_errors

KIND = "MergeConfig"


class MergeConfig(SpecModel):
    api_version: Literal["finetune.dev/v1alpha1"] = API_VERSION
    kind: Literal["MergeConfig"] = KIND
    merge: JobIdentity
    """The AdapterMerge this pod works for."""
    base_model: ModelSource
    """Always loaded unquantised (bf16 or the dtype below), even for QLoRA adapters."""
    adapter_dir: str
    """Local directory holding adapter_config.json and the adapter weights."""
    output_dir: str
    """Local directory the merged model (safetensors + tokenizer) is written to."""
    dtype: DType = "bfloat16"
    hf_token_file: str | None = None
    claim_mounts: dict[str, str] = Field(default_factory=dict)
    """PVC claim name -> mount path (for a `pvc://` base model)."""


def load_merge_config(path: str | Path) -> MergeConfig:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise WorkerConfigError(f"merge config {path} does not exist") from None
    except (OSError, yaml.YAMLError) as exc:
        raise WorkerConfigError(f"merge config {path} cannot be read: {exc}") from None
    try:
        return MergeConfig.model_validate(data)
    except ValidationError as exc:
        raise WorkerConfigError(
            f"merge config {path} is invalid:\n{describe_errors(exc)}"
        ) from None
