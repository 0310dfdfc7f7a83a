"""What the local node agent can honour in a pod, and how container paths map to host paths.

Pure functions, unit-tested without a cluster. The agent runs a container as a process on
this machine, so two things stand in for a container runtime:

* **Image mapping**: an image is never pulled; a container runs only when a mapping
  names its image (a glob) and its command's executable, and the mapping says which
  local executable to run instead (by default: `finetune-worker` images run the
  `finetune-worker` next to this Python). Anything else is refused, with a reason.
* **Path translation**: there is no mount namespace, so every volume mount becomes a host
  directory and each mount path is rewritten to its host directory in the container's
  command, args, environment values and ConfigMap files. This is the agent's one
  liberty with the pod: the program reads the same config, with host paths in it.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

# Volume types the agent can materialise as host directories.
SUPPORTED_VOLUMES = (
    "configMap",
    "secret",
    "emptyDir",
    "persistentVolumeClaim",
    "projected",
    "downwardAPI",
)
SUPPORTED_PROJECTIONS = ("serviceAccountToken", "configMap", "secret", "downwardAPI")
# Persistent volumes whose data is a directory on this machine.
LOCAL_PV_TYPES = ("hostPath", "local")
SERVICE_ACCOUNT_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
DEFAULT_TERMINATION_MESSAGE_PATH = "/dev/termination-log"

# Reasons in pod and container statuses, as `kubectl get pods` shows them.
UNSUPPORTED_IMAGE = "UnsupportedImage"
UNSUPPORTED_VOLUME = "UnsupportedVolume"
UNSUPPORTED_POD = "UnsupportedPod"


@dataclass(frozen=True)
class ImageMapping:
    """Run containers whose image matches `image` and whose command[0] is `command`
    as the local `executable`."""

    image: str
    command: str
    executable: str

    def matches(self, image: str, argv0: str) -> bool:
        return fnmatch.fnmatchcase(image, self.image) and os.path.basename(argv0) == self.command


def default_mappings() -> list[ImageMapping]:
    """The worker image, whatever registry or tag, runs this environment's worker."""
    here = Path(sys.executable).parent
    worker = here / "finetune-worker"
    executable = (
        str(worker) if worker.exists() else (shutil.which("finetune-worker") or str(worker))
    )
    return [
        ImageMapping(image="*finetune-worker*", command="finetune-worker", executable=executable)
    ]


class Refusal(Exception):
    """The agent cannot honour this pod; `reason` and the message go to its status."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


def container_argv(container: dict) -> list[str]:
    return [*(container.get("command") or []), *(container.get("args") or [])]


def find_mapping(container: dict, mappings: list[ImageMapping]) -> ImageMapping:
    image = container.get("image", "")
    argv = container_argv(container)
    if not argv:
        raise Refusal(
            UNSUPPORTED_IMAGE,
            (
                f"container {container['name']!r} (image {image!r}) has no command; the local "
                f"node agent cannot read an image's entrypoint, so it only runs containers with "
                f"an explicit command"
            ),
        )
    for mapping in mappings:
        if mapping.matches(image, argv[0]):
            return mapping
    known = ", ".join(f"{m.image} running {m.command}" for m in mappings) or "none"
    raise Refusal(
        UNSUPPORTED_IMAGE,
        (
            f"container {container['name']!r}: image {image!r} with command {argv[0]!r} cannot "
            f"be mapped to a program on this machine (the local node agent runs only: {known}). "
            f"Run it on a real cluster with a container runtime"
        ),
    )


def check_pod(pod: dict, mappings: list[ImageMapping]) -> dict[str, ImageMapping]:
    """The mapping for each container, or a Refusal naming what cannot be honoured."""
    spec = pod["spec"]
    name = pod["metadata"]["name"]
    mapped = {c["name"]: find_mapping(c, mappings) for c in spec["containers"]}
    if spec.get("initContainers"):
        raise Refusal(
            UNSUPPORTED_POD,
            (f"pod {name!r} has init containers; the local node agent does not run them"),
        )
    for volume in spec.get("volumes") or []:
        kind = next((k for k in volume if k != "name"), None)
        if kind not in SUPPORTED_VOLUMES:
            raise Refusal(
                UNSUPPORTED_VOLUME,
                (
                    f"volume {volume['name']!r} is of type {kind!r}; the local node agent "
                    f"supports {', '.join(SUPPORTED_VOLUMES)}"
                ),
            )
        for source in (volume.get("projected") or {}).get("sources") or []:
            for k in source:
                if k not in SUPPORTED_PROJECTIONS:
                    raise Refusal(
                        UNSUPPORTED_VOLUME,
                        (
                            f"projected volume {volume['name']!r} has a {k!r} source; the local "
                            f"node agent supports {', '.join(SUPPORTED_PROJECTIONS)}"
                        ),
                    )
    policy = spec.get("restartPolicy", "Always")
    if policy != "Never":
        raise Refusal(
            UNSUPPORTED_POD,
            (
                f"pod {name!r} has restartPolicy {policy!r}; the local node agent runs each "
                f"container once, so it only accepts restartPolicy Never (batch pods)"
            ),
        )
    return mapped


def pv_host_path(pv: dict) -> str:
    """The host directory of a PersistentVolume, or a Refusal for remote storage."""
    spec = pv.get("spec") or {}
    for kind in LOCAL_PV_TYPES:
        if spec.get(kind, {}).get("path"):
            return spec[kind]["path"]
    kind = next(
        (
            k
            for k in spec
            if k
            in (
                "nfs",
                "csi",
                "iscsi",
                "awsElasticBlockStore",
                "gcePersistentDisk",
                "azureDisk",
                "azureFile",
                "cephfs",
                "rbd",
                "fc",
                "flexVolume",
            )
        ),
        "unknown",
    )
    raise Refusal(
        UNSUPPORTED_VOLUME,
        (
            f"PersistentVolume {pv['metadata']['name']!r} is of type {kind!r}; the local node "
            f"agent only mounts hostPath or local volumes (directories on this machine)"
        ),
    )


@dataclass
class MountTable:
    """Container path -> host path, longest container path first when rewriting."""

    entries: dict[str, str]

    def _pattern(self) -> re.Pattern | None:
        if not self.entries:
            return None
        paths = sorted(self.entries, key=len, reverse=True)
        # A mount path matches as a whole path component: /scratch, /scratch/x, "/scratch"
        # but not /scratchpad or /data/scratch.
        alternatives = "|".join(re.escape(p.rstrip("/") or "/") for p in paths)
        return re.compile(r"(?<![\w.\-/])(" + alternatives + r")(?=$|/|[^\w.\-])")

    def translate(self, text: str) -> str:
        pattern = self._pattern()
        if pattern is None:
            return text
        normalised = {k.rstrip("/"): v for k, v in self.entries.items()}
        return pattern.sub(lambda m: normalised[m.group(1)], text)

    def host_path(self, container_path: str) -> str:
        return self.translate(container_path)


_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_.\-]*)\)|\$\$")


def expand_references(value: str, env: dict[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion in command, args and env values; `$$` escapes."""

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env.get(name, m.group(0))

    return _VAR.sub(sub, value)


def field_ref(pod: dict, path: str) -> str:
    """The downward API's fieldRef paths a kubelet resolves."""
    md, spec, status = pod["metadata"], pod["spec"], pod.get("status") or {}
    simple = {
        "metadata.name": md.get("name"),
        "metadata.namespace": md.get("namespace"),
        "metadata.uid": md.get("uid"),
        "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName"),
        "status.podIP": status.get("podIP", "127.0.0.1"),
        "status.hostIP": status.get("hostIP", "127.0.0.1"),
    }
    if path in simple:
        return simple[path] or ""
    m = re.fullmatch(r"metadata\.(labels|annotations)\['(.+)'\]", path)
    if m:
        return (md.get(m.group(1)) or {}).get(m.group(2), "")
    if path in ("metadata.labels", "metadata.annotations"):
        items = md.get(path.split(".")[1]) or {}
        return "\n".join(f'{k}="{v}"' for k, v in sorted(items.items()))
    raise Refusal(
        UNSUPPORTED_POD, f"downward API field {path!r} is not supported by the local node agent"
    )
