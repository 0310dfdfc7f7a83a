"""Draw docs/img/fp8.png from the committed FP8 results (bench/data/): tokens/s of the
benchmark job's plans with a bf16 base and with `auto` free to choose the FP8 base, and the
200-step loss curves of the same job on both bases with their relative difference.

    python -m finetune_bench.fp8_report bench/data docs/img/fp8.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

BUDGETS = ["80Gi", "48Gi", "24Gi"]


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def draw(data: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # the model's own loss (the budget runs' default), not the trl-head variant at 48 GiB
    bf16 = {
        r["memory"]: r
        for r in _lines(data / "trainer-budgets-h200.jsonl")
        if r.get("model_loss", True)
    }
    fp8 = {r["memory"]: r for r in _lines(data / "trainer-budgets-fp8-h200.jsonl")}
    (quality,) = _lines(data / "fp8-quality-h200.jsonl")

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    x = range(len(BUDGETS))
    width = 0.38
    for offset, rows, name in ((-width / 2, bf16, "bf16 base"), (width / 2, fp8, "FP8 base")):
        values = [rows[b]["tokens_per_s"] for b in BUDGETS]
        bars = left.bar([i + offset for i in x], values, width, label=name)
        left.bar_label(bars, labels=[f"{v:,.0f}" for v in values], fontsize=8)
    left.set_xticks(list(x), [b.replace("Gi", " GiB") for b in BUDGETS])
    left.set_ylabel("tokens/s (product path, one H200)")
    left.set_title("Benchmark job, plan chosen by the planner")
    left.legend()

    steps = range(1, len(quality["lora"]["losses"]) + 1)
    right.plot(steps, quality["lora"]["losses"], label="bf16 base", linewidth=1)
    right.plot(steps, quality["fp8"]["losses"], label="FP8 base", linewidth=1, linestyle="--")
    right.set_xlabel("optimizer step (8,192 tokens each)")
    right.set_ylabel("training loss")
    right.set_title("Same job on both bases, 200 steps")
    right.legend(loc="upper right")
    diff = right.twinx()
    rel = [
        100 * abs(a - b) / a
        for a, b in zip(quality["lora"]["losses"], quality["fp8"]["losses"], strict=True)
    ]
    diff.plot(steps, rel, color="grey", linewidth=0.6, alpha=0.6)
    diff.set_ylabel("relative difference, % (grey)")
    diff.set_ylim(0, max(5.0, max(rel) * 1.2))
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    draw(Path(args[0]), Path(args[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
