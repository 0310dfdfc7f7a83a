"""The worker's report of a run: one model for what the worker writes and the operator reads.

The worker writes it as its container's termination message (and each rank's summary file
under the launcher); the operator reads it from the pod's status when the worker could not
patch the FineTuneJob itself, and to explain a failure. Both sides validate with this model,
so a key renamed on one side is an error in tests, not a status field that silently stays
empty. `metrics` and `progress` are the FineTuneJob status's own models.
"""

from __future__ import annotations

from typing import Literal

from .common import Artifact, StatusModel
from .finetunejob import Progress, TrainingMetrics


class ReportedAdapter(Artifact):
    """The adapter a run wrote: status.adapter's fields, plus where the pod saw it."""

    path: str | None = None
    """The adapter directory inside the worker pod."""


class WorkerReport(StatusModel):
    """A run's outcome as the worker reports it (the termination message's JSON)."""

    result: Literal["Succeeded", "Failed", "Preempted"]
    exit_code: int
    """The process's exit code: 0, a worker code (api/exit_codes.py), 1 for a crash, 143 when
    SIGTERM stopped training after a checkpoint."""
    reason: str | None = None
    """The condition reason this outcome maps to (e.g. `DataError`)."""
    message: str = ""
    spec_hash: str | None = None
    metrics: TrainingMetrics | None = None
    progress: Progress | None = None
    adapter: ReportedAdapter | None = None
    base: str | None = None
    """Merges: the base model the adapter was merged into."""
    output: str | None = None
    """Merges: where the merged model was written."""
