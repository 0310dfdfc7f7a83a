"""Pure builders for the vLLM servers behind AdapterDeployments: the Deployment and the
Service of one shared server.

A server is shared by every AdapterDeployment with the same `server_config` (see
server_group.py). The Deployment and its Service are built from the sorted members of
that group only, so the same members always give the same manifest and adding or removing
an adapter rolls the pod template exactly once. What runs in the pod is in vllm.py; the
adapter checks its `verify-adapters` init container runs are `finetune_api.adapter_checks`,
shipped whole (`verify_script`).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune_api import adapter_checks
from finetune_api.common import API_VERSION, uri_scheme
from finetune_api.constants import (
    ADAPTER_MANIFEST_FILENAME,
    ANNOTATION_ADAPTERS,
    LABEL_COMPONENT,
    LABEL_SERVER,
    MANAGED_BY,
    TERMINATION_LOG_PATH,
)

from ..constants import (
    FETCH_CONTAINER,
    GPU_PRODUCT_LABEL,
    HF_TOKEN_DIR,
    HF_TOKEN_PATH,
    HF_TOKEN_VOLUME,
    SERVER_COMPONENT,
    STORAGE_CREDENTIALS_DIR,
    STORAGE_CREDENTIALS_VOLUME,
    VERIFY_CONTAINER,
    VLLM_CONTAINER,
)
from .server_group import ServingDefaults, server_name
from .storage import VolumePlan, locate
from .training import RESTRICTED_CONTAINER_SECURITY
from .vllm import (
    ADAPTERS_DIR,
    HEALTH_PATH,
    MODELS_DIR,
    PORT,
    VLLM_LORA_RANKS,
    ServedAdapter,
    adapter_path,
    server_check_inputs,
    vllm_args,
)

SERVING_UID = 1000
CACHE_DIR = "/cache"


@dataclass(frozen=True)
class Member:
    """One AdapterDeployment of a server's group: it owns the server with the others."""

    name: str
    uid: str
    replicas: int
    adapters: tuple[ServedAdapter, ...]


def sorted_adapters(members: list[Member]) -> list[ServedAdapter]:
    return sorted((a for m in members for a in m.adapters), key=lambda a: a.name)


@functools.cache
def verify_script() -> str:
    """The Python program the verify init container runs: `finetune_api/adapter_checks.py`,
    the whole file, as it is imported here (it has its own `__main__` entry)."""
    return Path(adapter_checks.__file__).read_text(encoding="utf-8")


def server_labels(name: str) -> dict[str, str]:
    return {**MANAGED_BY, LABEL_COMPONENT: SERVER_COMPONENT, LABEL_SERVER: name}


def _owner_references(members: list[Member]) -> list[dict]:
    # Not controller references: the server belongs to all of its AdapterDeployments, and
    # the garbage collector removes it when the last of them is gone.
    return [
        {
            "apiVersion": API_VERSION,
            "kind": "AdapterDeployment",
            "name": m.name,
            "uid": m.uid,
            "controller": False,
            "blockOwnerDeletion": False,
        }
        for m in sorted(members, key=lambda m: m.name)
    ]


def _fetch_container(
    sources: list[tuple[str, str]], config: dict, defaults: ServingDefaults
) -> dict:
    """Copies s3:// artifacts into the pod; credentials come from files, never env specs."""
    script = (
        "set -eu\n"
        f"if [ -d {STORAGE_CREDENTIALS_DIR} ]; then\n"
        f"  for f in {STORAGE_CREDENTIALS_DIR}/*; do\n"
        '    [ -f "$f" ] && export "$(basename "$f")=$(cat "$f")"\n'
        "  done\n"
        "fi\n"
        'while [ "$#" -gt 0 ]; do\n'
        '  echo "fetching $1 -> $2"\n'
        '  aws s3 cp --recursive --only-show-errors "$1" "$2"\n'
        "  shift 2\n"
        "done\n"
    )
    mounts = [
        {"name": "adapters", "mountPath": ADAPTERS_DIR},
        {"name": "models", "mountPath": MODELS_DIR},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    if config.get("storageSecretRef"):
        mounts.append(
            {
                "name": STORAGE_CREDENTIALS_VOLUME,
                "mountPath": STORAGE_CREDENTIALS_DIR,
                "readOnly": True,
            }
        )
    return {
        "name": FETCH_CONTAINER,
        "image": defaults.fetch_image,
        "command": ["/bin/sh", "-c", script, "fetch"],
        "args": [part for pair in sources for part in pair],
        "env": [{"name": "HOME", "value": "/tmp"}],
        "volumeMounts": mounts,
        "securityContext": RESTRICTED_CONTAINER_SECURITY,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def _verify_container(
    config: dict, adapters: list[ServedAdapter], image: str, mounts: list[dict]
) -> dict | None:
    local = [a for a in adapters if uri_scheme(a.uri) in ("pvc", "s3")]
    if not local:
        return None
    plan = {
        # The server's limit for the init check is vLLM's (each deployment's own limit was
        # checked by the operator); the base model is the one this server loads.
        "server": {**server_check_inputs(config, VLLM_LORA_RANKS[-1])},
        "adapters": [
            {
                "name": a.name,
                "path": adapter_path(a),
                "uri": a.uri,
                "sha256": a.sha256,
                "manifest": ADAPTER_MANIFEST_FILENAME,
            }
            for a in local
        ],
    }
    return {
        "name": VERIFY_CONTAINER,
        "image": image,
        "command": [
            "python3",
            "-c",
            verify_script(),
            json.dumps(plan, sort_keys=True, separators=(",", ":")),
        ],
        "volumeMounts": mounts,
        "securityContext": RESTRICTED_CONTAINER_SECURITY,
        "terminationMessagePath": TERMINATION_LOG_PATH,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }


def build_server(
    config: dict, members: list[Member], defaults: ServingDefaults
) -> tuple[dict, dict]:
    """The shared Deployment and Service for a group of AdapterDeployments."""
    name = server_name(config)
    namespace = config["namespace"]
    adapters = sorted_adapters(members)
    labels = server_labels(name)
    metadata = {
        "name": name,
        "namespace": namespace,
        "labels": labels,
        "ownerReferences": _owner_references(members),
    }

    claims = VolumePlan()
    for uri in [a.uri for a in adapters] + [
        config["baseModel"].get("uri") or "",
        config["baseModel"].get("tokenizer") or "",
    ]:
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
        volumes.append(
            {
                "name": HF_TOKEN_VOLUME,
                "secret": {
                    "secretName": ref["name"],
                    "items": [{"key": ref.get("key", "token"), "path": "token"}],
                    "defaultMode": 0o440,
                },
            }
        )
        mounts.append({"name": HF_TOKEN_VOLUME, "mountPath": HF_TOKEN_DIR, "readOnly": True})
        # huggingface_hub reads the token from this file: no secret in the pod spec.
        env.append({"name": "HF_TOKEN_PATH", "value": HF_TOKEN_PATH})
    if config.get("storageSecretRef"):
        volumes.append(
            {
                "name": STORAGE_CREDENTIALS_VOLUME,
                "secret": {"secretName": config["storageSecretRef"], "defaultMode": 0o440},
            }
        )

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
        "livenessProbe": {**probe, "periodSeconds": 15, "timeoutSeconds": 5, "failureThreshold": 4},
        "readinessProbe": {**probe, "periodSeconds": 5, "timeoutSeconds": 3, "failureThreshold": 3},
        "securityContext": RESTRICTED_CONTAINER_SECURITY,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    init_containers = []
    if fetches:
        init_containers.append(_fetch_container(fetches, config, defaults))
    verify = _verify_container(
        config, adapters, config["image"], [m for m in mounts if m["name"] != "dshm"]
    )
    if verify:
        init_containers.append(verify)

    pod_spec: dict[str, Any] = {
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": SERVING_UID,
            "runAsGroup": SERVING_UID,
            "fsGroup": SERVING_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
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
        node_selector[GPU_PRODUCT_LABEL] = gpu["product"]
    if node_selector:
        pod_spec["nodeSelector"] = node_selector
    if config.get("tolerations"):
        pod_spec["tolerations"] = list(config["tolerations"])

    annotations = {
        ANNOTATION_ADAPTERS: ",".join(
            f"{a.name}={(a.sha256 or 'unverified')[:16]}" for a in adapters
        )
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata,
        "spec": {
            "replicas": max(m.replicas for m in members),
            "selector": {"matchLabels": {LABEL_SERVER: name}},
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {
                    "maxSurge": defaults.max_surge,
                    "maxUnavailable": defaults.max_unavailable,
                },
            },
            "template": {
                "metadata": {"labels": labels, "annotations": annotations},
                "spec": pod_spec,
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata,
        "spec": {
            "selector": {LABEL_SERVER: name},
            "ports": [{"name": "http", "port": PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }
    return deployment, service


def endpoint(config: dict) -> str:
    """OpenAI-compatible base URL; clients pick an adapter with the request's `model`."""
    return f"http://{server_name(config)}.{config['namespace']}.svc:{PORT}/v1"
