"""Test-side access to the real local control plane: kubectl with JSON, and polling.

Tests talk to the API server through kubectl (the real client people use) and poll
for conditions with a deadline; nothing here sleeps and hopes.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import yaml

from finetune_dev.devcluster import binaries
from finetune_dev.devcluster.controlplane import Cluster
from finetune_dev.devcluster.volumes import hostpath_claim


class KubectlError(AssertionError):
    def __init__(self, args: tuple[str, ...], stderr: str):
        super().__init__(f"kubectl {' '.join(args)} failed: {stderr}")
        self.stderr = stderr


@dataclass
class Kube:
    cluster: Cluster
    namespace: str = "default"

    @property
    def kubeconfig(self) -> str:
        return self.cluster.kubeconfig

    def kubectl(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        namespaced: bool = True,
        kubeconfig: str | None = None,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess:
        argv = [str(binaries.kubectl_path()), "--kubeconfig", kubeconfig or self.kubeconfig]
        if namespaced:
            argv += ["-n", self.namespace]
        res = subprocess.run(
            [*argv, *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and res.returncode != 0:
            raise KubectlError(args, res.stderr.strip())
        return res

    def apply(
        self, manifest: dict | str | list, *, server_side: bool = False, check: bool = True
    ) -> subprocess.CompletedProcess:
        text = manifest if isinstance(manifest, str) else _dump(manifest)
        args = ["apply", "-f", "-"]
        if server_side:
            args += ["--server-side", "--field-manager", "tests"]
        return self.kubectl(*args, input=text, check=check)

    def create(self, manifest: dict | str, *, check: bool = True) -> subprocess.CompletedProcess:
        text = manifest if isinstance(manifest, str) else _dump(manifest)
        return self.kubectl("create", "-f", "-", input=text, check=check)

    def get(self, kind: str, name: str | None = None, *, namespaced: bool = True) -> Any:
        args = ["get", kind] + ([name] if name else []) + ["-o", "json"]
        return json.loads(self.kubectl(*args, namespaced=namespaced).stdout)

    def get_or_none(self, kind: str, name: str, *, namespaced: bool = True) -> Any | None:
        res = self.kubectl("get", kind, name, "-o", "json", check=False, namespaced=namespaced)
        if res.returncode != 0:
            if "NotFound" in res.stderr or "not found" in res.stderr:
                return None
            raise KubectlError(("get", kind, name), res.stderr)
        return json.loads(res.stdout)

    def items(self, kind: str, selector: str | None = None) -> list[dict]:
        args = ["get", kind, "-o", "json"] + (["-l", selector] if selector else [])
        return json.loads(self.kubectl(*args).stdout)["items"]

    def patch_status(
        self, kind: str, name: str, patch: dict, kubeconfig: str | None = None, check: bool = True
    ):
        return self.kubectl(
            "patch",
            kind,
            name,
            "--subresource=status",
            "--type=merge",
            "-p",
            json.dumps(patch),
            kubeconfig=kubeconfig,
            check=check,
        )

    def delete(self, kind: str, name: str, *, wait: bool = False) -> None:
        self.kubectl("delete", kind, name, "--ignore-not-found", f"--wait={str(wait).lower()}")


def bound_pvc(
    kube: Kube, claim: str, size: str = "1Gi", access_modes: tuple[str, ...] = ("ReadWriteOnce",)
) -> None:
    """A PersistentVolumeClaim bound to a hostPath PersistentVolume (the PV controller
    binds them), so pods that mount it can be scheduled."""
    pv = f"pv-{kube.namespace}-{claim}"[:63]
    for manifest in hostpath_claim(
        kube.namespace,
        claim,
        volume=pv,
        path=f"/tmp/finetune-test-pv/{pv}",
        size=size,
        access_modes=access_modes,
        storage_class="manual",
    ):
        kube.apply(manifest)


def _dump(manifest: dict | list) -> str:
    if isinstance(manifest, list):
        return yaml.safe_dump_all(manifest)
    return yaml.safe_dump(manifest)


def wait_for(
    check: Callable[[], Any],
    *,
    timeout: float = 30.0,
    interval: float = 0.2,
    what: str = "condition",
) -> Any:
    """Poll `check` until it returns something truthy; fail with `what` at the deadline.

    The last exception or falsy value is reported, so a timeout says what was seen.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            value = check()
            if value:
                return value
            last = value
        except (AssertionError, KubectlError, KeyError, IndexError, TypeError) as exc:
            last = exc
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")
        time.sleep(interval)


def condition(obj: dict, type_: str) -> dict | None:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == type_:
            return c
    return None


def finetunejob_manifest(name: str, *, memory: str = "24Gi", **spec) -> dict:
    """A small valid FineTuneJob on a preset model (planned without any download), reading
    and writing the `data` and `adapters` claims; `spec` keys override or add fields."""
    doc = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"name": "meta-llama/Meta-Llama-3-8B"},
            "dataset": {"uri": "pvc://data/alpaca.jsonl", "format": "alpaca"},
            "training": {"maxSteps": 10},
            "resources": {"gpu": {"count": 1, "memory": memory}},
            "output": {"uri": f"pvc://adapters/{name}"},
        },
    }
    doc["spec"].update(spec)
    return doc
