"""Where the model, tokenizer and dataset come from, as seen inside the pod.

Spec URIs name storage (`hf://owner/name`, `pvc://claim/path`, `s3://bucket/key`); the
worker needs a local path or a Hub id. PVCs are mounted by the operator at the paths
listed in the worker config (`paths.claimMounts`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import InvalidConfigError

if TYPE_CHECKING:
    from finetune_api.finetunejob import DatasetSpec, ModelSource
    from finetune_api.worker_config import WorkerPaths


@dataclass(frozen=True)
class Source:
    """A local path, or a Hugging Face Hub id with an optional revision."""

    local_path: Path | None = None
    hub_id: str | None = None
    revision: str | None = None

    @property
    def location(self) -> str:
        return str(self.local_path) if self.local_path is not None else str(self.hub_id)


def resolve_uri(
    value: str, paths: WorkerPaths, *, field: str, revision: str | None = None
) -> Source:
    """Turn a spec URI (or a bare Hub id / absolute path) into a Source."""
    if value.startswith("hf://"):
        return Source(hub_id=value[len("hf://") :].strip("/"), revision=revision)
    if value.startswith("pvc://"):
        try:
            return Source(local_path=paths.resolve_pvc(value))
        except ValueError as exc:
            raise InvalidConfigError(f"{field}: {exc}") from None
    if value.startswith("s3://"):
        raise InvalidConfigError(
            f"{field} is {value!r}, but this worker image cannot read s3:// sources yet; copy "
            "the data to a PersistentVolumeClaim (pvc://claim/path) or the Hugging Face Hub"
        )
    if value.startswith("/"):
        return Source(local_path=Path(value))
    return Source(hub_id=value, revision=revision)


def model_source(model: ModelSource, paths: WorkerPaths) -> Source:
    """spec.model: a Hub id in `name`, or a URI in `uri`."""
    if model.name:
        return resolve_uri(model.name, paths, field="spec.model.name", revision=model.revision)
    return resolve_uri(model.uri, paths, field="spec.model.uri", revision=model.revision)


def tokenizer_source(model: ModelSource, paths: WorkerPaths) -> Source:
    """spec.model.tokenizer when set, else the model's own tokenizer."""
    if model.tokenizer:
        return resolve_uri(model.tokenizer, paths, field="spec.model.tokenizer")
    return model_source(model, paths)


def dataset_source(dataset: DatasetSpec, paths: WorkerPaths) -> Source:
    return resolve_uri(dataset.uri, paths, field="spec.dataset.uri")


def check_local(source: Source, field: str, error: type[Exception] = InvalidConfigError) -> None:
    """Fail before any GPU time is spent when a mounted path is not there."""
    if source.local_path is not None and not source.local_path.exists():
        raise error(
            f"{field} resolves to {source.local_path} inside the pod, which does not exist; "
            "check the PersistentVolumeClaim's contents and the path in the spec"
        )
