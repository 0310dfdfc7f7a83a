"""Writing the trained adapter and its manifest so that readers never see half of it.

The adapter is saved into a temporary directory next to the destination, hashed, and
its files are renamed into place one by one with the manifest last. Each rename is
atomic and the manifest lists every file with its sha256, so "the manifest exists and
its digests match" is the definition of a complete adapter. (The destination itself
may be a volume mount point, which cannot be replaced by a rename.)
"""

from __future__ import annotations

import copy
import logging
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from finetune_api import AdapterManifest, describe_files, now
from finetune_api.adapter_manifest import BaseModelRef, FineTuneJobRef
from finetune_api.constants import ADAPTER_MANIFEST_FILENAME
from finetune_api.finetunejob import TrainingMetrics

from .errors import StorageError, WorkerEnvironmentError

if TYPE_CHECKING:
    from peft import PeftModel

    from finetune_api import WorkerConfig

log = logging.getLogger(__name__)

ADAPTER_WEIGHTS_FILENAME = "adapter_model.safetensors"
"""peft's file name for the adapter's weights (what vLLM and peft load)."""


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


def build_manifest(
    config: WorkerConfig,
    peft_model: PeftModel,
    *,
    base_revision: str | None,
    metrics: dict,
    directory: Path,
) -> AdapterManifest:
    spec = config.spec
    lora = peft_model.peft_config["default"]
    return AdapterManifest(
        spec_hash=config.spec_hash,
        base_model=BaseModelRef(
            name=spec.model.name, uri=spec.model.uri, revision=base_revision or spec.model.revision
        ),
        method=config.plan.method,
        r=lora.r,
        alpha=float(lora.lora_alpha),
        target_modules=adapted_modules(peft_model),
        use_rs_lora=bool(lora.use_rslora),
        use_do_ra=bool(lora.use_dora),
        metrics=TrainingMetrics.model_validate(metrics),
        files=describe_files(directory),
        fine_tune_job=FineTuneJobRef(
            namespace=config.job.namespace, name=config.job.name, uid=config.job.uid
        ),
        created_at=now(),
    )


def write_adapter(
    config: WorkerConfig,
    peft_model: PeftModel,
    destination: Path,
    *,
    base_revision: str | None,
    metrics: dict,
    state_dict: dict | None = None,
) -> AdapterManifest:
    """Save adapter weights, adapter_config.json and the manifest into `destination`.

    `state_dict`: the model's full state when its weights are sharded (FSDP; gathered by
    accelerate); peft keeps the adapter's entries. None: peft reads the model itself."""
    destination = Path(destination)
    staging = destination.parent / f".{destination.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        destination.mkdir(parents=True, exist_ok=True)
        staging.mkdir(parents=True)
        if state_dict is None:
            peft_model.save_pretrained(str(staging), safe_serialization=True)
        else:
            save_gathered_adapter(peft_model, state_dict, staging)
        require_weights(staging)
        manifest = build_manifest(
            config, peft_model, base_revision=base_revision, metrics=metrics, directory=staging
        )
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
        raise StorageError(
            f"cannot write the adapter to {destination}: {exc}; check that the "
            "output volume is mounted read-write and has free space"
        ) from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info(
        "adapter written to %s (%d files, digest %s)",
        destination,
        len(manifest.files),
        manifest.digest[:12],
    )
    return manifest


# A LoRA parameter of the model: `<module>.lora_A.<adapter>.weight`; on disk peft drops the
# adapter's name (`<module>.lora_A.weight`). The embedding variants are plain parameters
# (`...lora_embedding_A.<adapter>`); DoRA's magnitude drops `.weight` too.
_LORA_PARAMETER = (
    r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)\.{}(\.weight)?$"
)


def adapter_tensors(state_dict: dict, adapter_name: str = "default") -> dict:
    """The adapter's entries of a full model state dict, named as peft writes them to disk."""
    pattern = re.compile(_LORA_PARAMETER.format(re.escape(adapter_name)))
    selected = {}
    for key, tensor in state_dict.items():
        match = pattern.search(key)
        if match is None:
            continue
        keep_weight = match.group(1) in ("lora_A", "lora_B") and match.group(2)
        selected[
            key[: match.start()] + f".{match.group(1)}" + (".weight" if keep_weight else "")
        ] = tensor
    return selected


def save_gathered_adapter(peft_model: PeftModel, state_dict: dict, directory: Path) -> None:
    """Write the adapter from the full state dict that accelerate gathers under FSDP.

    peft's own save cannot be used there: it picks the adapter's entries by walking the
    model's modules, whose names under FSDP contain `_fsdp_wrapped_module` segments that the
    gathered state dict's keys do not, so it selected nothing and wrote an adapter without
    weights (found with 2 FSDP ranks, peft 0.21, accelerate 1.15). The files are peft's: the
    weights under peft's names and the adapter's config in inference mode."""
    from safetensors.torch import save_file

    tensors = adapter_tensors(state_dict)
    save_file(
        {k: v.detach().contiguous().cpu() for k, v in tensors.items()},
        str(directory / ADAPTER_WEIGHTS_FILENAME),
        metadata={"format": "pt"},
    )
    config = copy.copy(peft_model.peft_config["default"])
    config.inference_mode = True
    config.save_pretrained(str(directory))


def require_weights(directory: Path) -> None:
    """Never publish an adapter without weights: it would load and serve the bare base model
    under the adapter's name, with nothing to say that training was lost."""
    from safetensors import safe_open

    path = directory / ADAPTER_WEIGHTS_FILENAME
    with safe_open(str(path), framework="pt") as weights:
        if not list(weights.keys()):
            raise WorkerEnvironmentError(
                f"the trained adapter has no weights ({ADAPTER_WEIGHTS_FILENAME} is empty): "
                "peft found none of the LoRA parameters in the model's state dict; this is a "
                "worker defect with these library versions, not a problem of the job"
            )


def verify_adapter(directory: Path) -> AdapterManifest:
    """The manifest of a complete adapter; StorageError when files are missing or changed."""
    from finetune_api.adapter_checks import file_sha256

    directory = Path(directory)
    try:
        manifest = AdapterManifest.read(directory)
    except (OSError, ValueError) as exc:
        raise StorageError(
            f"{directory} holds no readable {ADAPTER_MANIFEST_FILENAME} ({exc}); "
            "it is not a complete adapter written by finetune-worker"
        ) from exc
    for entry in manifest.files:
        path = directory / entry.name
        if not path.is_file() or file_sha256(path) != entry.sha256:
            raise StorageError(
                f"adapter file {path} is missing or does not match the sha256 in "
                "its manifest; the copy is incomplete or corrupt"
            )
    return manifest


def push_to_hub(directory: Path, repo_id: str, token: str | None) -> None:
    """Upload the adapter directory to a (private, created if absent) Hub model repository."""
    try:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=True, exist_ok=True)
        api.upload_folder(
            repo_id=repo_id,
            folder_path=str(directory),
            commit_message="Adapter trained by finetune-operator",
        )
    except Exception as exc:
        raise StorageError(
            f"cannot push the adapter to hf://{repo_id}: {exc}; check the token "
            "in spec.hfTokenSecretRef has write access"
        ) from exc
