"""Failures the worker reports to the operator, each tied to one documented exit code.

The operator's pod failure policy reads the exit code, so every failure that is not a
bug must become one of these exceptions; the CLI turns them into the process status.
"""

from __future__ import annotations

from finetune_operator.api.exit_codes import WorkerExitCode


class WorkerError(Exception):
    """Base class: a failure with a message meant for the person reading the job status."""

    exit_code: WorkerExitCode = WorkerExitCode.INVALID_CONFIG
    reason: str = "WorkerFailed"


class InvalidConfigError(WorkerError):
    exit_code = WorkerExitCode.INVALID_CONFIG
    reason = "InvalidConfig"


class DataError(WorkerError):
    exit_code = WorkerExitCode.DATA_ERROR
    reason = "DataError"


class OutOfMemoryError(WorkerError):
    exit_code = WorkerExitCode.CUDA_OOM
    reason = "CudaOutOfMemory"


class NonFiniteLossError(WorkerError):
    exit_code = WorkerExitCode.NON_FINITE_LOSS
    reason = "NonFiniteLoss"


class StorageError(WorkerError):
    exit_code = WorkerExitCode.STORAGE_ERROR
    reason = "StorageError"


class ModelLoadError(WorkerError):
    exit_code = WorkerExitCode.MODEL_LOAD_ERROR
    reason = "ModelLoadError"
