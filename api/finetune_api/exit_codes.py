"""Worker exit codes: the contract between the worker process and the operator.

The worker exits with one of these; the operator's Job `podFailurePolicy` turns the
permanent ones into an immediate failure (retrying cannot help) and maps each to the
`Failed` condition's reason. Codes start at 10 so they never collide with Python's own
(1: uncaught exception, 2: usage error) or with signals (128+n).
"""

from __future__ import annotations

from enum import IntEnum

from .constants import Reason


class WorkerExitCode(IntEnum):
    SUCCESS = 0
    INVALID_CONFIG = 10
    DATA_ERROR = 11
    CUDA_OOM = 12
    NON_FINITE_LOSS = 13
    STORAGE_ERROR = 14
    MODEL_LOAD_ERROR = 15
    ENVIRONMENT_ERROR = 16

    @property
    def reason(self) -> str:
        """The `Failed` condition's reason for this exit code."""
        return _REASONS[self]

    @property
    def meaning(self) -> str:
        """One line for people: what this exit code says happened."""
        return _MEANINGS[self]

    @property
    def retryable(self) -> bool:
        """Whether a new pod could succeed: only storage errors may be transient."""
        return self is WorkerExitCode.STORAGE_ERROR


_REASONS = {
    WorkerExitCode.SUCCESS: Reason.TRAINING_COMPLETE,
    WorkerExitCode.INVALID_CONFIG: Reason.INVALID_CONFIG,
    WorkerExitCode.DATA_ERROR: Reason.DATA_ERROR,
    WorkerExitCode.CUDA_OOM: Reason.CUDA_OUT_OF_MEMORY,
    WorkerExitCode.NON_FINITE_LOSS: Reason.NON_FINITE_LOSS,
    WorkerExitCode.STORAGE_ERROR: Reason.STORAGE_ERROR,
    WorkerExitCode.MODEL_LOAD_ERROR: Reason.MODEL_LOAD_ERROR,
    WorkerExitCode.ENVIRONMENT_ERROR: Reason.WORKER_ENVIRONMENT_ERROR,
}

_MEANINGS = {
    WorkerExitCode.SUCCESS: "training finished; the adapter and its manifest were written",
    WorkerExitCode.INVALID_CONFIG: "the worker config is missing, unreadable or invalid",
    WorkerExitCode.DATA_ERROR: (
        "the dataset cannot be read, or its rows do not match the declared format or fields"
    ),
    WorkerExitCode.CUDA_OOM: (
        "the GPU ran out of memory: the plan under-estimated or the budget is too small"
    ),
    WorkerExitCode.NON_FINITE_LOSS: "the loss became NaN or infinite; lower the learning rate",
    WorkerExitCode.STORAGE_ERROR: (
        "reading or writing a checkpoint or the adapter failed (volume, bucket or Hub push)"
    ),
    WorkerExitCode.MODEL_LOAD_ERROR: (
        "the base model or tokenizer cannot be loaded (not found, gated, wrong revision)"
    ),
    WorkerExitCode.ENVIRONMENT_ERROR: (
        "the worker image or node cannot run what the plan assumes (a C compiler for Triton's "
        "fused kernels, bitsandbytes' CUDA library, a GPU kernel); fix the image"
    ),
}

# A worker's own verdict on a run that failed: any documented code but success.
FAILURE_CODES = frozenset(int(c) for c in WorkerExitCode if c is not WorkerExitCode.SUCCESS)
# What a process stopped by SIGTERM after its checkpoint exits with (128 + 15); the Job retries.
PREEMPTED_EXIT_CODE = 143
