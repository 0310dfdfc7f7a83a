"""The operator's settings: read from its environment when it starts, never at import."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import kopf
import pytest

from finetune_operator.constants import DEFAULT_SERVING_IMAGE, DEFAULT_WORKER_IMAGE
from finetune_operator.reconcile.settings import OperatorSettings


def test_settings_are_parsed_from_the_environment_given():
    s = OperatorSettings.from_env(
        {
            "FINETUNE_WORKER_IMAGE": "registry/worker:2",
            "FINETUNE_SERVING_IMAGE": "registry/vllm:1",
            "FINETUNE_NAMESPACES": "team-a,team-*",
            "FINETUNE_RESYNC_SECONDS": "5",
            "FINETUNE_PVC_ROOT": "/pvcs",
            "FINETUNE_ALLOW_HUB": "false",
            "FINETUNE_METRICS_PORT": "0",
            "FINETUNE_REFERENCE_WAIT_SECONDS": "4",
            "FINETUNE_GPU_TOLERATIONS": '[{"key": "nvidia.com/gpu", "operator": "Exists"}]',
            "FINETUNE_SERVING_DEFAULTS": json.dumps({"cpu": "4", "maxLorasPerBatch": 2}),
            "FINETUNE_PEERING": "true",
            "FINETUNE_PEERING_NAME": "pair",
            "FINETUNE_GPU_NODES_CACHE_SECONDS": "0",
        }
    )
    assert (s.worker_image, s.namespaces, s.resync_seconds) == (
        "registry/worker:2",
        ["team-a", "team-*"],
        5.0,
    )
    assert (s.pvc_root, s.allow_hub, s.metrics_port, s.reference_wait_seconds) == (
        "/pvcs",
        False,
        0,
        4.0,
    )
    assert s.gpu_tolerations == [{"key": "nvidia.com/gpu", "operator": "Exists"}]
    assert (s.serving.image, s.serving.cpu, s.serving.max_loras_per_batch) == (
        "registry/vllm:1",
        "4",
        2,
    )
    assert (s.peering, s.peering_name) == (True, "pair")
    assert s.gpu_nodes_cache_seconds == 0.0  # every plan lists the nodes (the tests do)
    with pytest.raises(ValueError, match="FINETUNE_GPU_NODES_CACHE_SECONDS='-1'"):
        OperatorSettings.from_env({"FINETUNE_GPU_NODES_CACHE_SECONDS": "-1"})


def test_unset_environment_gives_the_defaults():
    s = OperatorSettings.from_env({})
    assert s == OperatorSettings()
    assert (s.worker_image, s.serving.image) == (DEFAULT_WORKER_IMAGE, DEFAULT_SERVING_IMAGE)
    assert (s.peering, s.peering_name) == (False, "finetune-operator")
    assert s.gpu_nodes_cache_seconds == 60.0


def test_an_image_in_the_serving_defaults_wins_over_the_serving_image():
    s = OperatorSettings.from_env(
        {
            "FINETUNE_SERVING_IMAGE": "registry/vllm:1",
            "FINETUNE_SERVING_DEFAULTS": '{"image": "mine/vllm:3"}',
        }
    )
    assert s.serving.image == "mine/vllm:3"


def test_importing_the_operator_reads_no_environment():
    """A value that would stop the operator at start-up does not break an import."""
    code = "import finetune_operator.main, finetune_operator.reconcile.settings; print('ok')"
    env = {**os.environ, "FINETUNE_RESYNC_SECONDS": "soon", "FINETUNE_SERVING_DEFAULTS": "{"}
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_a_bad_environment_stops_the_operator_at_start_up(monkeypatch):
    """kopf retries a start-up handler's ordinary errors forever; a permanent one stops it."""
    from finetune_operator import main

    monkeypatch.setenv("FINETUNE_RESYNC_SECONDS", "soon")
    memo = kopf.Memo()
    with pytest.raises(kopf.PermanentError, match="FINETUNE_RESYNC_SECONDS='soon'"):
        asyncio.run(main.configure(settings=kopf.OperatorSettings(), memo=memo))
    assert "operator_settings" not in memo
