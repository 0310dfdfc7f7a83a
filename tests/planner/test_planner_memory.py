"""Each term of the planner's memory model, checked against arithmetic and published numbers."""

from __future__ import annotations

import itertools
import json

import pytest

from finetune_operator.planner import (
    ModelArch,
    TrainingShape,
    UnknownArchitecture,
    UnknownTargetModule,
    arch_from_config_json,
    arch_from_hints,
    estimate_memory,
    preset,
    trainable_params,
)
from finetune_operator.planner.configsource import arch_for_model, arch_from_local
from finetune_operator.planner.memory import (
    PAGED_MIN_ELEMENTS,
    GiB,
    layer_activation_bytes,
    nf4_bytes,
    optimizer_state_bytes,
    weight_bytes,
)

LLAMA3_8B = preset("meta-llama/Meta-Llama-3-8B")
ALL7 = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# --- architecture ------------------------------------------------------------------------

# Parameter counts the model cards / `num_parameters()` publish; a wrong preset field
# (layers, intermediate size, vocabulary, tying) moves these by far more than 0.5 %.
PUBLISHED_PARAMS = {
    "meta-llama/Meta-Llama-3-8B": 8_030_261_248,
    "meta-llama/Llama-3.1-70B": 70_553_706_496,
    "mistralai/Mistral-7B-v0.1": 7_241_732_096,
    "Qwen/Qwen2.5-7B": 7_615_616_512,
    "Qwen/Qwen2.5-14B": 14_770_033_664,
    "Qwen/Qwen2.5-32B": 32_763_876_352,
    "Qwen/Qwen2.5-72B": 72_706_203_648,
    "google/gemma-2-9b": 9_241_705_984,
    "google/gemma-2-27b": 27_227_128_320,
    "microsoft/Phi-3-mini-4k-instruct": 3_821_079_552,
}


@pytest.mark.parametrize("hub_id,published", PUBLISHED_PARAMS.items())
def test_preset_parameter_counts_match_published(hub_id, published):
    arch = preset(hub_id)
    assert arch is not None, hub_id
    assert arch.total_params() == pytest.approx(published, rel=0.005)


def test_llama3_8b_parameter_count_is_exact():
    # Embeddings and lm_head 2 x 128,256 x 4,096, 32 layers of 218,112,000 (attention
    # 2 x 4,096^2 + 2 x 4,096 x 1,024, MLP 3 x 4,096 x 14,336, two norms) and the final norm.
    assert LLAMA3_8B.total_params() == 8_030_261_248


LLAMA3_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
    "rope_theta": 500000.0,
    "torch_dtype": "bfloat16",
}


def test_arch_from_config_json_reads_transformers_fields():
    arch = arch_from_config_json(LLAMA3_CONFIG, name="my/llama")
    assert arch.total_params() == LLAMA3_8B.total_params()
    assert (arch.kv_dim, arch.q_dim) == (1024, 4096)
    wrapped = arch_from_config_json({"model_type": "llava", "text_config": LLAMA3_CONFIG})
    assert wrapped.total_params() == LLAMA3_8B.total_params()


def test_config_without_shape_names_missing_fields():
    with pytest.raises(UnknownArchitecture, match="intermediate_size.*spec.model.architecture"):
        arch_from_config_json(
            {
                "model_type": "llama",
                "hidden_size": 8,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "vocab_size": 10,
            }
        )


def test_hints_in_camel_case_and_missing_hint_message():
    hints = {
        "hiddenSize": 4096,
        "intermediateSize": 14336,
        "numHiddenLayers": 32,
        "numAttentionHeads": 32,
        "numKeyValueHeads": 8,
        "vocabSize": 128256,
    }
    assert arch_from_hints(hints, "x").total_params() == LLAMA3_8B.total_params()
    with pytest.raises(UnknownArchitecture, match="vocabSize"):
        arch_from_hints({k: v for k, v in hints.items() if k != "vocabSize"}, "x")


def test_arch_for_model_prefers_local_config_then_preset_then_hints(tmp_path):
    small = {
        **LLAMA3_CONFIG,
        "hidden_size": 64,
        "intermediate_size": 224,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 1024,
    }
    (tmp_path / "claim" / "models" / "tiny").mkdir(parents=True)
    (tmp_path / "claim" / "models" / "tiny" / "config.json").write_text(json.dumps(small))
    from_pvc = arch_for_model({"uri": "pvc://claim/models/tiny"}, claims_root=tmp_path)
    assert from_pvc.hidden_size == 64 and from_pvc.num_layers == 2
    assert arch_from_local(tmp_path / "claim/models/tiny").vocab_size == 1024
    assert arch_for_model({"name": "meta-llama/Meta-Llama-3-8B"}) == LLAMA3_8B
    hinted = arch_for_model(
        {
            "name": "acme/private",
            "architecture": {
                "hiddenSize": 64,
                "intermediateSize": 224,
                "numHiddenLayers": 2,
                "numAttentionHeads": 4,
                "vocabSize": 1024,
            },
        }
    )
    assert hinted.num_kv_heads == 4  # defaults to the attention heads
    with pytest.raises(UnknownArchitecture, match="spec.model.architecture"):
        arch_for_model({"name": "acme/private"})
    with pytest.raises(UnknownArchitecture, match="--claims-root"):
        arch_for_model({"uri": "pvc://claim/models/tiny"})
    with pytest.raises(UnknownArchitecture, match="no config.json under"):
        arch_for_model({"uri": "pvc://claim/models/absent"}, claims_root=tmp_path)


# --- weights -----------------------------------------------------------------------------


def test_bf16_weights_match_measured_after_load():
    # after_load_GiB of the bf16 model on the H200, measured by the common recipe:
    # 14.96 (bench/reference/common-recipe-h200.jsonl).
    assert weight_bytes(LLAMA3_8B, TrainingShape(method="lora")) / GiB == pytest.approx(
        14.96, abs=0.01
    )


def test_nf4_double_quant_weights_of_8b():
    nf4 = weight_bytes(LLAMA3_8B, TrainingShape(method="qlora", double_quant=True))
    # ~5.7 GB (= 5.31 GiB): 3.49 GB of 4-bit projections, 0.11 GB of constants and
    # 2.1 GB of bf16 embeddings + lm_head.
    assert nf4 == pytest.approx(5.70e9, rel=0.02)
    # The common recipe upcasts embeddings, lm_head and norms to fp32: measured 7.27 GiB
    # (bench/reference/common-recipe-h200.jsonl).
    upcast = weight_bytes(LLAMA3_8B, TrainingShape(method="qlora", upcast_non_quantized=True))
    assert upcast / GiB == pytest.approx(7.27, abs=0.02)


def test_quantization_constants_bits_per_parameter():
    n = 64 * 256 * 1000
    assert (nf4_bytes(n, False) - n // 2) * 8 / n == pytest.approx(0.5)
    assert (nf4_bytes(n, True) - n // 2) * 8 / n == pytest.approx(0.127, abs=0.001)


# --- adapters, gradients, optimizer -------------------------------------------------------


def test_lora_trainable_params_match_peft():
    # peft's trainable parameters for all seven projections, as measured by the common recipe
    # (bench/reference/common-recipe-h200.jsonl: 41,943,040 at r=16, 167,772,160 at r=64).
    assert trainable_params(LLAMA3_8B, TrainingShape(lora_r=16, target_modules=ALL7)) == 41_943_040
    assert trainable_params(LLAMA3_8B, TrainingShape(lora_r=64)) == 167_772_160  # all-linear
    # q and v only: 8 * (4096 + 4096) + 8 * (4096 + 1024) per layer.
    assert (
        trainable_params(LLAMA3_8B, TrainingShape(lora_r=8, target_modules=("q_proj", "v_proj")))
        == 3_407_872
    )


def test_fused_projection_families_count_their_own_modules():
    phi3 = preset("microsoft/Phi-3-mini-4k-instruct")
    # qkv_proj 3072 -> 9216, o 3072 -> 3072, gate_up 3072 -> 16384, down 8192 -> 3072
    per_layer = 16 * ((3072 + 9216) + (3072 + 3072) + (3072 + 16384) + (8192 + 3072))
    assert trainable_params(phi3, TrainingShape(lora_r=16)) == 32 * per_layer


def test_unknown_target_module_names_valid_ones():
    with pytest.raises(UnknownTargetModule, match="c_attn.*q_proj"):
        trainable_params(LLAMA3_8B, TrainingShape(target_modules=("c_attn",)))


def test_optimizer_state_bytes():
    shape = TrainingShape(lora_r=16)
    n = trainable_params(LLAMA3_8B, shape)
    assert optimizer_state_bytes(LLAMA3_8B, shape) == (8 * n, 0)  # fp32 m and v
    assert optimizer_state_bytes(LLAMA3_8B, shape.but(optimizer="adamw_8bit")) == (2 * n, 0)
    assert optimizer_state_bytes(LLAMA3_8B, shape.but(optimizer="sgd")) == (0, 0)
    resident, paged = optimizer_state_bytes(LLAMA3_8B, shape.but(optimizer="paged_adamw_32bit"))
    assert resident + paged == 8 * n
    # r=16: the 14336-wide A/B matrices (229,376 elements) are paged, the 4096-wide are not.
    assert resident == 8 * 32 * (9 * 16 * 4096 + 2 * 16 * 1024)
    assert 16 * 14336 >= PAGED_MIN_ELEMENTS > 16 * 4096


# --- activations and the peak ------------------------------------------------------------


def test_saved_activations_per_layer_from_first_principles():
    h, i = 4096, 14336
    # Plain SDPA rows (varlen=False): K/V stay at their grouped width without a mask.
    stock = layer_activation_bytes(
        LLAMA3_8B,
        TrainingShape(
            lora_dropout=0.1,
            fused_kernels=False,
            attention_mask=False,
            target_modules=ALL7,
            varlen=False,
        ),
    )
    # fp32 norm inputs; bf16 input copy + 1-byte dropout mask per adapted projection;
    # q, k, v, output of SDPA (K/V at the 1024-wide grouped width) plus fp32 log-sum-exp;
    # gate, up and SiLU outputs.
    assert stock["norms"] == 2 * 4 * h
    assert stock["adapters"] == 3 * (6 * h + i) + 7 * 2 * 16
    assert stock["attention"] == 2 * h + 2 * 2 * 1024 + 2 * h + 4 * 32
    assert stock["mlp"] == 3 * 2 * i
    fused = layer_activation_bytes(
        LLAMA3_8B,
        TrainingShape(
            lora_dropout=0.1,
            fused_kernels=True,
            attention_mask=False,
            target_modules=ALL7,
            varlen=False,
        ),
    )
    # liger's RMSNorm keeps the bf16 input, its SwiGLU recomputes SiLU in backward.
    assert stock["norms"] - fused["norms"] == 2 * 2 * h
    assert stock["mlp"] - fused["mlp"] == 2 * i
    masked = layer_activation_bytes(LLAMA3_8B, TrainingShape(attention_mask=True, varlen=False))
    assert masked["attention"] - fused["attention"] == 2 * 2 * (4096 - 1024)


def test_activations_scale_with_tokens_and_checkpointing_cuts_them():
    base = TrainingShape(seq_len=2048, micro_batch=1)
    one = estimate_memory(LLAMA3_8B, base).breakdown["activations"]
    four = estimate_memory(LLAMA3_8B, base.but(micro_batch=4)).breakdown["activations"]
    assert four == pytest.approx(4 * one, rel=0.1)  # the packed-row mask grows quadratically
    ckpt = estimate_memory(LLAMA3_8B, base.but(gradient_checkpointing=True))
    assert ckpt.breakdown["activations"] < one / 8
    assert ckpt.total < estimate_memory(LLAMA3_8B, base).total


def test_checkpointing_some_layers_lies_between_none_and_all():
    base = TrainingShape(seq_len=2048, micro_batch=4)
    none = estimate_memory(LLAMA3_8B, base).total
    every = estimate_memory(LLAMA3_8B, base.but(gradient_checkpointing=True)).total
    partial = [
        estimate_memory(
            LLAMA3_8B, base.but(gradient_checkpointing=True, checkpointed_layers=k)
        ).total
        for k in (4, 8, 16, 24, 28)
    ]
    assert none > partial[0] and all(a > b for a, b in itertools.pairwise(partial))
    assert partial[-1] > every
    # each recomputed layer keeps only its input instead of everything it saves
    per_layer = partial[1] - partial[2]
    assert per_layer == pytest.approx((partial[0] - partial[1]) * 2, rel=0.02)
    assert estimate_memory(
        LLAMA3_8B, base.but(gradient_checkpointing=True, checkpointed_layers=32)
    ).total == pytest.approx(every)


def test_unfused_cross_entropy_materialises_logits():
    shape = TrainingShape(seq_len=2048, micro_batch=4, gradient_checkpointing=True)
    fused = estimate_memory(LLAMA3_8B, shape)
    unfused = estimate_memory(LLAMA3_8B, shape.but(fused_ce=False))
    tokens = 2048 * 4
    # At the start of backward: bf16 logits, fp32 log-probabilities, their gradients and
    # casts, 18 bytes per vocabulary entry (19.4 measured on the H200 without liger).
    assert unfused.breakdown["logits"] == pytest.approx(18 * 128256 * tokens, rel=0.001)
    # The loss moment becomes the peak (the backward moment it replaces was smaller).
    assert unfused.total - fused.total > 14 * 128256 * tokens


def test_qlora_needs_less_than_lora_and_breakdown_sums_to_total():
    for method in ("lora", "qlora"):
        estimate = estimate_memory(LLAMA3_8B, TrainingShape(method=method))
        assert sum(estimate.breakdown.values()) == estimate.total
        assert estimate.with_context == estimate.total + estimate.cuda_context
    lora = estimate_memory(LLAMA3_8B, TrainingShape(method="lora"))
    qlora = estimate_memory(LLAMA3_8B, TrainingShape(method="qlora"))
    assert lora.breakdown["weights"] - qlora.breakdown["weights"] > 9 * GiB


def test_data_parallel_adds_gradient_buckets():
    one = estimate_memory(LLAMA3_8B, TrainingShape(gpu_count=1))
    two = estimate_memory(LLAMA3_8B, TrainingShape(gpu_count=2, strategy="ddp"))
    assert two.breakdown["gradients"] == 2 * one.breakdown["gradients"]


def test_invalid_shape_names_the_field():
    with pytest.raises(ValueError, match="optimizer is 'lion'"):
        TrainingShape(optimizer="lion")
    with pytest.raises(ValueError, match="micro_batch is 0"):
        TrainingShape(micro_batch=0)
    with pytest.raises(UnknownArchitecture, match="hidden_size"):
        ModelArch(
            name="x",
            hidden_size=0,
            intermediate_size=1,
            num_layers=1,
            num_heads=1,
            num_kv_heads=1,
            vocab_size=1,
        )


def test_hub_config_is_fetched_with_the_token_and_errors_say_what_to_do(monkeypatch):
    # A local stand-in for the Hub (HF_ENDPOINT): no network in tests.
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen = {}

    class Hub(BaseHTTPRequestHandler):
        def do_GET(self):
            seen[self.path] = self.headers.get("Authorization")
            if self.path == "/acme/small/resolve/main/config.json":
                body = json.dumps({**LLAMA3_CONFIG, "num_hidden_layers": 2}).encode()
                self.send_response(200)
                self.end_headers()
                self.wfile.write(body)
            else:
                self.send_response(401)
                self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        for var in ("no_proxy", "NO_PROXY"):
            monkeypatch.setenv(var, "127.0.0.1,localhost")
        arch = arch_for_model({"name": "acme/small"}, allow_hub=True, token="hf_secret")
        assert arch.num_layers == 2 and arch.name == "acme/small"
        assert seen["/acme/small/resolve/main/config.json"] == "Bearer hf_secret"
        with pytest.raises(UnknownArchitecture, match="401.*hfTokenSecretRef") as caught:
            arch_for_model({"name": "acme/gated"}, allow_hub=True, token="hf_secret")
        assert "hf_secret" not in str(caught.value)
        # Hints still rescue a model the Hub refuses.
        hinted = arch_for_model(
            {
                "name": "acme/gated",
                "architecture": {
                    "hiddenSize": 64,
                    "intermediateSize": 224,
                    "numHiddenLayers": 2,
                    "numAttentionHeads": 4,
                    "vocabSize": 1024,
                },
            },
            allow_hub=True,
        )
        assert hinted.hidden_size == 64
    finally:
        server.shutdown()


# --- FSDP and DDP per-rank memory, measured with real ranks ----------------------------------

FSDP_RUNS = ["fsdp-ranks-on-one-gpu-h200.json", "fsdp-ranks-on-one-gpu-w4-memory-h200.json"]


def _ranks_model_arch():
    """The 16-layer, 2048-wide Llama of bench/fsdp_ranks_on_one_gpu.py (SIZES), its tiny
    tokenizer's vocabulary at most 512 tokens."""
    from transformers import LlamaConfig

    from finetune_operator.planner.arch import arch_from_config_json

    config = LlamaConfig(
        vocab_size=512,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=8,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    return arch_from_config_json(config.to_dict())


@pytest.mark.parametrize("data_file", FSDP_RUNS)
def test_per_rank_memory_of_fsdp_and_ddp_matches_real_ranks(data_file):
    """Each rank's measured peak (reserved) against the planner's per-GPU prediction.
    `fsdp_gathered_layers` was fitted on the 2-rank FSDP runs; the 4-rank runs, the DDP run
    and the single-process runs are points the fit never saw."""
    from pathlib import Path

    from finetune_operator.planner.memory import TrainingShape, estimate_memory

    runs = json.loads(
        (Path(__file__).resolve().parents[2] / "bench" / "data" / data_file).read_text()
    )
    arch = _ranks_model_arch()
    checked = 0
    for run in runs:
        peaks = [p for p in run["peakVRAMPerRankBytes"] if p]
        if any(run["exitCodes"]) or not peaks:
            continue
        world = run["world"]
        shape = TrainingShape(
            method=run["method"],
            lora_r=8,
            lora_dropout=0.0,
            seq_len=512,
            micro_batch=2,
            packing=True,
            gpu_count=world,
            strategy=run["strategy"],
            gradient_accumulation=8 // 2 // world,
        )
        predicted = estimate_memory(arch, shape).total
        assert predicted == pytest.approx(max(peaks), rel=0.05), run["run"]
        checked += 1
    assert checked >= 5


def test_fp8_base_is_one_byte_per_adapted_weight_plus_channel_scales():
    from finetune_operator.planner.memory import fp8_weight_bytes, weight_bytes

    shape = TrainingShape(method="fp8")
    projections = LLAMA3_8B.quantizable_params()
    scales = 4 * LLAMA3_8B.num_layers * sum(o for _, o in LLAMA3_8B.projections().values())
    expected = projections + scales + 2 * LLAMA3_8B.unquantized_params()
    assert fp8_weight_bytes(LLAMA3_8B, shape) == weight_bytes(LLAMA3_8B, shape) == expected
    # only adapted projections are converted: the others stay bf16
    partial = TrainingShape(method="fp8", target_modules=("q_proj", "v_proj"))
    assert weight_bytes(LLAMA3_8B, partial) > expected + projections // 2
