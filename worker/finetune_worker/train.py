"""`run_training`: one fine-tuning run from a WorkerConfig, start to adapter.

The sequence is fixed (as in transformers' run_clm): resolve sources, load tokenizer and
data (cheap failures first), load and prepare the model, train with resume, evaluate,
write the adapter and manifest, and return the measured numbers. Failures surface as
WorkerError subclasses; the CLI turns them into exit codes. Nothing here calls
sys.exit, so the benchmark can call it in-process.

Under torchrun (plan.worldSize > 1, `finetune-worker launch`) every rank runs this same
sequence: the Trainer and accelerate do DDP or FSDP from the environment, and
distributed.py makes the worker's own decisions agree. Only global rank 0 writes the
adapter and manifest and reports (`TrainResult.reports`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from finetune_api import WorkerConfig, spec_hash, uri_scheme
from finetune_api.constants import ROW_PAD_MULTIPLE

from . import distributed, preflight, sources
from .checkpoints import find_resumable_checkpoint
from .distributed import World
from .errors import DataError, InvalidConfigError, ModelLoadError, StorageError, WorkerError
from .memory import (
    cap_gpu_memory,
    out_of_memory_message,
    peak_memory_metrics,
    world_memory_metrics,
)
from .status import StatusReporter

if TYPE_CHECKING:  # the heavy libraries load inside the steps of a run, not at import
    import torch
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer
    from transformers.trainer_utils import TrainOutput
    from trl import SFTConfig, SFTTrainer

    from finetune_api import AdapterManifest, FineTuneJobSpec, TrainingPlan
    from finetune_api.finetunejob import TrainingSpec

    from .callbacks import CheckpointCallback, ProgressCallback
    from .data import TokenizedSplits
    from .packing import PackedBatchSampler, TokenBudgetBatchSampler

log = logging.getLogger(__name__)

NON_FINITE_PATIENCE = 3


@dataclass
class TrainResult:
    """What a run produced and measured (metrics use the status field names)."""

    metrics: dict[str, Any]
    progress: dict[str, Any]
    adapter_dir: Path | None = None
    adapter_digest: str | None = None
    adapter_size_bytes: int | None = None
    resumed_from: Path | None = None
    preempted: bool = False
    global_step: int = 0
    train_loss: float | None = None
    eval_loss: float | None = None
    checkpoints: list[int] = field(default_factory=list)
    reports: bool = True
    """Whether this process reports the run (global rank 0): the other ranks of a distributed
    run write neither the adapter nor the summary."""
    model: Any = field(default=None, repr=False)
    """The trained peft model, for in-process callers (tests, the benchmark)."""


def read_secret_file(path: str | None, what: str) -> str | None:
    if not path:
        return None
    try:
        value = Path(path).read_text().strip()
    except OSError as exc:
        raise InvalidConfigError(
            f"{what} file {path} cannot be read ({exc}); check that the "
            "Secret exists and is mounted"
        ) from None
    return value or None


def training_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# --- translators: spec -> library configuration ----------------------------------------


def local_path(source: sources.Source) -> str | None:
    return str(source.local_path) if source.local_path is not None else None


def with_target_modules(spec: FineTuneJobSpec, targets: list[str]) -> FineTuneJobSpec:
    """The spec with `all-linear` replaced by the module names it resolved to."""
    return spec.model_copy(
        update={"lora": spec.lora.model_copy(update={"target_modules": targets})}
    )


def resolve_target_modules(model: PreTrainedModel, requested: list[str]) -> list[str]:
    """`all-linear` -> the names of every linear projection except the output head."""
    if requested != ["all-linear"]:
        return list(requested)
    import torch

    names = set()
    output = model.get_output_embeddings()
    for name, module in model.named_modules():
        linear = isinstance(module, torch.nn.Linear) or type(module).__name__ in (
            "Linear4bit",
            "Linear8bitLt",
        )
        if linear and module is not output:
            names.add(name.rsplit(".", 1)[-1])
    if not names:
        raise ModelLoadError(
            "spec.lora.targetModules is all-linear but the model has no linear "
            "layers besides its output head; name the modules explicitly"
        )
    return sorted(names)


def checkpoint_interval_seconds(training: TrainingSpec) -> float | None:
    """Time-based checkpoints on top of every `checkpointSteps` steps.

    A preemptible GPU can disappear between step-based saves that are hours apart; a save
    every `checkpointMinutes` bounds the loss (0 turns time-based saves off).
    """
    minutes = training.checkpoint_minutes
    return minutes * 60 if minutes > 0 else None


def steps_in_rows(config: WorkerConfig, device: str) -> bool:
    """Whether each optimizer step is one batch of whole examples that the collator splits
    into rows of the plan's token budget (unpacked, with a varlen kernel: training_batches)."""
    from . import attention

    return not config.spec.training.packing and attention.supported(device)


def row_budget(config: WorkerConfig) -> int:
    """Unpacked steps: the most real tokens a row may hold, the plan's memory bound:
    plan.rowTokens where the planner filled the budget between two micro-batch sizes, else
    microBatchSize x seqLength (and never less than one whole example)."""
    seq = config.spec.training.seq_length
    return max(config.plan.row_tokens or config.plan.micro_batch_size * seq, seq)


def examples_per_step(config: WorkerConfig) -> int:
    """Whole examples per optimizer step of one process: spec.training.batchSize over the
    world (the API requires a multiple of the world size)."""
    return max(config.spec.training.batch_size // config.plan.world_size, 1)


def build_sft_config(config: WorkerConfig, *, device: str, world: World | None = None) -> SFTConfig:
    """spec.training + plan -> trl SFTConfig. Packing and checkpointing are handled by our
    collator and modeling.py, so the trainer's own versions stay off. Under torchrun, creating
    it joins the process group (accelerate reads the ranks from the environment).

    Unpacked with a varlen kernel (steps_in_rows), the Trainer's batch is a whole optimizer
    step, batchSize / worldSize examples, with no accumulation of its own: the collator and
    the trainer's training_step split it into rows of the plan's budget (training_batches).
    Otherwise a batch is a micro-batch and the plan's accumulation makes up the step."""
    from trl import SFTConfig

    training, plan = config.spec.training, config.plan
    if steps_in_rows(config, device):
        per_device, accumulation = examples_per_step(config), 1
    else:
        per_device, accumulation = plan.micro_batch_size, plan.gradient_accumulation
        if not training.packing and per_device * accumulation != examples_per_step(config):
            # The planner lets an unpacked micro-batch not divide the batch because steps are
            # split into rows; without the varlen kernel they are fixed micro-batches instead.
            log.warning(
                "this PyTorch has no varlen attention kernel: each optimizer step trains "
                "%d examples (micro-batch %d x %d) instead of spec.training.batchSize / "
                "worldSize = %d",
                per_device * accumulation,
                per_device,
                accumulation,
                examples_per_step(config),
            )
    warmup = (
        training.warmup_steps
        if training.warmup_steps is not None
        else training.effective_warmup_ratio
    )
    return SFTConfig(
        output_dir=config.paths.checkpoint_dir,
        per_device_train_batch_size=per_device,
        per_device_eval_batch_size=plan.micro_batch_size,
        gradient_accumulation_steps=accumulation,
        max_steps=training.max_steps or -1,
        num_train_epochs=training.effective_epochs,
        learning_rate=training.learning_rate,
        lr_scheduler_type=training.scheduler,
        warmup_steps=warmup,
        weight_decay=training.weight_decay,
        max_grad_norm=training.max_grad_norm,
        optim=training.optimizer,
        seed=training.seed,
        data_seed=training.seed,
        bf16=device == "cuda",
        use_cpu=device == "cpu",
        gradient_checkpointing=False,
        # every step is logged so the NaN guard sees each loss; trl syncs per step anyway
        logging_strategy="steps",
        logging_steps=1,
        logging_nan_inf_filter=False,
        save_strategy="steps",
        save_steps=training.checkpoint_steps,
        save_total_limit=training.checkpoint_limit,
        eval_strategy="no",
        report_to=[],
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
        max_length=training.seq_length,
        packing=False,
        padding_free=False,
        remove_unused_columns=False,
        dataset_kwargs={"skip_prepare_dataset": True},
        dataloader_num_workers=0,
        **distributed_arguments(config.plan, world or World()),
    )


def distributed_arguments(plan: TrainingPlan, world: World) -> dict:
    """TrainingArguments for plan.strategy; nothing for one process.

    The loss is the token mean over the whole optimizer step, all ranks' tokens together
    (`average_tokens_across_devices`), so a step is the same mathematics as one process
    accumulating the same micro-batches. DDP: every parameter that needs a gradient gets one
    each step (LoRA on every adapted layer; checkpointing is non-reentrant), so DDP need not
    search the graph for unused ones. FSDP (FULL_SHARD, FSDP1 as in peft's FSDP-QLoRA recipe):
    the base loads on rank 0's CPU only and is sharded from there (`cpu_ram_efficient_loading`
    with `sync_module_states`); `use_orig_params` off because peft's wrap policy (set in
    build_trainer) gives the trainable adapters FSDP units of their own, apart from the frozen
    base; checkpoints are sharded (each rank writes its own) and the adapter is gathered in
    full on rank 0 (write_outputs).
    """
    if not world.distributed:
        return {}
    from . import distributed

    arguments = {
        "ddp_timeout": distributed.collective_timeout_seconds(),
        "average_tokens_across_devices": True,
        "ddp_find_unused_parameters": False,
    }
    if plan.strategy == "fsdp":
        arguments.update(
            fsdp="full_shard auto_wrap",
            fsdp_config={
                "version": 1,
                "cpu_ram_efficient_loading": True,
                "sync_module_states": True,
                "use_orig_params": False,
                "state_dict_type": "SHARDED_STATE_DICT",
                "limit_all_gathers": True,
            },
        )
    return arguments


# --- steps of a run --------------------------------------------------------------------


def load_tokenizer(config: WorkerConfig, token: str | None) -> PreTrainedTokenizerBase:
    from . import modeling

    source = sources.tokenizer_source(config.spec.model, config.paths)
    sources.check_local(source, "spec.model", ModelLoadError)
    try:
        return modeling.load_tokenizer(config.spec, token, local_path=local_path(source))
    except Exception as exc:
        raise ModelLoadError(
            f"cannot load the tokenizer from {source.location}: {type(exc).__name__}: {exc}"
        ) from exc


def load_training_data(
    config: WorkerConfig, tokenizer: PreTrainedTokenizerBase, token: str | None
) -> TokenizedSplits:
    from .data import load_records, prepare_splits, rename_fields

    dataset = config.spec.dataset
    source = sources.dataset_source(dataset, config.paths)
    sources.check_local(source, "spec.dataset.uri", DataError)
    location = source.location
    seed = config.spec.training.seed
    records = load_records(location, split=dataset.split, token=token, subset=dataset.subset)
    records = rename_fields(records, dataset.format, dataset.fields, location)
    if dataset.max_samples and dataset.max_samples < len(records):
        records = records.shuffle(seed=seed).select(range(dataset.max_samples))
    eval_records = None
    if dataset.eval_split:
        eval_records = load_records(
            location, split=dataset.eval_split, token=token, subset=dataset.subset
        )
        eval_records = rename_fields(eval_records, dataset.format, dataset.fields, location)
    return prepare_splits(
        records,
        dataset.format,
        tokenizer,
        max_length=config.spec.training.seq_length,
        source=location,
        eval_records=eval_records,
        eval_fraction=dataset.eval_fraction or 0.0,
        seed=seed,
    )


def load_model(
    config: WorkerConfig, token: str | None, device: str
) -> tuple[PeftModel, str | None]:
    """Base model per plan (bf16 or NF4), then LoRA and checkpointing per plan.

    `device` is this process's own (cuda:LOCAL_RANK under torchrun). Under FSDP the base is
    not placed on it: FSDP moves each rank's shard there (distributed_arguments)."""
    from . import modeling

    spec, plan = config.spec, config.plan
    source = sources.model_source(spec.model, config.paths)
    sources.check_local(source, "spec.model", ModelLoadError)
    try:
        base = load_base_model(spec, plan, token, device, local_path(source))
    except Exception as exc:
        if _is_out_of_memory(exc):
            raise
        raise ModelLoadError(
            f"cannot load the base model from {source.location} "
            f"(method {plan.method}): {type(exc).__name__}: {exc}"
        ) from exc
    revision = getattr(base.config, "_commit_hash", None) or source.revision
    targets = resolve_target_modules(base, list(spec.lora.target_modules))
    try:
        model = modeling.prepare_for_training(
            base, with_target_modules(spec, targets), plan, device=device
        )
    except ValueError as exc:  # peft: target modules not found and the like
        raise InvalidConfigError(
            f"cannot apply LoRA with spec.lora {spec.lora.model_dump()}: {exc}"
        ) from exc
    if getattr(model, "compiled_layers", 0):
        # so that the first step's pause has a reason in the log
        log.info(
            "%d decoder layers compiled (plan.compiledLayers); the first step compiles them "
            "(10-25 s on an H200)",
            model.compiled_layers,
        )
    return model, revision


def load_base_model(
    spec: FineTuneJobSpec, plan: TrainingPlan, token: str | None, device: str, path: str | None
) -> PreTrainedModel:
    from . import modeling

    if plan.strategy == "fsdp":
        return modeling.load_base_model(spec, plan, token, device, local_path=path, device_map=None)

    if plan.method == "qlora" and device == "cpu":
        # bitsandbytes >= 0.48 runs NF4 on the CPU, which the CPU tests rely on; the
        # model is loaded in bf16 and quantised in memory, the same layers and settings
        # transformers quantises at load time.
        base = modeling.load_base_model(
            spec, plan.model_copy(update={"method": "lora"}), token, device, local_path=path
        )
        return modeling.quantize_in_place(base, spec)
    return modeling.load_base_model(spec, plan, token, device, local_path=path)


def _is_out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError)


def measured_throughput(
    output: TrainOutput,
    progress: ProgressCallback,
    wall_seconds: float,
    device: str,
    world_size: int = 1,
) -> dict:
    """Throughput over the training steps (loading and checkpoint restore excluded).

    The Trainer sums the tokens of all ranks (`num_input_tokens_seen` is gathered), so
    tokens/s is the whole job's."""
    seconds = progress.seconds
    metrics = {
        "tokensPerSecond": round(progress.tokens / seconds, 2)
        if progress.tokens and seconds
        else None,
        "steadyTokensPerSecond": (
            round(progress.steady_tokens_per_second(), 2)
            if progress.steady_tokens_per_second()
            else None
        ),
        "samplesPerSecond": output.metrics.get("train_samples_per_second"),
        "stepsPerSecond": output.metrics.get("train_steps_per_second"),
        "trainRuntimeSeconds": round(wall_seconds, 2),
        "trainedTokens": progress.tokens,
    }
    if device == "cuda":
        import torch

        gpus = world_size if world_size > 1 else max(torch.cuda.device_count(), 1)
        metrics["gpuSeconds"] = round(wall_seconds * gpus, 1)
    return {k: v for k, v in metrics.items() if v is not None}


def run_training(config: WorkerConfig, *, reporter: StatusReporter | None = None) -> TrainResult:
    """Train the adapter a WorkerConfig describes. Raises WorkerError subclasses."""
    world = World.from_environment()
    check_config(config, world)
    token = read_secret_file(config.paths.hf_token_file, "Hugging Face token")
    kind = training_device()
    # Seconds, before minutes of loading: can this image run the kernels the plan assumes?
    preflight.run_preflight(config.plan, kind, packing=config.spec.training.packing)
    device = distributed.process_device(kind, world)
    cap_bytes = None
    if kind == "cuda":
        import torch

        # peaks are per process; a caller running several trainings (the benchmark)
        # must get each run's own
        torch.cuda.reset_peak_memory_stats()
        # Before anything is allocated: the plan's budget is this process's limit on its GPU,
        # however large (or shared) the card is.
        cap_bytes = cap_gpu_memory(config.plan, device)
    # Before the model: it joins the process group, and under FSDP it tells from_pretrained
    # to load the base on rank 0 only.
    args = build_sft_config(config, device=kind, world=world)
    if world.distributed:
        log.info(
            "%s, strategy %s, backend %s",
            world.describe(),
            config.plan.strategy,
            args.distributed_state.backend,
        )

    tokenizer = load_tokenizer(config, token)
    splits = load_training_data(config, tokenizer, token)
    log.info(
        "data: %d training and %d eval examples (%d dropped)",
        len(splits.train),
        len(splits.eval) if splits.eval is not None else 0,
        splits.dropped,
    )

    trainer = None
    try:
        from transformers import set_seed

        # The adapters' random init comes from the seed, not from whatever this process drew
        # before: one process and a world of them start from the same weights.
        set_seed(config.spec.training.seed)
        model, revision = load_model(config, token, device)
        trainer, checkpointing, progress = build_trainer(
            config, model, tokenizer, splits, kind, reporter, args=args
        )
        resume = resumable_checkpoint(config, world) if config.spec.training.resume else None
        from .callbacks import SigtermToCheckpoint

        started = time.perf_counter()
        with SigtermToCheckpoint(checkpointing):
            output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        metrics = {
            **measured_throughput(
                output, progress, time.perf_counter() - started, kind, world.world_size
            ),
            **measured_memory(kind, world),
        }
        result = TrainResult(
            metrics=metrics,
            progress=dict(progress.last_progress),
            resumed_from=resume,
            # a SIGTERM that lands after the last step stops nothing
            preempted=(
                checkpointing.preempted.is_set()
                and trainer.state.global_step < trainer.state.max_steps
            ),
            global_step=trainer.state.global_step,
            checkpoints=list(checkpointing.saved_steps),
            train_loss=_finite(output.training_loss),
        )
        if result.preempted:
            return result
        if splits.eval is not None:
            result.eval_loss = _finite(trainer.evaluate().get("eval_loss"))
        result.metrics.update(
            {
                k: v
                for k, v in (("trainLoss", result.train_loss), ("evalLoss", result.eval_loss))
                if v is not None
            }
        )
    except Exception as exc:
        if _is_out_of_memory(exc):
            from .errors import OutOfMemoryError

            step = trainer.state.global_step + 1 if trainer is not None else None
            raise OutOfMemoryError(
                out_of_memory_message(config.plan, step, exc, cap_bytes)
            ) from exc
        raise

    adapter, state_dict = adapter_to_save(trainer)  # collective under FSDP: every rank
    result.model = trainer.model
    if not world.is_main:
        result.reports = False
        return result
    manifest = write_outputs(
        config, adapter, revision, result.metrics, token, state_dict=state_dict
    )
    result.adapter_dir = Path(config.paths.output_dir)
    result.adapter_digest = manifest.digest
    result.adapter_size_bytes = manifest.size_bytes
    return result


def resumable_checkpoint(config: WorkerConfig, world: World) -> Path | None:
    """The checkpoint every rank resumes from: rank 0 chooses (one verdict on half-written
    directories and hashes), the others check they can read it (several pods need the
    checkpoint directory on a volume they all mount)."""
    root = Path(config.paths.checkpoint_dir)
    chosen = distributed.decided_by_main(
        lambda: find_resumable_checkpoint(root, config.spec_hash, plan_record(config.plan)), world
    )
    if chosen is not None and not Path(chosen).is_dir():
        raise StorageError(
            f"rank 0 resumes from {chosen}, which {world.describe()} cannot see; the checkpoint "
            f"directory {root} must be one volume shared by every worker pod (ReadWriteMany)"
        )
    return Path(chosen) if chosen is not None else None


def measured_memory(kind: str, world: World) -> dict:
    """This process's peak memory; in a distributed run every rank's, gathered (collective)."""
    local = peak_memory_metrics(world.local_rank if kind == "cuda" and world.distributed else None)
    if not world.distributed:
        return local
    return world_memory_metrics(distributed.gathered(local))


def require_sharded(model: torch.nn.Module) -> None:
    """Fail (exit 16) rather than train an unsharded replica under a plan made for FSDP.

    The planner chooses FSDP when a whole replica does not fit one GPU; if the Trainer did not
    wrap the model (an accelerate, bitsandbytes or peft combination that skips it), the run
    would go out of memory minutes later or, worse, fit by luck with the wrong arithmetic."""
    from .errors import WorkerEnvironmentError

    if not any(
        type(m).__name__ == "FullyShardedDataParallel" or type(m).__name__.startswith("FSDP")
        for m in model.modules()
    ):
        raise WorkerEnvironmentError(
            "plan.strategy is fsdp but the Trainer did not shard the model (no FSDP module "
            f"around {type(model).__name__}); this PyTorch/accelerate/bitsandbytes combination "
            "cannot shard it. Plan the job with more GPU memory per GPU (a replica per GPU, "
            "DDP) or report the versions"
        )


def adapter_to_save(trainer: Trainer) -> tuple[PeftModel, dict | None]:
    """(peft model, state dict or None) for write_adapter. Under FSDP the adapter weights are
    sharded: accelerate gathers the full state dict to rank 0 (every rank must call it);
    otherwise peft reads the weights from the model itself."""
    if not getattr(trainer, "is_fsdp_enabled", False):
        return trainer.model, None
    accelerator = trainer.accelerator
    return accelerator.unwrap_model(trainer.model), accelerator.get_state_dict(trainer.model)


def _finite(value) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def plan_record(plan: TrainingPlan) -> dict:
    """The plan fields that shape a step, as recorded in each checkpoint."""
    return plan.model_dump(
        by_alias=True,
        include={
            "method",
            "micro_batch_size",
            "gradient_accumulation",
            "gradient_checkpointing",
            "strategy",
            "world_size",
        },
    )


def build_trainer(
    config: WorkerConfig,
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    splits: TokenizedSplits,
    device: str,
    reporter: StatusReporter | None,
    *,
    args: SFTConfig | None = None,
) -> tuple[SFTTrainer, CheckpointCallback, ProgressCallback]:
    from trl import SFTTrainer

    from .callbacks import CheckpointCallback, NonFiniteLossGuard, ProgressCallback

    training = config.spec.training
    progress = ProgressCallback(reporter)
    checkpointing = CheckpointCallback(
        config.spec_hash,
        interval_s=checkpoint_interval_seconds(training),
        plan=plan_record(config.plan),
    )
    try:
        Path(config.paths.checkpoint_dir).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageError(
            f"cannot create the checkpoint directory {config.paths.checkpoint_dir}: {exc}"
        ) from exc
    args = args if args is not None else build_sft_config(config, device=device)
    sampler, collator = training_batches(config, model, tokenizer, splits, device)
    trainer = _trainer_class(SFTTrainer)(
        model=model,
        args=args,
        train_dataset=splits.train,
        eval_dataset=splits.eval,
        processing_class=tokenizer,
        data_collator=collator,
        callbacks=[progress, NonFiniteLossGuard(NON_FINITE_PATIENCE), checkpointing],
    )
    trainer.token_budget_sampler = sampler
    trainer.expect_sharded = config.plan.strategy == "fsdp"
    if trainer.is_fsdp_enabled:
        configure_fsdp(trainer.accelerator.state.fsdp_plugin, trainer.model)
    return trainer, checkpointing, progress


def configure_fsdp(plugin: Any, model: PeftModel) -> None:
    """The FSDP units and precision the worker trains with.

    Units: decoder layers, and each LoRA matrix a unit of its own, so no unit mixes trainable
    and frozen weights (use_orig_params=False needs that). Precision: no FSDP mixed-precision
    policy, so every flat parameter keeps its own dtype (the bf16 or 4-bit base, fp32
    adapters) and autocast does the bf16 compute exactly as on one GPU. accelerate's bf16
    policy instead trains bf16 copies of the adapters: measured with 2 ranks, the first
    step's gradient norm 20 % off one process's (47.2 against 39.2), and the losses off from
    the second step; without it the first three steps are identical to one process."""
    from peft.utils.other import fsdp_auto_wrap_policy

    plugin.auto_wrap_policy = fsdp_auto_wrap_policy(model)
    plugin.mixed_precision_policy = None


DENSE_BATCH_MULTIPLE = ROW_PAD_MULTIPLE


def training_batches(
    config: WorkerConfig,
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    splits: TokenizedSplits,
    device: str,
) -> tuple[PackedBatchSampler | TokenBudgetBatchSampler | None, Callable[[list[dict]], dict]]:
    """(batch sampler or None, collator) for the training data, per spec.training.packing.

    Packing: micro-batches of micro-batch x seqLength tokens (the plan's memory bound), each
    one padding-free row of exactly that length with varlen attention (attention.py): no
    compute on padding, no mask, one shape for the whole run. Measured on an H200 against
    the alternatives in docs/perf-notes.md. Where PyTorch has no varlen kernel (torch < 2.10)
    the dense fallback: length-grouped batches padded to a multiple of 64, no mask.

    Without packing: the Trainer's own sampler deals each process batchSize / worldSize whole
    examples per optimizer step (build_sft_config), and packing.make_step_collator splits
    them into as few padding-free varlen rows as fit micro-batch x seqLength real tokens each
    (first-fit decreasing; at worst ceil(examples / micro-batch) rows, the plan's
    accumulation), each row padded to a multiple of 64. The trainer runs the rows one after
    another and the Trainer takes one optimizer step (_trainer_class). Why: a micro-batch of
    N whole examples was one row of ~1,300 tokens for typical instruction data, which leaves
    an H200 host-bound (measured: 3,010 tokens/s unpacked against 9,880 packed); rows filled
    to the budget keep it busy within the same memory bound. Every row's loss is normalised
    by the whole step's token count (all ranks'), so the split changes how the step runs,
    not its loss or gradients; and a row computes no padding beyond its last 63 tokens
    (right-padding was 60-75 % of the GPU time of such jobs on an H200). Where PyTorch has no
    varlen kernel: micro-batches of micro-batch examples padded to the batch's longest, with
    the plan's accumulation, as before.
    """
    from . import attention, packing

    training = config.spec.training
    if not training.packing:
        if steps_in_rows(config, device):
            attention.use_varlen(model)
            return None, packing.make_step_collator(
                tokenizer,
                training.seq_length,
                row_budget(config),
                pad_to_multiple_of=DENSE_BATCH_MULTIPLE,
            )
        return None, packing.make_collator(tokenizer, training.seq_length, False)
    budget = config.plan.micro_batch_size * training.seq_length
    lengths = [len(ids) for ids in splits.train["input_ids"]]
    if attention.supported(device):
        attention.use_varlen(model)
        return (
            packing.PackedBatchSampler(
                lengths, budget, seq_len=training.seq_length, seed=training.seed
            ),
            packing.make_varlen_collator(tokenizer, training.seq_length, row_tokens=budget),
        )
    log.warning(
        "this PyTorch has no varlen attention kernel: packing falls back to "
        "length-grouped padded batches (slower)"
    )
    return (
        packing.TokenBudgetBatchSampler(
            lengths,
            budget,
            seq_len=training.seq_length,
            multiple=DENSE_BATCH_MULTIPLE,
            seed=training.seed,
        ),
        packing.make_collator(
            tokenizer,
            training.seq_length,
            False,
            attention_mask=False,
            pad_to_multiple_of=DENSE_BATCH_MULTIPLE,
        ),
    )


def _trainer_class(base):
    """SFTTrainer whose training batches can come from a token-budget batch sampler, and
    whose unpacked steps run as several rows (training_step)."""

    class FineTuneTrainer(base):
        token_budget_sampler = None
        model_loss = True
        """Train on the model's own loss (liger's fused linear cross-entropy on GPUs) rather
        than trl's fused LM head, which also computes entropy and top-1 accuracy over the
        vocabulary for its logs and syncs the GPU per micro-batch to record them; this worker
        reports neither. Same loss (token mean over the optimizer step), measured faster:
        docs/perf-notes.md."""

        expect_sharded = False
        """plan.strategy is fsdp: the first step checks the model really was sharded."""

        row_weight: float | None = None
        """While training_step runs a row of a step whose loss the Trainer does not normalise
        by the step's token count (a model that takes no `num_items_in_batch`, so each row's
        loss is its own mean): the row's share of the step's trained tokens, which turns the
        row's mean into its part of the step's mean."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if self.expect_sharded:
                self.expect_sharded = False
                require_sharded(model)
            inputs = _without_rows(inputs)
            if not self.model_loss or not model.training:
                result = super().compute_loss(
                    model,
                    inputs,
                    return_outputs=return_outputs,
                    num_items_in_batch=num_items_in_batch,
                )
            else:
                from transformers import Trainer

                result = Trainer.compute_loss(
                    self,
                    model,
                    inputs,
                    return_outputs=return_outputs,
                    num_items_in_batch=num_items_in_batch,
                )
            if self.row_weight is None:
                return result
            if return_outputs:
                return result[0] * self.row_weight, result[1]
            return result * self.row_weight

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            return super().prediction_step(
                model, _without_rows(inputs), prediction_loss_only, ignore_keys=ignore_keys
            )

        def training_step(self, model, inputs, num_items_in_batch=None):
            """One optimizer step's batch; a step batch of several rows (make_step_collator)
            runs row by row, forward and backward each, gradients accumulating.

            `num_items_in_batch` is the Trainer's count of the whole step's trained tokens
            (every rank's under average_tokens_across_devices), so each row's loss is its token
            sum over the step's tokens and the rows' gradients add up to exactly the step's:
            the same as one row holding every example. Rows but the last run under no_sync, so
            DDP all-reduces once, in the last backward. DDP tolerates ranks running different
            numbers of rows: a forward or backward under no_sync is no collective (buffers are
            broadcast only at a step's first forward, which follows a synced one on every
            rank), so each rank makes the same collectives once per step. FSDP gathers
            parameters in every forward, so there every rank runs as many rows as the rank with
            the most, the extra ones empty (no trained tokens: nothing added to loss or
            gradients). Returns the sum of the rows' losses: the step's loss."""
            from .packing import ROWS_KEY

            rows = inputs.get(ROWS_KEY) if isinstance(inputs, Mapping) else None
            if rows is None:
                return super().training_step(model, inputs, num_items_in_batch)
            step = _without_rows(inputs)
            count = len(rows)
            if getattr(self, "is_fsdp_enabled", False):
                count = self._most_rows_of_any_rank(count)
            if count == 1:
                return super().training_step(model, step, num_items_in_batch)
            import contextlib

            from .packing import step_row

            step_items = sum(row["items"] for row in rows)
            # what Trainer.compute_loss divides by num_items_in_batch (transformers 5.x)
            step_normalised = num_items_in_batch is not None and (
                getattr(self, "model_accepts_loss_kwargs", False)
                or getattr(self, "compute_loss_func", None) is not None
            )
            total = None
            for i in range(count):
                row = rows[i] if i < len(rows) else None
                row_inputs = step_row(step, row) if row else self._empty_row(step)
                if not step_normalised:
                    items = row["items"] if row else 0
                    self.row_weight = items / step_items if step_items else 0.0
                sync = i == count - 1
                try:
                    with contextlib.nullcontext() if sync else self.accelerator.no_sync(model):
                        loss = super().training_step(model, row_inputs, num_items_in_batch)
                finally:
                    self.row_weight = None
                total = loss if total is None else total + loss
            return total

        def _most_rows_of_any_rank(self, count: int) -> int:
            import torch

            counts = self.accelerator.gather(torch.tensor([count], device=self.args.device))
            return int(counts.max())

        def _empty_row(self, step: dict) -> dict:
            """A minimal padding row with no trained tokens, for FSDP's extra forwards."""
            import torch

            from .attention import boundaries
            from .packing import IGNORE_INDEX

            ids = step["input_ids"]
            cached = getattr(self, "_empty_row_cache", None)
            if cached is None or cached["input_ids"].device != ids.device:
                width = DENSE_BATCH_MULTIPLE
                pad = getattr(self.processing_class, "pad_token_id", None) or 0
                cached = {
                    "input_ids": torch.full((1, width), pad, dtype=ids.dtype, device=ids.device),
                    "labels": torch.full(
                        (1, width), IGNORE_INDEX, dtype=torch.long, device=ids.device
                    ),
                    "position_ids": torch.arange(width, device=ids.device)[None],
                    **{
                        key: value.to(ids.device) if hasattr(value, "to") else value
                        for key, value in boundaries([width]).items()
                    },
                }
                self._empty_row_cache = cached
            return dict(cached)

        def get_train_dataloader(self):
            if self.token_budget_sampler is None:
                return super().get_train_dataloader()
            from torch.utils.data import DataLoader

            loader = DataLoader(
                self.train_dataset,
                batch_sampler=self.token_budget_sampler,
                collate_fn=self.data_collator,
                num_workers=self.args.dataloader_num_workers,
                pin_memory=self.args.dataloader_pin_memory,
            )
            # accelerate deals the sampler's micro-batches out to the ranks in turn (rank r
            # gets r, r + world, ...), so one optimizer step of the world sees the same
            # micro-batches as one process accumulating them; the Trainer passes each new
            # epoch to our sampler inside accelerate's shard
            # (tests/worker/test_worker_distributed.py crosses two epochs).
            return self.accelerator.prepare(loader)

    return FineTuneTrainer


def _without_rows(inputs: Any) -> Any:
    """A step batch without its list of rows (packing.ROWS_KEY), which is no model input:
    the rows side by side are one varlen row, the same computation (evaluation batches of a
    micro-batch are always one row)."""
    from .packing import ROWS_KEY

    if isinstance(inputs, Mapping) and ROWS_KEY in inputs:
        return {key: value for key, value in inputs.items() if key != ROWS_KEY}
    return inputs


def write_outputs(
    config: WorkerConfig,
    model: PeftModel,
    revision: str | None,
    metrics: dict,
    token: str | None,
    *,
    state_dict: dict | None = None,
) -> AdapterManifest:
    from .adapter import push_to_hub, write_adapter

    manifest = write_adapter(
        config,
        model,
        Path(config.paths.output_dir),
        base_revision=revision,
        metrics=metrics,
        state_dict=state_dict,
    )
    output = config.spec.output.uri
    if uri_scheme(output) == "hf":
        push_to_hub(Path(config.paths.output_dir), output[len("hf://") :], token)
    return manifest


def check_config(config: WorkerConfig, world: World | None = None) -> None:
    """What pydantic cannot see: cross-checks between spec, plan and the pod."""
    distributed.check_world(config.plan, world or World.from_environment())
    expected = spec_hash(config.spec)
    if expected != config.spec_hash:
        # Checkpoints are keyed by the operator's hash, so it stays the identity; a
        # difference means operator and worker versions disagree on the hash function.
        log.warning(
            "specHash in the worker config (%s) differs from this worker's hash of the "
            "spec (%s); using the config's",
            config.spec_hash[:12],
            expected[:12],
        )
    if config.spec.method != "auto" and config.spec.method != config.plan.method:
        raise InvalidConfigError(
            f"spec.method is {config.spec.method!r} but plan.method is "
            f"{config.plan.method!r}; the plan must follow the spec"
        )
    if uri_scheme(config.spec.output.uri) == "s3":
        raise InvalidConfigError(
            f"spec.output.uri is {config.spec.output.uri!r}, but this worker image cannot "
            "write to s3:// yet; use pvc://claim/path or hf://owner/name"
        )
    if config.spec.training.packing and config.plan.micro_batch_size < 1:
        raise InvalidConfigError("plan.microBatchSize must be at least 1")


__all__ = ["TrainResult", "WorkerError", "run_training"]
