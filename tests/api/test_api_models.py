"""Unit tests for the API models: defaults, round-trips, quantities, spec hash, worker
config, adapter manifest and exit codes. No cluster needed."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from finetune_api import (
    AdapterDeployment,
    AdapterManifest,
    AdapterMerge,
    Condition,
    FineTuneJob,
    FineTuneJobSpec,
    FineTuneJobStatus,
    Phase,
    Reason,
    TrainingPlan,
    WorkerConfig,
    WorkerConfigError,
    WorkerExitCode,
    describe_files,
    format_bytes,
    load_worker_config,
    parse_quantity,
    spec_hash,
    to_k8s,
)
from finetune_api.common import parse_quantity_decimal

ROOT = Path(__file__).resolve().parents[2]
KINDS = {
    "FineTuneJob": FineTuneJob,
    "AdapterMerge": AdapterMerge,
    "AdapterDeployment": AdapterDeployment,
}

MINIMAL_SPEC = {
    "model": {"name": "meta-llama/Meta-Llama-3-8B"},
    "dataset": {"uri": "hf://tatsu-lab/alpaca", "format": "alpaca"},
    "training": {"epochs": 1},
    "resources": {"gpu": {"memory": "24Gi"}},
    "output": {"uri": "pvc://adapters/llama3"},
}


def example_documents() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            docs.append((f"{path.name}#{i}", doc))
    return docs


# --- quantities -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("24Gi", 24 * 2**30),
        ("512Mi", 512 * 2**20),
        ("40G", 40 * 10**9),
        ("1.5Gi", 3 * 2**29),
        ("1e9", 10**9),
        ("100", 100),
        ("1k", 1000),
        ("500m", 1),  # 0.5 bytes rounds up: a budget is never rounded below what was asked
    ],
)
def test_parse_quantity(text, expected):
    assert parse_quantity(text) == expected


def test_parse_quantity_keeps_millis_exact():
    assert parse_quantity_decimal("500m") * 2 == 1


@pytest.mark.parametrize("bad", ["", "Gi", "24GB", "-1Gi", "24 Gi", "1.2.3"])
def test_parse_quantity_rejects_with_an_example(bad):
    with pytest.raises(ValueError, match="24Gi"):
        parse_quantity(bad)


def test_format_bytes():
    assert format_bytes(17 * 2**30 + 2**29) == "17.5Gi"
    assert format_bytes(512) == "512"
    assert format_bytes(3 * 2**20) == "3.0Mi"


# --- defaults -------------------------------------------------------------------------------


def test_minimal_spec_gets_the_documented_defaults():
    spec = FineTuneJobSpec.model_validate(MINIMAL_SPEC)
    assert spec.method == "auto"
    assert (spec.lora.r, spec.lora.alpha, spec.lora.dropout) == (16, 32, 0.05)
    assert spec.lora.target_modules == ["all-linear"]
    assert not spec.lora.use_rs_lora and not spec.lora.use_do_ra
    assert spec.training.micro_batch_size == "auto"
    assert spec.training.seq_length == 2048
    assert spec.training.gradient_checkpointing == "auto"
    assert spec.training.effective_warmup_ratio == 0.03
    assert spec.resources.gpu.count == 1
    assert spec.resources.gpu.resource_name == "nvidia.com/gpu"
    assert spec.quantization is None
    assert spec.quantization_or_default.type == "nf4"
    assert spec.quantization_or_default.double_quant is True
    assert spec.suspend is False
    assert spec.backoff_limit == 2


def test_a_spec_without_training_trains_one_epoch():
    """Model, dataset, GPU memory and output are all a FineTuneJob needs (issue 18)."""
    spec = FineTuneJobSpec.model_validate(
        {k: v for k, v in MINIMAL_SPEC.items() if k != "training"}
    )
    assert spec.training.epochs is None and spec.training.max_steps is None
    assert spec.training.effective_epochs == 1.0
    assert spec.training.batch_size == 16
    # A length given explicitly is kept; both at once is still an error.
    assert (
        FineTuneJobSpec.model_validate(
            {**MINIMAL_SPEC, "training": {"epochs": 3}}
        ).training.effective_epochs
        == 3
    )
    with pytest.raises(ValidationError, match="at most one of spec.training.epochs"):
        FineTuneJobSpec.model_validate({**MINIMAL_SPEC, "training": {"epochs": 1, "maxSteps": 5}})


def test_default_target_modules_are_not_shared_between_instances():
    a = FineTuneJobSpec.model_validate(MINIMAL_SPEC)
    a.lora.target_modules.append("q_proj")
    assert FineTuneJobSpec.model_validate(MINIMAL_SPEC).lora.target_modules == ["all-linear"]


def test_camel_case_on_the_wire_and_snake_case_in_python():
    spec = FineTuneJobSpec(**{**MINIMAL_SPEC, "training": {"max_steps": 5}})
    wire = to_k8s(spec)
    assert wire["training"]["maxSteps"] == 5
    assert wire["lora"]["useRSLoRA"] is False
    assert "max_steps" not in json.dumps(wire)


def test_unknown_spec_fields_are_rejected_naming_the_field():
    with pytest.raises(ValidationError) as err:
        FineTuneJobSpec.model_validate({**MINIMAL_SPEC, "lora": {"r": 8, "rank": 8}})
    assert "lora.rank" in ".".join(str(p) for p in err.value.errors()[0]["loc"])


def test_status_tolerates_fields_from_newer_versions():
    status = FineTuneJobStatus.model_validate({"phase": "Running", "somethingNew": 1})
    assert status.phase is Phase.RUNNING


def test_inline_credentials_are_not_accepted():
    with pytest.raises(ValidationError):
        FineTuneJobSpec.model_validate({**MINIMAL_SPEC, "hfToken": "hf_secret"})
    with pytest.raises(ValidationError):
        FineTuneJobSpec.model_validate(
            {**MINIMAL_SPEC, "hfTokenSecretRef": {"name": "hf", "token": "hf_secret"}}
        )


def test_yaml_integer_quantity_is_read_as_a_quantity():
    spec = FineTuneJobSpec.model_validate(
        {**MINIMAL_SPEC, "resources": {"gpu": {"memory": 8000000000}}}
    )
    assert parse_quantity(spec.resources.gpu.memory) == 8 * 10**9


# --- round trips ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, doc", example_documents(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_examples_round_trip(name, doc):
    model = KINDS[doc["kind"]].model_validate(doc)
    wire = to_k8s(model)
    assert KINDS[doc["kind"]].model_validate(wire) == model
    # Everything the user wrote survives (defaults may be added, nothing is lost or renamed).
    assert _is_subset(doc["spec"], wire["spec"]), name


def _is_subset(small, big) -> bool:
    if isinstance(small, dict):
        return isinstance(big, dict) and all(
            k in big and _is_subset(v, big[k]) for k, v in small.items()
        )
    if isinstance(small, list):
        return (
            isinstance(big, list)
            and len(small) == len(big)
            and all(_is_subset(a, b) for a, b in zip(small, big, strict=True))
        )
    return small == big or (isinstance(small, int | float) and float(small) == float(big))


def test_full_status_round_trips_with_metav1_times():
    status = FineTuneJobStatus.model_validate(
        {
            "observedGeneration": 3,
            "phase": "Running",
            "conditions": [
                {
                    "type": "Running",
                    "status": "True",
                    "reason": Reason.TRAINING,
                    "message": "step 10/30",
                    "lastTransitionTime": "2026-11-29T14:00:00Z",
                    "observedGeneration": 3,
                }
            ],
            "plan": {
                "method": "qlora",
                "reason": "bf16 base does not fit",
                "estimatedPeakBytes": 10,
                "breakdown": {"baseWeights": 4, "activations": 6},
                "microBatchSize": 2,
                "gradientAccumulation": 8,
                "gradientCheckpointing": True,
                "trainableParams": 1000,
            },
            "progress": {
                "step": 10,
                "totalSteps": 30,
                "percent": 33.3,
                "loss": 1.25,
                "updatedAt": "2026-11-29T14:01:02.123456+00:00",
            },
            "metrics": {"peakVRAMBytes": 123, "peakVRAM": "123", "tokensPerSecond": 99.5},
            "adapter": {"uri": "pvc://a/b", "sizeBytes": 5, "sha256": "ab"},
            "startTime": "2026-11-29T14:00:00Z",
        }
    )
    wire = to_k8s(status)
    assert wire["conditions"][0]["lastTransitionTime"] == "2026-11-29T14:00:00Z"
    # metav1.Time has second precision; anything finer would be churn on every write.
    assert wire["progress"]["updatedAt"] == "2026-11-29T14:01:02Z"
    assert wire["metrics"]["peakVRAMBytes"] == 123
    assert wire["plan"]["breakdown"]["baseWeights"] == 4
    assert FineTuneJobStatus.model_validate(wire) == FineTuneJobStatus.model_validate(wire)
    assert to_k8s(FineTuneJobStatus.model_validate(wire)) == wire


def test_condition_has_the_metav1_shape():
    fields = set(Condition.model_json_schema(by_alias=True)["properties"])
    assert fields == {
        "type",
        "status",
        "observedGeneration",
        "lastTransitionTime",
        "reason",
        "message",
    }
    with pytest.raises(ValidationError):
        Condition.model_validate(
            {
                "type": "Running",
                "status": "Yes",
                "reason": "X",
                "lastTransitionTime": "2026-11-29T14:00:00Z",
            }
        )


# --- spec hash ------------------------------------------------------------------------------


def test_spec_hash_ignores_defaults_written_out_and_scheduling_knobs():
    base = FineTuneJobSpec.model_validate(MINIMAL_SPEC)
    explicit = FineTuneJobSpec.model_validate(
        {
            **MINIMAL_SPEC,
            "lora": {"r": 16, "alpha": 32},
            "suspend": True,
            "backoffLimit": 7,
            # The product, like the queue, is scheduling: hashing it would re-plan existing jobs.
            "resources": {"gpu": {"memory": "24576Mi", "product": "NVIDIA-H200"}, "queueName": "q"},
        }
    )
    assert spec_hash(base) == spec_hash(explicit)
    assert len(spec_hash(base)) == 64


@pytest.mark.parametrize(
    "change",
    [
        {"lora": {"r": 8}},
        {"training": {"epochs": 2}},
        {"method": "qlora"},
        {"allowedMethods": ["lora", "qlora"]},
        {"resources": {"gpu": {"memory": "16Gi"}}},
        {"model": {"name": "meta-llama/Meta-Llama-3-8B", "revision": "abc123"}},
    ],
)
def test_spec_hash_changes_with_training_relevant_fields(change):
    base = FineTuneJobSpec.model_validate(MINIMAL_SPEC)
    assert spec_hash(FineTuneJobSpec.model_validate({**MINIMAL_SPEC, **change})) != spec_hash(base)


# --- worker config --------------------------------------------------------------------------

PLAN = {
    "method": "lora",
    "reason": "fits",
    "estimatedPeakBytes": 2**30,
    "microBatchSize": 4,
    "gradientAccumulation": 4,
    "gradientCheckpointing": False,
    "trainableParams": 1000,
}


def worker_config_dict() -> dict:
    spec = FineTuneJobSpec.model_validate(MINIMAL_SPEC)
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "WorkerConfig",
        "job": {"namespace": "ns", "name": "job", "uid": "u-1"},
        "spec": to_k8s(spec),
        "plan": PLAN,
        "paths": {
            "outputDir": "/out",
            "checkpointDir": "/ckpt",
            "claimMounts": {"adapters": "/mnt/adapters"},
        },
        "specHash": spec_hash(spec),
    }


def test_worker_config_loads_and_defaults_reporting(tmp_path):
    path = tmp_path / "worker-config.yaml"
    path.write_text(yaml.safe_dump(worker_config_dict()))
    config = load_worker_config(path)
    assert isinstance(config, WorkerConfig)
    assert config.report.min_interval_seconds == 10 and config.report.status_patch
    assert config.plan.micro_batch_size == 4
    assert config.paths.resolve_pvc("pvc://adapters/llama3") == Path("/mnt/adapters/llama3")
    assert config.spec_hash == spec_hash(config.spec)


def test_worker_config_json_is_accepted(tmp_path):
    path = tmp_path / "worker-config.json"
    path.write_text(json.dumps(worker_config_dict()))
    assert load_worker_config(path).job.uid == "u-1"


def test_worker_config_errors_name_file_and_field(tmp_path):
    data = worker_config_dict()
    data["spec"]["training"]["seqLength"] = 8
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(WorkerConfigError) as err:
        load_worker_config(path)
    assert str(path) in str(err.value)
    assert "spec.training.seqLength" in str(err.value)
    assert "(got 8)" in str(err.value)


def test_worker_config_missing_file_says_what_to_check(tmp_path):
    with pytest.raises(WorkerConfigError, match="does not exist.*volumes"):
        load_worker_config(tmp_path / "nope.yaml")


def test_worker_config_unmounted_claim_is_named():
    config = WorkerConfig.model_validate(worker_config_dict())
    with pytest.raises(ValueError, match="'data' is not mounted"):
        config.paths.resolve_pvc("pvc://data/x.jsonl")


# --- adapter manifest -----------------------------------------------------------------------


def test_adapter_manifest_round_trip_and_file_digests(tmp_path):
    (tmp_path / "adapter_model.safetensors").write_bytes(b"weights")
    (tmp_path / "adapter_config.json").write_text("{}")
    files = describe_files(tmp_path)
    manifest = AdapterManifest(
        spec_hash="h",
        base_model={"name": "gpt2", "revision": "abc"},
        method="qlora",
        r=8,
        alpha=16,
        target_modules=["q_proj", "v_proj"],
        files=files,
        metrics={"peakVRAMBytes": 42, "tokensPerSecond": 1.5},
        fine_tune_job={"namespace": "ns", "name": "job", "uid": "u"},
        created_at="2026-11-29T14:00:00Z",
    )
    manifest.write(tmp_path)
    again = AdapterManifest.read(tmp_path)
    assert again == manifest
    assert again.size_bytes == len(b"weights") + 2
    assert {f.name for f in again.files} == {"adapter_model.safetensors", "adapter_config.json"}
    # The manifest is not part of what it describes.
    assert [f.name for f in describe_files(tmp_path)] == [f.name for f in files]
    weights = next(f for f in files if f.name == "adapter_model.safetensors")
    assert weights.sha256 == hashlib.sha256(b"weights").hexdigest()
    raw = json.loads((tmp_path / "finetune-manifest.json").read_text())
    assert raw["kind"] == "AdapterManifest" and raw["metrics"]["peakVRAMBytes"] == 42


def test_adapter_manifest_digest_depends_on_content(tmp_path):
    def manifest(content: bytes) -> AdapterManifest:
        (tmp_path / "w.bin").write_bytes(content)
        return AdapterManifest(
            spec_hash="h",
            base_model={"name": "gpt2"},
            method="lora",
            r=8,
            alpha=16,
            target_modules=["q_proj"],
            files=describe_files(tmp_path),
            created_at="2026-11-29T14:00:00Z",
        )

    assert manifest(b"a").digest != manifest(b"b").digest


# --- plan and exit codes --------------------------------------------------------------------


def test_training_plan_requires_the_decisions():
    with pytest.raises(ValidationError):
        TrainingPlan.model_validate({"method": "lora"})
    with pytest.raises(ValidationError):
        TrainingPlan.model_validate({**PLAN, "method": "auto"})


def test_worker_exit_codes_are_the_contract():
    assert {c.name: int(c) for c in WorkerExitCode} == {
        "SUCCESS": 0,
        "INVALID_CONFIG": 10,
        "DATA_ERROR": 11,
        "CUDA_OOM": 12,
        "NON_FINITE_LOSS": 13,
        "STORAGE_ERROR": 14,
        "MODEL_LOAD_ERROR": 15,
        "ENVIRONMENT_ERROR": 16,
    }
    assert WorkerExitCode.CUDA_OOM.reason == Reason.CUDA_OUT_OF_MEMORY == "CUDAOutOfMemory"
    assert all(code.meaning for code in WorkerExitCode)
    assert [c for c in WorkerExitCode if c.retryable] == [WorkerExitCode.STORAGE_ERROR]


def test_finished_phases():
    assert {p for p in Phase if p.finished} == {Phase.SUCCEEDED, Phase.FAILED}


def test_the_worker_report_is_one_contract_for_both_sides():
    """The termination message the worker writes is what the operator reads, by one model:
    unknown keys are dropped, the adapter's digest has one name, metrics are status metrics."""
    import json

    from finetune_api import WorkerReport
    from finetune_operator.status import termination_summary
    from finetune_worker.termination import report_document

    written = report_document(
        {
            "result": "Succeeded",
            "exitCode": 0,
            "reason": "TrainingComplete",
            "message": "done",
            "metrics": {
                "tokensPerSecond": 12.5,
                "steadyTokensPerSecond": 14.0,
                "worldSize": 2,
                "peakVRAMPerRankBytes": [1, 2],
                "notAMetric": 1,
            },
            "adapter": {"uri": "pvc://out/a", "path": "/mnt/out/a", "sha256": "ab", "sizeBytes": 3},
        }
    )
    assert "notAMetric" not in written["metrics"]
    pod = {
        "status": {
            "containerStatuses": [
                {
                    "name": "worker",
                    "state": {"terminated": {"exitCode": 0, "message": json.dumps(written)}},
                }
            ]
        }
    }
    read = termination_summary(pod)
    assert read == written and read["adapter"]["sha256"] == "ab"
    assert WorkerReport.model_validate(read).metrics.steady_tokens_per_second == 14.0
    # a log tail (FallbackToLogsOnError) or a report of another shape is not a report
    pod["status"]["containerStatuses"][0]["state"]["terminated"]["message"] = "Traceback ..."
    assert termination_summary(pod) is None
    assert report_document({"result": "Exploded", "exitCode": 1, "message": "m"}) == {
        "result": "Exploded",
        "exitCode": 1,
        "message": "m",
    }  # outcome kept, model refused
