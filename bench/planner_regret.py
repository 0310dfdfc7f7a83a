"""The planner's regret: its choice against the fastest configuration that fits, measured.

    python bench/planner_regret.py [GRID.jsonl ...] [--previous]

For a grid of jobs (Llama-3.2-1B and Llama-3-8B, 8-80 GiB, seq 512-4096, the API's default
dropout), every candidate the planner enumerates whose configuration was measured gets its
measured tokens/s; regret is 1 - measured(planner's choice) / measured(fastest fitting
candidate). "Fits" is the memory model's verdict (validated separately in
docs/memory-model.md). Jobs whose choice was not measured are listed, not scored.

The measurements (default: both files below): bench/data/speed-grid-h200.jsonl has no and
full checkpointing at 1,024 to 16,384 tokens per micro-batch; bench/data/
partial-checkpointing-h200.jsonl has, for every job, method and token count, the fitting
configuration that recomputes the fewest layers (the fastest of its kind: recomputing more
layers only adds work) wherever the speed model put it within 15 % of the planner's choice.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "operator")]

from finetune_operator.planner import Budget, PlanRequest, plan_training, preset
from finetune_operator.planner.memory import GiB

SHAPES = {"llama-3-8b": "meta-llama/Meta-Llama-3-8B", "llama-3.2-1b": "meta-llama/Llama-3.2-1B"}
JOBS = [  # (shape, budget GiB, seq, batch)
    ("llama-3-8b", 80, 512, 64),
    ("llama-3-8b", 48, 512, 64),
    ("llama-3-8b", 40, 1024, 64),
    ("llama-3-8b", 24, 1024, 32),
    ("llama-3-8b", 24, 2048, 16),
    ("llama-3-8b", 16, 2048, 16),
    ("llama-3-8b", 12, 512, 64),
    ("llama-3-8b", 80, 4096, 16),
    ("llama-3-8b", 40, 4096, 8),
    ("llama-3.2-1b", 8, 2048, 32),
    ("llama-3.2-1b", 16, 1024, 64),
    ("llama-3.2-1b", 24, 512, 128),
    ("llama-3.2-1b", 40, 4096, 16),
    ("llama-3.2-1b", 6, 1024, 32),
    ("llama-3.2-1b", 80, 2048, 64),
]


@dataclass
class JobRegret:
    job: tuple
    chosen: str
    chosen_tps: float | None
    best: str
    best_tps: float

    @property
    def regret(self) -> float | None:
        return None if self.chosen_tps is None else 1 - self.chosen_tps / self.best_tps


GRIDS = [
    ROOT / "bench/data/speed-grid-h200.jsonl",
    ROOT / "bench/data/partial-checkpointing-h200.jsonl",
]


def measured_table(*paths: Path) -> dict[tuple, float]:
    """(shape, method, recomputed layers, tokens per micro-batch) -> measured tokens/s."""
    table = {}
    for path in paths or GRIDS:
        for line in path.read_text().splitlines():
            r = json.loads(line)
            if r.get("kind") == "run" and r["dropout"] > 0 and not r.get("error"):
                layers = preset(SHAPES[r["shape"]]).num_layers
                recomputed = r.get("ckpt_layers") or (layers if r["grad_ckpt"] else 0)
                key = (r["shape"], r["method"], recomputed, r["tokens_per_micro_batch"])
                table[key] = r["tokens_per_s"]
    return table


def describe(c, layers: int) -> str:
    recomputed = c.shape.recomputed_layers(layers)
    ckpt = (
        "no-ckpt"
        if recomputed == 0
        else "ckpt"
        if recomputed == layers
        else f"ckpt {recomputed}/{layers}"
    )
    return f"{c.shape.method} {ckpt} {c.shape.tokens_per_micro_batch} tok"


def regrets(measured: dict[tuple, float], jobs=JOBS) -> list[JobRegret]:
    out = []
    for shape, gib, seq, batch in jobs:
        arch = preset(SHAPES[shape])
        request = PlanRequest(seq_len=seq, batch_size=batch, packing=True, lora_dropout=0.05)
        decision = plan_training(arch, request, Budget(gib * GiB))
        truth = {}
        for c in decision.candidates:
            key = (
                shape,
                c.shape.method,
                c.shape.recomputed_layers(arch.num_layers),
                c.shape.tokens_per_micro_batch,
            )
            if c.fits and key in measured:
                truth[id(c)] = (c, measured[key])
        if not truth or decision.chosen is None:
            continue
        best, best_tps = max(truth.values(), key=lambda item: item[1])
        chosen_tps = truth.get(id(decision.chosen), (None, None))[1]
        out.append(
            JobRegret(
                (shape, gib, seq, batch),
                describe(decision.chosen, arch.num_layers),
                chosen_tps,
                describe(best, arch.num_layers),
                best_tps,
            )
        )
    return out


def previous_speed_score(arch, shape) -> float:
    """The score the planner used before speed.py: fixed rates per method and checkpointing,
    one saturation curve and one host-bound threshold for every model size."""
    rates = {
        ("lora", False): 1.00,
        ("lora", True): 0.70,
        ("qlora", False): 0.87,
        ("qlora", True): 0.57,
    }
    tokens = shape.tokens_per_micro_batch
    host = 2048 * (1.4 if shape.gradient_checkpointing else 1.0)
    half = {"lora": 512, "qlora": 1536}[shape.method]
    return (
        rates[(shape.method, shape.gradient_checkpointing)]
        * tokens
        / (tokens + half)
        * min(1.0, tokens / host)
    )


def main() -> int:
    paths = [Path(a) for a in sys.argv[1:] if not a.startswith("--")]
    if "--previous" in sys.argv:  # the same jobs under the old score, for comparison
        from finetune_operator.planner import decide

        decide.speed_score = previous_speed_score
        decide.QLORA_MIN_SPEEDUP = 1.0
    rows = regrets(measured_table(*paths))
    print(
        f"{'job (shape, GiB, seq, batch)':36} {'planner':28} {'tok/s':>7} "
        f"{'fastest fitting':28} {'tok/s':>7} {'regret':>7}"
    )
    for r in rows:
        tps = f"{r.chosen_tps:.0f}" if r.chosen_tps else "-"
        regret = f"{r.regret:.1%}" if r.regret is not None else "unmeasured"
        print(f"{r.job!s:36} {r.chosen:28} {tps:>7} {r.best:28} {r.best_tps:>7.0f} {regret:>7}")
    scored = [r.regret for r in rows if r.regret is not None]
    print(
        f"\n{len(scored)} jobs scored: mean regret {sum(scored) / len(scored):.1%}, "
        f"max {max(scored):.1%}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
