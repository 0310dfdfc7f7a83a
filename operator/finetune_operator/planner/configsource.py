"""Finding a model's architecture: the only planner module that touches files or the network.

Order, first hit wins:
  1. a config.json the caller points at (a local directory or file, or a `pvc://claim/path`
     URI resolved under the directory where the operator mounts claims);
  2. the built-in presets (arch.PRESETS), by hub id;
  3. the Hugging Face Hub's config.json for a hub id, only when `allow_hub` (the operator
     may have no egress; tests never fetch);
  4. `spec.model.architecture` hints.
Nothing found raises UnknownArchitecture saying which hints to set.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .arch import (
    HubUnavailable,
    ModelArch,
    UnknownArchitecture,
    arch_from_config_json,
    arch_from_hints,
    preset,
)

HUB_TIMEOUT_SECONDS = 10


def load_config_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read `<dir>/config.json` (or the file itself) and return the parsed object."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        raise UnknownArchitecture(
            f"no config.json at {file}; point at the model directory (the one holding "
            "config.json) or set spec.model.architecture"
        ) from None
    except (OSError, json.JSONDecodeError) as exc:
        raise UnknownArchitecture(f"cannot read {file}: {exc}") from None
    if not isinstance(data, dict):
        raise UnknownArchitecture(f"{file} is not a JSON object, so it is not a model config")
    return data


def arch_from_local(path: str | os.PathLike[str], name: str | None = None) -> ModelArch:
    return arch_from_config_json(load_config_json(path), name=name or str(path))


def resolve_pvc_uri(uri: str, claims_root: str | os.PathLike[str]) -> Path:
    """`pvc://claim/some/dir` -> `<claims_root>/claim/some/dir`."""
    claim, _, rest = uri.removeprefix("pvc://").partition("/")
    if not claim:
        raise UnknownArchitecture(f"{uri!r} names no claim; expected pvc://<claim>/<path>")
    return Path(claims_root) / claim / rest


def fetch_hub_config(
    repo_id: str,
    revision: str | None = None,
    token: str | None = None,
    timeout: float = HUB_TIMEOUT_SECONDS,
) -> dict[str, Any]:
    """GET config.json of a hub repository (honours HF_ENDPOINT). The token is sent, never
    logged or put in an error message."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    url = (
        f"{endpoint}/{repo_id}/resolve/"
        f"{urllib.parse.quote(revision or 'main', safe='')}/config.json"
    )
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            data = json.loads(response.read().decode("utf-8"))
    except urllib.error.HTTPError as exc:
        if exc.code == 429 or exc.code >= 500:
            raise HubUnavailable(
                f"the Hub answered {exc.code} for config.json of {repo_id!r} (a passing "
                "error); or set spec.model.architecture to plan without it"
            ) from None
        hint = (
            " (gated or private: reference a token with spec.hfTokenSecretRef)"
            if exc.code in (401, 403)
            else ""
        )
        raise UnknownArchitecture(
            f"the Hub answered {exc.code} for config.json of {repo_id!r}{hint}; or set "
            "spec.model.architecture to plan without it"
        ) from None
    except json.JSONDecodeError as exc:
        raise UnknownArchitecture(
            f"config.json of {repo_id!r} from {endpoint} is not JSON ({exc}); set "
            "spec.model.architecture to plan without the Hub"
        ) from None
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        raise HubUnavailable(
            f"cannot fetch config.json of {repo_id!r} from {endpoint}: {exc}; set "
            "spec.model.architecture to plan without the Hub"
        ) from None
    if not isinstance(data, dict):
        raise UnknownArchitecture(f"config.json of {repo_id!r} is not a JSON object")
    return data


def _get(obj: Any, snake: str, camel: str | None = None) -> Any:
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return obj.get(camel or snake, obj.get(snake))
    return getattr(obj, snake, None)


def arch_for_model(
    model: Any,
    *,
    config_path: str | os.PathLike[str] | None = None,
    claims_root: str | os.PathLike[str] | None = None,
    allow_hub: bool = False,
    token: str | None = None,
) -> ModelArch:
    """The architecture of `spec.model` (the pydantic ModelSource or its camelCase dict)."""
    name = _get(model, "name")
    uri = _get(model, "uri")
    revision = _get(model, "revision")
    hints = _get(model, "architecture")
    label = name or uri or "the model"

    if config_path is not None:
        return arch_from_local(config_path, name=label)
    if uri and uri.startswith("pvc://") and claims_root is not None:
        path = resolve_pvc_uri(uri, claims_root)
        if path.exists():
            return arch_from_local(path, name=label)
    if uri and os.path.isabs(uri) and os.path.exists(uri):
        return arch_from_local(uri, name=label)
    hub_id = name or (uri.removeprefix("hf://") if uri and uri.startswith("hf://") else None)
    if hub_id:
        found = preset(hub_id)
        if found is not None:
            return found
    hub_error: UnknownArchitecture | None = None
    if hub_id and allow_hub:
        try:
            return arch_from_config_json(fetch_hub_config(hub_id, revision, token), name=hub_id)
        except UnknownArchitecture as exc:
            hub_error = exc
    if hints is not None:
        return arch_from_hints(hints, name=label)
    reasons = [str(hub_error)] if hub_error else []
    if uri and uri.startswith("pvc://"):
        reasons.append(
            f"no config.json under {claims_root}"
            if claims_root is not None
            else "pvc:// is read under the claims directory, and none was given (the "
            "operator's PVC root, or --claims-root for `finetune-operator plan`)"
        )
    detail = "".join(f"; {reason}" for reason in reasons)
    # Only the Hub could have answered, and it may yet: the caller waits rather than fails.
    error = HubUnavailable if isinstance(hub_error, HubUnavailable) else UnknownArchitecture
    raise error(
        f"cannot tell the architecture of {label!r}: it is not a built-in preset and its "
        f"config.json could not be read{detail}. Set spec.model.architecture (hiddenSize, "
        "intermediateSize, numHiddenLayers, numAttentionHeads, numKeyValueHeads, vocabSize, "
        "tieWordEmbeddings) from the model's config.json."
    )
