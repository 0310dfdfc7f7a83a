"""The FineTuneJob kind: what a user asks for (spec) and what the system observed (status).

Spec defaults are what a user of a LoRA tool expects (r=16, alpha=32, all linear layers,
cosine schedule, bf16). Every rule the API server enforces through CEL is also checked
here, next to it, so the worker rejects the same specs with the same words.

Immutability: the spec cannot change after creation, except `suspend`. CEL transition
rules cannot see status, so "immutable once started" is enforced from creation; a job
that has not started yet is cheap to delete and re-create, and a changed spec would
otherwise silently mix two trainings in one checkpoint directory.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from .common import (
    API_VERSION,
    HF_REPO_PATTERN,
    Artifact,
    Condition,
    DNSLabel,
    DType,
    LocalSecretReference,
    ObjectMeta,
    ObjectReference,
    OutputURI,
    PositiveQuantity,
    Quantity,
    SecretKeySelector,
    ShortString,
    SourceURI,
    SpecModel,
    StatusModel,
    StorageURI,
    Timestamp,
    at_most_one_cel,
    cel,
    conditions_schema_extra,
    exactly_one_cel,
    object_name_rule,
    validations,
)
from .constants import DEFAULT_GPU_RESOURCE, Phase

KIND = "FineTuneJob"
PLURAL = "finetunejobs"

HFRepoId = Annotated[str, Field(min_length=1, max_length=256, pattern=HF_REPO_PATTERN)]
Revision = Annotated[str, Field(min_length=1, max_length=256, pattern=r"^[A-Za-z0-9._/-]+$")]
ModuleName = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.*-]+$")]


# --- model ----------------------------------------------------------------------------------


class ArchitectureHints(SpecModel):
    """Shape of the base model, used for planning when its config cannot be read
    (for example a private repository the operator has no token for)."""

    model_type: ShortString | None = None
    """Transformers `model_type`, e.g. `llama`, `mistral`, `qwen2`."""
    num_parameters: Annotated[int, Field(ge=1)] | None = None
    """Total parameter count, e.g. 8030261248."""
    hidden_size: Annotated[int, Field(ge=1)] | None = None
    """Width of the hidden states (`hidden_size` in config.json)."""
    intermediate_size: Annotated[int, Field(ge=1)] | None = None
    """Width of the MLP's inner projection (`intermediate_size`)."""
    num_hidden_layers: Annotated[int, Field(ge=1)] | None = None
    """Transformer blocks (`num_hidden_layers`)."""
    num_attention_heads: Annotated[int, Field(ge=1)] | None = None
    """Query heads per layer (`num_attention_heads`)."""
    num_key_value_heads: Annotated[int, Field(ge=1)] | None = None
    """Key/value heads per layer (`num_key_value_heads`; fewer than the query heads with
    grouped-query attention)."""
    vocab_size: Annotated[int, Field(ge=1)] | None = None
    """Tokens in the vocabulary (`vocab_size`)."""
    tie_word_embeddings: bool | None = None
    """Whether the output head shares the input embedding's weights."""


class ModelSource(SpecModel):
    """A base model: a Hugging Face id (plus revision) or a URI."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            exactly_one_cel("name", "uri", "model"),
        )
    )

    name: HFRepoId | None = None
    """Hugging Face repository id, e.g. `meta-llama/Meta-Llama-3-8B`."""
    uri: SourceURI | None = None
    """`hf://owner/name`, `pvc://claim/path` or `s3://bucket/key`."""
    revision: Revision | None = None
    """Branch, tag or commit of a Hugging Face repository; pin a commit for reproducibility."""
    tokenizer: Annotated[str, Field(min_length=1, max_length=1024)] | None = None
    """Tokenizer to use instead of the model's own (a Hugging Face id or a URI)."""
    architecture: ArchitectureHints | None = None
    """The model's shape, for planning when its config.json cannot be read (a private
    repository, an air-gapped cluster)."""

    @model_validator(mode="after")
    def _exactly_one_source(self) -> ModelSource:
        if (self.name is None) == (self.uri is None):
            raise ValueError("exactly one of model.name and model.uri must be set")
        return self

    @property
    def reference(self) -> str:
        """What to load: the id or the URI, with `@revision` when pinned."""
        base = self.name or self.uri or ""
        return f"{base}@{self.revision}" if self.revision else base


# --- dataset --------------------------------------------------------------------------------


class FieldMapping(SpecModel):
    """Column names in the dataset when they differ from the format's defaults."""

    instruction: ShortString | None = None
    """alpaca: the instruction column (default `instruction`)."""
    input: ShortString | None = None
    """alpaca: the optional input column (default `input`)."""
    output: ShortString | None = None
    """alpaca: the response column (default `output`)."""
    messages: ShortString | None = None
    """chat: the column holding `[{role, content}]` lists (default `messages`)."""
    text: ShortString | None = None
    """text: the column with raw text (default `text`)."""
    prompt: ShortString | None = None
    """completion: the prompt column (default `prompt`)."""
    completion: ShortString | None = None
    """completion: the completion column (default `completion`)."""


DatasetFormat = Literal["alpaca", "chat", "text", "completion"]


class DatasetSpec(SpecModel):
    """Training data: where it is, how rows are shaped, and what to hold out."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            at_most_one_cel("evalSplit", "evalFraction", "dataset"),
        )
    )

    uri: SourceURI
    """`hf://owner/name`, `pvc://claim/file.jsonl` or `s3://bucket/key`."""
    format: DatasetFormat
    """alpaca (instruction/input/output), chat (messages), text, or completion
    (prompt/completion)."""
    subset: ShortString | None = None
    """Configuration name of a Hugging Face dataset."""
    split: ShortString = "train"
    """Split to train on."""
    fields: FieldMapping | None = None
    """Column names, when they differ from the format's defaults."""
    max_samples: Annotated[int, Field(ge=1)] | None = None
    """Use at most this many training rows (after shuffling with the seed)."""
    eval_split: ShortString | None = None
    """A split to evaluate on."""
    eval_fraction: Annotated[float, Field(gt=0, le=0.5)] | None = None
    """Hold out this fraction of the training split for evaluation instead."""

    @model_validator(mode="after")
    def _one_eval_source(self) -> DatasetSpec:
        if self.eval_split is not None and self.eval_fraction is not None:
            raise ValueError("at most one of dataset.evalSplit and dataset.evalFraction may be set")
        return self


# --- method ---------------------------------------------------------------------------------

Method = Literal["auto", "lora", "qlora", "fp8"]
ResolvedMethod = Literal["lora", "qlora", "fp8"]


class LoRASpec(SpecModel):
    """Low-rank adapter settings (PEFT `LoraConfig`)."""

    r: Annotated[int, Field(ge=1, le=1024)] = 16
    """Rank of the update matrices."""
    alpha: Annotated[float, Field(gt=0)] = 32
    """Scaling numerator: the update is scaled by alpha/r (alpha/sqrt(r) with rsLoRA)."""
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.05
    """Dropout probability on the adapter's input, 0 to <1."""
    target_modules: Annotated[list[ModuleName], Field(min_length=1, max_length=64)] = Field(
        default_factory=lambda: ["all-linear"], json_schema_extra={"default": ["all-linear"]}
    )
    """Module names to adapt; `all-linear` means every linear projection except the output head."""
    use_rs_lora: bool = Field(False, alias="useRSLoRA")
    """Rank-stabilised scaling (alpha/sqrt(r)); helps at high ranks."""
    use_do_ra: bool = Field(False, alias="useDoRA")
    """Weight-decomposed LoRA (DoRA): slower, sometimes better at low ranks."""


class QuantizationSpec(SpecModel):
    """How the frozen base is stored for QLoRA (bitsandbytes 4-bit)."""

    type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type of the frozen base: `nf4` (NormalFloat, the QLoRA paper's) or `fp4`."""
    double_quant: bool = True
    """Quantize the quantization constants too (saves about 0.4 bits per parameter)."""
    compute_dtype: DType = "bfloat16"
    """Dtype the 4-bit weights are de-quantized to for matrix multiplies."""


# --- training -------------------------------------------------------------------------------


class TrainingSpec(SpecModel):
    """Optimisation settings. At most one of epochs and maxSteps; neither means one epoch."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            at_most_one_cel("epochs", "maxSteps", "spec.training"),
            at_most_one_cel("warmupRatio", "warmupSteps", "spec.training"),
        )
    )

    epochs: Annotated[float, Field(gt=0, le=1000)] | None = None
    """Passes over the training data (may be fractional); 1 when neither this nor maxSteps is
    set. At most one of epochs and maxSteps."""
    max_steps: Annotated[int, Field(ge=1)] | None = None
    """Optimizer steps to run, instead of epochs. At most one of epochs and maxSteps."""
    learning_rate: Annotated[float, Field(gt=0, le=1)] = 2e-4
    """Peak learning rate of the optimizer, reached after warm-up (0 < value <= 1)."""
    batch_size: Annotated[int, Field(ge=1, le=65536)] = 16
    """Examples per optimizer step, exactly: micro-batch x gradient accumulation x GPUs; a
    multiple of the GPUs, and of microBatchSize x GPUs when microBatchSize is a number."""
    micro_batch_size: Annotated[
        Literal["auto"] | Annotated[int, Field(ge=1, le=4096)],
        Field(
            json_schema_extra={
                "x-kubernetes-int-or-string": True,
                **validations(
                    cel(
                        "type(self) == string ? self == 'auto' : self >= 1",
                        "must be 'auto' or an integer of at least 1",
                    )
                ),
            }
        ),
    ] = "auto"
    """Memory per forward pass, in sequences of seqLength: each forward pass is one
    padding-free row of at most microBatchSize x seqLength tokens (packed rows are filled to
    it; without packing a step's whole examples are split into as few such rows as they fit
    in). `auto` lets the planner choose the fastest that fits."""
    seq_length: Annotated[int, Field(ge=16, le=131072)] = 2048
    """Maximum tokens per training sequence; longer rows are truncated."""
    packing: bool = False
    """Put examples back to back in padding-free rows of microBatchSize x seqLength tokens,
    each example attending only to itself: no compute on padding (the fastest setting for
    short, uneven instruction data; docs/benchmarks.md)."""
    gradient_checkpointing: Literal["auto", "on", "off"] = "auto"
    """Trade compute for activation memory; `auto` lets the planner decide."""
    compile_layers: Literal["auto", "off"] = "auto"
    """`auto`: the planner compiles the decoder layers (torch.compile) where that is measured
    to pay, in plans that recompute every layer (status.plan.compiledLayers); the first step
    then takes 10-25 s longer. `off`: always run them eager. Not part of the spec hash: a
    checkpoint resumes either way."""
    optimizer: Literal[
        "adamw_torch",
        "adamw_torch_fused",
        "adamw_8bit",
        "paged_adamw_8bit",
        "paged_adamw_32bit",
        "adafactor",
        "sgd",
    ] = "adamw_torch"
    """Optimizer (transformers' `optim` names); `adamw_8bit` and `paged_*` keep optimizer
    state in 8 bits or page it to host memory."""
    scheduler: Literal[
        "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"
    ] = "cosine"
    """Learning-rate schedule after warm-up (transformers' `lr_scheduler_type`)."""
    warmup_ratio: Annotated[float, Field(ge=0, lt=1)] | None = None
    """Fraction of steps spent warming up (0.03 when neither this nor warmupSteps is set)."""
    warmup_steps: Annotated[int, Field(ge=0)] | None = None
    """Optimizer steps spent warming up, instead of warmupRatio."""
    weight_decay: Annotated[float, Field(ge=0, le=1)] = 0.0
    """Decoupled weight decay of the adapter weights (AdamW's), 0 to 1."""
    max_grad_norm: Annotated[float, Field(gt=0)] = 1.0
    """Gradients are clipped to this global L2 norm."""
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] = 42
    """Random seed for shuffling, dropout and adapter initialisation; the same seed and data
    give the same run."""
    checkpoint_steps: Annotated[int, Field(ge=1)] = 200
    """Save a checkpoint every this many steps (the job resumes from the latest)."""
    checkpoint_minutes: Annotated[float, Field(ge=0, le=1440)] = 30
    """Also save a checkpoint every this many minutes (0: only every checkpointSteps), so a
    preempted GPU loses at most this much work."""
    checkpoint_limit: Annotated[int, Field(ge=1, le=100)] = 2
    """Keep at most this many checkpoints."""
    resume: bool = True
    """Continue from the latest checkpoint when a pod is restarted."""

    @model_validator(mode="after")
    def _one_length(self) -> TrainingSpec:
        if self.epochs is not None and self.max_steps is not None:
            raise ValueError(
                "at most one of spec.training.epochs and spec.training.maxSteps may be set "
                "(neither means one epoch)"
            )
        if self.warmup_ratio is not None and self.warmup_steps is not None:
            raise ValueError(
                "at most one of spec.training.warmupRatio and spec.training.warmupSteps may be set"
            )
        return self

    @property
    def effective_epochs(self) -> float:
        """Epochs for the trainer: one pass when unset (maxSteps, when set, wins)."""
        return 1.0 if self.epochs is None else self.epochs

    @property
    def effective_warmup_ratio(self) -> float:
        return (
            0.03
            if self.warmup_ratio is None and self.warmup_steps is None
            else (self.warmup_ratio or 0.0)
        )


# --- resources ------------------------------------------------------------------------------


class GPUSpec(SpecModel):
    """GPUs per worker pod, worker pods (nodes), and the memory budget the plan must fit in."""

    count: Annotated[int, Field(ge=1, le=64)] = 1
    """GPUs per worker pod (one node); one training process (torchrun rank) per GPU."""
    nodes: Annotated[int, Field(ge=1, le=64)] = 1
    """Worker pods, each on its own node with `count` GPUs. More than 1 runs an Indexed Job
    whose pods rendezvous through a headless Service; the world size is count x nodes."""
    memory: PositiveQuantity
    """Memory per GPU the plan must fit in, e.g. `24Gi`: the planner's budget."""
    product: ShortString | None = None
    """GPU product for scheduling (the `nvidia.com/gpu.product` node label), e.g. `NVIDIA-H200`.
    It also tells the planner whether the GPU has FP8 tensor cores: `method: auto` considers
    fp8 when this names one the planner knows to have them, and without a product only when
    every GPU node that could take the job has them (by GPU Feature Discovery labels)."""
    resource_name: Annotated[str, Field(min_length=1, max_length=253)] = DEFAULT_GPU_RESOURCE
    """Extended resource to request."""


class Toleration(SpecModel):
    """A `core/v1` Toleration."""

    key: Annotated[str, Field(max_length=316)] | None = None
    """Taint key the toleration matches; empty with operator Exists matches every taint."""
    operator: Literal["Exists", "Equal"] | None = None
    """`Equal` (key and value match) or `Exists` (key only); default Equal."""
    value: Annotated[str, Field(max_length=63)] | None = None
    """Taint value to match with operator Equal."""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """Taint effect to match; empty matches all effects."""
    toleration_seconds: int | None = None
    """With effect NoExecute: seconds the pod stays bound after the taint appears (unset:
    forever)."""


LabelMap = Annotated[dict[str, Annotated[str, Field(max_length=63)]], Field(max_length=64)]


class ResourcesSpec(SpecModel):
    """What the worker pod requests and where it may run."""

    gpu: GPUSpec
    cpu: Quantity | None = None
    """CPU request and limit for the worker, e.g. `8`."""
    memory: Quantity | None = None
    """Host memory request and limit for the worker, e.g. `64Gi`."""
    node_selector: LabelMap | None = None
    """Node labels the worker pods require, on top of the GPU product's."""
    tolerations: Annotated[list[Toleration], Field(max_length=32)] | None = None
    """Tolerations for the worker pods, added to the operator's GPU tolerations."""
    priority_class_name: DNSLabel | None = None
    """PriorityClass of the worker pods (preemption order)."""
    queue_name: DNSLabel | None = None
    """Kueue LocalQueue; the Job is created suspended and Kueue admits it."""


# --- output, follow-ups ---------------------------------------------------------------------


class OutputSpec(SpecModel):
    """Where the trained adapter goes."""

    uri: OutputURI
    """Where the adapter is written: `pvc://claim/path`, `s3://bucket/key` or `hf://owner/name`."""


class MergeFollowUp(SpecModel):
    """Create an AdapterMerge (adapter folded into the base weights) after training."""

    enabled: bool = False
    """Create the AdapterMerge when training succeeds."""
    output: StorageURI | None = None
    """Where the merged model is written (default: the adapter's URI with `-merged`)."""
    dtype: DType = "bfloat16"
    """Dtype of the merged weights."""


class DeploymentGPU(SpecModel):
    """GPUs per serving replica."""

    count: Annotated[int, Field(ge=1, le=64)] = 1
    """GPUs per pod (when serving, vLLM's tensor-parallel size)."""
    product: ShortString | None = None
    """GPU product for scheduling (the `nvidia.com/gpu.product` node label)."""
    resource_name: Annotated[str, Field(min_length=1, max_length=253)] = DEFAULT_GPU_RESOURCE
    """Extended resource to request."""


class DeploymentResources(SpecModel):
    """What each serving replica requests."""

    gpu: DeploymentGPU = Field(default_factory=DeploymentGPU)
    """GPUs per replica."""
    cpu: Quantity | None = None
    """CPU request and limit per replica, e.g. `4`."""
    memory: Quantity | None = None
    """Host memory request and limit per replica, e.g. `32Gi`."""
    node_selector: LabelMap | None = None
    """Extra node labels the serving pods require (the operator's default when unset)."""
    tolerations: Annotated[list[Toleration], Field(max_length=32)] | None = None
    """Tolerations for the serving pods (the operator's default when unset)."""


class DeployFollowUp(SpecModel):
    """Create an AdapterDeployment serving the adapter after training."""

    enabled: bool = False
    """Create (or extend) an AdapterDeployment when training succeeds."""
    name: DNSLabel | None = None
    """AdapterDeployment to create, or to add the adapter to (default: the job's name)."""
    runtime: Literal["vllm"] = "vllm"
    """Serving runtime; only vLLM."""
    replicas: Annotated[int, Field(ge=0, le=100)] = 1
    """Serving replicas of the AdapterDeployment it creates."""
    resources: DeploymentResources | None = None
    """What each serving replica requests (the operator's defaults when unset)."""


class FollowUpSpec(SpecModel):
    """What to create once training has succeeded."""

    merge: MergeFollowUp | None = None
    """Merge the adapter into the base weights after training."""
    deploy: DeployFollowUp | None = None
    """Serve the adapter after training."""


# --- spec -----------------------------------------------------------------------------------

# Fields that may change after creation. Everything else is compared with `oldSelf`.
MUTABLE_SPEC_FIELDS = ("suspend",)
BATCH_PER_PROCESS_MESSAGE = (
    "spec.training.batchSize must be a multiple of the GPUs in the job "
    "(spec.resources.gpu.count x spec.resources.gpu.nodes): every training process takes the "
    "same number of examples per optimizer step"
)
MICRO_BATCH_DIVIDES_MESSAGE = (
    "spec.training.microBatchSize must divide the per-process batch, spec.training.batchSize / "
    "(spec.resources.gpu.count x spec.resources.gpu.nodes): the batch is exactly microBatchSize "
    "x gradient accumulation x GPUs. Raise spec.training.batchSize to a multiple of "
    "microBatchSize x GPUs, lower microBatchSize, or set it to auto"
)
ALLOWED_METHODS_NEED_AUTO = "spec.allowedMethods may only be set when spec.method is auto"


class FineTuneJobSpec(SpecModel):
    """What to fine-tune, on what data, how, within which GPU budget, and where the adapter
    goes. Immutable after creation except `suspend`."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "!(self.method in ['lora', 'fp8']) || !has(self.quantization)",
                "spec.quantization may only be set when spec.method is qlora or auto",
                field_path=".quantization",
            ),
            cel(
                "self.method == 'auto' || !has(self.allowedMethods)",
                ALLOWED_METHODS_NEED_AUTO,
                field_path=".allowedMethods",
            ),
            cel(
                "self.training.batchSize % (self.resources.gpu.count * self.resources.gpu.nodes)"
                " == 0",
                BATCH_PER_PROCESS_MESSAGE,
                field_path=".training.batchSize",
            ),
            # Silent on a batch the rule above rejects already: one message per mistake.
            cel(
                "type(self.training.microBatchSize) == string"
                " || self.training.batchSize"
                " % (self.resources.gpu.count * self.resources.gpu.nodes)"
                " != 0"
                " || (self.training.batchSize"
                " / (self.resources.gpu.count * self.resources.gpu.nodes))"
                " % self.training.microBatchSize == 0",
                MICRO_BATCH_DIVIDES_MESSAGE,
                field_path=".training.microBatchSize",
            ),
        )
    )

    model: ModelSource
    """The base model to adapt."""
    dataset: DatasetSpec
    """The training data."""
    method: Method = "auto"
    """`auto` lets the planner pick the fastest method that fits the budget: lora (bf16 base),
    qlora (4-bit base) or fp8, narrowed by allowedMethods. `fp8` trains LoRA on an FP8 (e4m3,
    a scale per output channel) copy of the frozen base: half of bf16's weight memory and FP8
    GEMMs, on GPUs with FP8 tensor cores (compute capability 8.9 or newer: L4, L40S, H100,
    H200, B200, ...). `auto` considers fp8 only where the GPU is known to have them: when
    resources.gpu.product names such a GPU, or, without a product, when every node whose GPU
    Feature Discovery labels show the memory (and nodeSelector's labels) has them. The pods of
    an fp8 plan require nodes labelled compute capability 8.9 or newer. fp8 named on a product
    known to lack them (A100, T4, ...) is refused when planning, and on any other GPU without
    them the worker refuses it at start (exit code 16)."""
    allowed_methods: (
        Annotated[
            list[ResolvedMethod],
            Field(min_length=1, max_length=3, json_schema_extra={"x-kubernetes-list-type": "set"}),
        ]
        | None
    ) = None
    """The methods `auto` may choose from, each at most once, to forbid the others: `[lora,
    qlora]` never trains on an FP8 base, `[qlora]` always on the 4-bit base. Only with method
    auto. Unset: all three, fp8 still only where the GPU is known to have FP8 tensor cores."""
    # `default: {}` in the CRD makes the API server fill in (and show) the LoRA defaults.
    lora: LoRASpec = Field(default_factory=LoRASpec, json_schema_extra={"default": {}})
    quantization: QuantizationSpec | None = None
    """4-bit settings used when the method is (or resolves to) qlora."""
    # `default: {}` as for lora: a spec without `training` trains one epoch with the defaults.
    training: TrainingSpec = Field(default_factory=TrainingSpec, json_schema_extra={"default": {}})
    """How to optimise: how long (epochs or maxSteps; neither: one epoch), batch, learning
    rate, checkpoints."""
    resources: ResourcesSpec
    """GPUs, host resources and scheduling of the worker pods."""
    output: OutputSpec
    """Where the trained adapter goes."""
    hf_token_secret_ref: SecretKeySelector | None = None
    """Hugging Face token for gated models, private datasets and Hub pushes."""
    storage_secret_ref: LocalSecretReference | None = None
    """Object storage credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...)."""
    follow_up: FollowUpSpec | None = None
    """What to create once training has succeeded: a merge and/or a deployment."""
    image: Annotated[str, Field(min_length=1, max_length=1024)] | None = None
    """Worker image override."""
    suspend: bool = False
    """Stop running pods (checkpoints are kept) and resume when set back to false."""
    active_deadline_seconds: Annotated[int, Field(ge=1)] | None = None
    """Seconds the training Job may run before it is failed (DeadlineExceeded); unset: no limit."""
    backoff_limit: Annotated[int, Field(ge=0, le=100)] = 2
    """Retries after a retryable pod failure (out-of-memory and bad data are not retried)."""
    ttl_seconds_after_finished: Annotated[int, Field(ge=0)] | None = None
    """Seconds after it finishes that the training Job (and its pods) is deleted; unset: kept."""

    @model_validator(mode="after")
    def _quantization_needs_qlora(self) -> FineTuneJobSpec:
        if self.method in ("lora", "fp8") and self.quantization is not None:
            raise ValueError("spec.quantization may only be set when spec.method is qlora or auto")
        return self

    @field_validator("allowed_methods")
    @classmethod
    def _each_method_once(cls, methods: list[str] | None) -> list[str] | None:
        repeated = sorted({m for m in methods or [] if methods.count(m) > 1})
        if repeated:
            raise ValueError(f"names each method at most once; repeated: {repeated}")
        return methods

    @model_validator(mode="after")
    def _allowed_methods_need_auto(self) -> FineTuneJobSpec:
        if self.method != "auto" and self.allowed_methods is not None:
            raise ValueError(ALLOWED_METHODS_NEED_AUTO)
        return self

    @model_validator(mode="after")
    def _batch_splits_over_processes(self) -> FineTuneJobSpec:
        gpu = self.resources.gpu
        if self.training.batch_size % (gpu.count * gpu.nodes):
            raise ValueError(
                f"{BATCH_PER_PROCESS_MESSAGE} (batchSize {self.training.batch_size}, "
                f"{gpu.count} x {gpu.nodes} GPUs)"
            )
        micro = self.training.micro_batch_size
        per_process = self.training.batch_size // (gpu.count * gpu.nodes)
        if micro != "auto" and per_process % micro:
            raise ValueError(
                f"{MICRO_BATCH_DIVIDES_MESSAGE} (batchSize "
                f"{self.training.batch_size}, {gpu.count} x {gpu.nodes} GPUs, "
                f"microBatchSize {micro})"
            )
        return self

    @property
    def quantization_or_default(self) -> QuantizationSpec:
        return self.quantization or QuantizationSpec()


# --- status ---------------------------------------------------------------------------------


class MemoryBreakdown(StatusModel):
    """Predicted peak GPU memory per GPU, in bytes, by what occupies it."""

    base_weights: int = 0
    """Frozen base weights (bf16, 4-bit plus quantization constants for qlora, or FP8 plus a
    scale per output channel for fp8)."""
    adapter_weights: int = 0
    """The trainable LoRA matrices."""
    gradients: int = 0
    """Gradients of the trainable (adapter) parameters."""
    optimizer_state: int = 0
    """Optimizer moments of the adapter weights."""
    activations: int = 0
    """Activations kept for the backward pass at the chosen micro-batch."""
    overhead: int = 0
    """CUDA context, allocator fragmentation and temporary buffers."""


class TrainingPlan(StatusModel):
    """What the planner decided and why; also handed to the worker in its config."""

    method: ResolvedMethod
    """The resolved method: `lora` (bf16 base), `qlora` (4-bit base) or `fp8` (FP8 base)."""
    reason: Annotated[str, Field(max_length=4096)] = ""
    """Why this method and these settings, for people."""
    estimated_peak_bytes: int
    """Predicted peak GPU memory per GPU, in bytes."""
    budget_bytes: int | None = None
    """spec.resources.gpu.memory in bytes: what the plan had to fit in."""
    breakdown: MemoryBreakdown = Field(default_factory=MemoryBreakdown)
    """The predicted peak, term by term."""
    micro_batch_size: Annotated[int, Field(ge=1)]
    """Sequences per forward pass, per process: each forward pass is one padding-free row of
    at most microBatchSize x seqLength tokens (rowTokens when set). With packing a row is
    filled to that budget; without packing an optimizer step's batchSize / worldSize whole
    examples are split into as few such rows as they fit in (the same gradients as one pass
    over all of them)."""
    row_tokens: Annotated[int, Field(ge=1)] | None = None
    """Without packing: the most real tokens one row (forward pass) holds, when the planner
    filled the memory between two micro-batch sizes; each step's whole examples are split into
    as few rows of at most rowTokens as they fit in. microBatchSize is then the whole
    seqLength-long examples such a row is sure to hold. Unset: microBatchSize x seqLength."""
    gradient_accumulation: Annotated[int, Field(ge=1)]
    """Micro-batches accumulated per optimizer step, per process; without packing the most
    rows a step can need (every example seqLength long), usually fewer."""
    gradient_checkpointing: bool
    """Whether activations are recomputed in the backward pass to save memory."""
    checkpointed_layers: Annotated[int, Field(ge=1)] | None = None
    """Decoder layers recomputed in the backward pass, spread evenly over the depth, when
    gradientCheckpointing is true; unset means all of them. Recomputing only some layers
    fills a budget that lies between no checkpointing and full checkpointing."""
    fused_kernels: bool = True
    """The prediction assumes liger's fused Triton kernels on the GPU; the worker refuses to
    start without them (exit code 16) rather than run a plan made for other kernels."""
    compiled_layers: bool = False
    """The decoder layers run compiled (torch.compile, one graph per layer's forward and
    backward, Inductor's fused kernels in place of liger's inside the layers; liger's fused
    loss stays). Chosen where every layer is recomputed, which makes a row's host work (each
    layer's kernels launched three times) the bound; the first step takes 10-25 s longer
    (compilation). spec.training.compileLayers `off` rules it out."""
    strategy: Literal["single", "ddp", "fsdp"] = "single"
    """How the processes share the work: one process (`single`); data-parallel replicas of the
    whole model (`ddp`); or FULL_SHARD FSDP (`fsdp`), which shards the frozen base, the
    adapters, their gradients and optimizer state across all processes, for bases that do not
    fit one GPU."""
    nodes: Annotated[int, Field(ge=1)] = 1
    """Worker pods (torchrun --nnodes)."""
    processes_per_node: Annotated[int, Field(ge=1)] = 1
    """Training processes per pod, one per GPU (torchrun --nproc-per-node)."""
    world_size: Annotated[int, Field(ge=1)] = 1
    """nodes x processesPerNode. microBatchSize and gradientAccumulation are per process:
    the effective batch is microBatchSize x gradientAccumulation x worldSize."""
    trainable_params: int
    """Parameters trained (the adapter's)."""
    total_params: int | None = None
    """Parameters of the base model plus the adapter."""


class Progress(StatusModel):
    """Training progress as last reported by the worker."""

    step: int = 0
    """Optimizer steps done."""
    total_steps: int | None = None
    """Optimizer steps the run will take."""
    epoch: float | None = None
    """Passes over the training data so far (fractional)."""
    percent: float | None = None
    """step / totalSteps, in percent."""
    loss: float | None = None
    """Training loss of the latest logged step."""
    learning_rate: float | None = None
    """Learning rate at the latest logged step."""
    eta_seconds: int | None = None
    """Estimated seconds until training ends."""
    updated_at: Timestamp | None = None
    """When the worker last reported."""


class TrainingMetrics(StatusModel):
    """Measured by the worker on the GPU (not predicted)."""

    peak_vram_bytes: int | None = Field(None, alias="peakVRAMBytes")
    """`torch.cuda.max_memory_reserved` on the busiest GPU."""
    peak_vram: str | None = Field(None, alias="peakVRAM")
    """The same, formatted for people (`17.2Gi`); shown by `kubectl get ftj`."""
    tokens_per_second: float | None = None
    """Real (non-padding) tokens trained per second, whole job, over every training step of the
    last pod (warm-up included): what the job ran at overall."""
    steady_tokens_per_second: float | None = None
    """The same after the first 3 optimizer steps (first kernel compiles, allocator growth):
    the rate to compare with benchmarks and the planner's prediction."""
    samples_per_second: float | None = None
    """Training examples per second, whole job."""
    steps_per_second: float | None = None
    """Optimizer steps per second."""
    gpu_seconds: float | None = None
    """GPU time used: wall time x GPUs."""
    peak_vram_per_rank_bytes: list[int] | None = Field(None, alias="peakVRAMPerRankBytes")
    """Peak reserved VRAM of each training process, by global rank; peakVRAMBytes is the
    largest."""
    world_size: int | None = None
    """Training processes that ran (tokensPerSecond is their total)."""
    peak_vram_allocated_bytes: int | None = Field(None, alias="peakVRAMAllocatedBytes")
    """`torch.cuda.max_memory_allocated`: live tensors at the peak, without allocator cache."""
    peak_rss_bytes: int | None = Field(None, alias="peakRSSBytes")
    """Peak host memory of the worker process (the measure that counts on a CPU)."""
    device: str | None = None
    """What trained: `cuda` or `cpu`."""
    trained_tokens: int | None = None
    """Real (non-padding) tokens the optimizer saw."""
    train_runtime_seconds: float | None = None
    """Wall time of the training loop, in seconds."""
    train_loss: float | None = None
    """Mean training loss over the run."""
    eval_loss: float | None = None
    """Loss on the evaluation split at the end, when one is set."""


class FollowUpStatus(StatusModel):
    """The follow-up objects created after training."""

    merge: ObjectReference | None = None
    """The AdapterMerge created for this job."""
    deployment: ObjectReference | None = None
    """The AdapterDeployment serving this job's adapter."""


class FineTuneJobStatus(StatusModel):
    """What the operator and the worker observed."""

    observed_generation: int | None = None
    """The `.metadata.generation` this status was computed from."""
    phase: Phase | None = None
    """One-word summary: Pending, Planning, Queued, Suspended, Running, Succeeded or Failed."""
    reason: Annotated[str, Field(max_length=128)] | None = None
    """The reason of the condition behind the phase (e.g. `CUDAOutOfMemory`), for
    `kubectl get ftj -o wide`; the condition's message says more."""
    conditions: Annotated[list[Condition], Field(json_schema_extra=conditions_schema_extra())] = (
        Field(default_factory=list)
    )
    """Planned, Queued, Suspended, Running, Succeeded, Failed: each with a reason and message."""
    plan: TrainingPlan | None = None
    """What the planner decided and why."""
    progress: Progress | None = None
    """Training progress, written by the worker."""
    metrics: TrainingMetrics | None = None
    """Measured throughput and memory, written by the worker."""
    adapter: Artifact | None = None
    """The trained adapter."""
    job_name: str | None = None
    """The batch Job running the worker."""
    spec_hash: str | None = None
    """`api.spec_hash` of the spec the plan and the Job were built from."""
    follow_up: FollowUpStatus | None = None
    """The AdapterMerge and AdapterDeployment created after success."""
    start_time: Timestamp | None = None
    """When the worker first ran."""
    completion_time: Timestamp | None = None
    """When the job succeeded or failed."""


# --- the resource ---------------------------------------------------------------------------


class FineTuneJob(SpecModel):
    """A LoRA or QLoRA fine-tuning run, planned to fit a GPU memory budget."""

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra=validations(
            object_name_rule(KIND, "Job and pods"),
        ),
    )

    api_version: Literal["finetune.dev/v1alpha1"] = API_VERSION
    kind: Literal["FineTuneJob"] = KIND
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: FineTuneJobSpec
    status: FineTuneJobStatus | None = None


def crd_extras() -> dict[str, Any]:
    """What the CRD needs beyond the schema; used by crdgen."""
    return {
        "kind": KIND,
        "plural": PLURAL,
        "singular": "finetunejob",
        "short_names": ["ftj"],
        "categories": ["finetune"],
        "mutable_spec_fields": MUTABLE_SPEC_FIELDS,
        "printer_columns": [
            {"name": "Method", "type": "string", "jsonPath": ".status.plan.method"},
            {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
            {
                "name": "Reason",
                "type": "string",
                "jsonPath": ".status.reason",
                "priority": 1,
                "description": "Why the job is in this phase",
            },
            {
                "name": "Progress",
                "type": "number",
                "jsonPath": ".status.progress.percent",
                "description": "Percent of training steps done",
            },
            {
                "name": "Peak VRAM",
                "type": "string",
                "jsonPath": ".status.metrics.peakVRAM",
                "description": "Measured peak GPU memory",
            },
            {"name": "Tokens/s", "type": "number", "jsonPath": ".status.metrics.tokensPerSecond"},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ],
    }
