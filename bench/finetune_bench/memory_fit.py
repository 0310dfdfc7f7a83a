"""Fit the memory model's measured constants on part of the calibration data, check the rest.

    python -m finetune_bench.memory_fit [tests/data/calibration]

The calibration points (tests/data/calibration/*.jsonl) are split by a rule, not by hand:
the FIT points are the Llama-3-8B shape at sequence length 512, LoRA dropout 0 and at most
8,192 tokens per micro-batch; every other point is HELD OUT, so the held-out set differs from
the fit in model shape (Llama-3.2-1B), sequence length (2,048 and 8,192), dropout (0.1) or
micro-batch size (more tokens than any fit point). A new record lands on one side or the
other by the same rule.

The constants of `MemoryConstants` that were fitted rather than derived (`FITTED`) are fitted
again on the fit points only: least squares on the relative error, by Gauss-Newton over the
planner's own `estimate_memory` (numerical derivatives, constants kept non-negative). A
constant that no fit point depends on keeps its shipped value; one they only bound from one
side goes to the bound nearest its shipped value. The physically known ones
(cuBLAS workspaces, CUDA context) and the FSDP constant, calibrated on multi-rank runs, are
not touched.

Printed: the split, the shipped and refitted constants, the error range of each on the fit
and the held-out points, and the held-out points by what sets them apart. `CLAIMED` holds the
ranges docs/memory-model.md states (each measured range rounded outward to 0.1 %);
tests/planner/ asserts every point within them and that the docs print what this prints.
Bench code: the planner never imports it.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from finetune_bench.calibration_report import load_points
from finetune_operator.planner.calibration import CalibrationPoint
from finetune_operator.planner.memory import (
    DEFAULT_CONSTANTS,
    MemoryConstants,
    MiB,
    estimate_memory,
)

# The split rule: a point is fitted only if it matches the fit's model shape, sequence length
# and dropout and has no more tokens per micro-batch than FIT_MAX_TOKENS.
FIT_MODEL = "llama-3-8b"
FIT_SEQ_LEN = 512
FIT_DROPOUT = 0.0
FIT_MAX_TOKENS = 8192

FITTED = (
    "backward_bytes_per_intermediate",
    "backward_fp32_cast_bytes_per_intermediate",
    "backward_dropout_bytes_per_intermediate",
    "fused_ce_bytes_per_hidden",
    "unfused_ce_bytes_per_vocab",
    "packed_rows_bytes_per_layer",
    "allocator_slack_bytes",
    "allocator_slack_fraction",
)
"""The constants the docstrings of MemoryConstants call fitted or measured on calibration
runs. Not here: cublas_workspace_bytes and cuda_context_bytes (known from the hardware and
measured directly), fsdp_gathered_layers (fitted on multi-rank runs, which are not
calibration records)."""

SHIPPED = "shipped"
REFIT = "refit"
FIT = "fit"
HELD_OUT = "held out"
ALL = "all"

CLAIMED: dict[tuple[str, str], tuple[float, float]] = {
    (SHIPPED, FIT): (-0.028, 0.02),
    (SHIPPED, HELD_OUT): (-0.037, 0.042),
    (SHIPPED, ALL): (-0.037, 0.042),
    (REFIT, FIT): (-0.014, 0.013),
    (REFIT, HELD_OUT): (-0.045, 0.108),
    (REFIT, ALL): (-0.045, 0.108),
}
"""(constants, points) -> (lowest, highest) relative error, (predicted - measured) / measured,
as docs/memory-model.md states it: the measured range rounded outward to 0.1 %. Change it only
with the calibration data or the model, and then the docs with it (this module prints both)."""


def held_out_reasons(point: CalibrationPoint) -> list[str]:
    """Why a point is held out (empty: it is a fit point)."""
    s = point.shape
    reasons = []
    if point.arch.name != FIT_MODEL:
        reasons.append(f"model shape {point.arch.name}")
    if s.seq_len != FIT_SEQ_LEN:
        reasons.append(f"sequence length {s.seq_len}")
    if s.lora_dropout != FIT_DROPOUT:
        reasons.append(f"LoRA dropout {s.lora_dropout:g}")
    if s.tokens_per_micro_batch > FIT_MAX_TOKENS:
        reasons.append(f"more than {FIT_MAX_TOKENS:,} tokens per micro-batch")
    return reasons


def split(
    points: Sequence[CalibrationPoint],
) -> tuple[list[CalibrationPoint], list[CalibrationPoint]]:
    """(fit points, held-out points), each in the order given."""
    fit = [p for p in points if not held_out_reasons(p)]
    held = [p for p in points if held_out_reasons(p)]
    return fit, held


def relative_errors(
    points: Sequence[CalibrationPoint], constants: MemoryConstants = DEFAULT_CONSTANTS
) -> np.ndarray:
    """(predicted - measured) / measured peak reserved bytes, one per point."""
    return np.array(
        [
            (estimate_memory(p.arch, p.shape, constants).total - p.peak_reserved_bytes)
            / p.peak_reserved_bytes
            for p in points
        ]
    )


def round_constants(constants: MemoryConstants) -> MemoryConstants:
    """The precision the constants are written with: bytes per channel to 0.01, byte counts to
    0.1 MiB, the slack fraction to 0.0001."""
    changes: dict[str, float | int] = {}
    for name in FITTED:
        value = getattr(constants, name)
        if name.endswith("_fraction"):
            changes[name] = round(value, 4)
        elif isinstance(getattr(DEFAULT_CONSTANTS, name), int):
            changes[name] = int(round(value / (0.1 * MiB)) * (0.1 * MiB))
        else:
            changes[name] = round(value, 2)
    return replace(constants, **changes)


DETERMINED = "determined"
BOUNDED = "bounded"
FREE = "free"


@dataclass(frozen=True)
class Refit:
    constants: MemoryConstants
    status: dict[str, str]
    """Per fitted constant: DETERMINED by the fit points; BOUNDED (they only bound it: it sits at
    the bound nearest its start value, and every value beyond fits as well); or FREE (no fit
    point depends on it: it keeps its start value)."""
    iterations: int

    @property
    def determined(self) -> tuple[str, ...]:
        return tuple(n for n, s in self.status.items() if s == DETERMINED)


def _with(start: MemoryConstants, names: Sequence[str], x: np.ndarray) -> MemoryConstants:
    """`start` with each named constant scaled by x (the fit works in units of the start)."""
    return replace(
        start, **{n: getattr(start, n) * float(v) for n, v in zip(names, x, strict=True)}
    )


def _towards_start(
    points: Sequence[CalibrationPoint],
    start: MemoryConstants,
    names: Sequence[str],
    x: np.ndarray,
    k: int,
) -> tuple[float, str]:
    """Move constant k from the fit's value towards its start value (1 in units of the start)
    as far as no fit point's prediction changes: (value, DETERMINED, BOUNDED or FREE)."""
    base = relative_errors(points, _with(start, names, x))

    def unchanged(value: float) -> bool:
        trial = x.copy()
        trial[k] = value
        errors = relative_errors(points, _with(start, names, trial))
        return bool(np.abs(errors - base).max() <= 1e-9)

    if x[k] == 1.0:  # still at its start: free only if moving it either way changes nothing
        return 1.0, (FREE if unchanged(0.5) and unchanged(1.5) else DETERMINED)
    if unchanged(1.0):
        return 1.0, FREE
    near, far = float(x[k]), 1.0
    # A step large enough to notice: predictions are whole bytes.
    if not unchanged(near + 0.01 * (far - near)):
        return near, DETERMINED
    for _ in range(40):
        middle = 0.5 * (near + far)
        near, far = (middle, far) if unchanged(middle) else (near, middle)
    return near, BOUNDED


def fit_constants(
    points: Sequence[CalibrationPoint],
    start: MemoryConstants = DEFAULT_CONSTANTS,
    names: Sequence[str] = FITTED,
    max_iterations: int = 200,
) -> Refit:
    """Least squares on the points' relative errors over the named constants, from `start`:
    Gauss-Newton with central differences and step halving, each constant kept >= 0. Where the
    fit points leave a constant free (no prediction changes with it), it goes as close to its
    start value as they allow (the shipped value, by default). Rounded with
    `round_constants`."""
    names = list(names)
    n = len(names)
    x = np.ones(n)
    r = relative_errors(points, start)
    h = 1e-2  # in units of the start value; predictions are piecewise linear in the constants
    iterations = 0
    for iterations in range(1, max_iterations + 1):  # noqa: B007 (reported)
        jacobian = np.zeros((len(points), n))
        for k in range(n):
            up, down = x.copy(), x.copy()
            up[k] += h
            down[k] -= h
            jacobian[:, k] = (
                relative_errors(points, _with(start, names, up))
                - relative_errors(points, _with(start, names, down))
            ) / (2 * h)
        # Predictions are whole bytes: a column below this is rounding, not a dependence.
        free = np.abs(jacobian).max(axis=0) > 1e-5
        while True:
            step = np.zeros(n)
            if free.any():
                step[free] = np.linalg.lstsq(jacobian[:, free], -r, rcond=None)[0]
            blocked = free & (x <= 0) & (step < 0)
            if not blocked.any():
                break
            free &= ~blocked
        t = 1.0
        while t >= 2**-12:
            trial = np.maximum(x + t * step, 0.0)
            r_trial = relative_errors(points, _with(start, names, trial))
            if r_trial @ r_trial < r @ r:
                break
            t /= 2
        else:
            break  # no step improves the fit: converged
        gain = r @ r - r_trial @ r_trial
        x, r = trial, r_trial
        if gain < 1e-14:
            break
    status = {}
    for k in range(n):
        x[k], status[names[k]] = _towards_start(points, start, names, x, k)
    constants = round_constants(_with(start, names, x))
    return Refit(constants=constants, status=status, iterations=iterations)


def error_range(errors: Sequence[float]) -> tuple[float, float]:
    return float(min(errors)), float(max(errors))


def claim(errors: Sequence[float]) -> tuple[float, float]:
    """The range as the docs state it: lowest and highest rounded outward to 0.1 %."""
    lo, hi = error_range(errors)
    # A little tolerance so an exact boundary (0.031 stored as 0.0310000001) stays put.
    return (math.floor(lo * 1000 + 1e-9) / 1000, math.ceil(hi * 1000 - 1e-9) / 1000)


def format_range(bounds: tuple[float, float]) -> str:
    lo, hi = bounds
    return f"{100 * lo:+.1f} % .. {100 * hi:+.1f} %"


@dataclass(frozen=True)
class Report:
    points: list[CalibrationPoint]
    fit: list[CalibrationPoint]
    held: list[CalibrationPoint]
    refit: Refit
    errors: dict[tuple[str, str], np.ndarray]
    """(SHIPPED or REFIT, FIT or HELD_OUT or ALL) -> relative errors, in the order of points."""

    def claims(self) -> dict[tuple[str, str], tuple[float, float]]:
        return {key: claim(errors) for key, errors in self.errors.items()}

    @property
    def adopt_refit(self) -> bool:
        """Only if the refit predicts the held-out points at least as well at both ends."""
        s_lo, s_hi = error_range(self.errors[SHIPPED, HELD_OUT])
        r_lo, r_hi = error_range(self.errors[REFIT, HELD_OUT])
        return r_lo >= s_lo and r_hi <= s_hi


def build_report(points: Sequence[CalibrationPoint]) -> Report:
    points = list(points)
    fit, held = split(points)
    refit = fit_constants(fit)
    errors = {}
    for label, constants in ((SHIPPED, DEFAULT_CONSTANTS), (REFIT, refit.constants)):
        errors[label, FIT] = relative_errors(fit, constants)
        errors[label, HELD_OUT] = relative_errors(held, constants)
        errors[label, ALL] = relative_errors(points, constants)
    return Report(points=points, fit=fit, held=held, refit=refit, errors=errors)


def _constant_text(name: str, value: float) -> str:
    if name.endswith("_fraction"):
        return f"{value:.4f}"
    if isinstance(getattr(DEFAULT_CONSTANTS, name), int):
        return f"{value / MiB:.1f} MiB"
    return f"{value:.2f}"


def claims_table(report: Report, claims: dict[tuple[str, str], tuple[float, float]]) -> str:
    """Error ranges of both sets of constants on both sides of the split (docs/memory-model.md)."""
    lines = [
        f"| constants | fit ({len(report.fit)} points) | held out ({len(report.held)} points) "
        f"| all ({len(report.points)} points) |",
        "|---|---|---|---|",
    ]
    for label, text in (
        (SHIPPED, "shipped (`MemoryConstants`)"),
        (REFIT, "refitted on the fit points only"),
    ):
        cells = " | ".join(format_range(claims[label, part]) for part in (FIT, HELD_OUT, ALL))
        lines.append(f"| {text} | {cells} |")
    return "\n".join(lines)


def constants_table(report: Report) -> str:
    lines = ["| constant | shipped | refitted |", "|---|---|---|"]
    for name in FITTED:
        shipped = _constant_text(name, getattr(DEFAULT_CONSTANTS, name))
        value = getattr(report.refit.constants, name)
        status = report.refit.status[name]
        if status == DETERMINED:
            refit = _constant_text(name, value)
        elif status == BOUNDED:
            side = "at most" if value < getattr(DEFAULT_CONSTANTS, name) else "at least"
            further = "lower" if side == "at most" else "higher"
            refit = f"{side} {_constant_text(name, value)} ({further} values fit as well)"
        else:
            refit = "no fit point depends on it (shipped value kept)"
        lines.append(f"| `{name}` | {shipped} | {refit} |")
    return "\n".join(lines)


def _errors_text(errors: np.ndarray) -> str:
    if len(errors) == 1:
        return f"{100 * errors[0]:+.1f} %"
    return format_range(claim(errors))


def held_out_table(report: Report) -> str:
    """The held-out points grouped by what sets them apart from the fit points."""
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(report.held):
        groups.setdefault(", ".join(held_out_reasons(p)), []).append(i)
    lines = ["| held out for | points | shipped | refitted |", "|---|---|---|---|"]
    for reason, idx in sorted(groups.items()):
        shipped = _errors_text(report.errors[SHIPPED, HELD_OUT][idx])
        refit = _errors_text(report.errors[REFIT, HELD_OUT][idx])
        lines.append(f"| {reason} | {len(idx)} | {shipped} | {refit} |")
    return "\n".join(lines)


def markdown(report: Report) -> str:
    """What docs/memory-model.md's "Held-out validation" section shows, computed."""
    return "\n\n".join(
        (claims_table(report, report.claims()), constants_table(report), held_out_table(report))
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    directory = Path(argv[0] if argv else "tests/data/calibration")
    report = build_report(load_points(directory))
    print(
        f"fit: model {FIT_MODEL}, seq {FIT_SEQ_LEN}, dropout {FIT_DROPOUT:g}, at most "
        f"{FIT_MAX_TOKENS:,} tokens per micro-batch ({len(report.fit)} points); held out: "
        f"everything else ({len(report.held)} points). Gauss-Newton: "
        f"{report.refit.iterations} iterations.\n"
    )
    print(markdown(report))
    print()
    if report.adopt_refit:
        print("The refit predicts the held-out points at least as well: adopt its constants.")
    else:
        print("The refit predicts the held-out points worse: keep the shipped constants.")
    if report.claims() != CLAIMED:
        print(
            "CLAIMED in finetune_bench/memory_fit.py differs from these ranges: update it and "
            "docs/memory-model.md",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
