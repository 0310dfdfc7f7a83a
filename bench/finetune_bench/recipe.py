"""The common recipe (peft + trl SFTTrainer, micro-batch 1, accumulation 4, seq 512) on the
benchmark's data: the baseline the worker is compared against.

The training setup of the recipe's reference measurements (bench/reference/README.md: same
optimizer, learning rate, clipping, dropout, LoRA ranks, prepare_model_for_kbit_training for
QLoRA), with two changes so that it runs on exactly the worker's benchmark data: the
random-weight model is built in memory instead of saved and reloaded (QLoRA: quantised in
memory by modeling.quantize_in_place, the same NF4 layers from_pretrained would make), and the
dataset is the benchmark's examples in a fixed order (a sequential sampler) instead of
fixed-length random tokens. Knobs exist only for the loss-curve check (dropout, optimizer).
"""

from __future__ import annotations

import time

from . import harness

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def run(
    mode: str,
    examples: list[dict],
    steps: int,
    *,
    shape: str = "llama-3-8b",
    dropout: float = 0.1,
    optim: str = "paged_adamw_32bit",
    mb: int = 1,
    ga: int = 4,
    seq: int = 512,
    liger: bool = False,
    seed: int = 0,
    warmup_excluded: int = 5,
) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from tokenizers import Tokenizer, models
    from torch.utils.data import SequentialSampler
    from transformers import PreTrainedTokenizerFast, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    qlora = mode.startswith("qlora")
    gc = mode in ("qlora", "lora_gc")
    r, alpha = (64, 128) if qlora else (16, 32)
    cuda = torch.cuda.is_available()
    if cuda:
        harness.cuda_context_bytes()
    model = harness.build_base(
        shape, "qlora" if qlora else "lora", seed=seed, device="cuda" if cuda else "cpu"
    )
    if qlora:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gc)
    torch.manual_seed(seed + 1)
    pm = get_peft_model(
        model,
        LoraConfig(
            r=r,
            lora_alpha=alpha,
            target_modules=TARGETS,
            lora_dropout=dropout,
            bias="none",
            task_type="CAUSAL_LM",
        ),
    )
    vocab = pm.config.vocab_size
    ds = Dataset.from_list([{"input_ids": e["input_ids"]} for e in examples])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(
            models.WordLevel({"<pad>": 0, "<eos>": 1, "<unk>": 2}, unk_token="<unk>")
        ),
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
    )
    args = SFTConfig(
        output_dir="/tmp/recipe_out",
        max_steps=steps,
        per_device_train_batch_size=mb,
        gradient_accumulation_steps=ga,
        use_liger_kernel=liger,
        optim=optim,
        learning_rate=2e-4,
        weight_decay=0.001,
        bf16=cuda,
        use_cpu=not cuda,
        max_grad_norm=0.3,
        warmup_steps=0.03,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        max_length=seq,
        gradient_checkpointing=gc,
        packing=False,
        dataloader_num_workers=0,
        seed=seed,
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
    )

    class Clock(TrainerCallback):
        def __init__(self):
            self.t, self.tokens, self.losses = [], [], []

        def on_step_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            self.t.append(time.perf_counter())
            self.tokens.append(state.num_input_tokens_seen)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append(round(float(logs["loss"]), 5))

    class InOrder(SFTTrainer):
        def _get_train_sampler(self, *a, **k):
            return SequentialSampler(self.train_dataset)

    clock = Clock()
    tr = InOrder(model=pm, train_dataset=ds, args=args, processing_class=tok, callbacks=[clock])
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    tr.train()
    t, tokens = clock.t, clock.tokens
    w = min(warmup_excluded, len(t) - 2)
    dt = t[-1] - t[w]
    toks = tokens[-1] - tokens[w]
    return {
        "mode": mode,
        "r": r,
        "grad_ckpt": gc,
        "dropout": dropout,
        "optim": optim,
        "mb": mb,
        "ga": ga,
        "seq": seq,
        "liger": liger,
        "steps_timed": len(t) - 1 - w,
        "seconds": round(dt, 3),
        "tokens_per_s": round(toks / dt, 1),
        "step_s": round(dt / (len(t) - 1 - w), 4),
        "peak_reserved_bytes": torch.cuda.max_memory_reserved() if cuda else None,
        "peak_allocated_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "cuda_context_bytes": harness.cuda_context_bytes() if cuda else None,
        "non_torch_bytes": harness.non_torch_bytes() if cuda else None,
        "losses": clock.losses,
        "vocab": vocab,
    }
