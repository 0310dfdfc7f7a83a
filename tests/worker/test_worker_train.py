"""The worker trains for real on the CPU: a tiny Llama and committed datasets.

LoRA (bf16 base) and QLoRA (NF4 base; bitsandbytes runs NF4 on the CPU) each train a few
steps and must memorise; the adapter reloads with identical outputs; merging reproduces
base+adapter; SIGTERM saves a checkpoint that the next run resumes from; a diverging
run and CUDA out-of-memory exit with their documented codes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from kubetest import wait_for
from worker_configs import merge_adapter, worker_config_dict

from finetune_api import AdapterManifest, WorkerConfig

torch = pytest.importorskip("torch")

# tiny_model_root and worker_config fixtures
pytestmark = pytest.mark.slow


def _config(tmp_path, model_root, **kwargs) -> WorkerConfig:
    return WorkerConfig.model_validate(worker_config_dict(tmp_path, model_root, **kwargs))


def _dataset_loss(model, config: WorkerConfig) -> float:
    """Mean completion-token loss over the training file, as the worker tokenizes it."""
    from finetune_worker import train

    tokenizer = train.load_tokenizer(config, None)
    splits = train.load_training_data(config, tokenizer, None)
    losses = []
    model.eval()
    with torch.no_grad():
        for example in splits.train:
            ids = torch.tensor([example["input_ids"]])
            labels = torch.tensor([example["labels"]])
            losses.append(float(model(input_ids=ids, labels=labels).loss))
    return sum(losses) / len(losses)


def _load_base(config: WorkerConfig):
    from finetune_worker import train

    model, _ = (
        train.load_base_model(
            config.spec,
            config.plan,
            None,
            "cpu",
            str(config.paths.resolve_pvc(config.spec.model.uri)),
        ),
        None,
    )
    return model


def _load_adapter(config: WorkerConfig, adapter_dir: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(_load_base(config), str(adapter_dir)).eval()


def _probe() -> torch.Tensor:
    return torch.tensor([[1, 4, 60, 61, 62, 63, 64, 65, 6]])


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_root):
    """One LoRA training run on the chat data, shared by the tests that inspect it."""
    from finetune_worker.train import run_training

    tmp = tmp_path_factory.mktemp("lora")
    config = _config(tmp, tiny_model_root, fmt="chat", max_steps=14, eval_fraction=0.2)
    return config, run_training(config)


def test_lora_memorises_reports_and_reloads_identically(lora_run):
    config, result = lora_run
    assert result.global_step == 14 and not result.preempted and result.resumed_from is None
    # loss on the training rows falls well below the untrained model's
    before = _dataset_loss(_load_base(config), config)
    reloaded = _load_adapter(config, result.adapter_dir)
    after = _dataset_loss(reloaded, config)
    assert after < 0.5 * before, (before, after)
    # the adapter on disk gives exactly the outputs of the model that was trained
    trained = result.model.eval()
    with torch.no_grad():
        assert torch.equal(trained(_probe()).logits, reloaded(_probe()).logits)
    # measured numbers: CPU runs report peak RSS, plus throughput and an eval loss
    metrics = result.metrics
    assert metrics["device"] == "cpu" and metrics["peakRSSBytes"] > 100 * 2**20
    assert metrics["tokensPerSecond"] > 0 and metrics["samplesPerSecond"] > 0
    # the steady rate leaves the first steps out: fewer tokens over less time
    assert metrics["steadyTokensPerSecond"] > 0
    assert result.eval_loss is not None and metrics["evalLoss"] == result.eval_loss
    assert result.progress["step"] == 14 and result.progress["totalSteps"] == 14


def test_adapter_manifest_lists_every_file_with_its_digest(lora_run):
    from finetune_worker.adapter import verify_adapter

    config, result = lora_run
    manifest = verify_adapter(result.adapter_dir)
    names = {f.name for f in manifest.files}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= names
    assert manifest.spec_hash == config.spec_hash and manifest.method == "lora"
    assert manifest.base_model.uri == "pvc://models/tiny" and manifest.r == 8
    assert set(manifest.target_modules) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    assert manifest.metrics.tokens_per_second == result.metrics["tokensPerSecond"]
    assert manifest.digest == result.adapter_digest
    # nothing temporary is left beside the adapter
    assert [p.name for p in result.adapter_dir.parent.iterdir()] == ["adapter"]


def test_merged_model_matches_base_plus_adapter(lora_run, tmp_path, tiny_model_root):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from finetune_worker.cli import main

    _, result = lora_run
    # as the merge Job runs it: a MergeConfig written by the operator
    merged_dir = tmp_path / "merged-fp32"
    merge_config = tmp_path / "merge-config.yaml"
    merge_config.write_text(
        json.dumps(
            {
                "apiVersion": "finetune.dev/v1alpha1",
                "kind": "MergeConfig",
                "merge": {"namespace": "default", "name": "tiny-merge", "uid": "0000-merge"},
                "baseModel": {"uri": "pvc://models/tiny"},
                "adapterDir": str(result.adapter_dir),
                "outputDir": str(merged_dir),
                "dtype": "float32",
                "claimMounts": {"models": str(tiny_model_root)},
            }
        )
    )
    assert main(["merge", "--config", str(merge_config)]) == 0
    base = AutoModelForCausalLM.from_pretrained(tiny_model_root / "tiny", dtype=torch.float32)
    reference = PeftModel.from_pretrained(base, str(result.adapter_dir)).eval()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    with torch.no_grad():
        expected, got = reference(_probe()).logits, merged(_probe()).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert (merged_dir / "model.safetensors").is_file()
    assert (merged_dir / "tokenizer.json").is_file()


def test_qlora_trains_on_nf4_base_with_bf16_embeddings_and_merges_unquantised(
    tmp_path, tiny_model_root
):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    from finetune_worker.train import run_training

    config = _config(
        tmp_path, tiny_model_root, fmt="alpaca", method="qlora", max_steps=12, packing=True
    )
    result = run_training(config)
    model = result.model
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.weight.quant_type == "nf4" for m in layers)
    # frozen embeddings and head stay bf16 (the common recipe upcasts them to fp32)
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert model.get_output_embeddings().weight.dtype == torch.bfloat16
    before = _dataset_loss(_load_base(config), config)
    reloaded = _load_adapter(config, result.adapter_dir)
    after = _dataset_loss(reloaded, config)
    assert after < 0.6 * before, (before, after)
    # trl keeps QLoRA adapters in bf16 (as the QLoRA paper does); peft reloads them into
    # fp32 tensors, so compare the weights exactly and the outputs at the trained dtype
    trained = {n: p for n, p in model.named_parameters() if "lora_" in n}
    loaded = {n: p for n, p in reloaded.named_parameters() if "lora_" in n}
    assert trained.keys() == loaded.keys() and trained
    for name, param in trained.items():
        assert torch.equal(loaded[name].to(param.dtype), param), name
        loaded[name].data = loaded[name].data.to(param.dtype)
    with torch.no_grad():
        assert torch.equal(reloaded(_probe()).logits, model.eval()(_probe()).logits)
    assert AdapterManifest.read(result.adapter_dir).method == "qlora"

    merged_dir = tmp_path / "merged"
    assert merge_adapter(result.adapter_dir, merged_dir, tiny_model_root) == 0
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert merged.dtype == torch.bfloat16
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())
    assert "quantization_config" not in json.loads((merged_dir / "config.json").read_text())


def _write_config(tmp_path: Path, config: dict) -> Path:
    import yaml

    path = tmp_path / "worker-config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_sigterm_saves_a_checkpoint_and_the_next_run_resumes_from_it(
    tmp_path, tiny_model_root, caplog
):
    from finetune_worker.checkpoints import MARKER, find_resumable_checkpoint
    from finetune_worker.train import run_training

    # A run far longer than the test: on a fast CPU 200 steps finish in seconds, before the
    # signal could arrive.
    max_steps = 100_000
    raw = worker_config_dict(
        tmp_path, tiny_model_root, fmt="completion", max_steps=max_steps, checkpointSteps=2
    )
    path = _write_config(tmp_path, raw)
    log = tmp_path / "termination-log"
    env = {**os.environ, "FINETUNE_WORKER_TERMINATION_LOG": str(log)}
    # Output to a file, not a pipe nobody reads while waiting: a full pipe buffer would
    # block the worker mid-log and the checkpoint would never come.
    out_path = tmp_path / "worker.out"
    with open(out_path, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "finetune_worker.cli", "train", "--config", str(path)],
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
    checkpoints = Path(raw["paths"]["checkpointDir"])
    try:
        # Any complete checkpoint: older ones are rotated away, so checkpoint-2 itself may be
        # gone again between two polls.
        wait_for(
            lambda: any(checkpoints.glob(f"checkpoint-*/{MARKER}")) or proc.poll() is not None,
            timeout=120,
            what="the first checkpoint",
        )
        assert proc.poll() is None, "the worker exited early:\n" + out_path.read_text()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = out_path.read_text()
    assert proc.returncode == 143, output
    summary = json.loads(log.read_text())
    assert summary["result"] == "Preempted"
    stopped_at = summary["progress"]["step"]
    assert 2 <= stopped_at < max_steps
    newest = find_resumable_checkpoint(checkpoints, raw["specHash"])
    assert newest == checkpoints / f"checkpoint-{stopped_at}"  # saved on SIGTERM, complete
    assert not (Path(raw["paths"]["outputDir"]) / "adapter_config.json").exists()

    # a save interrupted by a hard kill leaves a directory without a marker: skipped
    partial = checkpoints / f"checkpoint-{stopped_at + 1}"
    partial.mkdir()
    (partial / "adapter_model.safetensors").write_bytes(b"half")
    resumed_config = WorkerConfig.model_validate(
        {**raw, "spec": {**raw["spec"], "training": {**raw["spec"]["training"]}}}
    )
    resumed_config.spec.training.max_steps = stopped_at + 2  # not in the spec hash's way
    caplog.set_level("INFO")
    result = run_training(resumed_config)
    assert result.resumed_from == checkpoints / f"checkpoint-{stopped_at}"
    assert result.global_step == stopped_at + 2
    assert f"skipping checkpoint {partial}: it has no COMPLETE marker" in caplog.text


def test_diverging_loss_exits_13_after_three_non_finite_steps(tmp_path, tiny_model_root):
    from safetensors.torch import load_file, save_file

    from finetune_worker.cli import main

    broken_root = tmp_path / "models"
    broken = broken_root / "tiny"
    import shutil

    shutil.copytree(tiny_model_root / "tiny", broken)
    weights = load_file(broken / "model.safetensors")
    weights["model.norm.weight"] = torch.full_like(weights["model.norm.weight"], float("nan"))
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    raw = worker_config_dict(tmp_path, broken_root, fmt="text", max_steps=10)
    log = tmp_path / "termination-log"
    os.environ["FINETUNE_WORKER_TERMINATION_LOG"] = str(log)
    try:
        code = main(["train", "--config", str(_write_config(tmp_path, raw))])
    finally:
        del os.environ["FINETUNE_WORKER_TERMINATION_LOG"]
    assert code == 13
    summary = json.loads(log.read_text())
    assert summary["reason"] == "NonFiniteLoss"
    assert "for 3 consecutive steps (up to step 3)" in summary["message"]


def test_cuda_out_of_memory_exits_12_naming_peak_and_plan(tmp_path, tiny_model_root, monkeypatch):
    from finetune_worker import train
    from finetune_worker.cli import main

    def exhausted(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    # The first allocation that fails is the trainer's; everything before it is real.
    monkeypatch.setattr(train, "build_trainer", exhausted)
    raw = worker_config_dict(
        tmp_path, tiny_model_root, fmt="text", micro_batch=8, checkpointing=True
    )
    log = tmp_path / "termination-log"
    monkeypatch.setenv("FINETUNE_WORKER_TERMINATION_LOG", str(log))
    assert main(["train", "--config", str(_write_config(tmp_path, raw))]) == 12
    message = json.loads(log.read_text())["message"]
    assert "CUDA out of memory before the first training step" in message
    assert (
        "method=lora, micro-batch=8, gradient accumulation=1, gradient checkpointing=on, "
        "predicted peak=1.0Gi of a 24.0Gi budget"
    ) in message
    assert "Tried to allocate 2.00 GiB" in message


def test_checkpoints_are_also_saved_on_time(tmp_path, tiny_model_root, monkeypatch, lora_run):
    from finetune_worker.checkpoints import checkpoint_problem
    from finetune_worker.train import run_training

    # step-based only (every 1000 steps): the final step is the one checkpoint
    assert lora_run[1].checkpoints == [14]
    config = _config(tmp_path, tiny_model_root, fmt="text", max_steps=3)
    config.spec.training.checkpoint_minutes = 0.00001  # spec.training.checkpointMinutes
    result = run_training(config)
    assert result.checkpoints == [1, 2, 3]
    root = Path(config.paths.checkpoint_dir)
    # checkpointLimit (default 2) keeps the newest two, each complete
    assert sorted(p.name for p in root.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    for step in (2, 3):
        assert checkpoint_problem(root / f"checkpoint-{step}", config.spec_hash) is None


def test_merge_refuses_a_corrupt_adapter_and_an_invalid_config(
    lora_run, tmp_path, tiny_model_root, monkeypatch
):
    import shutil

    from finetune_worker.cli import main

    _, result = lora_run
    log = tmp_path / "termination-log"
    monkeypatch.setenv("FINETUNE_WORKER_TERMINATION_LOG", str(log))
    corrupt = tmp_path / "adapter"
    shutil.copytree(result.adapter_dir, corrupt)
    weights = corrupt / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    code = main(
        [
            "merge",
            "--adapter",
            str(corrupt),
            "--output",
            str(tmp_path / "merged"),
            "--claim-mount",
            f"models={tiny_model_root}",
        ]
    )
    assert code == 14
    summary = json.loads(log.read_text())
    assert summary["reason"] == "StorageError"
    assert "adapter_model.safetensors is missing or does not match the sha256" in summary["message"]
    assert not (tmp_path / "merged" / "model.safetensors").exists()

    bad = tmp_path / "merge-config.yaml"
    bad.write_text(
        json.dumps(
            {
                "apiVersion": "finetune.dev/v1alpha1",
                "kind": "MergeConfig",
                "adapterDir": str(result.adapter_dir),
                "dtype": "float8",
            }
        )
    )
    assert main(["merge", "--config", str(bad)]) == 10
    message = json.loads(log.read_text())["message"]
    assert "outputDir: Field required" in message and "dtype" in message


def _packed_trainer(tmp_path, tiny_model_root, **kwargs):
    from finetune_worker import train

    config = _config(tmp_path, tiny_model_root, fmt="alpaca", max_steps=2, packing=True, **kwargs)
    tokenizer = train.load_tokenizer(config, None)
    splits = train.load_training_data(config, tokenizer, None)
    model, _ = train.load_model(config, None, "cpu")
    trainer, _, _ = train.build_trainer(config, model, tokenizer, splits, "cpu", None)
    return config, splits, trainer


def test_packing_trains_on_varlen_rows_of_the_token_budget(tmp_path, tiny_model_root):
    """spec.training.packing: every micro-batch is one padding-free row of exactly
    micro-batch x seqLength tokens with varlen attention (what the H200 benchmark measured)."""
    from finetune_worker import attention

    config, splits, trainer = _packed_trainer(tmp_path, tiny_model_root)
    budget = config.plan.micro_batch_size * config.spec.training.seq_length
    assert trainer.model.config._attn_implementation == attention.VARLEN
    seen = 0
    for batch in trainer.get_train_dataloader():
        assert "attention_mask" not in batch
        assert tuple(batch["input_ids"].shape) == (1, budget)
        cu = batch["cu_seq_lens_q"].tolist()
        assert cu[0] == 0 and cu[-1] == budget
        seen += int((batch["position_ids"][0] == 0).sum()) - (
            1 if cu[-2] < budget and batch["labels"][0, cu[-2] :].eq(-100).all() else 0
        )
    assert seen == len(splits.train)  # every example exactly once per epoch
    output = trainer.train()
    assert trainer.state.global_step == 2 and output.training_loss > 0


def test_packing_falls_back_to_dense_batches_without_a_varlen_kernel(
    tmp_path, tiny_model_root, monkeypatch
):
    """torch < 2.10 on a GPU: length-grouped batches padded to a multiple of 64, no mask."""
    from finetune_worker import attention, train

    monkeypatch.setattr(attention, "supported", lambda device: False)
    config, splits, trainer = _packed_trainer(tmp_path, tiny_model_root)
    budget = config.plan.micro_batch_size * config.spec.training.seq_length
    assert trainer.model.config._attn_implementation != attention.VARLEN
    seen = 0
    for batch in trainer.get_train_dataloader():
        assert "attention_mask" not in batch and "cu_seq_lens_q" not in batch
        rows, width = batch["input_ids"].shape
        assert width % train.DENSE_BATCH_MULTIPLE == 0
        assert rows * width <= budget + rows * train.DENSE_BATCH_MULTIPLE
        seen += rows
    assert seen == len(splits.train)


def test_without_packing_each_micro_batch_is_its_examples_in_one_varlen_row(
    tmp_path, tiny_model_root
):
    """packing: false: the micro-batch keeps its number of whole examples, padding-free."""
    from finetune_worker import attention, train

    config = _config(tmp_path, tiny_model_root, fmt="alpaca", max_steps=2, packing=False)
    tokenizer = train.load_tokenizer(config, None)
    splits = train.load_training_data(config, tokenizer, None)
    model, _ = train.load_model(config, None, "cpu")
    trainer, _, _ = train.build_trainer(config, model, tokenizer, splits, "cpu", None)
    assert trainer.model.config._attn_implementation == attention.VARLEN
    micro = config.plan.micro_batch_size
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
    starts = int((batch["position_ids"][0] == 0).sum())
    padding_tail = int(
        batch["cu_seq_lens_q"][-2] < batch["input_ids"].shape[1]
        and batch["labels"][0, int(batch["cu_seq_lens_q"][-2]) :].eq(-100).all()
    )
    assert starts - padding_tail == micro  # whole examples, as many as the plan says
    assert batch["input_ids"].shape[1] % train.DENSE_BATCH_MULTIPLE == 0
    assert batch["input_ids"].shape[1] < micro * config.spec.training.seq_length or micro == 1
    output = trainer.train()
    assert trainer.state.global_step == 2 and output.training_loss > 0


def test_trainer_loss_is_the_models_own_and_equals_trls(tmp_path, tiny_model_root):
    """FineTuneTrainer trains on the model's loss, not trl's fused head: same number."""
    _, _, trainer = _packed_trainer(tmp_path, tiny_model_root)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    items = int((batch["labels"][:, 1:] != -100).sum())
    trainer.model.train()
    ours = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=items)
    trainer.model_loss = False
    trls = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=items)
    assert torch.allclose(ours, trls, rtol=1e-4)
    trainer.model_loss = True
    halved = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=2 * items)
    assert torch.allclose(halved, ours / 2, rtol=1e-4)  # normalised over the optimizer step


# --- unpacked steps: a step's whole examples in as few varlen rows as the budget allows ----


def _unpacked_trainer(tmp_path, tiny_model_root, *, float32=False, **kwargs):
    """An unpacked trainer on alpaca data; the adapters start from the seed, as in run_training."""
    from transformers import set_seed

    from finetune_worker import train

    config = _config(tmp_path, tiny_model_root, fmt="alpaca", packing=False, **kwargs)
    tokenizer = train.load_tokenizer(config, None)
    splits = train.load_training_data(config, tokenizer, None)
    set_seed(config.spec.training.seed)
    model, _ = train.load_model(config, None, "cpu")
    if float32:
        model = model.float()
    trainer, _, progress = train.build_trainer(config, model, tokenizer, splits, "cpu", None)
    return config, splits, trainer, progress


def _synthetic(lengths, seed=3):
    generator = torch.Generator().manual_seed(seed)
    data = []
    for n in lengths:
        ids = torch.randint(10, 400, (n,), generator=generator).tolist()
        data.append({"input_ids": ids, "labels": [-100] * (n // 3) + ids[n // 3 :]})
    return data


def _forward_kwargs(model) -> list[dict]:
    """Records the keyword arguments of every forward of `model`."""
    calls = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(dict(kwargs)), with_kwargs=True
    )
    return calls


class _TwoRowStep:
    """A float32 unpacked trainer (micro-batch 1: rows of 128 tokens) and one step of four
    examples that needs two rows of very different sizes: one example of 120 tokens (the row
    padded to 128), three of 60 together (padded to 64). Records every forward's keyword
    arguments and how many forwards had run when each no_sync began."""

    def __init__(self, tmp_path, tiny_model_root, monkeypatch):
        import contextlib

        from finetune_worker import packing

        config, _, trainer, _ = _unpacked_trainer(
            tmp_path, tiny_model_root, micro_batch=1, float32=True
        )
        tokenizer, seq = trainer.processing_class, config.spec.training.seq_length
        self.data = data = _synthetic([120, 30, 20, 10])
        budget = config.plan.micro_batch_size * seq
        self.step = packing.make_step_collator(tokenizer, seq, budget, pad_to_multiple_of=64)(data)
        self.rows = self.step[packing.ROWS_KEY]
        assert budget == 128 and [r["end"] - r["start"] for r in self.rows] == [128, 64]
        assert self.rows[0]["items"] > 1.5 * self.rows[1]["items"]
        self.one_row = packing.make_varlen_collator(tokenizer, seq, pad_to_multiple_of=64)(data)
        self.items = torch.tensor(packing.trained_tokens(self.step))
        assert int(self.items) == packing.trained_tokens(self.one_row)
        trainer.current_gradient_accumulation_steps = 1  # the Trainer's loop sets it per step
        self.trainer, self.model = trainer, trainer.model
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():  # LoRA's B starts at zero, which leaves A without gradients
            for name, parameter in self.model.named_parameters():
                if "lora_B" in name:
                    parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))
        self.forwards = _forward_kwargs(self.model)
        self.no_sync_at: list[int] = []

        @contextlib.contextmanager
        def no_sync(model):
            self.no_sync_at.append(len(self.forwards))
            yield

        monkeypatch.setattr(trainer.accelerator, "no_sync", no_sync)

    def gradients(self, batch, items):
        self.model.zero_grad()
        loss = self.trainer.training_step(self.model, batch, items)
        grads = {n: p.grad.clone() for n, p in self.model.named_parameters() if p.requires_grad}
        return loss, grads

    def assert_same(self, rows, one):
        (loss_rows, grads_rows), (loss_one, grads_one) = rows, one
        assert torch.allclose(loss_rows, loss_one, rtol=1e-6, atol=0)
        assert grads_rows.keys() == grads_one.keys() and grads_rows
        assert all(grad.abs().max() > 1e-4 for grad in grads_one.values())
        for name, grad in grads_one.items():
            assert torch.allclose(grads_rows[name], grad, rtol=1e-5, atol=2e-7), name


@pytest.mark.parametrize("normalised", ["by the step's items", "row means, weighted"])
def test_a_step_run_as_several_rows_has_the_gradients_of_one_row(
    tmp_path, tiny_model_root, monkeypatch, normalised
):
    """Two rows of very different sizes give the loss and the adapter gradients of the same
    examples in one row: every row is normalised by the whole step's trained tokens, so the
    split is only how the step runs. A per-row normalisation (mean of the rows' means) would
    be off by far more than the tolerance. The first row runs under no_sync, the last not (DDP
    all-reduces once). Second case: a model whose loss takes no `num_items_in_batch` (each
    row's loss its own mean), which the trainer weights by the row's share of the step."""
    from finetune_worker import packing

    case = _TwoRowStep(tmp_path, tiny_model_root, monkeypatch)
    items = case.items
    if normalised == "row means, weighted":
        case.trainer.model_accepts_loss_kwargs = False
        items = None
    rows = case.gradients(case.step, items)
    assert len(case.forwards) == 2  # one forward per row ...
    assert all(packing.ROWS_KEY not in call for call in case.forwards)  # ... never the list
    assert [call["input_ids"].shape[1] for call in case.forwards] == [128, 64]
    assert case.no_sync_at == [0]  # the first row without gradient sync, the last with
    one = case.gradients(case.one_row, items)
    assert len(case.forwards) == 3 and case.no_sync_at == [0]
    case.assert_same(rows, one)

    # the power of the comparison: per-row means averaged are far from the step's mean
    with torch.no_grad():
        case.trainer.model_accepts_loss_kwargs = False
        means = [
            case.trainer.compute_loss(case.model, packing.step_row(case.step, row))
            for row in case.rows
        ]
    assert not torch.allclose(sum(means) / len(means), one[0], rtol=1e-3)


def test_under_fsdp_a_rank_runs_as_many_rows_as_the_busiest_rank_the_extra_ones_empty(
    tmp_path, tiny_model_root, monkeypatch
):
    """FSDP gathers parameters in every forward, so each rank runs as many rows as the rank
    with the most (one gather of the counts per step); the extra rows have no trained tokens
    and change neither the loss nor the gradients. Simulated in one process: another rank
    has two rows more than this one."""
    case = _TwoRowStep(tmp_path, tiny_model_root, monkeypatch)
    trainer = case.trainer
    assert trainer._most_rows_of_any_rank(2) == 2  # one process: its own count
    monkeypatch.setattr(trainer, "is_fsdp_enabled", True, raising=False)
    asked = []
    monkeypatch.setattr(
        trainer, "_most_rows_of_any_rank", lambda count: asked.append(count) or count + 2
    )
    rows = case.gradients(case.step, case.items)
    assert asked == [2] and len(case.forwards) == 4
    assert case.no_sync_at == [0, 1, 2]  # all but the last row under no_sync
    for empty in case.forwards[2:]:
        assert (empty["labels"] == -100).all() and empty["cu_seq_lens_q"].tolist() == [0, 64]
    one = case.gradients(case.one_row, case.items)  # no row list: the step as it is
    assert len(case.forwards) == 5
    case.assert_same(rows, one)
    # a step of one row, on a rank whose neighbour has three: two empty rows after it
    from finetune_worker import packing

    collate = packing.make_step_collator(
        trainer.processing_class, 128, 10_000, pad_to_multiple_of=64
    )
    batch = collate(case.data)
    assert len(batch[packing.ROWS_KEY]) == 1
    again = case.gradients(batch, case.items)
    assert len(case.forwards) == 8 and case.no_sync_at == [0, 1, 2, 5, 6]
    case.assert_same(again, one)


def test_unpacked_rows_take_the_plans_row_budget(tmp_path, tiny_model_root):
    """plan.rowTokens, where the planner filled the memory between two micro-batch sizes, is
    the rows' token budget; without it a row holds micro-batch x seqLength tokens. Micro-batch
    1 x 128 tokens splits every 5-example step (42-72 tokens each) into two or more rows;
    rowTokens 384 makes each one row, never wider than the budget."""
    from transformers import set_seed

    from finetune_worker import packing, train

    counts = {}
    for row_tokens in (None, 384):
        raw = worker_config_dict(
            tmp_path / str(row_tokens), tiny_model_root, fmt="alpaca", micro_batch=1, batchSize=5
        )
        if row_tokens:
            raw["plan"]["rowTokens"] = row_tokens
        config = WorkerConfig.model_validate(raw)
        assert train.row_budget(config) == (row_tokens or 128)
        tokenizer = train.load_tokenizer(config, None)
        splits = train.load_training_data(config, tokenizer, None)
        set_seed(config.spec.training.seed)
        model, _ = train.load_model(config, None, "cpu")
        trainer, _, _ = train.build_trainer(config, model, tokenizer, splits, "cpu", None)
        batches = list(trainer.get_train_dataloader())
        counts[row_tokens] = [len(b[packing.ROWS_KEY]) for b in batches]
        widest = max(row["end"] - row["start"] for b in batches for row in b[packing.ROWS_KEY])
        assert widest <= train.row_budget(config)
    assert all(n >= 2 for n in counts[None]) and all(n == 1 for n in counts[384])


def test_unpacked_steps_of_several_rows_train_like_steps_of_one_row(tmp_path, tiny_model_root):
    """End to end through build_trainer: rows of 128 tokens (micro-batch 1; the examples are
    42-72 tokens) make every step of 5 examples two or more rows; rows of 8 x 128 tokens make
    it one. Same seed, same steps (ceil(24 / 5) = 5 for the epoch), the same losses, and the
    same real tokens counted for tokens/s."""
    from finetune_worker import packing

    runs = {}
    for name, micro in (("rows", 1), ("one row", 8)):
        config, splits, trainer, progress = _unpacked_trainer(
            tmp_path / name.replace(" ", "-"),
            tiny_model_root,
            micro_batch=micro,
            batchSize=5,
            max_steps=None,
            epochs=1,
            float32=True,  # bf16 rounds differently in rows of other lengths
        )
        assert trainer.args.per_device_train_batch_size == 5
        assert trainer.args.gradient_accumulation_steps == 1
        counts = [len(b[packing.ROWS_KEY]) for b in trainer.get_train_dataloader()]
        output = trainer.train()
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        runs[name] = (counts, losses, progress.tokens)
        assert trainer.state.global_step == -(-len(splits.train) // 5) == len(losses) == 5
        assert output.training_loss > 0
    (counts_rows, losses_rows, tokens_rows), (counts_one, losses_one, tokens_one) = (
        runs["rows"],
        runs["one row"],
    )
    assert all(count >= 2 for count in counts_rows) and counts_one == [1] * 5
    assert losses_rows == pytest.approx(losses_one, rel=1e-5)
    pad = trainer.processing_class.pad_token_id
    real = sum(
        sum(1 for token in ids[: config.spec.training.seq_length] if token != pad)
        for ids in splits.train["input_ids"]
    )
    assert tokens_rows == tokens_one == real
