"""The planner's speed model against measured throughput, and its regret on a grid of jobs.

The data are the worker's own training step on an H200 (bench/data/speed-grid-h200.jsonl,
bench/speed-grid.sh). The constants in planner/speed.py were fitted on 1,024 / 4,096 / 16,384
tokens per micro-batch (bench/fit_speed_model.py); 2,048 and 8,192 tokens, dropout 0, and the
earlier product-path runs were never seen by the fit. The tolerances are the ones
docs/memory-model.md states.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from finetune_operator.planner import TrainingShape, preset
from finetune_operator.planner.speed import predicted_tokens_per_second

ROOT = Path(__file__).resolve().parents[2]
GRID = ROOT / "bench" / "data" / "speed-grid-h200.jsonl"
ARCH = {
    "llama-3-8b": preset("meta-llama/Meta-Llama-3-8B"),
    "llama-3.2-1b": preset("meta-llama/Llama-3.2-1B"),
}
FIT_TOKENS = {1024, 4096, 16384}
# Two Llama-3.2-1B runs without dropout measured slower than the same runs with it (14,758 vs
# 18,928 and 44,129 vs 64,938 tokens/s), which no cost model can produce: dropout only adds
# work. They stay in the data file and out of the checks.
IMPLAUSIBLE = {"llama-3.2-1b-lora-2048-ck0-nodrop", "llama-3.2-1b-lora-8192-ck0-nodrop"}


def grid() -> list[dict]:
    rows = [json.loads(line) for line in GRID.read_text().splitlines()]
    return [r for r in rows if r["kind"] == "run" and r["label"] not in IMPLAUSIBLE]


def predicted(row: dict) -> float:
    shape = TrainingShape(
        method=row["method"],
        gradient_checkpointing=row["grad_ckpt"] > 0,
        micro_batch=1,
        seq_len=row["tokens_per_micro_batch"],
        packing=True,
        lora_dropout=row["dropout"],
    )
    return predicted_tokens_per_second(ARCH[row["shape"]], shape)


def test_the_grid_covers_both_sizes_methods_and_checkpointing():
    rows = grid()
    assert {(r["shape"], r["method"], r["grad_ckpt"]) for r in rows} == {
        (s, m, c) for s in ARCH for m in ("lora", "qlora") for c in (0, 1)
    }
    assert {r["tokens_per_micro_batch"] for r in rows} == {1024, 2048, 4096, 8192, 16384}


@pytest.mark.parametrize("held_out", [False, True], ids=["fit", "held-out"])
def test_predictions_are_within_15_percent_of_the_measurements(held_out):
    rows = [
        r
        for r in grid()
        if (r["tokens_per_micro_batch"] not in FIT_TOKENS or r["dropout"] == 0) == held_out
    ]
    assert len(rows) >= 18
    errors = {r["label"]: predicted(r) / r["tokens_per_s"] - 1 for r in rows}
    assert max(abs(e) for e in errors.values()) <= 0.15, errors


def test_earlier_product_path_runs_the_fit_never_saw():
    # The worker's Trainer on varlen rows, dropout 0, Llama-3-8B, seq 512 (earlier H200 runs:
    # bench/data/trainer-budgets-h200.jsonl and speed-microbatch-varlen-h200.jsonl):
    # (method, ckpt, micro-batch) -> tokens/s.
    measured = {
        ("lora", False, 2): 4_724,
        ("lora", False, 4): 10_784,
        ("lora", False, 8): 15_159,
        ("lora", False, 24): 15_582,
        ("lora", True, 4): 5_264,
        ("lora", True, 16): 11_123,
        ("lora", True, 24): 10_884,
        ("qlora", True, 16): 10_226,
    }
    for (method, ckpt, micro), tokens_per_s in measured.items():
        shape = TrainingShape(
            method=method,
            gradient_checkpointing=ckpt,
            micro_batch=micro,
            seq_len=512,
            packing=True,
            lora_dropout=0.0,
        )
        got = predicted_tokens_per_second(ARCH["llama-3-8b"], shape)
        assert got == pytest.approx(tokens_per_s, rel=0.20), (method, ckpt, micro, got)


def test_whenever_one_point_is_clearly_faster_the_model_ranks_it_first():
    rows = grid()
    for shape in ARCH:
        same = [r for r in rows if r["shape"] == shape and r["dropout"] > 0]
        for fast in same:
            for slow in same:
                if fast["tokens_per_s"] > 1.15 * slow["tokens_per_s"]:
                    assert predicted(fast) > predicted(slow), (fast["label"], slow["label"])


def test_the_planner_regret_on_fifteen_jobs_is_under_5_percent_and_was_not_before():
    sys.path.insert(0, str(ROOT / "bench"))
    import planner_regret

    measured = planner_regret.measured_table()
    now = planner_regret.regrets(measured)
    scored = [r.regret for r in now if r.regret is not None]
    assert len(scored) >= 12 and {r.job[0] for r in now} == set(ARCH)
    assert max(scored) <= 0.05, [(r.job, r.chosen, r.best) for r in now if r.regret > 0.05]
    # The score this model replaced picked configurations up to 64.7 % slower on these jobs.
    from finetune_operator.planner import decide

    saved = decide.speed_score, decide.QLORA_MIN_SPEEDUP
    try:
        decide.speed_score, decide.QLORA_MIN_SPEEDUP = planner_regret.previous_speed_score, 1.0
        before = [r.regret for r in planner_regret.regrets(measured) if r.regret is not None]
    finally:
        decide.speed_score, decide.QLORA_MIN_SPEEDUP = saved
    assert max(before) > 0.30


PARTIAL = ROOT / "bench" / "data" / "partial-checkpointing-h200.jsonl"


def _partial_points():
    from finetune_operator.planner.memory import estimate_memory

    for line in PARTIAL.read_text().splitlines():
        r = json.loads(line)
        shape = TrainingShape(
            method=r["method"],
            lora_dropout=r["dropout"],
            seq_len=r["tokens_per_micro_batch"],
            packing=True,
            gradient_checkpointing=True,
            checkpointed_layers=r["ckpt_layers"],
            optimizer="adamw_torch_fused",
        )
        arch = ARCH[r["shape"]]
        measured_peak = r["peak_reserved_bytes"] + r["non_torch_bytes"]
        yield r, estimate_memory(arch, shape).with_context, measured_peak, arch, shape


def test_checkpointing_some_layers_is_predicted_from_the_none_and_all_terms():
    # 19 runs on the H200 recomputing 2 to 28 layers (bench/partial-checkpointing.sh). Neither
    # model was fitted on them; the memory model's one structural rule for them (the last
    # layer is never recomputed, so no rebuilt layer sits on top of everything saved) came
    # from them. Peaks: never under the measurement (a plan must not go out of memory), at
    # most 3 % over; throughput within the 16 % docs/memory-model.md states for them.
    rows = list(_partial_points())
    assert len(rows) >= 19
    for r, predicted_peak, measured_peak, arch, shape in rows:
        assert 0 <= predicted_peak / measured_peak - 1 <= 0.03, r["label"]
        speed = predicted_tokens_per_second(arch, shape)
        assert speed == pytest.approx(r["tokens_per_s"], rel=0.16), r["label"]


def _jsonl(name: str) -> list[dict]:
    return [json.loads(line) for line in (ROOT / "bench/data" / name).read_text().splitlines()]


def test_the_fp8_base_measurements_against_the_bf16_base_and_the_models():
    # bench/fp8-speed-grid.sh on the H200: FP8 over 4k-16k tokens with and without
    # checkpointing, bf16 LoRA at three of the points, the same random 8B base and data.
    from finetune_operator.planner.memory import estimate_memory

    rows = {r["label"]: r for r in _jsonl("fp8-speed-grid-h200.jsonl")}
    for tokens, ckpt in ((12288, 0), (8192, 1), (16384, 1)):
        fp8, bf16 = rows[f"fp8-{tokens}-ckpt{ckpt}"], rows[f"lora-{tokens}-ckpt{ckpt}"]
        assert fp8["tokens_per_s"] > 1.10 * bf16["tokens_per_s"], (tokens, ckpt)
    arch = ARCH["llama-3-8b"]
    fp8_rows = [r for r in rows.values() if r["method"] == "fp8"]
    assert len(fp8_rows) == 7
    for r in fp8_rows:
        shape = TrainingShape(
            method="fp8",
            lora_dropout=0.0,
            seq_len=r["tokens_per_micro_batch"],
            packing=True,
            gradient_checkpointing=r["grad_ckpt"] > 0,
            optimizer="adamw_torch_fused",
        )
        measured = r["peak_reserved_bytes"] + r["non_torch_bytes"]
        # the memory model was not fitted on FP8: its weights term is derived, the rest
        # LoRA's; -1.3 % at 16k tokens checkpointed is the worst, inside the safety margin
        assert -0.02 <= estimate_memory(arch, shape).with_context / measured - 1 <= 0.05, r["label"]
        # the speed constants' fit (bench/fit_speed_model.py --fp8): within 5 % on its own
        # points, 13 % on the held-out 8k-token ones (docs/memory-model.md publishes both)
        held_out = r["tokens_per_micro_batch"] == 8192
        assert predicted_tokens_per_second(arch, shape) == pytest.approx(
            r["tokens_per_s"], rel=0.13 if held_out else 0.07
        ), r["label"]


def test_an_fp8_base_trains_and_merges_like_the_bf16_base_over_200_steps():
    # bench/fp8-quality.sh: the same job on both bases, then the FP8-trained adapter merged
    # into the bf16 base; the bar is 1 % on the curve and on the merged eval loss.
    (r,) = _jsonl("fp8-quality-h200.jsonl")
    assert len(set(r["base_checksum"].values())) == 1  # one base, rebuilt identically
    assert len(r["lora"]["losses"]) == len(r["fp8"]["losses"]) == 200
    diff = [abs(a - b) / a for a, b in zip(r["lora"]["losses"], r["fp8"]["losses"], strict=True)]
    assert sum(diff) / len(diff) < 0.01 and sum(diff[-20:]) / 20 < 0.01
    assert abs(r["fp8"]["eval_loss"] / r["lora"]["eval_loss"] - 1) < 0.01
    merged = r["fp8_adapter_merged_bf16_eval_loss"]
    assert abs(merged / r["fp8"]["eval_loss"] - 1) < 0.01
