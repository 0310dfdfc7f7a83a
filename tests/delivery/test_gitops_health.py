"""The Argo CD health checks (Lua), run in a Lua 5.1 interpreter as Argo CD runs them.

Argo CD evaluates a health script with the live object as the global `obj` and reads
`status` and `message` from the table it returns. The shipped ConfigMap patch must carry
exactly the shipped scripts.
"""

from __future__ import annotations

import pytest
import yaml
from charttest import CHART
from lupa import lua51

# Lua 5.1: the dialect of gopher-lua, which Argo CD embeds. `lupa` is in the dev extra.

ARGOCD = CHART / "argocd"
FTJ_SCRIPT = ARGOCD / "finetunejob-health.lua"
AD_SCRIPT = ARGOCD / "adapterdeployment-health.lua"


def health(script, obj: dict) -> dict:
    lua = lua51.LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = _to_lua(lua, obj)
    # Argo CD runs the file as a chunk; its `return hs` is the result.
    result = lua.execute(script.read_text())
    return {"status": result["status"], "message": result["message"]}


def _to_lua(lua, value):
    if isinstance(value, dict):
        return lua.table_from({k: _to_lua(lua, v) for k, v in value.items()})
    if isinstance(value, list):
        return lua.table_from([_to_lua(lua, v) for v in value])
    return value


def cond(type_: str, status: str = "True", reason: str = "", message: str = "") -> dict:
    return {"type": type_, "status": status, "reason": reason, "message": message}


def ftj(
    phase: str | None, *conditions: dict, generation: int = 1, observed: int | None = 1, **status
) -> dict:
    obj = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "j", "generation": generation},
        "spec": {},
    }
    if phase is not None:
        obj["status"] = {"phase": phase, "conditions": list(conditions), **status}
        if observed is not None:
            obj["status"]["observedGeneration"] = observed
    return obj


@pytest.mark.parametrize(
    "obj, want_status, want_in_message",
    [
        (ftj(None), "Progressing", "plan"),
        (
            ftj("Pending", cond("Planned", reason="PlanFits", message="lora, micro-batch 4")),
            "Progressing",
            "micro-batch 4",
        ),
        (ftj("Planning"), "Progressing", "Planning"),
        (
            ftj("Queued", cond("Queued", reason="WaitingForQuota", message="waiting for Kueue")),
            "Progressing",
            "waiting for Kueue",
        ),
        (
            ftj(
                "Running",
                cond("Running", reason="Training", message="step 40 of 100"),
                progress={"percent": 40},
            ),
            "Progressing",
            "(40%)",
        ),
        (
            ftj(
                "Succeeded",
                cond("Succeeded", reason="AdapterSaved", message="adapter at pvc://a/b"),
            ),
            "Healthy",
            "adapter at pvc://a/b",
        ),
        (
            ftj(
                "Failed",
                cond("Running", "False"),
                cond("Failed", reason="OutOfMemory", message="CUDA out of memory at step 3"),
            ),
            "Degraded",
            "OutOfMemory: CUDA out of memory at step 3",
        ),
        (
            ftj(
                "Suspended",
                cond("Suspended", reason="SuspendedByUser", message="suspended by spec.suspend"),
            ),
            "Suspended",
            "suspended by spec.suspend",
        ),
        # A status computed for an older spec is not evidence of anything yet.
        (
            ftj("Succeeded", cond("Succeeded"), generation=2, observed=1),
            "Progressing",
            "generation 2",
        ),
    ],
)
def test_finetunejob_health(obj, want_status, want_in_message):
    got = health(FTJ_SCRIPT, obj)
    assert got["status"] == want_status, got
    assert want_in_message in got["message"], got


def ad(*conditions: dict, generation: int = 1, observed: int = 1, status: bool = True) -> dict:
    obj = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "AdapterDeployment",
        "metadata": {"name": "d", "generation": generation},
        "spec": {},
    }
    if status:
        obj["status"] = {"observedGeneration": observed, "conditions": list(conditions)}
    return obj


@pytest.mark.parametrize(
    "obj, want_status, want_in_message",
    [
        (ad(status=False), "Progressing", "Waiting"),
        (
            ad(cond("Progressing", reason="Rollout", message="1 of 1 replicas starting")),
            "Progressing",
            "1 of 1 replicas starting",
        ),
        (
            ad(cond("Available", reason="MinimumReplicasAvailable", message="serving 2 adapters")),
            "Healthy",
            "serving 2 adapters",
        ),
        (
            ad(cond("Available", "False"), cond("Ready", reason="AdaptersLoaded", message="ok")),
            "Healthy",
            "ok",
        ),
        (
            ad(
                cond("Available"),
                cond(
                    "Degraded", reason="AdapterChecksumMismatch", message="adapter sha256 differs"
                ),
            ),
            "Degraded",
            "AdapterChecksumMismatch: adapter sha256 differs",
        ),
        (ad(cond("Available", "False"), cond("Degraded", "False")), "Progressing", "Waiting"),
        (ad(cond("Available"), generation=3, observed=2), "Progressing", "generation 3"),
    ],
)
def test_adapterdeployment_health(obj, want_status, want_in_message):
    got = health(AD_SCRIPT, obj)
    assert got["status"] == want_status, got
    assert want_in_message in got["message"], got


def test_argocd_configmap_patch_ships_the_same_scripts():
    data = yaml.safe_load((ARGOCD / "argocd-cm-patch.yaml").read_text())["data"]
    assert data == {
        "resource.customizations.health.finetune.dev_FineTuneJob": FTJ_SCRIPT.read_text(),
        "resource.customizations.health.finetune.dev_AdapterDeployment": AD_SCRIPT.read_text(),
    }


def test_health_checks_are_documented():
    doc = (CHART.parent.parent / "docs" / "argocd.md").read_text()
    for name in (
        "finetunejob-health.lua",
        "adapterdeployment-health.lua",
        "argocd-cm-patch.yaml",
        "resource.customizations.health.finetune.dev_FineTuneJob",
    ):
        assert name in doc
