"""Pure builders for the vLLM servers behind AdapterDeployments, and the adapter checks.

A server is shared: every AdapterDeployment in a namespace that asks for the same base
model and the same runtime settings (image, replicas, resources, placement, secrets)
lands on one vLLM Deployment with LoRA enabled, named `vllm-<hash of those settings>`.
The Deployment and its Service are built from the sorted members of that group only, so
the same members always give the same manifest and adding or removing an adapter rolls
the pod template exactly once.

The adapter checks live here too, as stdlib-only functions over plain dicts: the operator
runs them on what it can read (a FineTuneJob's spec and status, an adapter manifest under
`pvc_root`), and the server's init container runs the very same source over the mounted
files before vLLM starts (`verify_script`), because only the pod can read a PVC.

vLLM facts used here are from its v0.11 CLI and LoRA code (the default serving image):
`vllm/config/lora.py` (MaxLoRARanks), `vllm/entrypoints/openai/cli_args.py`
(`--lora-modules name=path ...` in one flag: the parser action replaces the list on every
occurrence), `vllm/lora/peft_helper.py` (DoRA and modules_to_save are refused at load).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from dataclasses import dataclass, field
from typing import Any

from finetune_api.adapterdeployment import AdapterDeployment
from finetune_api.common import uri_scheme
from finetune_api.constants import (
    ADAPTER_MANIFEST_FILENAME,
    DEFAULT_GPU_RESOURCE,
    LABEL_COMPONENT,
    LABEL_PREFIX,
)
from .storage import VolumePlan, locate
from .training import MANAGED_BY, RESTRICTED_CONTAINER_SECURITY

SERVER_COMPONENT = "adapter-server"
LABEL_SERVER = f"{LABEL_PREFIX}/server"
ANNOTATION_ADAPTERS = f"{LABEL_PREFIX}/adapters"
"""On the pod template: `name=digest` per served adapter, so a changed checksum rolls too."""

VLLM_CONTAINER = "vllm"
PORT = 8000
HEALTH_PATH = "/health"
SERVING_UID = 1000
ADAPTERS_DIR = "/adapters"
MODELS_DIR = "/models"
CACHE_DIR = "/cache"
SECRETS_DIR = "/var/run/secrets/finetune.dev"
HF_TOKEN_PATH = f"{SECRETS_DIR}/hf-token/token"
STORAGE_CREDENTIALS_DIR = f"{SECRETS_DIR}/storage"

# vllm/config/lora.py, `MaxLoRARanks` (v0.11): --max-lora-rank accepts only these.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

# Leaf module names vLLM applies LoRA to in the decoder families it serves (its models'
# `packed_modules_mapping` and linear layer names): Llama/Mistral/Qwen/Gemma, Phi-3,
# GPT-2/StarCoder, Falcon/GPT-NeoX/Bloom, Mixtral experts, InternLM2, Baichuan, OPT/Phi.
# An allow-list rather than a deny-list on purpose: one adapter vLLM cannot load crashes
# the shared server for every adapter on it, so an unknown name is refused up front.
SERVABLE_TARGET_MODULES = frozenset({
    "q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj",
    "gate_proj", "up_proj", "down_proj", "gate_up_proj",
    "c_attn", "c_proj", "c_fc",
    "query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h",
    "w1", "w2", "w3", "wqkv", "wo", "W_pack",
    "fc1", "fc2", "out_proj",
    "embed_tokens", "lm_head",
    "all-linear",  # PEFT's shorthand: every linear layer except the output head
})


@dataclass
class ServingDefaults:
    """Cluster-wide defaults for serving pods (Helm values `serving.*`, passed to the
    operator as JSON in FINETUNE_SERVING_DEFAULTS). An AdapterDeployment's own fields win."""

    image: str = "vllm/vllm-openai:v0.11.0"
    fetch_image: str = "amazon/aws-cli:2.22.35"
    """Copies s3:// adapters and base models into the pod before vLLM starts."""
    gpu_resource_name: str = DEFAULT_GPU_RESOURCE
    cpu: str | None = None
    memory: str | None = None
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict] = field(default_factory=list)
    max_loras_per_batch: int = 8
    """`--max-loras`: adapters in one batch (GPU slots); the rest wait in CPU memory."""
    extra_args: list[str] = field(default_factory=list)
    """Appended to every server's vLLM arguments (e.g. `--gpu-memory-utilization=0.9`)."""
    max_surge: int = 1
    max_unavailable: int = 0
    """Rollout: by default a new pod must be ready before an old one stops, so an adapter
    that fails its checks in the pod never takes the shared server down (it needs spare
    GPUs for one pod; set maxSurge 0, maxUnavailable 1 where there are none)."""

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None,
                 image: str | None = None) -> ServingDefaults:
        env = os.environ if environ is None else environ
        raw = env.get("FINETUNE_SERVING_DEFAULTS", "").strip()
        values: dict[str, Any] = {}
        if raw:
            try:
                values = json.loads(raw)
            except ValueError as exc:
                raise ValueError(
                    f"FINETUNE_SERVING_DEFAULTS is not valid JSON ({exc}); expected an object "
                    "such as {\"tolerations\": [], \"cpu\": \"8\"}") from exc
        keys = {"image": "image", "fetchImage": "fetch_image",
                "gpuResourceName": "gpu_resource_name", "cpu": "cpu", "memory": "memory",
                "nodeSelector": "node_selector", "tolerations": "tolerations",
                "maxLorasPerBatch": "max_loras_per_batch", "extraArgs": "extra_args",
                "maxSurge": "max_surge", "maxUnavailable": "max_unavailable"}
        unknown = sorted(set(values) - set(keys))
        if unknown:
            raise ValueError(f"FINETUNE_SERVING_DEFAULTS has unknown keys {unknown}; "
                             f"known: {sorted(keys)}")
        kwargs = {keys[k]: v for k, v in values.items() if v is not None}
        if image and "image" not in kwargs:
            kwargs["image"] = image
        return cls(**kwargs)


# --- which server an AdapterDeployment shares ------------------------------------------------


def server_config(ad: AdapterDeployment, defaults: ServingDefaults) -> dict:
    """Everything that decides what server pods look like, with defaults filled in.

    Two AdapterDeployments with equal configs share one server. Deliberately left out:
    the adapters, `maxLoraRank` (the server's rank is the largest its adapters need) and
    `replicas` (the server runs as many as its most demanding member asks for, so scaling
    one AdapterDeployment scales its server instead of moving it to a cold new one).
    """
    spec = ad.spec
    res = spec.resources
    base = spec.base_model.model_dump(mode="json", by_alias=True, exclude_none=True,
                                      exclude={"architecture"})
    return {
        "namespace": ad.metadata.namespace,
        "runtime": spec.runtime,
        "baseModel": base,
        "image": spec.image or defaults.image,
        "gpu": {"count": res.gpu.count, "product": res.gpu.product,
                "resourceName": res.gpu.resource_name or defaults.gpu_resource_name},
        "cpu": res.cpu or defaults.cpu,
        "memory": res.memory or defaults.memory,
        "nodeSelector": dict(res.node_selector if res.node_selector is not None
                             else defaults.node_selector),
        "tolerations": ([t.model_dump(by_alias=True, exclude_none=True)
                         for t in res.tolerations] if res.tolerations is not None
                        else list(defaults.tolerations)),
        "hfTokenSecretRef": (spec.hf_token_secret_ref.model_dump(by_alias=True)
                             if spec.hf_token_secret_ref else None),
        "storageSecretRef": spec.storage_secret_ref.name if spec.storage_secret_ref else None,
    }


def server_name(config: dict) -> str:
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return "vllm-" + hashlib.sha256(canonical.encode()).hexdigest()[:10]


def base_model_identity(model: dict | None) -> str | None:
    """`name` and `hf://name` are the same model; other URIs compare as written."""
    if not model:
        return None
    if model.get("name"):
        return model["name"]
    uri = model.get("uri")
    if uri and uri.startswith("hf://"):
        return uri[len("hf://"):]
    return uri


def served_base_name(config: dict) -> str:
    """The `model` clients send for the base without an adapter."""
    identity = base_model_identity(config["baseModel"]) or "base"
    if config["baseModel"].get("name") or config["baseModel"].get("uri", "").startswith("hf://"):
        return identity
    return identity.rstrip("/").rsplit("/", 1)[-1] or "base"


def server_rank(ranks: list[int]) -> int:
    """The smallest rank vLLM accepts that covers every adapter (`--max-lora-rank`)."""
    need = max(ranks, default=VLLM_LORA_RANKS[0])
    for allowed in VLLM_LORA_RANKS:
        if allowed >= need:
            return allowed
    raise ValueError(f"LoRA rank {need} is above vLLM's maximum {VLLM_LORA_RANKS[-1]}")


# --- adapter checks (stdlib only: also shipped into the init container) --------------------


def adapter_problems(facts: dict, server: dict) -> list[list[str]]:
    """Why an adapter cannot be served, as [reason, message] pairs (empty: compatible).

    `facts`: what is known about the adapter: baseModel {name, uri, revision},
    revisionDeclared (True when the revision is a spec's, not a resolved commit), r,
    targetModules, useDoRA, modulesToSave. `server`: baseModel, maxRank (the
    AdapterDeployment's limit), vllmMaxRank, servableModules. Unknown facts are not checked.
    """
    name = facts.get("name", "adapter")
    problems = []

    def identity(model):
        if not model:
            return None
        if model.get("name"):
            return model["name"]
        uri = model.get("uri")
        return uri[len("hf://"):] if uri and uri.startswith("hf://") else uri

    want, have = server.get("baseModel") or {}, facts.get("baseModel") or {}
    source = facts.get("baseModelFrom")
    if source and not (want.get("name") or (want.get("uri") or "").startswith("hf://")):
        # A PEFT config names a Hub id: comparable with a Hub base only, not with a base
        # served from a volume or a bucket.
        have = {}
    # Hub ids are case-insensitive; a PEFT config holds the id as its user typed it.
    fold = (lambda x: x.lower()) if source else (lambda x: x)
    if identity(have) and identity(want) and fold(identity(have)) != fold(identity(want)):
        problems.append(["BaseModelMismatch",
                         (f"adapter {name!r} was trained on {identity(have)!r}"
                          + (f" ({source})" if source else "")
                          + f", but this deployment serves {identity(want)!r}; serve it on "
                          "its own base model or retrain it on this one")])
    elif identity(have):
        a, b = have.get("revision"), want.get("revision")
        if facts.get("revisionDeclared"):
            differ = (a or "default branch") != (b or "default branch")
        else:  # a resolved commit: comparable only with a pinned revision
            differ = bool(a and b and a != b)
        if differ:
            problems.append(["BaseModelMismatch",
                             (f"adapter {name!r} was trained on revision "
                             f"{a or 'default branch'!r} of {identity(have)!r}, but this "
                             f"deployment serves revision {b or 'default branch'!r}; set "
                             "spec.baseModel.revision to the adapter's")])
    r = facts.get("r")
    if r is not None:
        limit, vllm_max = server.get("maxRank"), server.get("vllmMaxRank")
        if vllm_max and r > vllm_max:
            problems.append(["RankAboveLimit",
                             (f"adapter {name!r} has rank {r}; vLLM serves ranks up to "
                             f"{vllm_max}; retrain it with a lower lora.r")])
        elif limit and r > limit:
            problems.append(["RankAboveLimit",
                             (f"adapter {name!r} has rank {r}, above spec.maxLoraRank "
                             f"({limit}); raise spec.maxLoraRank to at least {r}")])
    servable = set(server.get("servableModules") or [])
    targets = facts.get("targetModules")
    if isinstance(targets, str):
        # PEFT stores a regular expression as a plain string: only `all-linear` is checkable.
        targets = [targets] if targets == "all-linear" else None
    if servable and targets:
        bad = sorted(t for t in targets if t not in servable)
        if bad:
            problems.append(["UnsupportedTargetModules",
                             (f"adapter {name!r} adapts {bad}, which vLLM cannot serve LoRA "
                             f"on; servable modules: {sorted(servable)}; retrain with "
                             "lora.targetModules from that list")])
    if facts.get("useDoRA"):
        problems.append(["UnsupportedAdapterFeature",
                         (f"adapter {name!r} is a DoRA adapter, which vLLM does not serve; "
                         "merge it into the base (AdapterMerge) or retrain without useDoRA")])
    if facts.get("modulesToSave"):
        problems.append(["UnsupportedAdapterFeature",
                         (f"adapter {name!r} saves full modules {facts['modulesToSave']}, "
                         "which vLLM does not load; retrain without modules_to_save")])
    return problems


def adapter_files_digest(files: list) -> str:
    """The adapter manifest's digest: one sha256 over sorted (name, sha256) pairs
    (api.AdapterManifest.digest; repeated here because the verify init container runs these
    functions without the package)."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(files, key=lambda f: f["name"]):
        h.update(f"{f['name']}\0{f['sha256']}\n".encode())
    return h.hexdigest()


def verify_adapter_dir(directory: str, expected: dict) -> tuple[list[list[str]], dict]:
    """Check an adapter's files against its manifest, and read what it says about itself.

    -> (problems as [reason, message], facts for `adapter_problems`). `expected`: name,
    sha256 (the digest a FineTuneJob recorded, if any), manifest (file name), uri (what
    the user wrote, e.g. `pvc://claim/path`: messages name it rather than `directory`,
    which is only where this process happens to see the files).
    """
    import hashlib
    import json
    import os
    import re

    name = expected.get("name", "adapter")
    where = expected.get("uri") or directory
    manifest_path = os.path.join(directory, expected.get("manifest", "finetune-manifest.json"))
    if not os.path.isdir(directory):
        return [["AdapterFilesMissing", (f"adapter {name!r}: {where} does not exist; check "
                 "the adapter's URI (the training job may have written elsewhere)")]], {}

    def sha256_of(path):
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()

    facts = {"name": name}
    problems = []
    config_path = os.path.join(directory, "adapter_config.json")
    if os.path.isfile(config_path):
        with open(config_path) as fh:
            peft = json.load(fh)
        facts.update({"r": peft.get("r"), "targetModules": peft.get("target_modules"),
                      "useDoRA": bool(peft.get("use_dora")),
                      "modulesToSave": peft.get("modules_to_save") or None})
        # PEFT records the base it was trained on; a Hub id (`owner/name` or `name`) is
        # comparable, a local path of the training machine (`/models/x`, `./x`) is not.
        base_id = peft.get("base_model_name_or_path")
        if isinstance(base_id, str) and re.match(
                r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$", base_id):
            facts["baseModel"] = {"name": base_id, **(
                {"revision": peft["revision"]} if isinstance(peft.get("revision"), str)
                else {})}
            facts["revisionDeclared"] = False
            facts["baseModelFrom"] = "base_model_name_or_path in its adapter_config.json"
    if not os.path.isfile(manifest_path):
        # Not written by our worker: check what vLLM itself needs to load it.
        weights = [w for w in ("adapter_model.safetensors", "adapter_model.bin")
                   if os.path.isfile(os.path.join(directory, w))]
        missing = ([] if os.path.isfile(config_path) else ["adapter_config.json"]) + (
            [] if weights else ["adapter_model.safetensors"])
        if missing:
            problems.append(["AdapterFilesMissing",
                             f"adapter {name!r}: {missing} not found in {where}"])
        # Its identity is the digest of its files, by the manifest's formula: new files,
        # new digest, and the server rolls to them.
        listed = []
        for root, _dirs, files in os.walk(directory):
            for f in files:
                rel = os.path.relpath(os.path.join(root, f), directory).replace(os.sep, "/")
                listed.append({"name": rel, "sha256": sha256_of(os.path.join(root, f))})
        facts["sha256"] = adapter_files_digest(listed)
        if expected.get("sha256") and expected["sha256"] != facts["sha256"]:
            problems.append(["AdapterChecksumMismatch",
                             (f"adapter {name!r}: no {os.path.basename(manifest_path)} in "
                             f"{where}, and its files' digest {facts['sha256'][:12]}... is not "
                             f"the expected {expected['sha256'][:12]}...; the files changed "
                             "since they were checked, or they are not the adapter its "
                             "FineTuneJob recorded")])
        return problems, facts
    with open(manifest_path) as fh:
        manifest = json.load(fh)
    base = manifest.get("baseModel") or {}
    facts.pop("baseModelFrom", None)  # the manifest says what the worker resolved
    facts.update({"baseModel": base, "revisionDeclared": False, "r": manifest.get("r"),
                  "targetModules": manifest.get("targetModules"),
                  "useDoRA": bool(manifest.get("useDoRA") or facts.get("useDoRA"))})
    missing, changed = [], []
    for entry in manifest.get("files") or []:
        path = os.path.join(directory, entry["name"])
        if not os.path.isfile(path):
            missing.append(entry["name"])
        elif os.path.getsize(path) != entry.get("sizeBytes") or sha256_of(path) != entry["sha256"]:
            changed.append(entry["name"])
    if missing:
        problems.append(["AdapterFilesMissing",
                         (f"adapter {name!r}: files listed in its manifest are missing from "
                         f"{where}: {missing}; copy the whole adapter directory again")])
    if changed:
        problems.append(["AdapterChecksumMismatch",
                         (f"adapter {name!r}: files differ from their manifest checksums in "
                         f"{where}: {changed}; the copy is corrupt or was modified")])
    facts["sha256"] = adapter_files_digest(manifest.get("files") or [])
    if expected.get("sha256") and facts["sha256"] != expected["sha256"]:
        problems.append(["AdapterChecksumMismatch",
                         (f"adapter {name!r}: the manifest in {where} has digest "
                         f"{facts['sha256'][:12]}..., but its FineTuneJob recorded "
                         f"{expected['sha256'][:12]}...; the directory holds a different "
                         "adapter")])
    return problems, facts


def _verify_main(argv: list[str]) -> int:
    """Init-container entry point: argv[1] is JSON {server, adapters: [{name, path, ...}]}."""
    import json
    import os
    import sys

    plan = json.loads(argv[1])
    failures = []
    for adapter in plan["adapters"]:
        problems, facts = verify_adapter_dir(adapter["path"], adapter)
        problems += adapter_problems(facts, plan["server"])
        for reason, message in problems:
            failures.append(f"{reason}: {message}")
        if not problems:
            print(f"adapter {adapter['name']!r} at {adapter['path']}: ok", flush=True)
    if failures:
        text = "\n".join(failures)
        print(text, file=sys.stderr, flush=True)
        try:
            path = os.environ.get("TERMINATION_LOG", "/dev/termination-log")
            with open(path, "w") as fh:
                fh.write(text[:4000])
        except OSError:
            pass
        return 1
    return 0


def verify_script() -> str:
    """The Python program the verify init container runs: the functions above, verbatim."""
    parts = [inspect.getsource(f) for f in (adapter_files_digest, adapter_problems,
                                            verify_adapter_dir, _verify_main)]
    return "\n\n".join(parts) + "\n\nimport sys\nsys.exit(_verify_main(sys.argv))\n"


def server_check_inputs(config: dict, max_rank: int) -> dict:
    """The `server` argument of `adapter_problems` for one AdapterDeployment."""
    return {"baseModel": config["baseModel"], "maxRank": max_rank,
            "vllmMaxRank": VLLM_LORA_RANKS[-1],
            "servableModules": sorted(SERVABLE_TARGET_MODULES)}


# --- what goes into a server ----------------------------------------------------------------


@dataclass(frozen=True)
class ServedAdapter:
    """An adapter that passed the checks the operator can run."""

    name: str
    """The `model` name clients send."""
    uri: str
    deployment: str
    """The AdapterDeployment that asked for it."""
    max_rank: int
    """The rank the server must accept for it: its own, or its deployment's limit."""
    sha256: str | None = None
    fine_tune_job: str | None = None


@dataclass(frozen=True)
class Member:
    """One AdapterDeployment of a server's group: it owns the server with the others."""

    name: str
    uid: str
    replicas: int
    adapters: tuple[ServedAdapter, ...]


def adapter_path(adapter: ServedAdapter) -> str:
    """Where vLLM finds the adapter inside the pod (or the Hub id it downloads)."""
    scheme = uri_scheme(adapter.uri)
    if scheme == "pvc":
        return locate(adapter.uri).local_path
    if scheme == "s3":
        return f"{ADAPTERS_DIR}/{adapter.name}"
    return adapter.uri[len("hf://"):]  # vLLM resolves Hub ids with huggingface_hub


def lora_module_arg(adapter: ServedAdapter, base_name: str) -> str:
    path = adapter_path(adapter)
    # vLLM splits `name=path` on "=" and treats anything with "," as JSON.
    if "=" in path or "," in path:
        return json.dumps({"name": adapter.name, "path": path, "base_model_name": base_name},
                          separators=(",", ":"))
    return f"{adapter.name}={path}"


def _model_location(config: dict) -> str:
    base = config["baseModel"]
    if base.get("name"):
        return base["name"]
    uri = base["uri"]
    scheme = uri_scheme(uri)
    if scheme == "hf":
        return uri[len("hf://"):]
    if scheme == "pvc":
        return locate(uri).local_path
    return f"{MODELS_DIR}/base"


def _tokenizer_location(tokenizer: str) -> str:
    if "://" not in tokenizer:
        return tokenizer
    scheme = uri_scheme(tokenizer)
    if scheme == "hf":
        return tokenizer[len("hf://"):]
    if scheme == "pvc":
        return locate(tokenizer).local_path
    return f"{MODELS_DIR}/tokenizer"


def sorted_adapters(members: list[Member]) -> list[ServedAdapter]:
    return sorted((a for m in members for a in m.adapters), key=lambda a: a.name)


def vllm_args(config: dict, adapters: list[ServedAdapter],
              defaults: ServingDefaults) -> list[str]:
    """`vllm serve` arguments: the base model with every adapter registered by name."""
    base = config["baseModel"]
    base_name = served_base_name(config)
    max_loras = max(1, min(len(adapters), defaults.max_loras_per_batch))
    args = [
        _model_location(config),
        "--served-model-name", base_name,
        "--host", "0.0.0.0",
        "--port", str(PORT),
        "--enable-lora",
        "--max-lora-rank", str(server_rank([a.max_rank for a in adapters])),
        "--max-loras", str(max_loras),
        # Every adapter stays in host memory, so a request for any of them never reloads it.
        "--max-cpu-loras", str(max(max_loras, len(adapters))),
        "--lora-modules", *[lora_module_arg(a, base_name) for a in adapters],
    ]
    if base.get("revision"):
        args += ["--revision", base["revision"]]
    if base.get("tokenizer"):
        args += ["--tokenizer", _tokenizer_location(base["tokenizer"])]
    if config["gpu"]["count"] > 1:
        args += ["--tensor-parallel-size", str(config["gpu"]["count"])]
    return args + list(defaults.extra_args)


def server_labels(name: str) -> dict[str, str]:
    return {**MANAGED_BY, LABEL_COMPONENT: SERVER_COMPONENT, LABEL_SERVER: name}


def _owner_references(members: list[Member]) -> list[dict]:
    # Not controller references: the server belongs to all of its AdapterDeployments, and
    # the garbage collector removes it when the last of them is gone.
    return [{"apiVersion": "finetune.dev/v1alpha1", "kind": "AdapterDeployment",
             "name": m.name, "uid": m.uid, "controller": False, "blockOwnerDeletion": False}
            for m in sorted(members, key=lambda m: m.name)]


def _fetch_container(sources: list[tuple[str, str]], config: dict,
                     defaults: ServingDefaults) -> dict:
    """Copies s3:// artifacts into the pod; credentials come from files, never env specs."""
    script = (
        'set -eu\n'
        f'if [ -d {STORAGE_CREDENTIALS_DIR} ]; then\n'
        f'  for f in {STORAGE_CREDENTIALS_DIR}/*; do\n'
        '    [ -f "$f" ] && export "$(basename "$f")=$(cat "$f")"\n'
        '  done\n'
        'fi\n'
        'while [ "$#" -gt 0 ]; do\n'
        '  echo "fetching $1 -> $2"\n'
        '  aws s3 cp --recursive --only-show-errors "$1" "$2"\n'
        '  shift 2\n'
        'done\n')
    mounts = [{"name": "adapters", "mountPath": ADAPTERS_DIR},
              {"name": "models", "mountPath": MODELS_DIR},
              {"name": "tmp", "mountPath": "/tmp"}]
    if config.get("storageSecretRef"):
        mounts.append({"name": "storage-credentials", "mountPath": STORAGE_CREDENTIALS_DIR,
                       "readOnly": True})
    return {
        "name": "fetch",
        "image": defaults.fetch_image,
        "command": ["/bin/sh", "-c", script, "fetch"],
        "args": [part for pair in sources for part in pair],
        "env": [{"name": "HOME", "value": "/tmp"}],
        "volumeMounts": mounts,
        "securityContext": RESTRICTED_CONTAINER_SECURITY,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def _verify_container(config: dict, adapters: list[ServedAdapter], image: str,
                      mounts: list[dict]) -> dict | None:
    local = [a for a in adapters if uri_scheme(a.uri) in ("pvc", "s3")]
    if not local:
        return None
    plan = {
        # The server's limit for the init check is vLLM's (each deployment's own limit was
        # checked by the operator); the base model is the one this server loads.
        "server": {**server_check_inputs(config, VLLM_LORA_RANKS[-1])},
        "adapters": [{"name": a.name, "path": adapter_path(a), "uri": a.uri,
                      "sha256": a.sha256, "manifest": ADAPTER_MANIFEST_FILENAME}
                     for a in local],
    }
    return {
        "name": "verify-adapters",
        "image": image,
        "command": ["python3", "-c", verify_script(),
                    json.dumps(plan, sort_keys=True, separators=(",", ":"))],
        "volumeMounts": mounts,
        "securityContext": RESTRICTED_CONTAINER_SECURITY,
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def build_server(config: dict, members: list[Member],
                 defaults: ServingDefaults) -> tuple[dict, dict]:
    """The shared Deployment and Service for a group of AdapterDeployments."""
    name = server_name(config)
    namespace = config["namespace"]
    adapters = sorted_adapters(members)
    labels = server_labels(name)
    metadata = {"name": name, "namespace": namespace, "labels": labels,
                "ownerReferences": _owner_references(members)}

    claims = VolumePlan()
    for uri in [a.uri for a in adapters] + [config["baseModel"].get("uri") or "",
                                            config["baseModel"].get("tokenizer") or ""]:
        if uri.startswith("pvc://"):
            claims.use(locate(uri), write=False)
    fetches = [(a.uri, adapter_path(a)) for a in adapters if uri_scheme(a.uri) == "s3"]
    base_uri = config["baseModel"].get("uri") or ""
    if base_uri.startswith("s3://"):
        fetches.append((base_uri, f"{MODELS_DIR}/base"))
    tokenizer = config["baseModel"].get("tokenizer") or ""
    if tokenizer.startswith("s3://"):
        fetches.append((tokenizer, f"{MODELS_DIR}/tokenizer"))

    volumes = [
        {"name": "cache", "emptyDir": {}},
        {"name": "tmp", "emptyDir": {}},
        {"name": "adapters", "emptyDir": {}},
        {"name": "models", "emptyDir": {}},
        # vLLM's workers exchange tensors through shared memory.
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
        *claims.volumes(),
    ]
    mounts = [
        {"name": "cache", "mountPath": CACHE_DIR},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "adapters", "mountPath": ADAPTERS_DIR},
        {"name": "models", "mountPath": MODELS_DIR},
        {"name": "dshm", "mountPath": "/dev/shm"},
        *claims.mounts(),
    ]
    env = [
        # The root filesystem is read-only: every cache vLLM, Triton and the Hub keep
        # goes to the `cache` volume.
        {"name": "HOME", "value": f"{CACHE_DIR}/home"},
        {"name": "XDG_CACHE_HOME", "value": CACHE_DIR},
        {"name": "HF_HOME", "value": f"{CACHE_DIR}/huggingface"},
        {"name": "VLLM_CACHE_ROOT", "value": f"{CACHE_DIR}/vllm"},
        {"name": "TRITON_CACHE_DIR", "value": f"{CACHE_DIR}/triton"},
        {"name": "TORCHINDUCTOR_CACHE_DIR", "value": f"{CACHE_DIR}/inductor"},
        {"name": "VLLM_NO_USAGE_STATS", "value": "1"},
    ]
    if config.get("hfTokenSecretRef"):
        ref = config["hfTokenSecretRef"]
        volumes.append({"name": "hf-token", "secret": {
            "secretName": ref["name"], "items": [{"key": ref.get("key", "token"),
                                                  "path": "token"}], "defaultMode": 0o440}})
        mounts.append({"name": "hf-token", "mountPath": f"{SECRETS_DIR}/hf-token",
                       "readOnly": True})
        # huggingface_hub reads the token from this file: no secret in the pod spec.
        env.append({"name": "HF_TOKEN_PATH", "value": HF_TOKEN_PATH})
    if config.get("storageSecretRef"):
        volumes.append({"name": "storage-credentials", "secret": {
            "secretName": config["storageSecretRef"], "defaultMode": 0o440}})

    gpu = config["gpu"]
    limits = {gpu["resourceName"]: str(gpu["count"])}
    if config.get("cpu"):
        limits["cpu"] = str(config["cpu"])
    if config.get("memory"):
        limits["memory"] = str(config["memory"])
    probe = {"httpGet": {"path": HEALTH_PATH, "port": "http"}}
    container = {
        "name": VLLM_CONTAINER,
        "image": config["image"],
        "command": ["vllm", "serve"],
        "args": vllm_args(config, adapters, defaults),
        "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}],
        "env": env,
        "resources": {"requests": dict(limits), "limits": dict(limits)},
        "volumeMounts": mounts,
        # Loading a large base model takes minutes: startup gets up to 30 of them, after
        # which liveness restarts a wedged engine and readiness gates traffic.
        "startupProbe": {**probe, "periodSeconds": 10, "failureThreshold": 180},
        "livenessProbe": {**probe, "periodSeconds": 15, "timeoutSeconds": 5,
                          "failureThreshold": 4},
        "readinessProbe": {**probe, "periodSeconds": 5, "timeoutSeconds": 3,
                           "failureThreshold": 3},
        "securityContext": RESTRICTED_CONTAINER_SECURITY,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    init_containers = []
    if fetches:
        init_containers.append(_fetch_container(fetches, config, defaults))
    verify = _verify_container(config, adapters, config["image"],
                               [m for m in mounts if m["name"] != "dshm"])
    if verify:
        init_containers.append(verify)

    pod_spec: dict[str, Any] = {
        "securityContext": {"runAsNonRoot": True, "runAsUser": SERVING_UID,
                            "runAsGroup": SERVING_UID, "fsGroup": SERVING_UID,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 60,
        "containers": [container],
        "volumes": volumes,
    }
    if init_containers:
        pod_spec["initContainers"] = init_containers
    node_selector = dict(config.get("nodeSelector") or {})
    if gpu.get("product"):
        node_selector["nvidia.com/gpu.product"] = gpu["product"]
    if node_selector:
        pod_spec["nodeSelector"] = node_selector
    if config.get("tolerations"):
        pod_spec["tolerations"] = list(config["tolerations"])

    annotations = {ANNOTATION_ADAPTERS: ",".join(
        f"{a.name}={(a.sha256 or 'unverified')[:16]}" for a in adapters)}
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": metadata,
        "spec": {
            "replicas": max(m.replicas for m in members),
            "selector": {"matchLabels": {LABEL_SERVER: name}},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {
                "maxSurge": defaults.max_surge, "maxUnavailable": defaults.max_unavailable}},
            "template": {"metadata": {"labels": labels, "annotations": annotations},
                         "spec": pod_spec},
        },
    }
    service = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": metadata,
        "spec": {
            "selector": {LABEL_SERVER: name},
            "ports": [{"name": "http", "port": PORT, "targetPort": "http",
                       "protocol": "TCP"}],
        },
    }
    return deployment, service


def endpoint(config: dict) -> str:
    """OpenAI-compatible base URL; clients pick an adapter with the request's `model`."""
    return f"http://{server_name(config)}.{config['namespace']}.svc:{PORT}/v1"
