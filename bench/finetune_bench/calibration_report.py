"""Predicted against measured: the table and the plot in docs/memory-model.md.

    python -m finetune_bench.calibration_report [tests/data/calibration] [docs/img]

Replays every calibration point through the operator's memory model, prints a Markdown table
of them (with the side of memory_fit's held-out split each is on) and writes
`memory-model-calibration.png` (predicted vs measured peak, one marker per source, shaded:
-5 % .. +10 %). A tool for the docs, so it lives with the benchmarks and never ships in an
image.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from finetune_operator.planner.calibration import (
    CalibrationPoint,
    is_measurement,
    point_from_record,
)
from finetune_operator.planner.memory import GiB, estimate_memory


def load_points(directory: Path) -> list[CalibrationPoint]:
    points = []
    for path in sorted(directory.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                if is_measurement(record):
                    points.append(point_from_record(record, path.name))
    return points


def _batches(shape) -> str:
    if shape.varlen_rows:
        return "varlen row"
    if shape.packing:
        return "packed"
    return "padded, mask" if shape.masked_attention else "no mask"


def markdown_table(points: list[CalibrationPoint]) -> str:
    from finetune_bench.memory_fit import held_out_reasons  # it imports load_points from here

    lines = [
        (
            "| source | model | method | r | seq | micro-batch | ckpt | kernels | adapter input "
            "| batches | dropout | measured GiB | predicted GiB | error | set |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in points:
        predicted = estimate_memory(p.arch, p.shape).total
        error = (predicted - p.peak_reserved_bytes) / p.peak_reserved_bytes
        s = p.shape
        adapter_input = (
            "fp32 residual"
            if s.upcast_non_quantized
            else "shared"
            if (s.method == "qlora" or s.lean_lora)
            else "peft copy"
        )
        lines.append(
            f"| {p.source.removesuffix('.jsonl')} | {p.arch.name} | {s.method} | {s.lora_r} "
            f"| {s.seq_len} | {s.micro_batch} | {'on' if s.gradient_checkpointing else 'off'} "
            f"| {'liger' if s.fused_kernels else 'stock'} | {adapter_input} | {_batches(s)} "
            f"| {s.lora_dropout:g} | {p.peak_reserved_bytes / GiB:.2f} | {predicted / GiB:.2f} "
            f"| {error:+.1%} | {'held out' if held_out_reasons(p) else 'fit'} |"
        )
    return "\n".join(lines)


def plot(points: list[CalibrationPoint], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_err) = plt.subplots(1, 2, figsize=(12, 5.2))
    markers = {"lora": "o", "qlora": "s"}
    sources = sorted({p.source for p in points})
    colors = dict(
        zip(
            sources,
            ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"),
            strict=False,  # usually fewer sources than colours: the rest go unused
        )
    )
    top = 0.0
    for p in points:
        measured = p.peak_reserved_bytes / GiB
        predicted = estimate_memory(p.arch, p.shape).total / GiB
        top = max(top, measured, predicted)
        filled = colors[p.source] if not p.shape.gradient_checkpointing else "none"
        ax.scatter(
            measured,
            predicted,
            marker=markers[p.shape.method],
            s=40,
            edgecolors=colors[p.source],
            facecolors=filled,
        )
        ax_err.scatter(
            measured,
            100 * (predicted - measured) / measured,
            marker=markers[p.shape.method],
            s=40,
            edgecolors=colors[p.source],
            facecolors=filled,
        )
    top *= 1.05
    ax.plot([0, top], [0, top], color="black", linewidth=0.8)
    ax.fill_between(
        [0, top],
        [0, 0.95 * top],
        [0, 1.10 * top],
        color="tab:green",
        alpha=0.12,
        label="accepted: -5 % .. +10 %",
    )
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel("measured peak reserved (GiB)")
    ax.set_ylabel("predicted peak reserved (GiB)")
    ax.set_title("Planner prediction vs H200 measurement")
    ax_err.axhspan(-5, 10, color="tab:green", alpha=0.12)
    ax_err.axhline(0, color="black", linewidth=0.8)
    ax_err.set_xlabel("measured peak reserved (GiB)")
    ax_err.set_ylabel("prediction error (%)")
    ax_err.set_title("Error per point")
    handles = [
        plt.Line2D([], [], marker="o", linestyle="", color="gray", label="LoRA"),
        plt.Line2D([], [], marker="s", linestyle="", color="gray", label="QLoRA"),
        plt.Line2D(
            [],
            [],
            marker="o",
            linestyle="",
            markerfacecolor="none",
            color="gray",
            label="checkpointing on (hollow)",
        ),
    ]
    handles += [
        plt.Line2D([], [], marker="o", linestyle="", color=c, label=s.removesuffix(".jsonl"))
        for s, c in colors.items()
    ]
    ax.legend(handles=handles, loc="upper left", fontsize=8)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "memory-model-calibration.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    data = Path(argv[0] if argv else "tests/data/calibration")
    out = Path(argv[1] if len(argv) > 1 else "docs/img")
    points = load_points(data)
    print(markdown_table(points))
    print(f"\nwrote {plot(points, out)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
