"""`merge_adapter`: fold a LoRA adapter into its base model's weights.

The base is always loaded unquantised (bf16 by default), also for adapters trained with
QLoRA: merging into 4-bit weights would round the update away and produce a model no
server loads. The merged model is saved as safetensors with its tokenizer, then loaded
back from disk and asked for a few tokens, so a broken artifact fails here, not in
serving.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from finetune_api import AdapterManifest
from finetune_api.constants import ADAPTER_MANIFEST_FILENAME

from .adapter import verify_adapter
from .errors import InvalidConfigError, ModelLoadError, StorageError
from .sources import Source

log = logging.getLogger(__name__)

DTYPES = ("bfloat16", "float16", "float32")


@dataclass
class MergeResult:
    output_dir: Path
    base: str
    generated_text: str
    files: list[str]


def base_from_manifest(manifest: AdapterManifest, claim_mounts: dict[str, str]) -> Source:
    """The base model the adapter was trained on, as recorded in its manifest."""
    ref = manifest.base_model
    if ref.name:
        return Source(hub_id=ref.name, revision=ref.revision)
    uri = ref.uri or ""
    if uri.startswith("hf://"):
        return Source(hub_id=uri[len("hf://") :], revision=ref.revision)
    if uri.startswith("pvc://"):
        claim, _, rest = uri[len("pvc://") :].partition("/")
        if claim in claim_mounts:
            return Source(local_path=Path(claim_mounts[claim]) / rest)
        raise InvalidConfigError(
            f"the adapter's base model is {uri!r} but claim {claim!r} is not mounted; pass "
            f"--claim-mount {claim}=/path or --base-model"
        )
    raise InvalidConfigError(
        f"the adapter manifest names no loadable base model ({ref}); pass --base-model"
    )


def _torch_dtype(name: str):
    import torch

    if name not in DTYPES:
        raise InvalidConfigError(f"--dtype is {name!r}; expected one of {DTYPES}")
    return getattr(torch, name)


def _load(source: Source, dtype, token: str | None, device: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    location = source.location
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, revision=source.revision, token=token)
        model = AutoModelForCausalLM.from_pretrained(
            location, revision=source.revision, token=token, dtype=dtype, device_map={"": device}
        )
    except Exception as exc:
        raise ModelLoadError(
            f"cannot load the base model {location} unquantised: {type(exc).__name__}: {exc}"
        ) from exc
    return model, tokenizer


def check_generation(directory: Path, device: str, max_new_tokens: int = 8) -> str:
    """Load the saved merged model and generate a few tokens; returns the text."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory))
        model = AutoModelForCausalLM.from_pretrained(str(directory), device_map={"": device})
        if tokenizer.chat_template:
            encoded = tokenizer.apply_chat_template(
                [{"role": "user", "content": "Hello"}],
                add_generation_prompt=True,
                return_dict=True,
                return_tensors="pt",
            )
        else:
            encoded = tokenizer("Hello", return_tensors="pt")
        encoded = {k: v.to(device) for k, v in encoded.items()}
        with torch.no_grad():
            logits = model(**encoded).logits
            if not torch.isfinite(logits).all():
                raise ValueError("the merged model produces non-finite logits")
            out = model.generate(
                **encoded,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
            )
    except Exception as exc:
        raise ModelLoadError(
            f"the merged model in {directory} does not run a short generation: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    prompt_len = encoded["input_ids"].shape[1]
    return tokenizer.decode(out[0, prompt_len:], skip_special_tokens=False)


def merge_adapter(
    adapter_dir: Path,
    output_dir: Path,
    *,
    base: Source | None = None,
    claim_mounts: dict[str, str] | None = None,
    dtype: str = "bfloat16",
    token: str | None = None,
    device: str | None = None,
) -> MergeResult:
    import torch
    from peft import PeftModel

    adapter_dir, output_dir = Path(adapter_dir), Path(output_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = _torch_dtype(dtype)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise StorageError(
            f"{adapter_dir} holds no adapter_config.json; it is not a LoRA "
            "adapter directory (check the adapter URI and the volume mount)"
        )
    if (adapter_dir / ADAPTER_MANIFEST_FILENAME).is_file():
        manifest = verify_adapter(adapter_dir)
        base = base or base_from_manifest(manifest, claim_mounts or {})
    elif base is None:
        raise InvalidConfigError(
            f"{adapter_dir} has no {ADAPTER_MANIFEST_FILENAME}, so its base "
            "model is unknown; pass --base-model"
        )

    model, tokenizer = _load(base, torch_dtype, token, device)
    try:
        model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    except Exception as exc:
        raise StorageError(
            f"cannot apply the adapter in {adapter_dir} to {base.location}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    merged = model.merge_and_unload()

    staging = output_dir.parent / f".{output_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        merged.save_pretrained(str(staging), safe_serialization=True)
        tokenizer.save_pretrained(str(staging))
        text = check_generation(staging, device)
        files = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())
        # config.json last: serving stacks treat a directory with a config as a model.
        for name in sorted(files, key=lambda n: n == "config.json"):
            (output_dir / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / name, output_dir / name)
    except OSError as exc:
        raise StorageError(f"cannot write the merged model to {output_dir}: {exc}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info(
        "merged %s + %s into %s; sample generation: %r",
        base.location,
        adapter_dir,
        output_dir,
        text,
    )
    return MergeResult(output_dir=output_dir, base=base.location, generated_text=text, files=files)
