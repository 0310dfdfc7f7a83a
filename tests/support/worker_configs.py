"""Fixtures for worker tests: the tiny model (built once per session) and worker configs.

The fixtures are registered for tests/worker/ by its conftest.py; the functions are imported
by name (bench scripts use them too).
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
from tinymodel import DATA_DIR, make_tiny_model


@pytest.fixture(scope="session")
def tiny_model_root(tmp_path_factory) -> Path:
    """A directory standing in for a mounted PVC: `<root>/tiny` holds the model."""
    root = tmp_path_factory.mktemp("models")
    make_tiny_model(root / "tiny")
    return root


def worker_config_dict(
    tmp_path: Path,
    model_root: Path,
    *,
    fmt: str = "chat",
    method: str = "lora",
    max_steps: int = 6,
    seq_length: int = 128,
    micro_batch: int = 4,
    packing: bool = False,
    checkpointing: bool = False,
    data_dir: Path = DATA_DIR,
    dataset_file: str | None = None,
    eval_fraction: float | None = None,
    **training,
) -> dict:
    """A valid WorkerConfig as the operator would write it (camelCase, as YAML)."""
    spec_training = {
        # the step the plan below describes (micro-batch x accumulation 1 x one process)
        "batchSize": micro_batch,
        "maxSteps": max_steps,
        "learningRate": 1e-2,
        "seqLength": seq_length,
        "packing": packing,
        "checkpointSteps": 1000,
        "warmupSteps": 0,
        "scheduler": "constant",
        "seed": 7,
        **training,
    }
    spec = {
        "model": {"uri": "pvc://models/tiny"},
        "dataset": {
            "uri": f"pvc://data/{dataset_file or fmt + '.jsonl'}",
            "format": fmt,
            **({"evalFraction": eval_fraction} if eval_fraction else {}),
        },
        "method": method,
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "training": spec_training,
        "resources": {"gpu": {"memory": "24Gi"}},
        "output": {"uri": "pvc://out/adapter"},
    }
    from finetune_api import FineTuneJobSpec, spec_hash

    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "WorkerConfig",
        "job": {"namespace": "default", "name": "tiny", "uid": "0000-tiny"},
        "spec": spec,
        "plan": {
            "method": method,
            "estimatedPeakBytes": 1 << 30,
            "budgetBytes": 24 << 30,
            "microBatchSize": micro_batch,
            "gradientAccumulation": 1,
            "gradientCheckpointing": checkpointing,
            "trainableParams": 1,
        },
        "paths": {
            "outputDir": str(tmp_path / "out" / "adapter"),
            "checkpointDir": str(tmp_path / "checkpoints"),
            "claimMounts": {
                "models": str(model_root),
                "data": str(data_dir),
                "out": str(tmp_path / "out"),
            },
        },
        "report": {"statusPatch": False, "minIntervalSeconds": 0},
        "specHash": spec_hash(FineTuneJobSpec.model_validate(spec)),
    }


def rehash(config: dict) -> dict:
    """The same config with specHash recomputed after editing the spec."""
    from finetune_api import FineTuneJobSpec, spec_hash

    config = copy.deepcopy(config)
    config["specHash"] = spec_hash(FineTuneJobSpec.model_validate(config["spec"]))
    return config


@pytest.fixture
def worker_config(tmp_path, tiny_model_root):
    """Factory: `worker_config(fmt="alpaca", method="qlora", ...)` -> WorkerConfig."""
    from finetune_api import WorkerConfig

    def make(**kwargs) -> WorkerConfig:
        return WorkerConfig.model_validate(worker_config_dict(tmp_path, tiny_model_root, **kwargs))

    return make


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def merge_adapter(adapter_dir: Path, output: Path, models_root: Path, *extra: str) -> int:
    """`finetune-worker merge` of a trained adapter into its base (the manifest's pvc://models
    source, mounted at `models_root`), as a user runs it by hand; -> its exit code."""
    from finetune_worker.cli import main

    return main(
        [
            "merge",
            "--adapter",
            str(adapter_dir),
            "--output",
            str(output),
            "--claim-mount",
            f"models={models_root}",
            *extra,
        ]
    )
