"""Predicted training throughput of one configuration: the planner's "fastest".

A micro-batch costs GPU time and host time, and they overlap only partly:

    gpu  = tokens x matmul FLOPs per token / rate(method)  (x dropout's elementwise work)
           + QLoRA's dequantisation of every 4-bit weight, once per forward pass
    host = layers x launch time per layer(method, checkpointing) + a fixed part
    step = (gpu^p + host^p)^(1/p)          a smooth maximum: p -> infinity is max(), 1 is sum
    tokens/s = tokens / step

FLOPs per token are those of a frozen-base LoRA step: forward 2P and backward 2P (input
gradients only; the frozen weights get none), plus another forward 2P for the share of
layers that checkpointing recomputes, with P the parameters in matmuls (every projection and
the output head).
The host part is what makes small micro-batches slow: Python launches the same kernels
whatever their size, so below a few thousand tokens a step waits on the CPU, and more so for
a small model, whose kernels finish sooner (Llama-3.2-1B: 18,928 tokens/s at 2,048 tokens,
64,938 at 8,192).

The constants were fitted (bench/fit_speed_model.py) on the worker's own training step on
one H200 (bench/data/speed-grid-h200.jsonl: Llama-3.2-1B and Llama-3-8B shapes, LoRA and
QLoRA, checkpointing off and on, 1,024 / 4,096 / 16,384 tokens per micro-batch) and checked
on the points the fit never saw (2,048 and 8,192 tokens, and earlier product-path runs):
docs/memory-model.md has the table. Other GPUs change the constants, not the ranking logic.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .arch import ModelArch
from .memory import TrainingShape


@dataclass(frozen=True)
class SpeedConstants:
    """Fitted on an H200 (torch 2.11, liger-kernel 0.8.5, bitsandbytes 0.50.2)."""

    tflops: dict[str, float] = field(
        default_factory=lambda: {"lora": 503.1, "qlora": 505.7, "fp8": 660.4}
    )
    """Effective matmul rate of a training step, TFLOP/s (the H200 peaks near 790 dense)."""
    dequant_seconds_per_gparam: float = 0.00001
    """QLoRA: seconds to dequantise 10^9 NF4 weights to bf16, once per pass. The fit leaves it
    near zero: on the H200 QLoRA's extra cost shows up as launch time per layer instead."""
    host_seconds_per_layer: dict[tuple[str, bool], float] = field(
        default_factory=lambda: {
            ("lora", False): 0.00557,
            ("lora", True): 0.01131,
            ("qlora", False): 0.00811,
            ("qlora", True): 0.01599,
            # fp8: fitted on its own grid (bench/fp8-speed-grid.sh, 4k-16k tokens, with and
            # without checkpointing; 8k tokens held out: -0.6 % and -12.2 %), the shared
            # constants kept: the Triton quantiser launches like any kernel.
            ("fp8", False): 0.00942,
            ("fp8", True): 0.01701,
        }
    )
    """Launch time per decoder layer and micro-batch; checkpointing launches the forward again."""
    compiled_host_seconds_per_layer: dict[str, float] = field(
        default_factory=lambda: {"lora": 0.0075, "qlora": 0.0105}
    )
    """The same for a recomputed layer that runs compiled (plan.compiledLayers): one graph per
    forward and backward instead of an operator at a time (LoRA rows of 2,048 tokens: 0.297 s
    against 0.527 s eager; QLoRA 0.376 s against 0.518 s). Fitted on the compiled runs at
    2,048, 4,608 and 16,384 tokens (bench/data/compiled-layers-h200.jsonl,
    compile-qlora-h200.jsonl: within 5.6 % for QLoRA, 6.7 % for LoRA), the other constants
    kept; the product-path runs (compiled-product-h200.jsonl) are held out."""
    host_seconds_fixed: float = 0.02823
    """Per micro-batch, outside the layers (loss, optimizer step share, data)."""
    overlap: float = 2.72
    """p of the smooth maximum of GPU and host time."""
    dropout_gpu_factor: float = 1.06
    """LoRA dropout draws a mask and a dropped-out copy per adapted projection (8B, 2k and 8k
    tokens: 8,094 vs 8,720 and 15,288 vs 16,170 tokens/s against dropout 0)."""


DEFAULT_SPEED = SpeedConstants()


def matmul_params(arch: ModelArch) -> int:
    """Parameters that take part in a matmul for every token: each layer's projections and the
    output head (a tied head still multiplies)."""
    return arch.num_layers * arch.layer_linear_params() + arch.vocab_size * arch.hidden_size


def step_seconds(
    arch: ModelArch, shape: TrainingShape, constants: SpeedConstants = DEFAULT_SPEED
) -> tuple[float, float, float]:
    """(GPU seconds, host seconds, step seconds) of one micro-batch at its token budget."""
    tokens = shape.tokens_per_micro_batch
    layers = arch.num_layers
    rebuilt = shape.recomputed_layers(layers)
    share = rebuilt / layers  # checkpointing some layers recomputes (and launches) only those
    params = matmul_params(arch)
    flops = tokens * params * (4.0 + 2.0 * share)
    gpu = flops / (constants.tflops[shape.method] * 1e12)
    if shape.lora_dropout > 0:
        gpu *= constants.dropout_gpu_factor
    if shape.method == "qlora":
        passes = 2 + share  # forward, backward, and the recomputed forward
        gpu += passes * constants.dequant_seconds_per_gparam * arch.quantizable_params() / 1e9
    per_layer = constants.host_seconds_per_layer
    recomputed_layer = (
        constants.compiled_host_seconds_per_layer[shape.method]
        if shape.compiled_layers
        else per_layer[(shape.method, True)]
    )
    host = (
        rebuilt * recomputed_layer
        + (layers - rebuilt) * per_layer[(shape.method, False)]
        + constants.host_seconds_fixed
    )
    p = constants.overlap
    return gpu, host, (gpu**p + host**p) ** (1 / p)


def predicted_tokens_per_second(
    arch: ModelArch, shape: TrainingShape, constants: SpeedConstants = DEFAULT_SPEED
) -> float:
    """Tokens per second of one training process, a full micro-batch at a time."""
    return shape.tokens_per_micro_batch / step_seconds(arch, shape, constants)[2]
