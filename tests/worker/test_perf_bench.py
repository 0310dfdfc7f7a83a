"""CPU checks of the benchmark harness (finetune_bench): its data, its token counting,
the committed calibration file, and that the worker's optimised loop trains the same
mathematics as the common recipe (peft + trl SFTTrainer) on the same data and seed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from finetune_bench import cli, data, harness

ROOT = Path(__file__).resolve().parents[2]


def test_bench_data_has_instruction_like_uneven_lengths():
    examples = data.make_examples(4000, 128256, seed=0)
    s = data.length_summary(examples)
    assert 200 <= s["median"] <= 290  # a few hundred tokens, as instruction sets are
    assert 0.10 <= s["share_over_512"] <= 0.25  # a long tail past the 512 limit
    assert s["p99"] > 1000
    lengths = [len(e["input_ids"]) for e in examples]
    assert len(set(lengths)) > 500  # not fixed-length
    # deterministic for a seed, different for another
    assert data.make_examples(5, 1000, seed=3) == data.make_examples(5, 1000, seed=3)
    assert data.make_examples(5, 1000, seed=3) != data.make_examples(5, 1000, seed=4)
    # prompts are masked out of the loss, responses are trained on
    e = examples[0]
    assert e["labels"][0] == data.IGNORE_INDEX and e["labels"][-1] == e["input_ids"][-1]


def test_tokens_per_second_counts_real_tokens_only():
    examples = cli.bench_examples(64, 512)
    base = harness.build_base("tiny", "lora", device="cpu")
    cfg = harness.RunConfig(
        shape="tiny", steps=3, warmup_excluded=0, packing=False, micro_batch=8, fused_kernels=False
    )
    pm = harness.prepare(base, cfg)
    result = harness.train(pm, examples, cfg)
    real = [
        sum(min(len(e["input_ids"]), 512) for e in examples[i * 8 : (i + 1) * 8]) for i in range(3)
    ]
    padded = [
        8 * max(min(len(e["input_ids"]), 512) for e in examples[i * 8 : (i + 1) * 8])
        for i in range(3)
    ]
    assert result.tokens_per_step == pytest.approx(sum(real) / 3)
    assert sum(padded) > sum(real)  # the padding exists and is not counted
    assert result.tokens_per_s == pytest.approx(sum(real) / result.seconds)


@pytest.mark.slow
def test_worker_loop_follows_the_common_recipe_loss_curve():
    """Same data, seed and hyperparameters: the trl recipe (micro-batch 1 x 4 accumulation,
    padded, peft's generic LoRA forward) and the worker's loop (4 examples packed in one
    micro-batch, lean LoRA layers, token-weighted loss) give the same per-step losses."""
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    from finetune_bench import recipe

    examples = cli.bench_examples(40, 512)
    ref = recipe.run(
        "lora", examples, 5, shape="tiny", dropout=0.0, optim="adamw_torch", warmup_excluded=1
    )
    base = harness.build_base("tiny", "lora", device="cpu")
    cfg = harness.RunConfig(
        shape="tiny",
        steps=5,
        warmup_excluded=1,
        micro_batch=4,
        group_by_tokens=False,
        packing=True,
        row_tokens=4096,
        fused_kernels=False,
        fused_adamw=False,
    )
    pm = harness.prepare(base, cfg)
    ours = harness.train(pm, examples, cfg).losses
    assert len(ref["losses"]) == len(ours) == 5
    assert ours == pytest.approx(ref["losses"], abs=2e-4)
    assert ours[-1] < ours[0]  # it does train


def test_committed_calibration_points_carry_the_fields_the_planner_reads():
    files = [
        ROOT / "tests" / "data" / "calibration" / name
        for name in ("worker-grid-h200.jsonl", "trainer-budgets-h200.jsonl")
    ]
    assert files
    rows = [json.loads(line) for f in files for line in f.read_text().splitlines() if line.strip()]
    need = {
        "shape",
        "hidden",
        "intermediate",
        "layers",
        "heads",
        "kv_heads",
        "vocab",
        "tied",
        "method",
        "r",
        "target_modules",
        "seq_len",
        "micro_batch",
        "grad_ckpt",
        "fused_ce",
        "packing",
        "peak_reserved_bytes",
        "peak_allocated_bytes",
        "cuda_context_bytes",
        "torch",
        "transformers",
    }
    ours = [r for r in rows if "peak_reserved_bytes" in r and "kv_heads" in r]
    assert len(ours) >= 48
    for r in ours:
        assert need <= r.keys()
        assert r["peak_reserved_bytes"] >= r["peak_allocated_bytes"] > 0
    grid = {(r["shape"], r["method"], r["seq_len"], r["micro_batch"], r["grad_ckpt"]) for r in ours}
    for shape in ("llama-3-8b", "llama-3.2-1b"):
        for method in ("lora", "qlora"):
            for seq in (512, 2048):
                for mb in (1, 4, 8):
                    for ckpt in (False, True):
                        assert (shape, method, seq, mb, ckpt) in grid


def test_bench_is_its_own_command_not_the_workers():
    from finetune_bench.cli import main as bench_main
    from finetune_worker.cli import main as worker_main

    with pytest.raises(SystemExit) as exc:
        bench_main(["--help"])
    assert exc.value.code == 0
    with pytest.raises(SystemExit) as exc:  # the shipped worker has no benchmark code
        worker_main(["bench", "--help"])
    assert exc.value.code == 2


@pytest.mark.slow
def test_trainer_bench_runs_the_planners_choice_through_the_workers_trainer():
    """`finetune-bench trainer`: the operator's planner picks the configuration for the
    budget, the worker's trainer runs it (varlen packed rows) and every step is timed and
    counted in real tokens."""
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    from finetune_bench import trainer

    spec = trainer.job_spec("2Gi", shape="tiny", steps=3, batch_size=8)
    chosen = trainer.plan(spec, "tiny")
    assert chosen.method == "lora" and 8 % chosen.micro_batch_size == 0
    examples = cli.bench_examples(400, 512)
    base = harness.build_base("tiny", "lora", device="cpu")
    base, row = trainer.run(
        base, "lora", examples, "2Gi", shape="tiny", steps=3, warmup=1, batch_size=8
    )
    assert "error" not in row
    assert row["plan"]["microBatchSize"] == chosen.micro_batch_size
    assert row["attn_implementation"] == "finetune_varlen"
    assert row["steps"] == 3 and row["steps_timed"] == 2 and len(row["losses"]) == 3
    # every step's micro-batches are one row of the budget, filled with real tokens
    budget = chosen.micro_batch_size * 512 * chosen.gradient_accumulation
    assert all(0.9 * budget < t <= budget for t in row["real_tokens_per_step"])
    # real tokens of the timed steps over their time (step times are kept to 0.1 ms)
    assert row["tokens_per_s"] == pytest.approx(
        sum(row["real_tokens_per_step"][1:]) / sum(row["step_seconds"][1:]), rel=2e-3
    )
    with pytest.raises(ValueError, match="planner chose lora"):
        trainer.run(base, "qlora", examples, "2Gi", shape="tiny", steps=1, batch_size=8)
