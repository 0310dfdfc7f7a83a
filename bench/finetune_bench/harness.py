"""One measured training run: build a random-weight model, prepare it with the worker's modeling
code, feed it the worker's packed or padded batches, time optimizer steps, read peak memory.

The loop is the worker's optimizer step without the Trainer around it: bf16 autocast over fp32
adapter weights, loss normalised over all trained tokens of the optimizer step (so gradient
accumulation and packing give the same update as one big batch), gradient clipping, fused AdamW.
Batches are collated and pinned before timing starts, so data loading is off the critical path
(the worker does the same with DataLoader workers).
"""

from __future__ import annotations

import gc
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from finetune_worker import modeling, packing

from . import shapes

PEAK_BF16_FLOPS = 989e12  # H100/H200 SXM dense bf16 datasheet rate, the usual MFU denominator


@dataclass
class RunConfig:
    shape: str = "llama-3-8b"
    method: str = "lora"  # lora | qlora
    r: int = 16
    alpha: float = 32
    dropout: float = 0.0
    targets: tuple[str, ...] = modeling.DEFAULT_TARGET_MODULES
    seq_len: int = 512
    packing: bool = True
    row_tokens: int | None = None  # packed row length; None = seq_len
    tokens_per_micro_batch: int = 8192  # packing: token budget of one micro-batch
    micro_batch: int = 16  # examples per micro-batch (no packing, or packing by count)
    group_by_tokens: bool = True  # packing: fill micro-batches to a token budget, not a count
    length_grouped: bool = False  # no packing: similar lengths together, no attention mask (flash)
    varlen: bool = (
        False  # one padding-free row of exactly tokens_per_micro_batch, varlen flash attention
    )
    lean_lora: bool = True  # modeling.lean_lora_layers (no fp32 input round trip, addmm epilogue)
    cudnn_sdpa: bool = False  # let SDPA pick cuDNN attention (per-shape plans) or not
    pad_multiple: int = 1  # length-grouped: pad widths to a multiple (fewer distinct shapes)
    grad_accum: int = 1
    grad_ckpt: float = 0.0  # share of layers recomputed in backward (0 = off, 1 = all)
    ckpt_layers: int | None = None  # or exactly this many (the plan's checkpointedLayers)
    fused_kernels: bool = True
    fused_adamw: bool = True
    compile_layers: bool = False  # the plan's compiledLayers (modeling.compile_decoder_layers)
    blas_library: str | None = None  # torch.backends.cuda.preferred_blas_library for the run
    gc_freeze: bool = False  # gc.freeze() before the steps: collections skip what exists then
    kbit_fp32_upcast: bool = (
        False  # QLoRA: peft's prepare_model_for_kbit_training upcast (the recipe's)
    )
    bf16_adapters: bool = False  # trainable weights cast to bf16, as trl's SFTTrainer does (QLoRA)
    lr: float = 2e-4
    weight_decay: float = 0.001
    max_grad_norm: float = 0.3
    warmup_steps: int = 1
    steps: int = 25
    warmup_excluded: int = 5
    seed: int = 0
    label: str = ""

    def spec(self) -> dict:
        return {
            "lora": {
                "r": self.r,
                "alpha": self.alpha,
                "dropout": self.dropout,
                "targetModules": list(self.targets),
            }
        }

    def plan(self) -> dict:
        return {
            "method": self.method,
            "gradientCheckpointing": self.grad_ckpt > 0,
            "checkpointFraction": self.grad_ckpt,
            "checkpointedLayers": self.ckpt_layers,
            "leanLora": self.lean_lora,
            "cudnnAttention": self.cudnn_sdpa,
            "compiledLayers": self.compile_layers,
        }


@dataclass
class RunResult:
    config: dict
    steps_timed: int = 0
    seconds: float = 0.0
    tokens_per_s: float = 0.0
    trained_tokens_per_s: float = 0.0
    step_s_median: float = 0.0
    peak_reserved_bytes: int = 0
    peak_allocated_bytes: int = 0
    cuda_context_bytes: int = 0
    non_torch_bytes: int = 0
    mfu: float = 0.0
    flops_per_token: float = 0.0
    losses: list[float] = field(default_factory=list)
    tokens_per_step: float = 0.0
    rows_per_micro_batch: float = 0.0
    error: str | None = None
    notes: dict = field(default_factory=dict)

    @property
    def peak_gib(self) -> float:
        return (self.peak_reserved_bytes + self.non_torch_bytes) / 2**30

    def as_dict(self) -> dict:
        d = asdict(self)
        d["peak_total_GiB"] = round(self.peak_gib, 2)
        return d


_CONTEXT_BYTES: int | None = None


def cuda_context_bytes() -> int:
    """Device memory the process holds outside PyTorch's allocator right after CUDA starts.

    That is the CUDA context (plus module images), which nvidia-smi counts but
    max_memory_reserved does not; the first call of a process measures it.
    """
    global _CONTEXT_BYTES
    import torch

    if _CONTEXT_BYTES is None:
        torch.cuda.init()
        torch.zeros(1, device="cuda")
        free, total = torch.cuda.mem_get_info()
        _CONTEXT_BYTES = total - free - torch.cuda.memory_reserved()
    return _CONTEXT_BYTES


def non_torch_bytes() -> int:
    import torch

    free, total = torch.cuda.mem_get_info()
    return total - free - torch.cuda.memory_reserved()


def build_base(shape: str, method: str, *, device: str = "cuda", seed: int = 0, attn: str = "sdpa"):
    """A random-weight model of `shape` in bf16 on `device`, NF4-quantised for QLoRA."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = shapes.llama_config(shape)
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.config.use_cache = False
    if method == "qlora":
        modeling.quantize_in_place(model)
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return model


def prepare(base, cfg: RunConfig):
    """The worker's preparation, or (kbit_fp32_upcast) the common recipe's peft preparation."""
    import torch

    if cfg.kbit_fp32_upcast:
        from peft import get_peft_model, prepare_model_for_kbit_training

        base = prepare_model_for_kbit_training(
            base,
            use_gradient_checkpointing=cfg.grad_ckpt > 0,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
        if cfg.fused_kernels:
            modeling.apply_fused_kernels(base)
        modeling.configure_cuda_backends(cfg.cudnn_sdpa)
        torch.manual_seed(cfg.seed + 1)
        return get_peft_model(base, modeling.lora_config(cfg.spec()))
    torch.manual_seed(cfg.seed + 1)  # LoRA A init: the same adapters for the same seed
    model = modeling.prepare_for_training(
        base, cfg.spec(), cfg.plan(), fused_kernels=cfg.fused_kernels
    )
    if cfg.bf16_adapters:
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
    if cfg.varlen:
        from finetune_worker import attention

        attention.use_varlen(model)
    return model


def release(peft_model):
    """Take the adapters and checkpointing off again so the next run reuses the same base."""
    import torch

    base = peft_model.unload()
    for layer in modeling.decoder_layers(base):
        layer._compiled_call_impl = None  # a compiled run's layers run eager again
    base.config._attn_implementation = "sdpa"  # a varlen run switched it
    base.gradient_checkpointing_disable()
    if getattr(base, "_require_grads_hook", None) is not None:
        base.disable_input_require_grads()
    gc.collect()
    torch.cuda.empty_cache()
    return base


def micro_batches(examples: list[dict], cfg: RunConfig) -> list[list[dict]]:
    if cfg.varlen and not cfg.group_by_tokens:  # a fixed count per row (the loss-curve check)
        return list(packing.chunks(examples, cfg.micro_batch))
    if cfg.varlen:
        lengths = [min(len(e["input_ids"]), cfg.seq_len) for e in examples]
        groups = packing.packed_batches(lengths, cfg.tokens_per_micro_batch)
        return [[examples[i] for i in g] for g in groups]
    if cfg.length_grouped:
        lengths = [min(len(e["input_ids"]), cfg.seq_len) for e in examples]
        groups = packing.length_grouped_batches(
            lengths, cfg.tokens_per_micro_batch, seed=cfg.seed, multiple=cfg.pad_multiple
        )
        return [[examples[i] for i in g] for g in groups]
    if cfg.packing and cfg.group_by_tokens:
        lengths = [min(len(e["input_ids"]), cfg.seq_len) for e in examples]
        groups = packing.token_budget_batches(lengths, cfg.tokens_per_micro_batch)
        return [[examples[i] for i in g] for g in groups]
    return list(packing.chunks(examples, cfg.micro_batch))


def flops_per_token(shape: str, attended: float) -> float:
    """Model FLOPs per trained-on token for LoRA: forward 2N plus input-gradient backward 2N over
    the frozen matmuls (no weight gradients), plus attention (forward 4*h*context per layer,
    backward twice that). Recompute under checkpointing is not counted (hardware, not model FLOPs);
    the adapters' own FLOPs (r=16: ~0.3%) are left out."""
    s = shapes.SHAPES[shape]
    attn = 3 * 4 * s["hidden_size"] * attended * s["num_hidden_layers"]
    return 4 * shapes.matmul_params(shape) + attn


def attended_context(examples: list[dict], seq_len: int) -> float:
    """Mean number of keys a query attends to under a causal mask, per real token."""
    total = sum(min(len(e["input_ids"]), seq_len) for e in examples)
    pairs = sum(n * (n + 1) / 2 for n in (min(len(e["input_ids"]), seq_len) for e in examples))
    return pairs / max(total, 1)


def train(
    model,
    examples: list[dict],
    cfg: RunConfig,
    *,
    collator=None,
    log=print,
    profile_steps: int = 0,
    profile_out: str | None = None,
) -> RunResult:
    """Run cfg.steps optimizer steps over `examples` (recycled if short) and measure them."""
    import torch

    result = RunResult(config=asdict(cfg))
    device = next(p for p in model.parameters()).device
    cuda = device.type == "cuda"
    if cfg.varlen:
        collate = collator or packing.make_varlen_collator(
            None, cfg.seq_len, row_tokens=cfg.row_tokens or cfg.tokens_per_micro_batch
        )
    else:
        collate = collator or packing.make_collator(
            None,
            cfg.seq_len,
            cfg.packing and not cfg.length_grouped,
            row_tokens=cfg.row_tokens,
            attention_mask=not cfg.length_grouped,
            pad_to_multiple_of=cfg.pad_multiple,
        )
    groups = micro_batches(examples, cfg)
    need = cfg.steps * cfg.grad_accum
    if len(groups) < need:
        groups = (groups * math.ceil(need / len(groups)))[:need]
    groups = groups[:need]
    batches = []
    for g in groups:
        b = collate(g)
        b = {k: v.pin_memory() if cuda and hasattr(v, "pin_memory") else v for k, v in b.items()}
        batches.append((b, packing.example_tokens(g, cfg.seq_len), packing.trained_tokens(b)))
    used = [e for g in groups for e in g]
    result.flops_per_token = flops_per_token(cfg.shape, attended_context(used, cfg.seq_len))
    result.rows_per_micro_batch = sum(b["input_ids"].shape[0] for b, _, _ in batches) / len(batches)

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=cfg.fused_adamw and cuda
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: min(1.0, (step + 1) / max(cfg.warmup_steps, 1))
    )
    model.train()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    step_times, step_tokens, step_trained, losses = [], [], [], []
    t_prev = time.perf_counter()
    i = 0
    prof = None
    try:
        for step in range(cfg.steps):
            if profile_steps and step == cfg.steps - profile_steps:
                prof = torch.profiler.profile(
                    activities=[
                        torch.profiler.ProfilerActivity.CPU,
                        torch.profiler.ProfilerActivity.CUDA,
                    ]
                )
                prof.__enter__()
            chunk = batches[i : i + cfg.grad_accum]
            i += cfg.grad_accum
            total_trained = sum(t for _, _, t in chunk)
            step_loss = torch.zeros((), device=device)
            for b, _, trained in chunk:
                b = {
                    k: v.to(device, non_blocking=True) if hasattr(v, "to") else v
                    for k, v in b.items()
                }
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                    out = model(**b)
                # out.loss is the mean over this micro-batch's trained tokens; reweight so the
                # step's loss is the mean over all of the step's trained tokens.
                loss = out.loss * (trained / total_trained)
                loss.backward()
                step_loss += loss.detach()
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm, foreach=True)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(step_loss)
            if cuda:
                torch.cuda.synchronize()
            now = time.perf_counter()
            step_times.append(now - t_prev)
            t_prev = now
            step_tokens.append(sum(n for _, n, _ in chunk))
            step_trained.append(total_trained)
    except torch.OutOfMemoryError as exc:
        result.error = f"OOM: {str(exc).splitlines()[0][:200]}"
    if prof is not None:
        prof.__exit__(None, None, None)
        result.notes["profile"] = summarize_profile(
            prof, profile_steps, step_times[-profile_steps:]
        )
        if profile_out:
            # Appended, one section per run: GPU kernels by GPU time, then the host's
            # operators by their own CPU time (where a host-bound step spends it).
            averages = prof.key_averages()
            with open(profile_out, "a") as fh:
                fh.write(f"== {cfg.label}: by CUDA time\n")
                fh.write(averages.table(sort_by="cuda_time_total", row_limit=40))
                fh.write(f"\n== {cfg.label}: by self CPU time\n")
                fh.write(averages.table(sort_by="self_cpu_time_total", row_limit=40))
                fh.write("\n")
    if cfg.compile_layers:
        from torch._dynamo.utils import counters

        result.notes["dynamo"] = {
            "unique_graphs": counters["stats"].get("unique_graphs", 0),
            "graph_breaks": sum(counters["graph_break"].values()),
            "break_reasons": sorted(counters["graph_break"])[:5],
        }
    result.losses = [round(float(x), 5) for x in losses]
    result.notes["step_seconds"] = [round(t, 4) for t in step_times]
    result.notes["step_shapes"] = [
        list(b["input_ids"].shape) for b, _, _ in batches[: len(step_times) * cfg.grad_accum]
    ]
    if cuda:
        result.peak_reserved_bytes = torch.cuda.max_memory_reserved()
        result.peak_allocated_bytes = torch.cuda.max_memory_allocated()
        result.cuda_context_bytes = cuda_context_bytes()
        result.non_torch_bytes = non_torch_bytes()
    timed = step_times[cfg.warmup_excluded :]
    if timed and not result.error:
        result.steps_timed = len(timed)
        result.seconds = sum(timed)
        toks = sum(step_tokens[cfg.warmup_excluded :])
        result.tokens_per_s = toks / result.seconds
        result.trained_tokens_per_s = sum(step_trained[cfg.warmup_excluded :]) / result.seconds
        result.tokens_per_step = toks / len(timed)
        result.step_s_median = sorted(timed)[len(timed) // 2]
        result.mfu = result.tokens_per_s * result.flops_per_token / PEAK_BF16_FLOPS
    del opt, sched, batches
    model.zero_grad(set_to_none=True)
    return result


def measure(
    base,
    examples: list[dict],
    cfg: RunConfig,
    *,
    log=print,
    profile_steps: int = 0,
    profile_out: str | None = None,
) -> tuple[Any, RunResult]:
    """prepare -> train -> release on a reusable base; returns (base, result)."""
    import torch

    pm = None
    blas = torch.backends.cuda.preferred_blas_library()
    try:
        pm = prepare(base, cfg)
        if cfg.blas_library:
            torch.backends.cuda.preferred_blas_library(cfg.blas_library)
        if cfg.gc_freeze:
            gc.collect()
            gc.freeze()
        result = train(
            pm, examples, cfg, log=log, profile_steps=profile_steps, profile_out=profile_out
        )
    except torch.OutOfMemoryError as exc:
        result = RunResult(config=asdict(cfg), error=f"OOM: {str(exc).splitlines()[0][:200]}")
        result.peak_reserved_bytes = torch.cuda.max_memory_reserved()
        result.peak_allocated_bytes = torch.cuda.max_memory_allocated()
    finally:
        torch.backends.cuda.preferred_blas_library(blas)
        gc.unfreeze()
    if pm is not None:
        base = release(pm)
    torch.cuda.reset_peak_memory_stats()
    return base, result


KERNEL_GROUPS = (
    # (group, substrings of CUDA kernel names); first match wins
    ("attention", ("fmha", "flash", "attention", "efficient")),
    ("gemm", ("gemm", "nvjet", "cutlass", "sm90_xmma", "xmma", "ampere_bf16", "splitk")),
    ("liger/triton", ("triton", "_rms_norm", "swiglu", "rope", "cross_entropy", "liger")),
    ("bnb dequant", ("kDequantize", "dequant")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    (
        "elementwise/copy",
        (
            "elementwise",
            "vectorized",
            "copy",
            "fill",
            "reduce",
            "Memcpy",
            "Memset",
            "index",
            "cat",
            "where",
            "masked",
        ),
    ),
)


def summarize_profile(prof, steps: int, step_times: list[float]) -> dict:
    """GPU kernel time per group over the profiled steps, as a share of the steps' wall time."""
    groups: dict[str, float] = {}
    top: list[tuple[str, float]] = []
    for evt in prof.key_averages():
        cuda_us = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
        if not cuda_us or evt.device_type.name != "CUDA":
            continue
        name = evt.key
        group = "other"
        for g, keys in KERNEL_GROUPS:
            if any(k.lower() in name.lower() for k in keys):
                group = g
                break
        groups[group] = groups.get(group, 0.0) + cuda_us / 1e6
        top.append((name[:90], cuda_us / 1e6))
    wall = sum(step_times) or 1.0
    busy = sum(groups.values())
    top.sort(key=lambda t: -t[1])
    return {
        "wall_s": round(wall, 4),
        "gpu_busy_s": round(busy, 4),
        "gpu_idle_share": round(1 - busy / wall, 3),
        "groups_share_of_wall": {
            k: round(v / wall, 3) for k, v in sorted(groups.items(), key=lambda kv: -kv[1])
        },
        "top_kernels_s": [(n, round(t, 4)) for n, t in top[:25]],
    }
