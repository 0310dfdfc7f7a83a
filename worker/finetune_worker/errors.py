"""Failures the worker reports to the operator, each tied to one documented exit code.

The operator's pod failure policy reads the exit code, so every failure that is not a
bug must become one of these exceptions; the CLI turns them into the process status.
"""

from __future__ import annotations

from finetune_api.exit_codes import WorkerExitCode


class WorkerError(Exception):
    """Base class: a failure with a message meant for the person reading the job status."""

    # The condition reason is `exit_code.reason` (api/exit_codes.py): one source of truth.
    exit_code: WorkerExitCode = WorkerExitCode.INVALID_CONFIG


class InvalidConfigError(WorkerError):
    exit_code = WorkerExitCode.INVALID_CONFIG


class DataError(WorkerError):
    exit_code = WorkerExitCode.DATA_ERROR


class OutOfMemoryError(WorkerError):
    exit_code = WorkerExitCode.CUDA_OOM


class NonFiniteLossError(WorkerError):
    exit_code = WorkerExitCode.NON_FINITE_LOSS


class StorageError(WorkerError):
    exit_code = WorkerExitCode.STORAGE_ERROR


class ModelLoadError(WorkerError):
    exit_code = WorkerExitCode.MODEL_LOAD_ERROR


class WorkerEnvironmentError(WorkerError):
    """The image or node lacks something the plan needs at run time (preflight.py)."""

    exit_code = WorkerExitCode.ENVIRONMENT_ERROR
