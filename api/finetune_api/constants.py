"""Named values shared by the operator, the worker and the CRDs: phases, condition types,
condition reasons, labels and file names. A string that two components must agree on is
defined here once."""

from __future__ import annotations

from enum import StrEnum


class Phase(StrEnum):
    """`status.phase`: a one-word summary for `kubectl get`; conditions carry the detail."""

    PENDING = "Pending"
    PLANNING = "Planning"
    QUEUED = "Queued"
    SUSPENDED = "Suspended"
    """spec.suspend is true: no pod runs; checkpoints are kept for the resume."""
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"

    @property
    def finished(self) -> bool:
        return self in (Phase.SUCCEEDED, Phase.FAILED)


class ConditionType(StrEnum):
    # FineTuneJob
    PLANNED = "Planned"
    REFERENCES_RESOLVED = "ReferencesResolved"
    """Every Secret and PVC the spec names exists (False: waiting for them)."""
    QUEUED = "Queued"
    RUNNING = "Running"
    SUSPENDED = "Suspended"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    # AdapterMerge uses Running / Succeeded / Failed too.
    # AdapterDeployment
    READY = "Ready"
    AVAILABLE = "Available"
    PROGRESSING = "Progressing"
    DEGRADED = "Degraded"


class Reason:
    """CamelCase `reason` values. Plain string constants (not an enum) so that a reason
    read back from the cluster compares equal to the constant without conversion."""

    # Planned
    PLAN_FITS = "PlanFits"
    PLAN_DOES_NOT_FIT = "InsufficientGPUMemory"
    MODEL_CONFIG_UNAVAILABLE = "ModelConfigUnavailable"
    HUB_UNAVAILABLE = "HubUnavailable"
    METHOD_NOT_SUPPORTED = "MethodNotSupported"
    """The method the spec names (or every one spec.allowedMethods allows) needs FP8 tensor
    cores that spec.resources.gpu.product lacks, or that neither it nor (without it) the GPU
    nodes that could take the job are known to have."""
    # ReferencesResolved
    REFERENCES_FOUND = "ReferencesFound"
    SECRET_NOT_FOUND = "SecretNotFound"
    SECRET_KEY_NOT_FOUND = "SecretKeyNotFound"
    VOLUME_CLAIM_NOT_FOUND = "VolumeClaimNotFound"
    # Queued
    WAITING_FOR_QUOTA = "WaitingForQuota"
    ADMITTED = "Admitted"
    NOT_QUEUED = "NotQueued"
    # Suspended
    SUSPENDED_BY_USER = "SuspendedByUser"
    # Running
    PODS_STARTING = "PodsStarting"
    TRAINING = "Training"
    RESUMED_FROM_CHECKPOINT = "ResumedFromCheckpoint"
    RETRYING_AFTER_FAILURE = "RetryingAfterFailure"
    # Succeeded
    TRAINING_COMPLETE = "TrainingComplete"
    MERGE_COMPLETE = "MergeComplete"
    # Failed: one per worker exit code (see exit_codes.WorkerExitCode), then the Job's own.
    INVALID_CONFIG = "InvalidConfig"
    DATA_ERROR = "DataError"
    CUDA_OUT_OF_MEMORY = "CUDAOutOfMemory"
    NON_FINITE_LOSS = "NonFiniteLoss"
    STORAGE_ERROR = "StorageError"
    MODEL_LOAD_ERROR = "ModelLoadError"
    VOLUME_NOT_SHAREABLE = "VolumeNotShareable"
    WORKER_ENVIRONMENT_ERROR = "WorkerEnvironmentError"
    BACKOFF_LIMIT_EXCEEDED = "BackoffLimitExceeded"
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    POD_FAILED = "PodFailed"
    FINE_TUNE_JOB_FAILED = "FineTuneJobFailed"
    FINE_TUNE_JOB_NOT_FOUND = "FineTuneJobNotFound"
    # Neutral states
    NOT_STARTED = "NotStarted"
    IN_PROGRESS = "InProgress"
    # AdapterDeployment
    REPLICAS_READY = "ReplicasReady"
    REPLICAS_NOT_READY = "ReplicasNotReady"
    ADAPTER_NOT_READY = "AdapterNotReady"
    ADAPTER_LOAD_FAILED = "AdapterLoadFailed"
    NO_SERVABLE_ADAPTER = "NoServableAdapter"
    SCALED_TO_ZERO = "ScaledToZero"
    ROLLING_OUT = "RollingOut"
    ADAPTERS_COMPATIBLE = "AdaptersCompatible"
    # AdapterDeployment: why an adapter is refused before it is served.
    BASE_MODEL_MISMATCH = "BaseModelMismatch"
    RANK_ABOVE_LIMIT = "RankAboveLimit"
    UNSUPPORTED_TARGET_MODULES = "UnsupportedTargetModules"
    UNSUPPORTED_ADAPTER_FEATURE = "UnsupportedAdapterFeature"
    ADAPTER_FILES_MISSING = "AdapterFilesMissing"
    ADAPTER_CHECKSUM_MISMATCH = "AdapterChecksumMismatch"
    ADAPTER_NAME_CONFLICT = "AdapterNameConflict"
    INVALID_SPEC = "InvalidSpec"


OPERATOR_NAME = "finetune-operator"
"""Who manages the children: the managed-by label's value and the server-side apply field
manager."""

# Labels and annotations put on children so they can be found and traced back.
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = {LABEL_MANAGED_BY: OPERATOR_NAME}
"""On every child: the operator watches Jobs, pods and Deployments with it."""
LABEL_PREFIX = "finetune.dev"
LABEL_FINETUNEJOB = f"{LABEL_PREFIX}/finetunejob"
LABEL_ADAPTERMERGE = f"{LABEL_PREFIX}/adaptermerge"
LABEL_ADAPTERDEPLOYMENT = f"{LABEL_PREFIX}/adapterdeployment"
LABEL_COMPONENT = f"{LABEL_PREFIX}/component"
LABEL_SERVER = f"{LABEL_PREFIX}/server"
"""On a vLLM server's Deployment, Service and pods: the server's name."""
ANNOTATION_SPEC_HASH = f"{LABEL_PREFIX}/spec-hash"
ANNOTATION_ADAPTERS = f"{LABEL_PREFIX}/adapters"
"""On a server's pod template: `name=digest` per served adapter, so a changed checksum rolls
the pods too."""

# Files the worker and the operator agree on.
WORKER_CONFIG_FILENAME = "worker-config.yaml"
ADAPTER_MANIFEST_FILENAME = "finetune-manifest.json"
TERMINATION_LOG_PATH = "/dev/termination-log"
"""The kubelet's default terminationMessagePath: the worker writes its report there, the
operator reads it back from the pod status."""
TERMINATION_LOG_ENV = "FINETUNE_WORKER_TERMINATION_LOG"
"""Set by the operator on the worker container: where the worker writes its report."""

DEFAULT_GPU_RESOURCE = "nvidia.com/gpu"
CUDA_CONTEXT_BYTES = 768 * 2**20
"""GPU memory a training process holds outside PyTorch's allocator (the CUDA context, cuBLAS
workspaces, lazily loaded kernels; measured in docs/memory-model.md). The planner counts it
against spec.resources.gpu.memory; the worker caps its allocator at the budget less this."""
FP8_MIN_COMPUTE_CAPABILITY = (8, 9)
"""FP8 tensor cores: Ada (8.9), Hopper (9.0) and newer. The worker refuses `fp8` below it; the
planner offers `fp8` to `method: auto` only on a GPU product, or (without one) GPU nodes, known
to reach it, and an fp8 plan's pods require nodes labelled with it."""
ROW_PAD_MULTIPLE = 64
"""The worker pads each padding-free row (and each unpacked step's rows) up to a multiple of
this many tokens, which bounds the shapes a run sees; the planner makes filled unpacked row
budgets (plan.rowTokens) a multiple of it, so no padded row is wider than its budget."""
# torchrun's master port on pod 0 of a multi-node job: the operator's Service and container
# port, and the worker launcher's default.
RENDEZVOUS_PORT = 29500
