"""Peak-memory calibration grid for the planner (issue 5).

Every point is the worker's real preparation (modeling.prepare_for_training, liger fused
kernels, bf16 frozen parts) trained for a few optimizer steps on full-length samples (the worst
case for a given micro-batch and sequence length), and reports torch's peak reserved and
allocated bytes plus the memory the process holds outside torch's allocator (CUDA context).
One JSON line per point; points that do not fit the card are recorded with `oom: true`.
"""

from __future__ import annotations

import datetime
import json
import platform

from . import data, harness, shapes


def versions() -> dict:
    import peft
    import torch
    import transformers

    out = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
    }
    for name in ("bitsandbytes", "liger_kernel", "trl"):
        try:
            module = __import__(name)
            out[name] = getattr(module, "__version__", "?")
        except Exception:  # noqa: BLE001
            out[name] = None
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
        out["gpu_total_bytes"] = torch.cuda.mem_get_info()[1]
    return out


def grid(
    shape: str,
    method: str,
    seq_lens,
    micro_batches,
    ckpts,
    *,
    r: int = 16,
    steps: int = 3,
    dropout: float = 0.0,
    out=None,
    log=print,
) -> list[dict]:
    import torch

    harness.cuda_context_bytes()  # measured before any model memory exists
    base = harness.build_base(shape, method)
    base_bytes = torch.cuda.memory_allocated()
    vers = versions()
    rows = []
    for seq in seq_lens:
        for mb in micro_batches:
            for ckpt in ckpts:
                cfg = harness.RunConfig(
                    shape=shape,
                    method=method,
                    r=r,
                    alpha=2 * r,
                    dropout=dropout,
                    seq_len=seq,
                    packing=False,
                    micro_batch=mb,
                    grad_ckpt=float(ckpt),
                    steps=steps,
                    warmup_excluded=1,
                    fused_kernels=True,
                )
                examples = data.fixed_examples(
                    mb * steps, seq, shapes.SHAPES[shape]["vocab_size"], seed=seq + mb
                )
                base, res = harness.measure(base, examples, cfg)
                row = {
                    **shapes.describe(shape),
                    "method": method,
                    "r": r,
                    "lora_alpha": 2 * r,
                    "lora_dropout": dropout,
                    "target_modules": list(cfg.targets),
                    "seq_len": seq,
                    "micro_batch": mb,
                    "grad_ckpt": bool(ckpt),
                    "fused_ce": True,
                    "liger": True,
                    "packing": False,
                    "optimizer": "adamw_torch_fused",
                    "peak_reserved_bytes": res.peak_reserved_bytes,
                    "peak_allocated_bytes": res.peak_allocated_bytes,
                    "cuda_context_bytes": res.cuda_context_bytes or harness.cuda_context_bytes(),
                    "non_torch_bytes_end": res.non_torch_bytes,
                    "model_bytes_after_load": base_bytes,
                    "oom": bool(res.error),
                    "tokens_per_s": round(res.tokens_per_s, 1),
                    "measured_at": datetime.date.today().isoformat(),
                    "torch": vers["torch"],
                    "transformers": vers["transformers"],
                    "peft": vers["peft"],
                    "bitsandbytes": vers.get("bitsandbytes"),
                    "liger_kernel": vers.get("liger_kernel"),
                    "gpu": vers.get("gpu"),
                }
                rows.append(row)
                log(
                    f"calib {shape} {method} seq={seq} mb={mb} ckpt={ckpt}: "
                    f"reserved={res.peak_reserved_bytes / 2**30:.2f} GiB oom={row['oom']} "
                    f"tok/s={row['tokens_per_s']}"
                )
                if out is not None:
                    out.write(json.dumps(row) + "\n")
                    out.flush()
    del base
    return rows
