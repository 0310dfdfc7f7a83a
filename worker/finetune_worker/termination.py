"""The JSON summary in the container's termination message.

Kubernetes keeps at most 4 KiB of `/dev/termination-log` in the pod status, and the
operator reads it when the status patches could not reach the API server, so the
summary must always parse: when it is too long, less important fields are dropped
first and the human message is shortened last.

In a distributed run each rank writes its summary to its own file in the directory the
launcher names (FINETUNE_WORKER_RANK_SUMMARY_DIR), and the launcher (launch.py), the only
writer of the pod's termination log, keeps the one that explains the outcome.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from finetune_api.constants import TERMINATION_LOG_ENV, TERMINATION_LOG_PATH

log = logging.getLogger(__name__)

LIMIT_BYTES = 4096
# Dropped in this order until the summary fits; outcome, exit code, peak memory and
# throughput are what the operator needs most, so they are never in this list.
DROP_FIRST = (
    ("progress",),
    ("metrics", "evalLoss"),
    ("metrics", "trainLoss"),
    ("adapter",),
    ("metrics", "trainRuntimeSeconds"),
    ("metrics", "samplesPerSecond"),
)


RANK_SUMMARY_DIR_ENV = "FINETUNE_WORKER_RANK_SUMMARY_DIR"


def rank_summary_path(directory: Path, rank: int | str) -> Path:
    return Path(directory) / f"rank-{rank}.json"


def termination_log_path() -> Path | None:
    """Where to write: this rank's file under the launcher; otherwise the env override, else
    the kubelet's file when it exists (a rank other than 0 started without our launcher
    writes nothing: the pod has one termination log)."""
    rank = os.environ.get("RANK")
    rank_dir = os.environ.get(RANK_SUMMARY_DIR_ENV)
    if rank_dir and rank is not None:
        return rank_summary_path(Path(rank_dir), rank)
    if rank not in (None, "0"):
        return None
    override = os.environ.get(TERMINATION_LOG_ENV)
    if override:
        return Path(override)
    default = Path(TERMINATION_LOG_PATH)
    return default if default.exists() else None


def _encode(summary: dict) -> bytes:
    return json.dumps(summary, separators=(",", ":"), sort_keys=True, default=str).encode()


def _drop(summary: dict, path: tuple[str, ...]) -> None:
    node: Any = summary
    for key in path[:-1]:
        node = node.get(key) if isinstance(node, dict) else None
        if node is None:
            return
    if isinstance(node, dict):
        node.pop(path[-1], None)


def fit_summary(summary: dict, limit: int = LIMIT_BYTES) -> bytes:
    """Compact JSON of `summary`, no longer than `limit` bytes."""
    summary = json.loads(json.dumps(summary, default=str))  # a deep copy we may trim
    data = _encode(summary)
    for path in DROP_FIRST:
        if len(data) <= limit:
            return data
        _drop(summary, path)
        data = _encode(summary)
    message = str(summary.get("message", ""))
    while len(data) > limit and message:
        overflow = len(data) - limit
        message = message[: max(len(message) - overflow - 3, 0)]
        summary["message"] = message + "..." if message else ""
        data = _encode(summary)
    if len(data) > limit:  # only the essentials survive
        keep = {k: summary[k] for k in ("result", "exitCode", "reason") if k in summary}
        data = _encode(keep)
    return data


def report_document(summary: dict) -> dict:
    """The summary as the operator will read it: validated by api.WorkerReport, the one
    contract between the two. A summary the model refuses is a bug here; the essentials are
    still written, so the pod never exits without saying how it ended."""
    from pydantic import ValidationError

    from finetune_api import WorkerReport

    try:
        return WorkerReport.model_validate(summary).model_dump(
            mode="json", by_alias=True, exclude_none=True
        )
    except ValidationError as exc:
        log.error(
            "the run's summary does not match api.WorkerReport (%s); writing its outcome only",
            exc.errors()[0].get("msg"),
        )
        return {k: summary[k] for k in ("result", "exitCode", "reason", "message") if k in summary}


def write_termination_message(summary: dict, path: Path | None = None) -> Path | None:
    """Write the summary; a failure to write is logged, never raised (we are exiting)."""
    path = path or termination_log_path()
    if path is None:
        return None
    try:
        path.write_bytes(fit_summary(report_document(summary)))
    except OSError as exc:
        log.warning("cannot write the termination message to %s: %s", path, exc)
        return None
    return path
