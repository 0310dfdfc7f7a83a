"""`finetune-bench ...`: calibration grid, lever runs, budget runs, the common recipe.

Each subcommand prints one JSON line per measurement and appends it to --out.
Examples (on a GPU machine):
    finetune-bench env
    finetune-bench calibrate --shape llama-3-8b --method lora --out calib.jsonl
    finetune-bench run --shape llama-3-8b --method lora \\
        --config '{"label": "80GiB", "tokens_per_micro_batch": 16384}' --out bench.jsonl
    finetune-bench recipe --mode lora --steps 30 --out bench.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def bench_examples(n: int, vocab: int, seed: int = 0) -> list[dict]:
    """The benchmark's data: realistic lengths, loss on every token (as the common recipe
    trains), so both sides of a comparison compute the same loss over the same tokens."""
    from . import data

    return [
        {"input_ids": e["input_ids"], "labels": e["input_ids"]}
        for e in data.make_examples(n, vocab, seed)
    ]


def _emit(row: dict, out) -> None:
    line = json.dumps(row)
    print("RESULT " + line, flush=True)
    if out:
        with open(out, "a") as fh:
            fh.write(line + "\n")


def cmd_env(args) -> None:
    import torch

    from . import calibrate, harness

    row = {
        "kind": "env",
        **calibrate.versions(),
        "cuda_context_bytes": harness.cuda_context_bytes(),
    }
    # the two ceilings (METHOD.md): a big bf16 matmul on random data, a device-to-device copy
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    row["matmul_tflops"] = round(20 * 2 * 8192**3 / (time.perf_counter() - t) / 1e12, 1)
    x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    y.copy_(x)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        y.copy_(x)
    torch.cuda.synchronize()
    row["copy_TBps"] = round(20 * 2 * 2**30 / (time.perf_counter() - t) / 1e12, 2)
    del a, b, x, y
    _emit(row, args.out)


def cmd_calibrate(args) -> None:
    import contextlib

    from . import calibrate

    with open(args.out, "a") if args.out else contextlib.nullcontext() as out:
        for method in args.method.split(","):
            calibrate.grid(
                args.shape,
                method,
                _ints(args.seq),
                _ints(args.mb),
                _ints(args.ckpt),
                r=args.r,
                steps=args.steps,
                dropout=args.dropout,
                out=out,
            )


def _override(cfg, overrides: dict) -> None:
    """Set a RunConfig's fields from a --config JSON object, refusing names it lacks."""
    for k, v in overrides.items():
        if not hasattr(cfg, k):
            raise SystemExit(f"--config: unknown field {k!r}; RunConfig has {sorted(vars(cfg))}")
        setattr(cfg, k, v)


def cmd_run(args) -> None:
    from . import harness, shapes

    harness.cuda_context_bytes()
    vocab = shapes.SHAPES[args.shape]["vocab_size"]
    examples = bench_examples(args.examples, vocab, args.seed)
    base = harness.build_base(args.shape, args.method)
    for text in args.config:
        overrides = json.loads(text)
        cfg = harness.RunConfig(
            shape=args.shape, method=args.method, steps=args.steps, warmup_excluded=args.warmup
        )
        _override(cfg, overrides)
        base, res = harness.measure(
            base,
            examples,
            cfg,
            profile_steps=args.profile_steps if cfg.label in args.profile else 0,
            profile_out=args.profile_table,
        )
        row = res.as_dict()
        row.pop("config")
        _emit(
            {
                "kind": "run",
                "label": cfg.label,
                **{k: v for k, v in vars(cfg).items() if k != "targets"},
                **row,
            },
            args.out,
        )


def cmd_trainer(args) -> None:
    """Plan each budget with the operator's planner, then train through the worker's trainer."""
    from . import harness, shapes, trainer

    harness.cuda_context_bytes()
    vocab = shapes.SHAPES[args.shape]["vocab_size"]
    examples = bench_examples(args.examples, vocab, args.seed)
    memories = [m for m in args.memory.split(",") if m]
    product = args.gpu_product or None
    methods = {
        m: trainer.plan(
            trainer.job_spec(m, shape=args.shape, batch_size=args.batch_size, gpu_product=product),
            args.shape,
        ).method
        for m in memories
    }
    # fp8 last: its runs turn the shared base's projections into FP8 layers.
    for method in ("lora", "qlora", "fp8"):
        todo = [m for m in memories if methods[m] == method]
        if not todo:
            continue
        base = harness.build_base(args.shape, method)
        for memory in todo:
            for model_loss in [True, False] if memory in args.trl_loss.split(",") else [True]:
                label = f"trainer-{memory}" + ("" if model_loss else "-trl-loss")
                base, row = trainer.run(
                    base,
                    method,
                    examples,
                    memory,
                    shape=args.shape,
                    steps=args.steps,
                    warmup=args.warmup,
                    batch_size=args.batch_size,
                    model_loss=model_loss,
                    label=label,
                    gpu_product=product,
                )
                _emit(row, args.out)
        del base


def cmd_job(args) -> None:
    """FineTuneJob manifests as users write them (examples/*.yaml), through the planner and
    the worker's preparation and trainer: what a user of each example gets."""
    from pathlib import Path

    import yaml

    from . import harness, shapes, trainer

    harness.cuda_context_bytes()
    examples = bench_examples(args.examples, shapes.SHAPES[args.shape]["vocab_size"], args.seed)
    jobs, extras = [], {}
    for text in args.job:
        job = json.loads(text)
        extras[job["label"]] = job
        manifest = yaml.safe_load(Path(job["manifest"]).read_text())
        spec = trainer.user_job(manifest, args.shape, steps=args.steps, overrides=job.get("set"))
        jobs.append((job["label"], spec, trainer.plan(spec, args.shape).method))
    # fp8 last: its runs turn the shared base's projections into FP8 layers.
    for method in ("lora", "qlora", "fp8"):
        todo = [(label, spec) for label, spec, m in jobs if m == method]
        if not todo:
            continue
        base = harness.build_base(args.shape, method)
        for label, spec in todo:
            base, row = trainer.run_user_job(
                base,
                spec,
                args.shape,
                examples,
                steps=args.steps,
                warmup=args.warmup,
                label=label,
                trainer_args=extras[label].get("trainer_args"),
                sync_each_step=extras[label].get("sync_each_step", True),
                step_memory=extras[label].get("step_memory", False),
                plan_set=extras[label].get("plan_set"),
            )
            _emit(row, args.out)
        del base


def cmd_fp8_quality(args) -> None:
    """The same LoRA job on the bf16 base and its FP8 copy; the FP8 adapter merged into bf16."""
    from . import fp8_quality, harness, shapes

    harness.cuda_context_bytes()
    examples = bench_examples(args.examples, shapes.SHAPES[args.shape]["vocab_size"], args.seed)
    cfg = harness.RunConfig(shape=args.shape, steps=args.steps, warmup_excluded=args.warmup)
    _override(cfg, json.loads(args.config))
    _emit({"kind": "fp8-quality", **fp8_quality.run(args.shape, examples, cfg)}, args.out)


def cmd_recipe(args) -> None:
    from . import recipe, shapes

    vocab = shapes.SHAPES[args.shape]["vocab_size"]
    examples = bench_examples(args.examples, vocab, args.seed)
    res = recipe.run(
        args.mode,
        examples,
        args.steps,
        shape=args.shape,
        dropout=args.dropout,
        optim=args.optim,
        liger=args.liger,
        mb=args.mb,
        ga=args.ga,
        warmup_excluded=args.warmup,
    )
    _emit({"kind": "recipe", "label": args.label, **res}, args.out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="finetune-bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("env", help="versions, CUDA context size, matmul and copy ceilings")
    e.add_argument("--out")
    c = sub.add_parser("calibrate", help="peak-memory grid for the planner")
    c.add_argument("--shape", default="llama-3-8b")
    c.add_argument("--method", default="lora", help="lora, qlora or lora,qlora")
    c.add_argument("--seq", default="512,2048")
    c.add_argument("--mb", default="1,4,8")
    c.add_argument("--ckpt", default="0,1")
    c.add_argument("--r", type=int, default=16)
    c.add_argument("--dropout", type=float, default=0.0)
    c.add_argument("--steps", type=int, default=3)
    c.add_argument("--out")
    r = sub.add_parser("run", help="measured training runs (RunConfig overrides as JSON)")
    r.add_argument("--shape", default="llama-3-8b")
    r.add_argument("--method", default="lora")
    r.add_argument("--config", action="append", default=[])
    r.add_argument("--steps", type=int, default=30)
    r.add_argument("--warmup", type=int, default=5)
    r.add_argument("--examples", type=int, default=4000)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--profile", action="append", default=[], help="labels of runs to profile")
    r.add_argument("--profile-steps", type=int, default=2)
    r.add_argument("--profile-table", help="write the profiler's kernel table here")
    r.add_argument("--out")
    t = sub.add_parser(
        "trainer", help="the product path: planner's choice per budget, worker's trainer"
    )
    t.add_argument("--memory", default="80Gi,48Gi,24Gi,12Gi", help="GPU memory budgets")
    t.add_argument("--shape", default="llama-3-8b")
    t.add_argument("--steps", type=int, default=23, help="optimizer steps, warm-up included")
    t.add_argument("--warmup", type=int, default=3)
    t.add_argument("--batch-size", type=int, default=96)
    t.add_argument(
        "--trl-loss", default="", help="budgets to also run with trl's fused LM head loss"
    )
    t.add_argument(
        "--gpu-product", default="", help="resources.gpu.product (NVIDIA-H200 lets auto pick fp8)"
    )
    t.add_argument("--examples", type=int, default=8000)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out")
    s = sub.add_parser("recipe", help="the common recipe (peft + trl SFTTrainer) on the same data")
    s.add_argument("--mode", default="lora", help="lora | qlora | lora_gc | qlora_nogc")
    s.add_argument("--shape", default="llama-3-8b")
    s.add_argument("--steps", type=int, default=30)
    s.add_argument("--warmup", type=int, default=5)
    s.add_argument("--dropout", type=float, default=0.1)
    s.add_argument("--optim", default="paged_adamw_32bit")
    s.add_argument("--liger", action="store_true")
    s.add_argument("--mb", type=int, default=1)
    s.add_argument("--ga", type=int, default=4)
    s.add_argument("--examples", type=int, default=4000)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--label", default="")
    s.add_argument("--out")
    j = sub.add_parser("job", help="FineTuneJob manifests as written, through planner and trainer")
    j.add_argument(
        "--job",
        action="append",
        default=[],
        help=(
            'JSON: {"label": ..., "manifest": "examples/x.yaml",'
            ' "set": {"training.packing": false}}; experiments may add "trainer_args"'
            " (TrainingArguments fields changed after the worker built the trainer),"
            ' "sync_each_step": false (no GPU synchronisation at each step end) and'
            ' "step_memory": true (each step\'s allocated bytes at its start and peaks)'
            ' and "plan_set" (plan fields changed before training, e.g.'
            ' {"compiled_layers": false})'
        ),
    )
    j.add_argument("--shape", default="llama-3-8b")
    j.add_argument("--steps", type=int, default=14)
    j.add_argument("--warmup", type=int, default=4)
    j.add_argument("--examples", type=int, default=6000)
    j.add_argument("--seed", type=int, default=0)
    j.add_argument("--out")
    q = sub.add_parser("fp8-quality", help="bf16 vs FP8 base: loss curves, merged eval loss")
    q.add_argument("--shape", default="llama-3-8b")
    q.add_argument("--steps", type=int, default=200)
    q.add_argument("--warmup", type=int, default=5)
    q.add_argument("--config", default="{}", help="RunConfig overrides as JSON")
    q.add_argument("--examples", type=int, default=6000)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--out")
    args = p.parse_args(argv)
    {
        "env": cmd_env,
        "calibrate": cmd_calibrate,
        "run": cmd_run,
        "recipe": cmd_recipe,
        "trainer": cmd_trainer,
        "job": cmd_job,
        "fp8-quality": cmd_fp8_quality,
    }[args.cmd](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
