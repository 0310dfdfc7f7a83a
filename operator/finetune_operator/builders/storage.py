"""Where a URI lives inside a worker pod: volumes and mount paths.

`pvc://claim/path` becomes a PersistentVolumeClaim volume mounted under /mnt/<claim>, so
the worker sees a local path. `hf://` and `s3://` are fetched by the worker itself and need
no volume. One claim used twice (model and output on the same volume, say) is mounted once,
writable if any use writes to it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from finetune_api.common import uri_scheme

PVC_MOUNT_ROOT = "/mnt"


@dataclass(frozen=True)
class Location:
    """A URI as the worker sees it: a local path for PVCs, the URI itself otherwise."""

    uri: str
    local_path: str | None
    claim: str | None


def locate(uri: str) -> Location:
    if uri_scheme(uri) != "pvc":
        return Location(uri=uri, local_path=None, claim=None)
    rest = uri[len("pvc://") :]
    claim, _, sub = rest.partition("/")
    path = f"{PVC_MOUNT_ROOT}/{claim}" + (f"/{sub}" if sub else "")
    return Location(uri=uri, local_path=path.rstrip("/"), claim=claim)


@dataclass
class VolumePlan:
    """The PVC volumes a pod needs, deduplicated by claim."""

    writable: dict[str, bool] = field(default_factory=dict)

    def use(self, location: Location, *, write: bool) -> None:
        if location.claim is None:
            return
        self.writable[location.claim] = self.writable.get(location.claim, False) or write

    def volumes(self) -> list[dict]:
        return [
            {
                "name": volume_name(claim),
                "persistentVolumeClaim": {"claimName": claim, "readOnly": not rw},
            }
            for claim, rw in sorted(self.writable.items())
        ]

    def mount_paths(self) -> dict[str, str]:
        return {claim: f"{PVC_MOUNT_ROOT}/{claim}" for claim in sorted(self.writable)}

    def mounts(self) -> list[dict]:
        return [
            {
                "name": volume_name(claim),
                "mountPath": f"{PVC_MOUNT_ROOT}/{claim}",
                "readOnly": not rw,
            }
            for claim, rw in sorted(self.writable.items())
        ]


def volume_name(claim: str) -> str:
    # Volume names are DNS labels (63); claims may be up to 253 characters.
    return ("pvc-" + claim)[:63].rstrip("-.")
