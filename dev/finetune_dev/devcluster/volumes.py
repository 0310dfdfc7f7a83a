"""PersistentVolumeClaims backed by hostPath volumes on the development cluster.

The cluster has no storage provisioner, so a claim a job names gets a PersistentVolume made
for it and pre-bound both ways (the PV's claimRef, the claim's volumeName); the
PersistentVolume controller then marks both Bound and pods that mount the claim schedule.
"""

from __future__ import annotations


def hostpath_claim(
    namespace: str,
    claim: str,
    *,
    volume: str,
    path: str,
    size: str = "1Gi",
    access_modes: tuple[str, ...] = ("ReadWriteOnce",),
    storage_class: str = "",
) -> list[dict]:
    """[PersistentVolume `volume` at `path`, PersistentVolumeClaim `claim` bound to it]."""
    return [
        {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": volume},
            "spec": {
                "capacity": {"storage": size},
                "accessModes": list(access_modes),
                "persistentVolumeReclaimPolicy": "Retain",
                "storageClassName": storage_class,
                "hostPath": {"path": path, "type": "DirectoryOrCreate"},
                "claimRef": {"namespace": namespace, "name": claim},
            },
        },
        {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": claim, "namespace": namespace},
            "spec": {
                "accessModes": list(access_modes),
                "storageClassName": storage_class,
                "volumeName": volume,
                "resources": {"requests": {"storage": size}},
            },
        },
    ]
