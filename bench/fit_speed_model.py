"""Fit the planner's speed model (operator/finetune_operator/planner/speed.py) to measured
throughput, and check it on the points the fit never saw.

    python bench/fit_speed_model.py [bench/data/speed-grid-h200.jsonl]
    python bench/fit_speed_model.py --fp8 [bench/data/fp8-speed-grid-h200.jsonl]

Fits on 1,024 / 4,096 / 16,384 tokens per micro-batch (dropout 0.05, both shapes, both
methods, checkpointing off and on); holds out 2,048 and 8,192 tokens and the dropout-0
points. Prints the constants to copy into SpeedConstants and a table of errors.

With --fp8, only the FP8 base's three constants (its matmul rate and its launch time per layer
with and without checkpointing) are fitted, the shared ones (fixed host time, overlap) kept:
on 4,096 / 12,288 / 16,384 tokens, holding out 8,192.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "operator")]

from finetune_operator.planner import preset
from finetune_operator.planner.memory import TrainingShape
from finetune_operator.planner.speed import (
    DEFAULT_SPEED,
    SpeedConstants,
    predicted_tokens_per_second,
)

ARCH = {
    "llama-3-8b": preset("meta-llama/Meta-Llama-3-8B"),
    "llama-3.2-1b": preset("meta-llama/Llama-3.2-1B"),
}
FIT_TOKENS = {1024, 4096, 16384}
KEYS = [("lora", False), ("lora", True), ("qlora", False), ("qlora", True)]


def load(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("kind") == "run"]


def shape_of(row: dict) -> TrainingShape:
    return TrainingShape(
        method=row["method"],
        gradient_checkpointing=row["grad_ckpt"] > 0,
        micro_batch=1,
        seq_len=row["tokens_per_micro_batch"],
        packing=True,
        lora_dropout=row["dropout"],
    )


def constants_from(v: torch.Tensor) -> SpeedConstants:
    """SpeedConstants from the log-parameters; with tensors in it, speed.py's own formula is
    differentiable, so the fit optimises exactly what the planner computes."""
    e = torch.exp(v)
    return replace(
        DEFAULT_SPEED,
        tflops={"lora": e[0], "qlora": e[1]},
        dequant_seconds_per_gparam=e[2],
        host_seconds_per_layer={k: e[3 + i] for i, k in enumerate(KEYS)},
        host_seconds_fixed=e[7],
        overlap=1 + e[8],
    )


def fit_log_params(start: list[float], constants_of, fit: list[dict], steps: int) -> torch.Tensor:
    """The log-parameters, from `start`, that minimise the squared log error of speed.py's
    prediction (with `constants_of(v)`) against the measured tokens/s of `fit`."""
    v = torch.tensor([math.log(x) for x in start], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([v], lr=0.02)
    for _ in range(steps):
        opt.zero_grad()
        loss = sum(
            (
                torch.log(
                    predicted_tokens_per_second(ARCH[r["shape"]], shape_of(r), constants_of(v))
                )
                - math.log(r["tokens_per_s"])
            )
            ** 2
            for r in fit
        )
        loss.backward()
        opt.step()
    return v.detach()


def print_errors(rows: list[dict], fit: list[dict], constants: SpeedConstants) -> None:
    """Measured against predicted tokens/s for every row, and which side of the split it is."""
    print(f"\n{'point':42} {'measured':>9} {'predicted':>9} {'error':>7}  set")
    for r in rows:
        got = float(predicted_tokens_per_second(ARCH[r["shape"]], shape_of(r), constants))
        held = "fit" if r in fit else "held out"
        print(
            f"{r['label']:42} {r['tokens_per_s']:>9.0f} {got:>9.0f} "
            f"{got / r['tokens_per_s'] - 1:>+7.1%}  {held}"
        )


def fit_fp8(path: Path) -> int:
    rows = [r for r in load(path) if r["method"] == "fp8"]
    fit = [r for r in rows if r["tokens_per_micro_batch"] != 8192]
    d = DEFAULT_SPEED
    keys = [("fp8", False), ("fp8", True)]

    def constants(v: torch.Tensor) -> SpeedConstants:
        e = torch.exp(v)
        return replace(
            d,
            tflops={**d.tflops, "fp8": e[0]},
            host_seconds_per_layer={**d.host_seconds_per_layer, keys[0]: e[1], keys[1]: e[2]},
        )

    start = [d.tflops["fp8"], *[d.host_seconds_per_layer[k] for k in keys]]
    v = fit_log_params(start, constants, fit, steps=3000)
    e = [float(x) for x in torch.exp(v)]
    print(f"tflops['fp8']={e[0]:.1f} host (fp8, False)={e[1]:.5f} (fp8, True)={e[2]:.5f}")
    print_errors(rows, fit, constants(v))
    return 0


def main() -> int:
    if sys.argv[1:2] == ["--fp8"]:
        default = ROOT / "bench/data/fp8-speed-grid-h200.jsonl"
        return fit_fp8(Path(sys.argv[2]) if len(sys.argv) > 2 else default)
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "bench/data/speed-grid-h200.jsonl"
    rows = load(path)
    fit = [r for r in rows if r["tokens_per_micro_batch"] in FIT_TOKENS and r["dropout"] > 0]
    d = DEFAULT_SPEED
    start = [
        d.tflops["lora"],
        d.tflops["qlora"],
        d.dequant_seconds_per_gparam,
        *[d.host_seconds_per_layer[k] for k in KEYS],
        d.host_seconds_fixed,
        d.overlap - 1,
    ]
    c = constants_from(fit_log_params(start, constants_from, fit, steps=4000))
    c = replace(
        c,
        tflops={k: float(x) for k, x in c.tflops.items()},
        dequant_seconds_per_gparam=float(c.dequant_seconds_per_gparam),
        host_seconds_per_layer={k: float(x) for k, x in c.host_seconds_per_layer.items()},
        host_seconds_fixed=float(c.host_seconds_fixed),
        overlap=float(c.overlap),
    )
    print(f"tflops={ {k: round(x, 1) for k, x in c.tflops.items()} }")
    print(f"dequant_seconds_per_gparam={c.dequant_seconds_per_gparam:.5f}")
    print(
        f"host_seconds_per_layer={ {k: round(x, 5) for k, x in c.host_seconds_per_layer.items()} }"
    )
    print(f"host_seconds_fixed={c.host_seconds_fixed:.5f} overlap={c.overlap:.2f}")
    print_errors(rows, fit, c)
    return 0


if __name__ == "__main__":
    sys.exit(main())
