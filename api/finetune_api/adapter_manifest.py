"""`AdapterManifest`: the JSON file the worker writes next to a trained adapter.

It makes an adapter directory self-describing: which spec (hash) and base model produced
it, the LoRA shape a server needs to load it, what training measured, and a digest per
file so a copy can be verified. The operator reads it to fill `status.adapter`; merge and
deployment read it to find the base model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from .adapter_checks import file_sha256, files_digest
from .common import API_VERSION, StatusModel, Timestamp
from .constants import ADAPTER_MANIFEST_FILENAME
from .finetunejob import ResolvedMethod, TrainingMetrics

KIND = "AdapterManifest"


class BaseModelRef(StatusModel):
    name: str | None = None
    """Hugging Face id, when the model came from the Hub."""
    uri: str | None = None
    revision: str | None = None
    """The resolved commit, when known (not a branch name)."""


class ArtifactFile(StatusModel):
    name: str
    """Path relative to the adapter directory."""
    size_bytes: int
    sha256: str


class FineTuneJobRef(StatusModel):
    namespace: str
    name: str
    uid: str


class AdapterManifest(StatusModel):
    api_version: Literal["finetune.dev/v1alpha1"] = API_VERSION
    kind: Literal["AdapterManifest"] = KIND
    spec_hash: str
    base_model: BaseModelRef
    method: ResolvedMethod
    r: int
    alpha: float
    target_modules: list[str]
    """Module names actually adapted (`all-linear` resolved)."""
    use_rs_lora: bool = Field(False, alias="useRSLoRA")
    use_do_ra: bool = Field(False, alias="useDoRA")
    metrics: TrainingMetrics = Field(default_factory=TrainingMetrics)
    files: list[ArtifactFile] = Field(default_factory=list)
    fine_tune_job: FineTuneJobRef | None = None
    created_at: Timestamp

    @property
    def size_bytes(self) -> int:
        return sum(f.size_bytes for f in self.files)

    @property
    def digest(self) -> str:
        """One sha256 over the sorted (name, sha256) pairs: the whole adapter's identity.
        The formula is `adapter_checks.files_digest`, which the server pods run too."""
        return files_digest((f.name, f.sha256) for f in self.files)

    def write(self, directory: str | Path) -> Path:
        path = Path(directory) / ADAPTER_MANIFEST_FILENAME
        path.write_text(self.model_dump_json(by_alias=True, exclude_none=True, indent=2) + "\n")
        return path

    @classmethod
    def read(cls, directory: str | Path) -> AdapterManifest:
        return cls.model_validate_json((Path(directory) / ADAPTER_MANIFEST_FILENAME).read_text())


def describe_files(directory: str | Path) -> list[ArtifactFile]:
    """Every file under `directory` (except the manifest itself), with size and digest."""
    root = Path(directory)
    return [
        ArtifactFile(
            name=p.relative_to(root).as_posix(), size_bytes=p.stat().st_size, sha256=file_sha256(p)
        )
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ADAPTER_MANIFEST_FILENAME
    ]
