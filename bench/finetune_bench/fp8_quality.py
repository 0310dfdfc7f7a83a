"""What an FP8 frozen base costs in quality: the same LoRA job on the bf16 base and on its FP8
copy (`method: fp8`), then the FP8-trained adapter merged into the bf16 base as AdapterMerge
does.

One process, three models of the same random base (rebuilt from the same seed, checked by a
weight checksum): the loss curves of the two trainings step by step, and the held-out loss of

* the bf16-trained adapter on the bf16 base (the reference),
* the FP8-trained adapter on the FP8 base it was trained against,
* the FP8-trained adapter on the bf16 base, unmerged and merged (peft's merge_and_unload into
  bf16 weights: the model a user serves after an AdapterMerge).
"""

from __future__ import annotations

import gc
from dataclasses import replace

from finetune_worker import attention, packing

from . import harness

EVAL_EXAMPLES = 256


def _checksum(model) -> float:
    """A cheap fingerprint of the random base: equal bases give equal sums."""
    layer = model.model.layers[0].mlp.down_proj.weight
    return float(layer.float().sum())


def eval_loss(model, examples: list[dict], cfg: harness.RunConfig) -> float:
    """Mean loss per trained token over `examples`, in varlen rows of the run's size."""
    import torch

    device = next(model.parameters()).device
    collate = packing.make_varlen_collator(None, cfg.seq_len, row_tokens=cfg.tokens_per_micro_batch)
    lengths = [min(len(e["input_ids"]), cfg.seq_len) for e in examples]
    total, weight = 0.0, 0
    model.eval()
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        for group in packing.packed_batches(lengths, cfg.tokens_per_micro_batch):
            batch = collate([examples[i] for i in group])
            n = packing.trained_tokens(batch)
            batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
            total += float(model(**batch).loss) * n
            weight += n
    model.train()
    return total / max(weight, 1)


def _adapter_state(peft_model) -> dict:
    return {
        k: v.detach().to("cpu", copy=True)
        for k, v in peft_model.state_dict().items()
        if "lora_" in k
    }


def run(
    shape: str, examples: list[dict], cfg: harness.RunConfig, *, device: str = "cuda", log=print
) -> dict:
    import torch

    train_examples, held_out = examples[:-EVAL_EXAMPLES], examples[-EVAL_EXAMPLES:]
    out: dict = {"shape": shape, "config": {k: v for k, v in vars(cfg).items() if k != "targets"}}
    adapters = {}
    for method in ("lora", "fp8"):
        base = harness.build_base(shape, "lora", device=device, seed=cfg.seed)
        out.setdefault("base_checksum", {})[method] = _checksum(base)
        run_cfg = replace(cfg, method=method, label=f"{shape}-{method}")
        model = harness.prepare(base, run_cfg)
        result = harness.train(model, train_examples, run_cfg)
        out[method] = {
            "tokens_per_s": round(result.tokens_per_s, 1),
            "peak_total_GiB": round(result.peak_gib, 2),
            "losses": result.losses,
            "error": result.error,
            "eval_loss": eval_loss(model, held_out, run_cfg),
        }
        log(f"{method}: {out[method]['tokens_per_s']} tok/s, eval {out[method]['eval_loss']:.5f}")
        adapters[method] = _adapter_state(model)
        del model, base
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    # The FP8-trained adapter on the bf16 base: unmerged, then merged into the bf16 weights.
    base = harness.build_base(shape, "lora", device=device, seed=cfg.seed)
    out["base_checksum"]["merge"] = _checksum(base)
    bf16_cfg = replace(cfg, method="lora", label=f"{shape}-fp8-adapter-on-bf16")
    model = harness.prepare(base, bf16_cfg)
    missing = model.load_state_dict(adapters["fp8"], strict=False)
    assert not missing.unexpected_keys, missing.unexpected_keys
    out["fp8_adapter_on_bf16_eval_loss"] = eval_loss(model, held_out, bf16_cfg)
    merged = model.merge_and_unload()
    attention.use_varlen(merged)
    out["fp8_adapter_merged_bf16_eval_loss"] = eval_loss(merged, held_out, bf16_cfg)
    a, b = out["lora"]["losses"], out["fp8"]["losses"]
    rel = [abs(x - y) / x for x, y in zip(a, b, strict=False)]
    tail = min(20, len(rel))
    out["loss_relative_difference"] = {
        "max": max(rel, default=0.0),
        "mean": sum(rel) / max(len(rel), 1),
        f"mean_last_{tail}_steps": sum(rel[-tail:]) / max(tail, 1),
        "last": rel[-1] if rel else 0.0,
    }
    fp8_eval = out["fp8"]["eval_loss"]
    out["merged_vs_adapter_eval_relative"] = (
        out["fp8_adapter_merged_bf16_eval_loss"] - fp8_eval
    ) / fp8_eval
    out["fp8_vs_bf16_eval_relative"] = (fp8_eval - out["lora"]["eval_loss"]) / out["lora"][
        "eval_loss"
    ]
    return out
