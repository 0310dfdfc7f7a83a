"""The product path, measured: a FineTuneJob spec -> the operator's planner -> the worker's trainer.

For one GPU memory budget this builds the FineTuneJob spec a user would write (Llama-3-8B
shape, LoRA r=16 unless QLoRA is needed, packing, seq 512), lets the operator's planner choose
method, micro-batch, accumulation and checkpointing for that budget, and runs the worker's own
`train.build_trainer` (trl SFTTrainer subclass, the worker's batching, attention and loss)
on a random-weight model of the shape over the benchmark's realistic-length data. Only the
model loading differs from a pod: the weights are built from the config instead of read.
Each optimizer step is timed (a callback synchronises the GPU at its end).
"""

from __future__ import annotations

import gc
import tempfile
import time
from typing import Any

from . import harness, shapes

HUB_IDS = {
    "llama-3-8b": "meta-llama/Meta-Llama-3-8B",
    "llama-3.2-1b": "meta-llama/Llama-3.2-1B",
    "mistral-7b": "mistralai/Mistral-7B-v0.3",
    "tiny": "bench/tiny",
}


def job_spec(
    memory: str,
    *,
    shape: str = "llama-3-8b",
    method: str = "auto",
    r: int = 16,
    seq_len: int = 512,
    batch_size: int = 96,
    steps: int = 25,
    seed: int = 0,
    lr: float = 2e-4,
    gpu_product: str | None = None,
) -> dict:
    """The FineTuneJob spec of the benchmark job (camelCase, as a user writes it).

    Hyperparameters follow the common recipe (lr 2e-4, weight decay 0.001, clip 0.3, r 16 /
    alpha 32) except dropout 0 (masks could not match across implementations) and the fused
    AdamW. batchSize 96 (packed rows of seqLength tokens per optimizer step) has many divisors,
    so the planner can pick the micro-batch that fills the budget.
    """
    return {
        "model": {"name": HUB_IDS[shape]},
        "dataset": {"uri": "pvc://data/bench.jsonl", "format": "text"},
        "method": method,
        "lora": {"r": r, "alpha": 2 * r, "dropout": 0.0},
        "training": {
            "maxSteps": steps,
            "learningRate": lr,
            "batchSize": batch_size,
            "seqLength": seq_len,
            "packing": True,
            "optimizer": "adamw_torch_fused",
            "scheduler": "constant",
            "warmupSteps": 0,
            "weightDecay": 0.001,
            "maxGradNorm": 0.3,
            "seed": seed,
            "checkpointSteps": 100_000,
            "checkpointMinutes": 0,
        },
        "resources": {
            "gpu": {"memory": memory, **({"product": gpu_product} if gpu_product else {})}
        },
        "output": {"uri": "pvc://out/adapter"},
    }


def plan(spec: dict, shape: str):
    """What the operator would write into status.plan for this spec."""
    from finetune_api import FineTuneJobSpec
    from finetune_operator.planner.api_adapter import plan_for_spec
    from finetune_operator.planner.arch import arch_from_config_json

    arch = arch_from_config_json({**shapes.SHAPES[shape], "model_type": "llama"}, name=shape)
    return plan_for_spec(FineTuneJobSpec.model_validate(spec), arch)


def worker_config(spec: dict, training_plan, workdir: str):
    from finetune_api import FineTuneJobSpec, WorkerConfig, spec_hash

    return WorkerConfig.model_validate(
        {
            "apiVersion": "finetune.dev/v1alpha1",
            "kind": "WorkerConfig",
            "job": {"namespace": "bench", "name": "bench", "uid": "bench"},
            "spec": spec,
            "plan": training_plan.model_dump(by_alias=True, exclude_none=True),
            "paths": {"outputDir": f"{workdir}/out", "checkpointDir": f"{workdir}/checkpoints"},
            "report": {"statusPatch": False, "minIntervalSeconds": 0},
            "specHash": spec_hash(FineTuneJobSpec.model_validate(spec)),
        }
    )


def _clock_readings(clock, cuda: bool) -> dict:
    """A run's peak reserved bytes (the step clock resets the allocator's peak at each step
    when it reads step memory) and, when it read them, its per-step and tensor readings."""
    import torch

    peak = max(clock.peak_reserved, torch.cuda.max_memory_reserved()) if cuda else 0
    return {
        "peak_reserved_bytes": peak,
        **({"step_memory": clock.memory} if clock.memory else {}),
        **({"tensor_bytes": clock.tensors} if clock.tensors else {}),
    }


def bench_tokenizer(vocab_size: int):
    """A stand-in tokenizer: the data is already token ids; the trainer only asks for pad/eos."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<unk>")),
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    tok.model_max_length = 1 << 20
    return tok


def _step_clock(sync_each_step: bool = True, step_memory: bool = False):
    """Per optimizer step wall times. With `sync_each_step` each step ends at a GPU
    synchronisation (exact per-step times, but a sync the job itself may not have); without,
    the times are the host's and `finish()` adds what the GPU still had queued to the last.
    `step_memory`: also each step's allocated bytes at its start and its peak allocated and
    reserved bytes (the allocator's peak is reset at each step start; `peak_reserved` keeps
    the run's), to read what a step adds to what it starts with."""
    import torch
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self.start = None
            self.memory: list[tuple[int, int, int]] = []
            self.peak_reserved = 0
            self.tensors: dict | None = None
            self._at_start = 0

        def on_step_begin(self, args, state, control, **kwargs):
            if self.start is None:
                _sync()
                self.start = time.perf_counter()
            if step_memory:
                self.peak_reserved = max(self.peak_reserved, torch.cuda.max_memory_reserved())
                torch.cuda.reset_peak_memory_stats()
                self._at_start = torch.cuda.memory_allocated()

        def on_step_end(self, args, state, control, **kwargs):
            if sync_each_step:
                _sync()
            if step_memory:
                reserved = torch.cuda.max_memory_reserved()
                self.peak_reserved = max(self.peak_reserved, reserved)
                self.memory.append((self._at_start, torch.cuda.max_memory_allocated(), reserved))
                if len(self.memory) == 2:
                    self.tensors = _tensor_bytes(kwargs.get("model"), kwargs.get("optimizer"))
            now = time.perf_counter()
            self.times.append(now - self.start)
            self.start = now

        def finish(self):
            if self.times and not sync_each_step:
                _sync()
                self.times[-1] += time.perf_counter() - self.start

    def _sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def _tensor_bytes(model, optimizer) -> dict:
        """What the static terms of the memory model count, as the trainer holds them."""
        out: dict = {"trainable": 0, "frozen": 0, "grads": 0, "optimizer_state": 0, "dtypes": {}}
        seen = set()
        for p in model.parameters() if model is not None else []:
            if p.data_ptr() in seen:
                continue
            seen.add(p.data_ptr())
            n = p.numel() * p.element_size()
            out["trainable" if p.requires_grad else "frozen"] += n
            if p.requires_grad:
                out["dtypes"][str(p.dtype)] = out["dtypes"].get(str(p.dtype), 0) + n
            if p.grad is not None:
                out["grads"] += p.grad.numel() * p.grad.element_size()
        inner = getattr(optimizer, "optimizer", optimizer)
        for state in getattr(inner, "state", {}).values():
            for v in state.values():
                if torch.is_tensor(v) and v.is_cuda:
                    out["optimizer_state"] += v.numel() * v.element_size()
        out["optimizer"] = type(inner).__name__
        return out

    return StepClock()


def run(
    base,
    method: str,
    examples: list[dict],
    memory: str,
    *,
    shape: str = "llama-3-8b",
    steps: int = 25,
    warmup: int = 3,
    batch_size: int = 96,
    model_loss: bool = True,
    label: str = "",
    gpu_product: str | None = None,
    log=print,
) -> dict[str, Any]:
    """Plan for `memory`, train `steps` optimizer steps through the worker's trainer, measure."""
    import datasets
    import torch

    from finetune_worker import train
    from finetune_worker.data import TokenizedSplits

    spec = job_spec(
        memory, shape=shape, steps=steps, batch_size=batch_size, gpu_product=gpu_product
    )
    training_plan = plan(spec, shape)
    workdir = tempfile.mkdtemp(prefix="bench-trainer-")
    config = worker_config(spec, training_plan, workdir)
    if training_plan.method != method:
        raise ValueError(
            f"the planner chose {training_plan.method} for {memory}; "
            f"the base was built for {method}"
        )
    row: dict[str, Any] = {
        "kind": "trainer",
        "label": label or f"trainer-{memory}",
        "memory": memory,
        "plan": training_plan.model_dump(by_alias=True),
        "model_loss": model_loss,
    }
    cfg = harness.RunConfig(
        shape=shape,
        method=method,
        r=16,
        alpha=32,
        grad_ckpt=1.0 if training_plan.gradient_checkpointing else 0.0,
        ckpt_layers=training_plan.checkpointed_layers,
    )
    model = harness.prepare(base, cfg)
    splits = TokenizedSplits(
        train=datasets.Dataset.from_dict(
            {
                "input_ids": [e["input_ids"] for e in examples],
                "labels": [e["labels"] for e in examples],
            }
        ),
        eval=None,
        dropped=0,
    )
    trainer = None
    try:
        device = next(model.parameters()).device.type
        trainer, _, _ = train.build_trainer(
            config, model, bench_tokenizer(shapes.SHAPES[shape]["vocab_size"]), splits, device, None
        )
        trainer.model_loss = model_loss
        clock = _step_clock()
        trainer.add_callback(clock)
        sampler = trainer.token_budget_sampler
        groups = list(sampler)  # epoch 0: the order the trainer will draw
        seq = config.spec.training.seq_length
        accum = training_plan.gradient_accumulation
        per_step = [
            sum(
                min(len(examples[i]["input_ids"]), seq)
                for g in groups[s * accum : (s + 1) * accum]
                for i in g
            )
            for s in range(steps)
        ]
        cuda = device == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
        timed = clock.times[warmup:]
        tokens = sum(per_step[warmup : len(clock.times)])
        row.update(
            {
                "steps": len(clock.times),
                "steps_timed": len(timed),
                "seconds": round(sum(timed), 3),
                "tokens_per_s": round(tokens / sum(timed), 1) if timed else None,
                "tokens_per_micro_batch": training_plan.micro_batch_size * seq,
                "real_token_share": round(
                    sum(per_step) / (steps * accum * training_plan.micro_batch_size * seq), 4
                ),
                "step_seconds": [round(t, 4) for t in clock.times],
                "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
                "attn_implementation": trainer.model.config._attn_implementation,
                **_clock_readings(clock, cuda),
                "peak_allocated_bytes": torch.cuda.max_memory_allocated() if cuda else 0,
                "non_torch_bytes": harness.non_torch_bytes() if cuda else 0,
                "predicted_peak_bytes": training_plan.estimated_peak_bytes,
            }
        )
        row["peak_total_GiB"] = round(
            (row["peak_reserved_bytes"] + row["non_torch_bytes"]) / 2**30, 2
        )
        row["budget_GiB"] = round(training_plan.budget_bytes / 2**30, 2)
        flops = harness.flops_per_token(shape, harness.attended_context(examples, seq))
        row["mfu"] = (
            round(row["tokens_per_s"] * flops / harness.PEAK_BF16_FLOPS, 4) if timed else None
        )
    except torch.OutOfMemoryError as exc:
        row["error"] = f"OOM: {str(exc).splitlines()[0][:200]}"
        row["peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
    else:
        row["real_tokens_per_step"] = per_step
    finally:
        if trainer is not None:
            trainer.model.zero_grad(set_to_none=True)
            del trainer
        gc.collect()
    log(
        f"trainer {memory}: {row.get('tokens_per_s')} tokens/s, "
        f"peak {row.get('peak_total_GiB')} GiB, "
        f"plan {method} mb {training_plan.micro_batch_size} "
        f"x {training_plan.gradient_accumulation} "
        f"ckpt {training_plan.gradient_checkpointing}"
    )
    return harness.release(model), row


def user_job(manifest: dict, shape: str, *, steps: int, overrides: dict | None = None) -> dict:
    """A FineTuneJob spec as a user wrote it (an example manifest), with only what a benchmark
    must change: the model becomes the random-weight `shape`, the data the benchmark's, the
    length a fixed number of steps, and the output a scratch path. `overrides` are dotted
    camelCase paths (e.g. {"training.packing": false})."""
    import copy

    spec = copy.deepcopy(manifest["spec"])
    spec["model"] = {"name": HUB_IDS.get(shape, shape)}
    spec["dataset"] = {"uri": "pvc://data/bench.jsonl", "format": "text"}
    spec["output"] = {"uri": "pvc://out/adapter"}
    training = spec.setdefault("training", {})
    training.pop("epochs", None)
    training.update({"maxSteps": steps, "checkpointSteps": 100_000, "checkpointMinutes": 0})
    for key in ("hfTokenSecretRef", "storageSecretRef", "followUp", "image"):
        spec.pop(key, None)
    for dotted, value in (overrides or {}).items():
        node = spec
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        if value is None:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return spec


def run_user_job(
    base,
    spec: dict,
    shape: str,
    examples: list[dict],
    *,
    steps: int,
    warmup: int,
    label: str,
    log=print,
    trainer_args: dict | None = None,
    sync_each_step: bool = True,
    step_memory: bool = False,
    plan_set: dict | None = None,
):
    """Plan `spec` with the operator's planner and train it through the worker's own
    preparation (modeling.prepare_for_training) and trainer, as a pod would.
    `trainer_args`: TrainingArguments fields to change after the worker built the trainer
    (experiments only); `sync_each_step` and `step_memory`: see _step_clock; `plan_set`:
    fields of the planner's plan to change before training (A/B runs of one plan setting,
    e.g. {"compiled_layers": false})."""
    import datasets
    import torch

    from finetune_worker import modeling, train
    from finetune_worker.data import TokenizedSplits

    training_plan = plan(spec, shape)
    if plan_set:
        training_plan = training_plan.model_copy(update=plan_set)
    config = worker_config(spec, training_plan, tempfile.mkdtemp(prefix="bench-job-"))
    row: dict[str, Any] = {
        "kind": "job",
        "label": label,
        "shape": shape,
        "spec": spec,
        "plan": training_plan.model_dump(by_alias=True),
    }
    torch.manual_seed(0)
    targets = train.resolve_target_modules(base, list(config.spec.lora.target_modules))
    model = modeling.prepare_for_training(
        base, train.with_target_modules(config.spec, targets), config.plan
    )
    splits = TokenizedSplits(
        train=datasets.Dataset.from_dict(
            {
                "input_ids": [e["input_ids"] for e in examples],
                "labels": [e["labels"] for e in examples],
            }
        ),
        eval=None,
        dropped=0,
    )
    seq = config.spec.training.seq_length
    trainer = None
    try:
        device = next(model.parameters()).device.type
        cuda = device == "cuda"
        trainer, _, _ = train.build_trainer(
            config, model, bench_tokenizer(shapes.SHAPES[shape]["vocab_size"]), splits, device, None
        )
        micro_tokens: list[int] = []
        collate = trainer.data_collator

        def counting(batch):  # real tokens of each micro-batch, in the order trained
            micro_tokens.append(sum(min(len(e["input_ids"]), seq) for e in batch))
            return collate(batch)

        trainer.data_collator = counting
        for name, value in (trainer_args or {}).items():
            setattr(trainer.args, name, value)
        clock = _step_clock(sync_each_step, step_memory and cuda)
        trainer.add_callback(clock)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
        clock.finish()
        # collator calls per optimizer step: the plan's micro-batches, or one (a whole step's
        # examples, split into rows inside the step) for unpacked jobs
        accum = trainer.args.gradient_accumulation_steps
        per_step = [sum(micro_tokens[s * accum : (s + 1) * accum]) for s in range(len(clock.times))]
        timed = clock.times[warmup:]
        row.update(
            {
                "steps": len(clock.times),
                "steps_timed": len(timed),
                "tokens_per_s": round(sum(per_step[warmup:]) / sum(timed), 1) if timed else None,
                "real_tokens_per_step": per_step,
                "step_seconds": [round(t, 4) for t in clock.times],
                "attn_implementation": trainer.model.config._attn_implementation,
                "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
                **_clock_readings(clock, cuda),
                "non_torch_bytes": harness.non_torch_bytes() if cuda else 0,
                "predicted_peak_bytes": training_plan.estimated_peak_bytes,
            }
        )
        row["peak_total_GiB"] = round(
            (row["peak_reserved_bytes"] + row["non_torch_bytes"]) / 2**30, 2
        )
    except torch.OutOfMemoryError as exc:
        row["error"] = f"OOM: {str(exc).splitlines()[0][:200]}"
    finally:
        if trainer is not None:
            trainer.model.zero_grad(set_to_none=True)
            del trainer
        gc.collect()
    p = training_plan
    log(
        f"job {label}: {row.get('tokens_per_s')} tokens/s, peak {row.get('peak_total_GiB')} GiB "
        f"(predicted {p.estimated_peak_bytes / 2**30:.1f}), plan {p.method} mb "
        f"{p.micro_batch_size} x {p.gradient_accumulation} ckpt {p.gradient_checkpointing}"
        f"{f' ({p.checkpointed_layers} layers)' if p.checkpointed_layers else ''}"
    )
    return harness.release(model), row
