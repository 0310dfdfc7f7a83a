"""`finetune-operator plan`: what the operator would decide, before any pod exists.

    finetune-operator plan -f job.yaml                 # a FineTuneJob manifest
    finetune-operator plan --model meta-llama/Meta-Llama-3-8B --memory 24Gi --seq-len 2048
    finetune-operator plan ... --explain               # every candidate, as a table
    finetune-operator plan -f job.yaml --cluster       # with the GPU nodes of KUBECONFIG's cluster

Prints JSON (the `status.plan` the operator would write, the reason and the smallest memory
that would work); `--explain` prints a table for people instead. Exit status: 0 planned,
1 nothing fits the memory, 2 the input is wrong (the message says which field).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from .arch import ModelArch, UnknownArchitecture, preset_names
from .configsource import arch_for_model, arch_from_local
from .decide import METHODS, Budget, PlanDecision, PlanRequest, format_gib, plan_training
from .memory import OPTIMIZERS, UnknownTargetModule

EXIT_PLANNED, EXIT_DOES_NOT_FIT, EXIT_BAD_INPUT = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="finetune-operator plan",
        description="Predict peak GPU memory of a LoRA / QLoRA fine-tuning job and choose "
        "method, micro-batch and gradient checkpointing for a memory budget.",
        epilog=f"Built-in models: {', '.join(preset_names())} (and their hub ids).",
    )
    p.add_argument("-f", "--file", help="FineTuneJob manifest (YAML or JSON); its spec is planned")
    p.add_argument("--model", help="hub id or preset name, e.g. meta-llama/Meta-Llama-3-8B")
    p.add_argument(
        "--config",
        help="a model's config.json (or its directory) to read the "
        "architecture from instead of presets or the Hub",
    )
    p.add_argument(
        "--allow-hub",
        action="store_true",
        help="fetch config.json from the Hugging Face Hub for models without a preset",
    )
    p.add_argument("--claims-root", help="directory where pvc://claim/... URIs are mounted")
    p.add_argument("--memory", help="GPU memory per GPU, a Kubernetes quantity such as 24Gi")
    p.add_argument("--gpus", type=int, default=1, help="GPUs per node (one process each)")
    p.add_argument("--nodes", type=int, default=1, help="nodes (worker pods)")
    p.add_argument(
        "--gpu-product",
        help="the nvidia.com/gpu.product label, e.g. NVIDIA-H100-80GB-HBM3: auto considers "
        "fp8 only on a GPU known to have FP8 tensor cores",
    )
    p.add_argument(
        "--cluster",
        action="store_true",
        help="read the GPU nodes of the cluster KUBECONFIG names (their GPU Feature Discovery "
        "labels, as the operator does): without --gpu-product, auto then considers fp8 when "
        "every GPU node that could take the job has FP8 tensor cores",
    )
    p.add_argument("--method", choices=("auto", *METHODS), default="auto")
    p.add_argument(
        "--allowed-methods",
        help="comma-separated methods auto may choose from (spec.allowedMethods); default all",
    )
    p.add_argument("--r", "--lora-r", dest="r", type=int, default=16, help="LoRA rank")
    p.add_argument(
        "--target-modules", default="all-linear", help="comma-separated module names, or all-linear"
    )
    p.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument(
        "--batch-size",
        type=int,
        default=16,
        help="effective batch size (micro-batch x accumulation x GPUs)",
    )
    p.add_argument("--micro-batch", default="auto", help="auto or an integer")
    p.add_argument("--gradient-checkpointing", choices=("auto", "on", "off"), default="auto")
    p.add_argument("--packing", action="store_true")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw_torch")
    p.add_argument(
        "--no-double-quant",
        action="store_true",
        help="QLoRA without double quantisation of the constants",
    )
    p.add_argument(
        "--unfused-ce",
        action="store_true",
        help="predict for a worker without fused linear cross-entropy",
    )
    p.add_argument(
        "--no-fused-kernels",
        action="store_true",
        help="predict for a worker without liger's RMSNorm / SwiGLU kernels",
    )
    p.add_argument(
        "--explain",
        action="store_true",
        help="print a table of every candidate configuration instead of JSON",
    )
    return p


class BadInput(Exception):
    pass


def _load_manifest(path: str):
    import yaml
    from pydantic import ValidationError

    from finetune_api import FineTuneJob
    from finetune_api.worker_config import describe_errors

    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise BadInput(f"cannot read {path}: {exc}") from None
    try:
        documents = [d for d in yaml.safe_load_all(text) if d]
    except yaml.YAMLError as exc:
        raise BadInput(f"{path} is not valid YAML: {exc}") from None
    jobs = [d for d in documents if isinstance(d, dict) and d.get("kind") == "FineTuneJob"]
    if not jobs:
        raise BadInput(f"{path} holds no object of kind FineTuneJob")
    try:
        return FineTuneJob.model_validate(jobs[0])
    except ValidationError as exc:
        raise BadInput(f"{path} is not a valid FineTuneJob:\n{describe_errors(exc)}") from None


def _request_from_flags(args: argparse.Namespace) -> tuple[PlanRequest, Budget]:
    from finetune_api import parse_quantity

    if not args.memory:
        raise BadInput("--memory is required without -f (the GPU memory per GPU, e.g. 24Gi)")
    try:
        memory = parse_quantity(args.memory)
    except ValueError:
        raise BadInput(f"--memory {args.memory!r} is not a quantity; write e.g. 24Gi") from None
    if args.micro_batch == "auto":
        micro = None
    elif args.micro_batch.isdigit() and int(args.micro_batch) >= 1:
        micro = int(args.micro_batch)
    else:
        raise BadInput(f"--micro-batch {args.micro_batch!r}: expected auto or an integer >= 1")
    targets = tuple(t.strip() for t in args.target_modules.split(",") if t.strip())
    allowed = args.allowed_methods or ",".join(METHODS)
    request = PlanRequest(
        method=args.method,
        allowed_methods=tuple(m.strip() for m in allowed.split(",") if m.strip()),
        lora_r=args.r,
        target_modules=targets,
        lora_dropout=args.dropout,
        seq_len=args.seq_len,
        packing=args.packing,
        batch_size=args.batch_size,
        micro_batch=micro,
        gradient_checkpointing={"auto": None, "on": True, "off": False}[
            args.gradient_checkpointing
        ],
        optimizer=args.optimizer,
        double_quant=not args.no_double_quant,
        fused_ce=not args.unfused_ce,
        fused_kernels=not args.no_fused_kernels,
    )
    if args.gpus < 1 or args.nodes < 1:
        raise BadInput("--gpus and --nodes must be at least 1")
    return request, Budget(
        gpu_memory_bytes=memory,
        gpu_count=args.gpus,
        nodes=args.nodes,
        gpu_product=args.gpu_product,
    )


def _arch_from_flags(args: argparse.Namespace) -> ModelArch:
    if args.config:
        return arch_from_local(args.config, name=args.model)
    if not args.model:
        raise BadInput(
            "name the model: --model <hub id or preset>, --config <config.json> "
            "or -f <FineTuneJob manifest>"
        )
    return arch_for_model({"name": args.model}, allow_hub=args.allow_hub)


def cluster_gpu_nodes() -> dict[str, dict[str, str]]:
    """The labels of the cluster's GPU nodes (name -> labels), read as the operator reads
    them (gpunodes.py), through KUBECONFIG."""
    import asyncio

    from .. import gpunodes, k8s, kubeconfig

    async def listed() -> dict[str, dict[str, str]]:
        await k8s.connect()
        try:
            return await gpunodes.list_gpu_node_labels()
        finally:
            await k8s.close()

    try:
        return asyncio.run(listed())
    except kubeconfig.ConfigError as exc:
        raise BadInput(f"--cluster: {exc}") from None
    except k8s.REQUEST_FAILURES as exc:
        raise BadInput(
            f"--cluster: could not list the nodes: {k8s.describe_failure(exc)}"
        ) from None


def decide(args: argparse.Namespace) -> PlanDecision:
    from .api_adapter import gpu_nodes_for_spec, request_from_spec
    from .gpus import fp8_on_nodes

    nodes = cluster_gpu_nodes() if args.cluster else None
    if args.file:
        job = _load_manifest(args.file)
        arch = (
            arch_from_local(args.config, name=job.spec.model.reference)
            if args.config
            else arch_for_model(
                job.spec.model, claims_root=args.claims_root, allow_hub=args.allow_hub
            )
        )
        gpu_nodes = gpu_nodes_for_spec(job.spec, nodes) if args.cluster else None
        request, budget = request_from_spec(job.spec, gpu_nodes)
    else:
        arch = _arch_from_flags(args)
        request, budget = _request_from_flags(args)
        if args.cluster:
            budget = dataclasses.replace(
                budget, gpu_nodes=fp8_on_nodes(nodes, budget.gpu_memory_bytes, None)
            )
    return plan_training(arch, request, budget)


def as_json(decision: PlanDecision) -> dict[str, Any]:
    from finetune_api import to_k8s

    from .api_adapter import training_plan

    arch = decision.arch
    return {
        "model": arch.name,
        "architecture": {
            "hiddenSize": arch.hidden_size,
            "intermediateSize": arch.intermediate_size,
            "numHiddenLayers": arch.num_layers,
            "numAttentionHeads": arch.num_heads,
            "numKeyValueHeads": arch.num_kv_heads,
            "vocabSize": arch.vocab_size,
            "tieWordEmbeddings": arch.tie_word_embeddings,
            "totalParams": arch.total_params(),
        },
        "fits": decision.fits,
        "plan": to_k8s(training_plan(decision)) if decision.fits else None,
        "reason": decision.reason,
        "budgetBytes": decision.budget.gpu_memory_bytes,
        "minimumGpuMemoryBytes": decision.minimum_budget_bytes,
        "minimumGpuMemory": format_gib(decision.minimum_budget_bytes),
    }


def explain(decision: PlanDecision) -> str:
    """A table of every candidate, the chosen one marked, then its breakdown and the reason."""
    budget = decision.budget
    lines = [
        (
            f"model {decision.arch.name}: {decision.arch.total_params() / 1e9:.2f}B parameters, "
            f"seq {decision.request.seq_len}, LoRA r={decision.request.lora_r}, budget "
            f"{format_gib(budget.gpu_memory_bytes)} x {budget.world_size} GPU "
            f"(usable {format_gib(budget.usable_bytes)})"
        ),
        "",
        (
            f"  {'strategy':<8} {'method':<6} {'ckpt':<4} {'micro':>5} {'accum':>5} {'tokens':>7} "
            f"{'peak':>8} {'+context':>9} {'fits':<4} {'speed':>5}"
        ),
    ]
    order = sorted(
        decision.candidates,
        key=lambda c: (
            c.shape.strategy,
            c.shape.method,
            c.shape.recomputed_layers(decision.arch.num_layers),
            c.shape.micro_batch,
        ),
    )
    for c in order:
        mark = "->" if c is decision.chosen else "  "
        lines.append(
            f"{mark}{c.shape.strategy:<8} {c.shape.method:<6} "
            f"{_checkpointing(c.shape):<4} "
            f"{c.shape.micro_batch:>5} {c.gradient_accumulation:>5} "
            f"{c.shape.tokens_per_micro_batch:>7} {format_gib(c.estimate.total):>8} "
            f"{format_gib(c.need_bytes):>9} {'yes' if c.fits else 'no':<4} {c.speed:>5.2f}"
        )
    if decision.chosen is not None:
        lines += ["", "chosen, peak by term:"]
        estimate = decision.chosen.estimate
        for term, value in estimate.breakdown.items():
            lines.append(f"  {term:<20} {format_gib(value):>8}")
        lines.append(f"  {'cuda_context':<20} {format_gib(estimate.cuda_context):>8}")
    lines += ["", ("plan: " if decision.fits else "no plan: ") + decision.reason]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        decision = decide(args)
    except (BadInput, UnknownArchitecture, UnknownTargetModule, ValueError) as exc:
        print(f"finetune-operator plan: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.explain:
        print(explain(decision))
    else:
        print(json.dumps(as_json(decision), indent=2))
    return EXIT_PLANNED if decision.fits else EXIT_DOES_NOT_FIT


def _checkpointing(shape) -> str:
    """off, all, or how many layers are recomputed."""
    if not shape.gradient_checkpointing:
        return "off"
    return "all" if shape.checkpointed_layers is None else str(shape.checkpointed_layers)


if __name__ == "__main__":
    sys.exit(main())
