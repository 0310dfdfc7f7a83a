"""Draw docs/img/bench.png from the committed benchmark results (bench/data/) and the
reference figures of the common recipe (bench/reference/): tokens/s at each memory budget
against the recipe, and the loss-curve check.

    python -m finetune_bench.throughput_report bench/data docs/img/bench.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# budget label -> (result file, run label, target tokens/s, plain transformers+peft+liger
# figure of the common recipe's headroom probe, bench/reference/common-recipe-h200.jsonl)
BUDGETS = [
    ("80 GiB", "trainer-budgets-h200.jsonl", "trainer-80Gi", 15000, 11762),
    ("48 GiB", "trainer-budgets-h200.jsonl", "trainer-48Gi", 13000, 10484),
    ("24 GiB", "trainer-budgets-h200.jsonl", "trainer-24Gi", 10000, 8185),
    ("12 GiB", "trainer-budgets-h200.jsonl", "trainer-12Gi", 6000, 4618),
]
RECIPE = ("common-recipe-same-data-h200.jsonl", "recipe-lora")
QLORA_RECIPE = ("common-recipe-same-data-h200.jsonl", "recipe-qlora-28")
LOSS_CHECK = ("loss-check-varlen-h200.jsonl", "check-recipe", "check-worker-varlen")


def _rows(path: Path) -> dict[str, dict]:
    return {r["label"]: r for r in map(json.loads, path.read_text().splitlines()) if r.get("label")}


def main(argv: list[str] | None = None) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    argv = sys.argv[1:] if argv is None else argv
    data_dir, out = Path(argv[0]), Path(argv[1])
    recipe = _rows(data_dir / RECIPE[0])[RECIPE[1]]["tokens_per_s"]
    qrecipe = _rows(data_dir / QLORA_RECIPE[0])[QLORA_RECIPE[1]]["tokens_per_s"]
    ours, targets, probe, base, peaks = [], [], [], [], []
    for name, f, label, target, plain in BUDGETS:
        row = _rows(data_dir / f)[label]
        ours.append(row["tokens_per_s"])
        peaks.append(row["peak_total_GiB"])
        targets.append(target)
        probe.append(plain)
        base.append(qrecipe if name == "12 GiB" else recipe)
    check = _rows(data_dir / LOSS_CHECK[0])
    recipe_losses, worker = check[LOSS_CHECK[1]]["losses"], check[LOSS_CHECK[2]]["losses"]

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    x = range(len(BUDGETS))
    w = 0.27
    ax.bar([i - w for i in x], base, w, label="common recipe, same data (trl, mb 1 x 4)")
    ax.bar(list(x), probe, w, label="plain transformers+peft+liger, fixed 512 (reference)")
    ax.bar([i + w for i in x], ours, w, label="this operator's plan + worker, realistic lengths")
    for i, (tps, peak) in enumerate(zip(ours, peaks, strict=True)):
        ax.annotate(
            f"{tps:,.0f}\n{peak:.1f} GiB", (i + w, tps), ha="center", va="bottom", fontsize=7
        )
    ax.scatter([i + w for i in x], targets, marker="_", s=600, color="k", zorder=3, label="target")
    ax.set_xticks(list(x), [b[0] for b in BUDGETS])
    ax.set_ylabel("real tokens / s (one H200)")
    ax.set_title("Llama-3-8B-shaped, LoRA r=16 (QLoRA at 12 GiB)")
    ax.set_ylim(0, 24000)
    ax.legend(fontsize=8, loc="upper center", ncol=2)
    bx.plot(
        range(1, len(recipe_losses) + 1),
        recipe_losses,
        "o",
        label="common recipe (trl SFTTrainer, mb 1 x 4, padded)",
    )
    bx.plot(
        range(1, len(worker) + 1),
        worker,
        "-",
        label="worker (varlen row, liger, lean LoRA, fused AdamW)",
    )
    bx.set_xlabel("optimizer step")
    bx.set_ylabel("training loss")
    bx.set_title("same data, seed and hyperparameters")
    bx.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
