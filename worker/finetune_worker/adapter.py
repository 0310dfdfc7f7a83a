"""Writing the trained adapter and its manifest so that readers never see half of it.

The adapter is saved into a temporary directory next to the destination, hashed, and
its files are renamed into place one by one with the manifest last. Each rename is
atomic and the manifest lists every file with its sha256, so "the manifest exists and
its digests match" is the definition of a complete adapter. (The destination itself
may be a volume mount point, which cannot be replaced by a rename.)
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from finetune_api import AdapterManifest, describe_files, now
from finetune_api.adapter_manifest import BaseModelRef, FineTuneJobRef
from finetune_api.constants import ADAPTER_MANIFEST_FILENAME
from finetune_api.finetunejob import TrainingMetrics

from .errors import StorageError

if TYPE_CHECKING:
    from finetune_api import WorkerConfig
    from peft import PeftModel

log = logging.getLogger(__name__)


def _fsync_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def adapted_modules(peft_model: PeftModel) -> list[str]:
    """Module names peft actually wrapped (`all-linear` resolved to real names)."""
    config = peft_model.peft_config["default"]
    targets = config.target_modules
    if isinstance(targets, str):
        targets = [targets]
    return sorted(targets or [])


def build_manifest(config: WorkerConfig, peft_model: PeftModel, *, base_revision: str | None,
                   metrics: dict, directory: Path) -> AdapterManifest:
    spec = config.spec
    lora = peft_model.peft_config["default"]
    return AdapterManifest(
        spec_hash=config.spec_hash,
        base_model=BaseModelRef(name=spec.model.name, uri=spec.model.uri,
                                revision=base_revision or spec.model.revision),
        method=config.plan.method,
        r=lora.r,
        alpha=float(lora.lora_alpha),
        target_modules=adapted_modules(peft_model),
        use_rs_lora=bool(lora.use_rslora),
        use_do_ra=bool(lora.use_dora),
        metrics=TrainingMetrics.model_validate(metrics),
        files=describe_files(directory),
        fine_tune_job=FineTuneJobRef(namespace=config.job.namespace, name=config.job.name,
                                     uid=config.job.uid),
        created_at=now(),
    )


def write_adapter(config: WorkerConfig, peft_model: PeftModel, destination: Path, *,
                  base_revision: str | None, metrics: dict,
                  state_dict: dict | None = None) -> AdapterManifest:
    """Save adapter weights, adapter_config.json and the manifest into `destination`.

    `state_dict`: the model's full state when its weights are sharded (FSDP; gathered by
    accelerate); peft keeps the adapter's entries. None: peft reads the model itself."""
    destination = Path(destination)
    staging = destination.parent / f".{destination.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        destination.mkdir(parents=True, exist_ok=True)
        staging.mkdir(parents=True)
        peft_model.save_pretrained(str(staging), safe_serialization=True, state_dict=state_dict)
        manifest = build_manifest(config, peft_model, base_revision=base_revision,
                                  metrics=metrics, directory=staging)
        manifest.write(staging)
        _fsync_tree(staging)
        # A stale manifest would vouch for files that are about to change: remove it first.
        (destination / ADAPTER_MANIFEST_FILENAME).unlink(missing_ok=True)
        for entry in manifest.files:
            target = destination / entry.name
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / entry.name, target)
        os.replace(staging / ADAPTER_MANIFEST_FILENAME, destination / ADAPTER_MANIFEST_FILENAME)
    except OSError as exc:
        raise StorageError(f"cannot write the adapter to {destination}: {exc}; check that the "
                           "output volume is mounted read-write and has free space") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("adapter written to %s (%d files, digest %s)", destination, len(manifest.files),
             manifest.digest[:12])
    return manifest


def verify_adapter(directory: Path) -> AdapterManifest:
    """The manifest of a complete adapter; StorageError when files are missing or changed."""
    from finetune_api.adapter_checks import file_sha256

    directory = Path(directory)
    try:
        manifest = AdapterManifest.read(directory)
    except (OSError, ValueError) as exc:
        raise StorageError(f"{directory} holds no readable {ADAPTER_MANIFEST_FILENAME} ({exc}); "
                           "it is not a complete adapter written by finetune-worker") from exc
    for entry in manifest.files:
        path = directory / entry.name
        if not path.is_file() or file_sha256(path) != entry.sha256:
            raise StorageError(f"adapter file {path} is missing or does not match the sha256 in "
                               "its manifest; the copy is incomplete or corrupt")
    return manifest


def push_to_hub(directory: Path, repo_id: str, token: str | None) -> None:
    """Upload the adapter directory to a (private, created if absent) Hub model repository."""
    try:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=True, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(directory),
                          commit_message="Adapter trained by finetune-operator")
    except Exception as exc:
        raise StorageError(f"cannot push the adapter to hf://{repo_id}: {exc}; check the token "
                           "in spec.hfTokenSecretRef has write access") from exc
