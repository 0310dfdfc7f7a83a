"""The demo driver's pure parts: what it prints and how it reads the manifest (no cluster)."""

from __future__ import annotations

from pathlib import Path

import yaml

from finetune_dev.demo import cli

ROOT = Path(__file__).resolve().parents[2]


def test_progress_line_shows_what_the_worker_reported():
    status = {
        "phase": "Running",
        "progress": {"step": 12, "totalSteps": 30, "loss": 7.51181, "etaSeconds": 20},
        "metrics": {"tokensPerSecond": 373.4},
    }
    assert cli.progress_line(status) == "Running  step 12/30  loss 7.5118  eta 20s  373 tokens/s"
    assert cli.progress_line({}) == "Pending (waiting for the operator)"


def test_plan_is_described_with_its_reason():
    plan = {
        "method": "qlora",
        "microBatchSize": 4,
        "gradientAccumulation": 4,
        "gradientCheckpointing": True,
        "estimatedPeakBytes": 20 * 2**30,
        "budgetBytes": 24 * 2**30,
        "trainableParams": 41_943_040,
        "reason": "bf16 LoRA needs 31Gi",
    }
    text = cli.describe_plan(plan)
    assert text.startswith(
        "qlora (micro-batch 4 x gradient accumulation 4, gradient checkpointing on)"
    )
    assert "predicted peak 20480 MiB of a 24576 MiB budget" in text
    assert "41,943,040 trainable parameters" in text
    assert text.endswith("Why: bf16 LoRA needs 31Gi")


def test_claims_map_to_folders_under_the_data_folder(tmp_path):
    paths = cli.DemoPaths(tmp_path)
    assert paths.claim("pvc://demo-adapters/demo") == tmp_path / "pvc" / "demo-adapters" / "demo"
    assert paths.claim("pvc://demo-data/a.jsonl") == tmp_path / "pvc" / "demo-data" / "a.jsonl"


def test_max_steps_overrides_the_committed_manifest():
    args = cli.parse_args(["--max-steps", "4"])
    manifest = cli.Demo(args).load_manifest()
    committed = yaml.safe_load((ROOT / "examples" / "finetunejob-demo.yaml").read_text())
    assert manifest["spec"]["training"]["maxSteps"] == 4
    assert manifest["spec"]["training"]["checkpointSteps"] <= 4
    assert committed["spec"]["training"]["maxSteps"] != 4  # the file itself is unchanged
    # Every claim the demo manifest names is one the demo creates a volume for.
    spec = manifest["spec"]
    uris = [
        spec["model"]["uri"],
        spec["dataset"]["uri"],
        spec["output"]["uri"],
        spec["followUp"]["merge"]["output"],
    ]
    assert {u[len("pvc://") :].split("/")[0] for u in uris} <= set(cli.CLAIMS)


def test_the_committed_dataset_is_what_the_manifest_reads():
    args = cli.parse_args([])
    assert Path(args.dataset) == ROOT / "examples" / "data" / "alpaca-tiny.jsonl"
    assert len(Path(args.dataset).read_text().splitlines()) >= 40
