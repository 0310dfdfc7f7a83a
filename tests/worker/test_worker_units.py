"""Worker pieces that need no training: data rendering and masks, corrupt data, the
termination message, checkpoint selection, status rate limiting and the CLI's config
errors. Fast; run on every `make test`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tinymodel import DATA_DIR, make_tiny_tokenizer
from worker_configs import worker_config_dict

from finetune_worker import checkpoints, data, termination
from finetune_worker.errors import DataError
from finetune_worker.status import StatusReporter

# tiny_model_root and worker_config fixtures
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def _decode_loss_tokens(tokenizer, example) -> str:
    ids = [
        i for i, label in zip(example["input_ids"], example["labels"], strict=True) if label != -100
    ]
    return tokenizer.decode(ids)


@pytest.mark.parametrize(
    "fmt, answer_field",
    [("alpaca", "output"), ("completion", "completion"), ("chat", None), ("text", "text")],
)
def test_each_format_takes_loss_only_on_the_completion(tokenizer, fmt, answer_field):
    records = data.load_records(str(DATA_DIR / f"{fmt}.jsonl"))
    splits = data.prepare_splits(records, fmt, tokenizer, max_length=256, source=fmt)
    assert len(splits.train) == len(records)
    for record, example in zip(records, splits.train, strict=True):
        assert len(example["input_ids"]) == len(example["labels"])
        trained = _decode_loss_tokens(tokenizer, example)
        if fmt == "chat":
            answers = [m["content"] for m in record["messages"] if m["role"] == "assistant"]
            # the assistant's text and its end-of-turn token, nothing of the user's turn
            assert trained == "".join(a + "<|end|>" for a in answers)
        elif fmt == "text":
            assert trained == record["text"] + tokenizer.eos_token
        else:
            assert trained == record[answer_field] + tokenizer.eos_token
            full = tokenizer.decode(example["input_ids"])
            assert full.endswith(record[answer_field] + tokenizer.eos_token)
            assert len(full) > len(trained)  # the prompt is there, just not trained on


def test_chat_masks_every_assistant_turn_in_a_multi_turn_conversation(tokenizer):
    messages = [
        {"role": "user", "content": "What is two plus three?"},
        {"role": "assistant", "content": "Five."},
        {"role": "user", "content": "And ten minus four?"},
        {"role": "assistant", "content": "Six."},
    ]
    example = data.tokenize_example({"messages": messages}, "chat", tokenizer, max_length=256)
    assert _decode_loss_tokens(tokenizer, example) == "Five.<|end|>Six.<|end|>"


def test_eval_fraction_holds_out_rows_and_field_mapping_renames(tokenizer):
    from finetune_api.finetunejob import FieldMapping

    records = data.load_records(str(DATA_DIR / "completion.jsonl"))
    renamed = records.rename_columns({"prompt": "question", "completion": "answer"})
    mapped = data.rename_fields(
        renamed, "completion", FieldMapping(prompt="question", completion="answer"), "x"
    )
    splits = data.prepare_splits(
        mapped, "completion", tokenizer, max_length=256, source="x", eval_fraction=0.25, seed=1
    )
    assert len(splits.eval) == 6 and len(splits.train) == 18
    with pytest.raises(DataError, match="fields.prompt names column 'nope'"):
        data.rename_fields(renamed, "completion", FieldMapping(prompt="nope"), "x")


def test_rows_without_completion_tokens_after_truncation_are_dropped(tokenizer):
    records = data.load_records(str(DATA_DIR / "alpaca.jsonl"))
    with pytest.raises(DataError, match="raise the sequence length"):
        data.prepare_splits(records, "alpaca", tokenizer, max_length=24, source="alpaca")


@pytest.mark.parametrize(
    "name, fmt, message",
    [
        ("alpaca-bad-json", "alpaca", r"cannot read dataset .*alpaca-bad-json.jsonl"),
        ("alpaca-missing-output", "alpaca", r"row 1: field 'output' is missing or null"),
        ("chat-bad-role", "chat", r"row 1: field 'messages' message 1 has role 'robot'"),
    ],
)
def test_corrupt_data_is_a_data_error_naming_row_and_field(tokenizer, name, fmt, message):
    with pytest.raises(DataError, match=message):
        records = data.load_records(str(DATA_DIR / "corrupt" / f"{name}.jsonl"))
        data.prepare_splits(records, fmt, tokenizer, max_length=256, source=str(name))


def test_wrong_format_names_the_missing_columns(tokenizer):
    records = data.load_records(str(DATA_DIR / "text.jsonl"))
    with pytest.raises(
        DataError,
        match=r"format 'alpaca' but has no column\(s\) "
        r"\['instruction', 'output'\]",
    ):
        data.prepare_splits(records, "alpaca", tokenizer, max_length=256, source="text.jsonl")


# --- termination message -----------------------------------------------------------------


def test_termination_message_fits_4k_dropping_details_first(tmp_path):
    summary = {
        "result": "Succeeded",
        "exitCode": 0,
        "reason": "TrainingComplete",
        "message": "m" * 3800,
        "metrics": {
            "peakVRAMBytes": 123,
            "tokensPerSecond": 4567.8,
            "trainLoss": 1.0,
            "evalLoss": 2.0,
        },
        "progress": {
            "step": 10,
            "totalSteps": 10,
            "loss": 0.5,
            "epoch": 1.0,
            "percent": 100.0,
            "learningRate": 0.0002,
            "updatedAt": "2026-12-01T00:00:00Z",
        },
        "adapter": {
            "uri": "pvc://out/adapter",
            "path": "/mnt/out/adapter",
            "sha256": "a" * 64,
            "sizeBytes": 12345,
        },
    }
    path = termination.write_termination_message(summary, tmp_path / "termination-log")
    raw = path.read_bytes()
    assert len(raw) <= 4096
    parsed = json.loads(raw)
    assert parsed["exitCode"] == 0 and parsed["metrics"]["peakVRAMBytes"] == 123
    assert parsed["metrics"]["tokensPerSecond"] == 4567.8
    # progress went first; once it fit, nothing more was dropped
    assert "progress" not in parsed and parsed["adapter"]["sha256"] == "a" * 64
    assert parsed["message"] == "m" * 3800
    small = termination.fit_summary({"result": "Failed", "exitCode": 11, "message": "x" * 9000})
    assert len(small) <= 4096 and json.loads(small)["message"].endswith("...")
    unchanged = {"result": "Succeeded", "exitCode": 0, "message": "ok", "progress": {"step": 1}}
    assert json.loads(termination.fit_summary(unchanged)) == unchanged


# --- checkpoints -------------------------------------------------------------------------


def _fake_checkpoint(root: Path, step: int, spec_hash: str | None, *, payload: bytes = b"w"):
    directory = root / f"checkpoint-{step}"
    directory.mkdir(parents=True)
    (directory / "adapter_model.safetensors").write_bytes(payload)
    (directory / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if spec_hash is not None:
        checkpoints.mark_complete(directory, spec_hash, step)
    return directory


def test_resume_picks_newest_complete_checkpoint_of_this_spec(tmp_path, caplog):
    good = _fake_checkpoint(tmp_path, 20, "hash-a")
    _fake_checkpoint(tmp_path, 10, "hash-a")
    _fake_checkpoint(tmp_path, 30, None)  # killed while saving: no marker
    _fake_checkpoint(tmp_path, 40, "hash-b")  # another spec
    corrupt = _fake_checkpoint(tmp_path, 50, "hash-a")
    (corrupt / "adapter_model.safetensors").write_bytes(b"truncated")
    (tmp_path / "checkpoint-60").mkdir()
    (tmp_path / "checkpoint-60" / checkpoints.MARKER).write_text("{not json")
    caplog.set_level("WARNING")
    assert checkpoints.find_resumable_checkpoint(tmp_path, "hash-a") == good
    text = caplog.text
    assert "checkpoint-60: its COMPLETE marker is unreadable" in text
    assert "checkpoint-50: adapter_model.safetensors does not match the sha256" in text
    assert "checkpoint-40: it was written for spec hash hash-b" in text
    assert "checkpoint-30: it has no COMPLETE marker" in text
    assert checkpoints.find_resumable_checkpoint(tmp_path, "hash-c") is None


def test_resume_under_a_different_plan_says_what_changed(tmp_path, caplog):
    directory = tmp_path / "checkpoint-7"
    directory.mkdir()
    (directory / "adapter_model.safetensors").write_bytes(b"w")
    checkpoints.mark_complete(
        directory, "hash-a", 7, {"method": "lora", "microBatchSize": 8, "gradientAccumulation": 1}
    )
    caplog.set_level("WARNING")
    now = {"method": "lora", "microBatchSize": 4, "gradientAccumulation": 2}
    assert checkpoints.find_resumable_checkpoint(tmp_path, "hash-a", now) == directory
    assert (
        "resuming checkpoint-7 under a different plan (gradientAccumulation: 1 -> 2; "
        "microBatchSize: 8 -> 4)"
    ) in caplog.text
    assert checkpoints.find_resumable_checkpoint(tmp_path / "absent", "hash-a") is None


# --- status reporter rate limit ------------------------------------------------------------


class RecordingClient:
    def __init__(self, fail: bool = False):
        self.patches: list[dict] = []
        self.fail = fail

    def patch_status(self, namespace, name, status):
        if self.fail:
            from finetune_worker.status import StatusPatchError

            raise StatusPatchError("connection refused")
        self.patches.append(json.loads(json.dumps(status)))
        return {}


def test_status_updates_are_rate_limited_and_the_final_one_always_goes():
    now = [100.0]
    client = RecordingClient()
    reporter = StatusReporter("ns", "job", client, min_interval_s=10, clock=lambda: now[0])
    assert reporter.update(progress={"step": 1})
    now[0] += 3
    assert not reporter.update(progress={"step": 2}, metrics={"tokensPerSecond": 5.0})
    now[0] += 3
    assert not reporter.update(progress={"step": 3})
    now[0] += 5  # 11 s after the first patch
    assert reporter.update(progress={"step": 4})
    now[0] += 1
    assert reporter.final(metrics={"peakVRAMBytes": 7})
    assert client.patches == [
        {"progress": {"step": 1}},
        {"progress": {"step": 4}, "metrics": {"tokensPerSecond": 5.0}},
        {"metrics": {"peakVRAMBytes": 7}},
    ]


def test_unreachable_api_warns_once_and_never_raises(caplog):
    caplog.set_level("WARNING")
    reporter = StatusReporter("ns", "job", RecordingClient(fail=True), min_interval_s=0)
    for step in range(5):
        assert reporter.update(progress={"step": step}) is False
    assert reporter.final(metrics={"tokensPerSecond": 1.0}) is False
    assert caplog.text.count("cannot report status") == 1


def _service_account(tmp_path, *, token=True, ca=True):
    """A service-account directory and the pod environment naming it; port 1 refuses."""
    sa_dir = tmp_path / "serviceaccount"
    sa_dir.mkdir(exist_ok=True)
    if token:
        (sa_dir / "token").write_text("secret-token-value\n")
    if ca:
        (sa_dir / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    return {
        "KUBERNETES_SERVICE_HOST": "127.0.0.1",
        "KUBERNETES_SERVICE_PORT": "1",
        "FINETUNE_WORKER_SA_DIR": str(sa_dir),
    }


def test_client_refuses_to_patch_fields_other_than_progress_and_metrics():
    from kubernetes.client import Configuration

    from finetune_worker.status import KubeStatusClient

    client = KubeStatusClient(Configuration(host="https://127.0.0.1:1"))
    with pytest.raises(ValueError, match="only patch"):
        client.patch_status("ns", "job", {"phase": "Succeeded"})


@pytest.mark.parametrize("missing", ["host", "port", "token", "ca"])
def test_no_client_outside_a_cluster(tmp_path, missing):
    from finetune_worker.status import KubeStatusClient

    environ = _service_account(tmp_path, token=missing != "token", ca=missing != "ca")
    environ.pop(
        {"host": "KUBERNETES_SERVICE_HOST", "port": "KUBERNETES_SERVICE_PORT"}.get(
            missing, "unset"
        ),
        None,
    )
    assert KubeStatusClient.from_environment(environ) is None


def test_in_cluster_client_reads_the_service_account_directory(tmp_path):
    from finetune_worker.status import KubeStatusClient, in_cluster_configuration

    environ = _service_account(tmp_path)
    environ["KUBERNETES_SERVICE_HOST"] = "fd00::1"  # an IPv6 literal gets brackets
    configuration = in_cluster_configuration(environ=environ)
    assert configuration.host == "https://[fd00::1]:1"
    assert configuration.ssl_ca_cert == f"{environ['FINETUNE_WORKER_SA_DIR']}/ca.crt"
    assert configuration.retries == 0
    # the token goes into the Authorization header, re-read as it rotates
    auth = configuration.auth_settings()["BearerToken"]
    assert auth["key"] == "authorization" and auth["value"].split() == [
        "bearer",
        "secret-token-value",
    ]
    assert KubeStatusClient.from_environment(environ).server == "https://[fd00::1]:1"


def test_unreachable_api_server_is_one_quick_status_patch_error(tmp_path):
    import time

    from finetune_worker.status import KubeStatusClient, StatusPatchError, in_cluster_configuration

    configuration = in_cluster_configuration(environ=_service_account(tmp_path))
    configuration.host = "https://127.0.0.1:1"  # nothing listens on port 1
    start = time.monotonic()
    with pytest.raises(
        StatusPatchError, match="cannot reach the API server at https://127.0.0.1:1"
    ) as failed:
        KubeStatusClient(configuration).patch_status("ns", "job", {"progress": {"step": 1}})
    assert failed.value.code is None
    assert time.monotonic() - start < 5
    assert "secret-token-value" not in str(failed.value)


def test_refusals_say_what_they_mean_from_the_status_line_only():
    from finetune_worker.status import refusal_message

    forbidden = refusal_message(403, "Forbidden", "ns", "job")
    assert forbidden.startswith(
        "HTTP 403 Forbidden patching finetunejobs/status of ns/job: "
        "the pod's service account may not patch it"
    )
    assert "token" in refusal_message(401, "Unauthorized", "ns", "job")
    assert (
        refusal_message(500, None, "ns", "job") == "HTTP 500 patching finetunejobs/status of ns/job"
    )


def test_the_api_client_never_logs_response_bodies(tmp_path):
    import logging

    from finetune_worker.status import API_CLIENT_LOGGERS, KubeStatusClient

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.DEBUG)  # `--log-level DEBUG`
    try:
        assert KubeStatusClient.from_environment(_service_account(tmp_path)) is not None
        for name in API_CLIENT_LOGGERS:
            assert not logging.getLogger(name).isEnabledFor(logging.DEBUG), name
    finally:
        root.setLevel(level)


# --- CLI: invalid configs ------------------------------------------------------------------


def _run_cli(*args, env_extra=None, tmp_path):
    import os

    log = tmp_path / "termination-log"
    env = {**os.environ, "FINETUNE_WORKER_TERMINATION_LOG": str(log), **(env_extra or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "finetune_worker.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    summary = json.loads(log.read_text()) if log.exists() else None
    return proc, summary


def test_missing_config_exits_10_with_the_path(tmp_path):
    proc, summary = _run_cli("train", "--config", str(tmp_path / "absent.yaml"), tmp_path=tmp_path)
    assert proc.returncode == 10, proc.stderr
    assert "absent.yaml does not exist" in proc.stderr
    assert summary["exitCode"] == 10 and summary["reason"] == "InvalidConfig"


def test_invalid_config_names_the_field_and_exits_10(tmp_path):
    import yaml

    config = worker_config_dict(tmp_path, tmp_path)
    config["spec"]["training"]["learningrate"] = 0.1  # a typo must not train with the default
    config["spec"]["lora"]["r"] = 0
    path = tmp_path / "worker-config.yaml"
    path.write_text(yaml.safe_dump(config))
    proc, summary = _run_cli("train", "--config", str(path), tmp_path=tmp_path)
    assert proc.returncode == 10, proc.stderr
    assert "spec.training.learningrate: Extra inputs are not permitted" in proc.stderr
    assert "spec.lora.r: Input should be greater than or equal to 1" in proc.stderr
    assert "spec.lora.r" in summary["message"]


def test_missing_dataset_on_the_volume_is_a_data_error(tmp_path, tiny_model_root):
    import yaml

    config = worker_config_dict(tmp_path, tiny_model_root, dataset_file="absent.jsonl")
    path = tmp_path / "worker-config.yaml"
    path.write_text(yaml.safe_dump(config))
    proc, summary = _run_cli("train", "--config", str(path), tmp_path=tmp_path)
    assert proc.returncode == 11, proc.stderr
    assert "spec.dataset.uri resolves to" in summary["message"]
    assert "absent.jsonl" in summary["message"] and summary["reason"] == "DataError"


def test_missing_model_on_the_volume_is_a_model_load_error(tmp_path, tiny_model_root):
    import yaml

    config = worker_config_dict(tmp_path, tiny_model_root)
    config["spec"]["model"] = {"uri": "pvc://models/not-there"}
    path = tmp_path / "worker-config.yaml"
    path.write_text(yaml.safe_dump(config))
    proc, summary = _run_cli("train", "--config", str(path), tmp_path=tmp_path)
    assert proc.returncode == 15, proc.stderr
    assert "not-there" in summary["message"] and summary["reason"] == "ModelLoadError"


def test_corrupt_rows_exit_11_naming_the_row(tmp_path, tiny_model_root):
    import yaml

    config = worker_config_dict(
        tmp_path, tiny_model_root, fmt="alpaca", dataset_file="corrupt/alpaca-missing-output.jsonl"
    )
    path = tmp_path / "worker-config.yaml"
    path.write_text(yaml.safe_dump(config))
    proc, summary = _run_cli("train", "--config", str(path), tmp_path=tmp_path)
    assert proc.returncode == 11, proc.stderr
    assert "row 1: field 'output' is missing or null" in summary["message"]
    assert not (tmp_path / "checkpoints").exists()  # failed before any training


def test_eval_split_and_max_samples_from_a_dataset_directory(tmp_path, tokenizer):
    from finetune_api import WorkerConfig
    from finetune_worker.train import load_training_data

    data_dir = tmp_path / "data" / "qa"
    data_dir.mkdir(parents=True)
    lines = (DATA_DIR / "completion.jsonl").read_text().splitlines()
    (data_dir / "train.jsonl").write_text("\n".join(lines[:20]) + "\n")
    (data_dir / "test.jsonl").write_text("\n".join(lines[20:]) + "\n")
    raw = worker_config_dict(tmp_path, tmp_path, fmt="completion", data_dir=tmp_path / "data")
    raw["spec"]["dataset"] = {
        "uri": "pvc://data/qa",
        "format": "completion",
        "evalSplit": "test",
        "maxSamples": 8,
    }
    splits = load_training_data(WorkerConfig.model_validate(raw), tokenizer, None)
    assert len(splits.train) == 8 and len(splits.eval) == 4
    train_prompts = {json.loads(line)["prompt"] for line in lines[:20]}
    test_prompts = {json.loads(line)["prompt"] for line in lines[20:]}
    for example in splits.train:
        assert any(tokenizer.decode(example["input_ids"]).startswith(p) for p in train_prompts)
    for example in splits.eval:
        assert any(tokenizer.decode(example["input_ids"]).startswith(p) for p in test_prompts)


def test_a_spec_without_a_length_trains_one_epoch(tmp_path):
    from worker_configs import rehash, worker_config_dict

    from finetune_api import WorkerConfig
    from finetune_worker.train import build_sft_config

    doc = worker_config_dict(tmp_path, tmp_path)
    del doc["spec"]["training"]["maxSteps"]
    args = build_sft_config(WorkerConfig.model_validate(rehash(doc)), device="cpu")
    assert args.num_train_epochs == 1.0 and args.max_steps == -1


@pytest.mark.parametrize("varlen", [True, False])
def test_an_unpacked_step_is_one_batch_of_the_whole_batch_size_where_rows_can_split_it(
    tmp_path, monkeypatch, varlen
):
    """Unpacked with a varlen kernel, the Trainer's batch is the process's whole step
    (batchSize / worldSize examples, no accumulation), split into rows by the collator;
    without one, micro-batches of the plan's size and its accumulation, as before."""
    from worker_configs import rehash

    from finetune_api import WorkerConfig
    from finetune_worker import attention
    from finetune_worker.train import build_sft_config

    monkeypatch.setattr(attention, "supported", lambda device: varlen)
    doc = worker_config_dict(tmp_path, tmp_path, micro_batch=3, batchSize=10)
    doc["plan"]["gradientAccumulation"] = 4  # ceil(10 / 3): the worst case, a row per 3
    args = build_sft_config(WorkerConfig.model_validate(doc), device="cpu")
    expected = (10, 1) if varlen else (3, 4)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == expected
    assert args.per_device_eval_batch_size == 3
    doc["spec"]["training"]["packing"] = True  # packed: micro-batches of the token budget
    args = build_sft_config(WorkerConfig.model_validate(rehash(doc)), device="cpu")
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (3, 4)


def test_steady_throughput_leaves_out_the_first_steps():
    """status.metrics.steadyTokensPerSecond: tokens/s after the first 3 optimizer steps,
    next to the overall rate that includes them."""
    from types import SimpleNamespace

    from finetune_worker.callbacks import ProgressCallback

    clock = iter([0.0, 10.0, 16.0])  # first step begins, step 3 ends, training ends
    from finetune_worker import callbacks

    real = callbacks.time.perf_counter
    callbacks.time.perf_counter = lambda: next(clock)
    try:
        cb = ProgressCallback(None)
        state = SimpleNamespace(global_step=0, num_input_tokens_seen=0)
        cb.on_step_begin(None, state, None)  # t = 0
        for step in range(1, 9):
            state.global_step, state.num_input_tokens_seen = step, 1000 * step
            if step < 8:
                cb.on_step_end(None, state, None)  # reads the clock once, at step 3 (t = 10)
            else:
                cb.on_train_end(None, state, None)  # t = 16
    finally:
        callbacks.time.perf_counter = real
    assert cb.tokens == 8000 and cb.seconds == 16.0
    assert cb.steady_tokens_per_second() == 5000 / 6.0  # steps 4-8 in the 6 s after step 3


def test_fused_kernels_follow_the_training_device_not_where_the_weights_are(tiny_model_root):
    """Under FSDP the base is still on the CPU when it is prepared: deciding by the weights'
    device silently dropped liger's kernels and the lean LoRA layers the plan assumes.
    In a subprocess: liger also patches transformers' classes, which must not leak into the
    other CPU tests of this process."""
    pytest.importorskip("liger_kernel")
    import subprocess
    import sys

    probe = f"""
from liger_kernel.transformers import LigerRMSNorm
from transformers import AutoModelForCausalLM
from finetune_worker import modeling

def prepared(device):
    base = AutoModelForCausalLM.from_pretrained({str(tiny_model_root / "tiny")!r})
    spec = {{"lora": {{"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj"]}}}}
    model = modeling.prepare_for_training(base, spec, {{"method": "lora"}}, device=device)
    assert next(model.parameters()).device.type == "cpu"  # nothing was moved
    norm = model.get_base_model().model.norm
    fused_norm = getattr(norm.forward, "__func__", None) is LigerRMSNorm.forward
    return fused_norm, model.fused_kernels_applied

print(prepared("cpu"), prepared("cuda"))
"""
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    # the CPU run keeps the stock norm; a CUDA run gets liger's even with CPU-resident weights
    assert out.stdout.strip() == "(False, False) (True, True)", out.stdout
