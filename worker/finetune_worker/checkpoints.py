"""Checkpoint completeness and selection for resuming after preemption.

The Trainer writes `checkpoint-<step>/`; only after it finishes do we add a `COMPLETE`
marker holding the spec hash and the sha256 of every file. A directory without a
valid marker, with a different spec hash, or whose files no longer match is skipped
with a warning: a half-written checkpoint from a killed pod must never be fatal.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _files(directory: Path) -> list[Path]:
    return sorted(
        p
        for p in directory.rglob("*")
        if p.is_file() and p.name != MARKER and not p.name.startswith(f".{MARKER}")
    )


def mark_complete(checkpoint: Path, spec_hash: str, step: int, plan: dict | None = None) -> Path:
    """Write the marker last, atomically, so its presence means the checkpoint is whole.

    `plan` records how the run was executed (method, micro-batch, ...): not part of the
    checkpoint's identity, but a resume under a different plan is reported.
    """
    marker = {
        "specHash": spec_hash,
        "step": step,
        "plan": plan or {},
        "files": {str(p.relative_to(checkpoint)): sha256_file(p) for p in _files(checkpoint)},
    }
    tmp = checkpoint / f".{MARKER}.tmp"
    tmp.write_text(json.dumps(marker, indent=1, sort_keys=True))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, checkpoint / MARKER)
    return checkpoint / MARKER


def checkpoint_problem(checkpoint: Path, spec_hash: str) -> str | None:
    """Why this checkpoint cannot be resumed from, or None when it can."""
    marker_path = checkpoint / MARKER
    if not marker_path.is_file():
        return "it has no COMPLETE marker (the save was interrupted)"
    try:
        marker = json.loads(marker_path.read_text())
        recorded_hash, files = marker["specHash"], marker["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"its COMPLETE marker is unreadable ({exc})"
    if recorded_hash != spec_hash:
        return (
            f"it was written for spec hash {recorded_hash}, but this job's spec hash is "
            f"{spec_hash} (the spec changed since)"
        )
    if not files:
        return "its COMPLETE marker lists no files"
    for name, digest in files.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if sha256_file(path) != digest:
            return f"{name} does not match the sha256 recorded when it was saved"
    return None


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """`checkpoint-<step>` directories under root, newest (highest step) first."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _CHECKPOINT_NAME.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found, reverse=True)


def plan_differences(checkpoint: Path, plan: dict) -> list[str]:
    """`field: saved -> now` for every plan field that differs from the checkpoint's."""
    saved = json.loads((checkpoint / MARKER).read_text()).get("plan") or {}
    return [
        f"{key}: {saved.get(key)!r} -> {value!r}"
        for key, value in sorted(plan.items())
        if key in saved and saved[key] != value
    ]


def find_resumable_checkpoint(root: Path, spec_hash: str, plan: dict | None = None) -> Path | None:
    """The newest complete checkpoint for this spec; the others are skipped with a warning."""
    for step, checkpoint in list_checkpoints(root):
        problem = checkpoint_problem(checkpoint, spec_hash)
        if problem is None:
            log.info("resuming from %s (step %d)", checkpoint, step)
            differences = plan_differences(checkpoint, plan or {})
            if differences:
                # Same spec, so the weights are compatible; the run continues, but its
                # remaining steps see a different batch layout or numerics.
                log.warning(
                    "resuming %s under a different plan (%s)",
                    checkpoint.name,
                    "; ".join(differences),
                )
            return checkpoint
        log.warning("skipping checkpoint %s: %s", checkpoint, problem)
    return None
