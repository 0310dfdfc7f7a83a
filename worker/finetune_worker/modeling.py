"""Loading the base model and turning it into a trainable LoRA / QLoRA model.

This module owns the numerics of a fine-tuning run: which dtype each part of the model lives
in, how the base is quantised, where adapters go, which layers are recomputed in the backward
pass and which fused kernels replace the stock ones. The planner's memory formulas were
calibrated against exactly these choices (tests/data/calibration/), so changing one of them
changes the memory a job needs.

The three entry points take the FineTuneJob spec and the operator's plan duck-typed: fields are
read by their Python (snake_case) or CRD (camelCase) names, so the worker can pass either the
pydantic models or plain dicts decoded from its config file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from peft import LoraConfig, PeftModel
    from transformers import BitsAndBytesConfig, PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

# Every linear projection of a Llama-style block. Adapting all of them (not only q/v) is what
# lets LoRA match full fine-tuning quality at r=16; the planner assumes this set by default.
DEFAULT_TARGET_MODULES = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)


def field(obj: Any, name: str, default: Any = None) -> Any:
    """Read `name` (snake_case) from a pydantic model, a dataclass or a dict, also trying camelCase.

    None-valued fields fall back to `default`, so optional spec fields can be left out.
    """
    if obj is None:
        return default
    camel = _camel(name)
    for key in (name, camel):
        if isinstance(obj, Mapping):
            if key in obj and obj[key] is not None:
                return obj[key]
        else:
            value = getattr(obj, key, None)
            if value is not None:
                return value
    return default


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def plan_method(plan: Any) -> str:
    method = str(field(plan, "method", "lora")).lower()
    if method not in ("lora", "qlora", "fp8"):
        raise ValueError(
            f"plan.method is {method!r}; expected 'lora' (bf16 base), 'qlora' (NF4 base) or "
            "'fp8' (FP8 base). "
            "The operator's planner writes this field: re-plan the job or fix the worker config."
        )
    return method


def model_source(spec: Any, local_path: str | None = None) -> tuple[str, str | None]:
    """Where to load the base model from: (path or hub id, revision or None).

    `local_path` is where the worker already has the model (a `pvc://` or `s3://` source mounted
    or downloaded into the pod); it wins so a job can run air-gapped. Otherwise spec.model.name
    or an `hf://owner/name` URI is a hub id, pinned by spec.model.revision when given.
    """
    model = field(spec, "model", spec)
    if local_path:
        if not os.path.isdir(local_path):
            raise FileNotFoundError(
                f"the base model should be at {local_path!r} in the worker pod but no such "
                "directory exists; check the volume mount (PVC) or the download step."
            )
        return str(local_path), None
    name = field(model, "name")
    uri = field(model, "uri")
    if not name and isinstance(uri, str):
        if uri.startswith("hf://"):
            name = uri[len("hf://") :]
        elif "://" not in uri:
            name = uri
        else:
            raise ValueError(
                f"spec.model.uri is {uri!r}: the worker must mount or download it first and pass "
                "its local directory as local_path."
            )
    if isinstance(name, str) and name:
        if os.path.isdir(name):
            return name, None
        return name, field(model, "revision")
    raise ValueError(
        "spec.model names no model: set spec.model.name to a Hugging Face hub id (e.g. "
        "'meta-llama/Meta-Llama-3-8B', optionally with spec.model.revision) or spec.model.uri "
        "to hf://, pvc:// or s3://."
    )


def load_tokenizer(
    spec: Any, token: str | None, *, local_path: str | None = None
) -> PreTrainedTokenizerBase:
    """Load the tokenizer that belongs to the base model.

    A tokenizer without a pad token (Llama 3 ships none) gets its EOS as pad token: padding
    positions are masked out of attention and loss, so which id fills them does not matter,
    and adding a new token would resize the embeddings the planner has already sized.
    """
    from transformers import AutoTokenizer

    source, revision = model_source(spec, local_path)
    override = field(field(spec, "model"), "tokenizer")
    if override and "://" not in str(override):
        source, revision = str(override), None
    tok = AutoTokenizer.from_pretrained(source, revision=revision, token=token)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def bnb_config(spec: Any = None) -> BitsAndBytesConfig:
    """The QLoRA quantisation: NF4 weights, double-quantised scales, bf16 compute.

    bf16 compute keeps the dequantised matmuls on the tensor cores at the same precision as
    LoRA on a bf16 base, so the two methods train the same mathematics up to NF4 rounding.
    The packed 4-bit weights are stored in bf16 tensors (quant storage = compute dtype), so
    FSDP can flatten and shard them with the bf16 parts of the model (Answer.AI's fsdp_qlora).
    """
    import torch
    from transformers import BitsAndBytesConfig

    quant = field(spec, "quantization")
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=str(field(quant, "type", "nf4")),
        bnb_4bit_use_double_quant=bool(field(quant, "double_quant", True)),
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_quant_storage=torch.bfloat16,
    )


def load_base_model(
    spec: Any,
    plan: Any,
    token: str | None,
    device: str,
    *,
    local_path: str | None = None,
    attn_implementation: str | None = None,
    device_map: Any = "device",
) -> PreTrainedModel:
    """Load the frozen base model: bf16 for LoRA, NF4 + double quant + bf16 compute for QLoRA.

    `device_map` defaults to everything on `device`; None under FSDP, where the base loads on
    the CPU (with cpu_ram_efficient_loading on rank 0 only) and FSDP moves each rank's shard to
    its GPU. The NF4 weights are stored as bf16 (bnb_config's quant storage) so FSDP can shard
    them like the rest of the bf16 base.

    The base always loads straight into bf16 on the target device; nothing is upcast to fp32.
    In particular the embeddings and lm_head stay bf16 under QLoRA (peft's
    prepare_model_for_kbit_training would upcast both to fp32: 2 x 128,256 x 4,096 x 2 extra bytes,
    about 2 GiB on a Llama-3-8B, for no benefit since they are frozen).
    SDPA attention is the default. With packing the trainer switches the model to varlen
    attention (attention.py), where each packed example attends only to itself.
    """
    import torch
    from transformers import AutoModelForCausalLM

    method = plan_method(plan)
    source, revision = model_source(spec, local_path)
    kwargs: dict[str, Any] = {
        "revision": revision,
        "token": token,
        "dtype": torch.bfloat16,
        "attn_implementation": attn_implementation or "sdpa",
        "low_cpu_mem_usage": True,
    }
    if method == "qlora":
        if not str(device).startswith("cuda"):
            raise RuntimeError(
                f"plan.method is 'qlora' but the worker runs on {device!r}: the NF4 kernels of "
                "bitsandbytes need a CUDA GPU. Schedule the job on a GPU node or plan it as 'lora'."
            )
        kwargs["quantization_config"] = bnb_config(spec)
    if method == "fp8" and device_map == "device":
        # The bf16 weights are read into host memory and each projection is quantised on the
        # GPU when LoRA is applied (prepare_for_training): a budget planned for an FP8 base
        # never holds the bf16 one.
        device_map = {"": "cpu"}
    if device_map == "device":
        kwargs["device_map"] = {"": device}
    elif device_map is not None:
        kwargs["device_map"] = device_map
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    model.config.use_cache = (
        False  # a KV cache is dead weight in training and disables packing masks
    )
    return model


def quantize_in_place(model: PreTrainedModel, spec: Any = None) -> PreTrainedModel:
    """Swap a bf16 model's decoder Linear layers for bitsandbytes NF4 Linear4bit, in memory.

    The same result as load_base_model(..., method 'qlora') on a checkpoint (transformers
    converts every nn.Linear except lm_head, which it keeps in the load dtype), without writing
    and re-reading a checkpoint: the benchmark and the memory calibration build random-weight
    models from a config and use this.
    """
    import bitsandbytes as bnb
    import torch

    cfg = bnb_config(spec)
    skip = {"lm_head"}
    device = next(model.parameters()).device
    for _parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if not isinstance(child, torch.nn.Linear) or child_name in skip:
                continue
            q = bnb.nn.Linear4bit(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                compute_dtype=cfg.bnb_4bit_compute_dtype,
                compress_statistics=cfg.bnb_4bit_use_double_quant,
                quant_type=cfg.bnb_4bit_quant_type,
                quant_storage=cfg.bnb_4bit_quant_storage,
                device="meta",
            )
            q.weight = bnb.nn.Params4bit(
                child.weight.data,
                requires_grad=False,
                compress_statistics=cfg.bnb_4bit_use_double_quant,
                quant_type=cfg.bnb_4bit_quant_type,
                quant_storage=cfg.bnb_4bit_quant_storage,
                module=q,
            )
            if child.bias is not None:
                q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, child_name, q)
            q.weight = q.weight.to(device)  # quantises on the move to the GPU
            del child
    model.is_loaded_in_4bit = True
    model.is_quantized = True
    model.quantization_method = "bitsandbytes"
    model.config.quantization_config = cfg
    try:  # what from_pretrained attaches; Trainer checks it says the quantisation is trainable
        from transformers.quantizers.auto import AutoHfQuantizer

        model.hf_quantizer = AutoHfQuantizer.from_config(cfg, pre_quantized=False)
    except Exception:  # noqa: BLE001 - only the Trainer's sanity check reads it
        model.hf_quantizer = None
    return model


def lora_config(spec: Any) -> LoraConfig:
    """Translate spec.lora into a peft LoraConfig (all linear projections unless told otherwise)."""
    from peft import LoraConfig

    lora = field(spec, "lora")
    r = int(field(lora, "r", 16))
    targets = field(lora, "target_modules") or list(DEFAULT_TARGET_MODULES)
    return LoraConfig(
        r=r,
        lora_alpha=float(field(lora, "alpha", 2 * r)),
        lora_dropout=float(field(lora, "dropout", 0.0)),
        target_modules=list(targets),
        # the API spells these useRSLoRA / useDoRA (python: use_rs_lora / use_do_ra)
        use_rslora=bool(
            field(lora, "use_rs_lora", field(lora, "use_rslora", field(lora, "useRSLoRA", False)))
        ),
        use_dora=bool(
            field(lora, "use_do_ra", field(lora, "use_dora", field(lora, "useDoRA", False)))
        ),
        bias="none",
        task_type="CAUSAL_LM",
    )


def liger_available() -> bool:
    try:
        import liger_kernel.transformers  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure (no triton, no GPU build) means "not available"
        return False
    return True


def apply_fused_kernels(
    model: PreTrainedModel, device: str | None = None, *, in_layers: bool = True
) -> bool:
    """Patch in liger-kernel's Triton kernels (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy).

    Each replaces several memory-bound PyTorch ops by one kernel; the fused linear cross-entropy
    never materialises the (tokens x 128,256) logits, the largest activation of a Llama-3 step.
    Only on CUDA (Triton) and only when the package imports; returns whether it was applied.
    `device` is where training runs; the weights may still be on the CPU (FSDP loads the base
    there and shards it onto the GPUs later), and the patch is a module swap either way.
    `in_layers=False` keeps the decoder layers' own norm, RoPE and SwiGLU (for compiled layers:
    Dynamo cannot trace liger's kernels, and Inductor fuses the same work itself) and patches
    in the fused loss alone.
    """
    kind = device or next(model.parameters()).device.type
    if not str(kind).startswith("cuda") or not liger_available():
        return False
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    if in_layers:
        _apply_liger_kernel_to_instance(model=model)
    else:
        _apply_liger_kernel_to_instance(model=model, rope=False, rms_norm=False, swiglu=False)
    return True


def compile_decoder_layers(peft_model: PeftModel, backend: str = "inductor") -> int:
    """torch.compile each decoder layer (one compiled graph serves every layer of the model).

    A layer that checkpointing recomputes launches its kernels three times per row (forward,
    recomputed forward, backward), each through Python, the dispatcher and autograd; with
    QLoRA's 4-bit matmuls and rows of a few thousand tokens that host work, not the GPU, sets
    the pace (docs/perf-notes.md). Compiled, a layer's forward and backward are one graph each
    with the elementwise work fused: measured on an H200, QLoRA rows of 4,608 tokens 9,405 /
    9,354 tokens/s against 8,345 / 7,619 eager. Rows change their token count and number of
    sequences every step, so the graphs are dynamic from the first compile (a static first
    graph costs a second compile at the first new shape), and without duck sizing (sizes that
    happen to be equal in one row, e.g. the longest sequence and the token count of a
    one-example row, would otherwise become one symbol and recompile when they differ).
    Returns the number of layers compiled.
    """
    import torch._dynamo
    import torch.fx.experimental._config as fx_config

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    torch._dynamo.config.accumulated_cache_size_limit = max(
        torch._dynamo.config.accumulated_cache_size_limit, 512
    )
    fx_config.use_duck_shape = False
    # Compiling is an optimisation: a layer Dynamo or Inductor cannot compile runs eager (and
    # logs why) instead of ending the job. Eager needs less memory than the plan allows for.
    torch._dynamo.config.suppress_errors = True
    layers = decoder_layers(peft_model)
    for layer in layers:
        layer.compile(backend=backend, dynamic=True)
    return len(layers)


def decoder_layers(model: Any) -> list:
    """The decoder layers of a (peft-wrapped) causal LM, in order."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def configure_cuda_backends(cudnn_attention: bool = False) -> None:
    """Process-wide CUDA settings for training on batches whose shapes change every step.

    Length-grouped and packed batches have a new (rows, length) shape almost every step. cuDNN's
    SDPA kernels build an execution plan per shape (measured on an H200: a length-grouped 4k-token
    step took 0.65 s against 0.33 s for fixed shapes), while the flash and memory-efficient kernels
    have no per-shape setup, so cuDNN attention is switched off.
    """
    import torch

    if torch.cuda.is_available():
        torch.backends.cuda.enable_cudnn_sdp(cudnn_attention)


def checkpointed_layers(num_layers: int, fraction: float, count: int | None = None) -> list[int]:
    """Which decoder layers to recompute in backward: `count` of them (the plan's
    checkpointedLayers) or, without a count, `fraction` of them.

    Spread evenly over the depth so the saved activations of the others are spread too.
    """
    if count is None:
        count = round(num_layers * min(max(float(fraction), 0.0), 1.0))
    count = min(max(int(count), 0), num_layers)
    if count <= 0:
        return []
    step = num_layers / count
    return sorted({int(i * step) for i in range(count)})


def enable_checkpointing(
    model: PreTrainedModel, fraction: float = 1.0, count: int | None = None
) -> list[int]:
    """Recompute the chosen decoder layers in backward (non-reentrant), keep the rest's activations.

    use_reentrant=False works with frozen inputs and with peft; selective (fewer than all
    layers) trades memory for the recompute of fewer layers: each layer not recomputed saves a
    sixth of that layer's step time (forward recompute is 2 of 6 FLOPs per parameter for LoRA).
    """
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = decoder_layers(model)
    keep = set(checkpointed_layers(len(layers), fraction, count))
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i in keep
    return sorted(keep)


def prepare_for_training(
    model: PreTrainedModel,
    spec: Any,
    plan: Any,
    *,
    fused_kernels: bool | None = None,
    device: str | None = None,
) -> PeftModel:
    """Freeze the base, apply fused kernels, checkpointing per plan, and wrap with LoRA adapters.

    Deliberately not peft's prepare_model_for_kbit_training: that upcasts every non-quantised
    weight (embeddings, lm_head, norms) to fp32, which costs ~2 GiB on an 8B model and slows
    the norms and the logits; the frozen parts train identically in bf16 and the adapters are
    created in fp32 by peft regardless.
    """
    from peft import get_peft_model

    for p in model.parameters():
        p.requires_grad_(False)
    model.config.use_cache = False
    if fused_kernels is None:
        fused_kernels = bool(field(plan, "fused_kernels", True))
    compiled = bool(field(plan, "compiled_layers", False))
    applied = apply_fused_kernels(model, device, in_layers=not compiled) if fused_kernels else False
    ckpt = field(plan, "gradient_checkpointing", False)
    if ckpt:
        fraction = 1.0 if ckpt is True else float(ckpt)
        fraction = float(field(plan, "checkpoint_fraction", fraction))
        enable_checkpointing(model, fraction, field(plan, "checkpointed_layers"))
        # The embeddings are frozen, so without this hook the first checkpointed block would see
        # inputs that need no grad and (with reentrant checkpointing) skip its backward.
        model.enable_input_require_grads()
    peft_model = get_peft_model(model, lora_config(spec))
    # Adapters in fp32 (peft's default) keep the optimizer update precise; cast them only if a
    # bf16 base made peft create them in bf16. Under QLoRA trl's SFTTrainer casts them back to
    # bf16 (the QLoRA paper's choice), and the planner counts them so (WORKER_ADAPTER_BYTES).
    for _name, p in peft_model.named_parameters():
        if p.requires_grad and p.dtype != _fp32():
            p.data = p.data.float()
    if plan_method(plan) == "fp8":
        from .fp8 import fp8_base_layers

        target = device or next(model.parameters()).device
        fp8_base_layers(peft_model, target)
        peft_model.to(target)
    # The training device, not where the weights are now: under FSDP the base is still on the
    # CPU here, and deciding by it silently dropped the fused kernels and lean LoRA layers
    # that the plan's memory and speed assume.
    on_cuda = str(device or next(model.parameters()).device.type).startswith("cuda")
    if on_cuda:
        configure_cuda_backends(bool(field(plan, "cudnn_attention", False)))
    if field(plan, "lean_lora", on_cuda):
        lean_lora_layers(peft_model)
    peft_model.fused_kernels_applied = applied
    # Compiled on the GPU only: the plan's speed assumes Inductor's GPU kernels, and on the CPU
    # (tests, a plan read without a GPU) compilation would cost minutes and gain nothing.
    peft_model.compiled_layers = compile_decoder_layers(peft_model) if compiled and on_cuda else 0
    return peft_model


def lean_lora_layers(peft_model: PeftModel) -> int:
    """Make the LoRA layers skip two memory-bound detours of peft's generic forward.

    1. peft casts each adapter's input to the adapter weights' dtype (fp32): under bf16 autocast
       that is a bf16 -> fp32 -> bf16 round trip of the whole activation per adapter (7 per
       layer) in both passes, and autograd keeps the bf16 copy alive for the backward pass: time
       and ~1 MiB per token on an 8B model, for bit-identical results (the round trip is exact).
       peft's bitsandbytes layers already skip it under autocast; this does the same for bf16.
    2. `result + lora_B(h) * scaling` is three passes over the (tokens x out_features) output;
       one addmm (result + scaling * h @ B^T, the add in the GEMM epilogue) is one.
    Only plain LoRA with one active adapter takes the lean path (DoRA, merged or disabled
    adapters and mixed-adapter batches keep peft's forward), and it assumes training under bf16
    autocast, as the worker does on GPUs. Returns how many layers were switched.
    """
    import types

    from peft.tuners.lora import LoraLayer

    count = 0
    for module in peft_model.modules():
        if isinstance(module, LoraLayer) and hasattr(module, "base_layer"):
            if not hasattr(module, "_peft_forward"):
                module._peft_forward = module.forward
                module.forward = types.MethodType(_lean_lora_forward, module)
            count += 1
    return count


def _lean_lora_forward(self, x, *args, **kwargs):
    import torch

    active = self.active_adapters
    if (
        args
        or kwargs
        or self.disable_adapters
        or self.merged
        or len(active) != 1
        or active[0] not in self.lora_A
        or active[0] in getattr(self, "lora_variant", {})
        or not torch.is_autocast_enabled(x.device.type)
    ):
        return self._peft_forward(x, *args, **kwargs)
    name = active[0]
    result = self.base_layer(x)
    lora_a, lora_b = self.lora_A[name], self.lora_B[name]
    h = lora_a(self.lora_dropout[name](x))
    if type(lora_b) is not torch.nn.Linear:
        # Under FSDP each LoRA matrix is a unit of its own, and only calling the module runs
        # the hook that gathers its weight; `lora_b.weight` read directly is a stale view of
        # the flat parameter (autograd refuses it once FSDP reshards in place). The add is
        # then a pass of its own instead of the GEMM epilogue.
        return torch.add(result, lora_b(h), alpha=self.scaling[name]).to(result.dtype)
    out_features = result.shape[-1]
    fused = torch.addmm(
        result.reshape(-1, out_features),
        h.reshape(-1, h.shape[-1]),
        lora_b.weight.t(),
        alpha=self.scaling[name],
    )
    return fused.view(result.shape).to(result.dtype)


def _fp32():
    import torch

    return torch.float32
