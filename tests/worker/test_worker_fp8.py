"""The FP8 frozen base (`method: fp8`, finetune_worker.fp8) on the CPU.

PyTorch runs `torch._scaled_mm` on the CPU with the same row-wise scales as on a GPU, so the
layer's GEMM layouts and scale handling are checked here against a reference that quantises
the same way and multiplies in float32; the GPU adds only speed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

import tinymodel
from worker_configs import merge_adapter

from finetune_worker import fp8, modeling, preflight

SPEC = {"model": {"name": "unused"}, "lora": {"r": 8, "alpha": 16, "dropout": 0.0}}


def _reference(x, w_q, w_scale):
    """Quantise x per row exactly as the layer does, then multiply in float32."""
    x_q, x_scale = fp8.quantize_rows(x)
    return (x_q.float() * x_scale) @ (w_q.float() * w_scale.view(-1, 1)).t()


def test_forward_and_input_gradient_are_the_fp8_gemms_of_the_quantised_operands():
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 80, bias=False)
    layer = fp8.float8_linear_class().from_linear(linear)
    assert layer.weight.dtype == torch.float8_e4m3fn and not layer.weight.requires_grad
    assert layer.weight_scale.shape == (80,)
    # 37 rows: not a multiple of 16, so the padding for _scaled_mm is exercised
    x = torch.randn(37, 96, requires_grad=True)
    y = layer(x)
    expected = _reference(x.detach(), layer.weight, layer.weight_scale)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)

    g = torch.randn(37, 80)
    y.backward(g)
    # The input gradient: g scaled by the weight's channel scales, quantised per row, times
    # the FP8 weight (not its transpose in the wrong layout: that would not even match shapes
    # for a non-square weight, and a wrong scale axis would be off by the scales' spread).
    g_q, g_scale = fp8.quantize_rows(g, layer.weight_scale.view(1, -1))
    torch.testing.assert_close(
        x.grad, (g_q.float() * g_scale) @ layer.weight.float(), rtol=1e-5, atol=1e-5
    )
    assert layer.weight.grad is None


def test_fp8_is_within_its_rounding_of_the_bf16_layer():
    torch.manual_seed(1)
    linear = torch.nn.Linear(256, 192, bias=True)
    layer = fp8.float8_linear_class().from_linear(linear)
    x = torch.randn(64, 256, requires_grad=True)
    y = layer(x)
    ref_x = x.detach().clone().requires_grad_(True)
    ref = linear(ref_x)
    rel = ((y - ref).norm() / ref.norm()).item()
    # e4m3 keeps 3 mantissa bits: about 3.5 % relative error per operand on random data
    assert 0.005 < rel < 0.06
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g)
    assert ((x.grad - ref_x.grad).norm() / ref_x.grad.norm()).item() < 0.06


def _tiny_model():
    return tinymodel.tiny_llama()


def test_an_fp8_plan_trains_lora_on_fp8_base_layers_like_the_bf16_plan():
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(3))
    losses, grads = {}, {}
    for method in ("lora", "fp8"):
        torch.manual_seed(7)
        pm = modeling.prepare_for_training(_tiny_model(), SPEC, {"method": method})
        bases = [m.base_layer for m in pm.modules() if hasattr(m, "lora_A")]
        fp8_bases = [b for b in bases if isinstance(b, fp8.float8_linear_class())]
        assert len(fp8_bases) == (len(bases) if method == "fp8" else 0) and bases
        # one optimizer-free step: the adapters get gradients, the base none
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02, generator=torch.Generator().manual_seed(11))
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        losses[method] = loss.item()
        grads[method] = torch.cat(
            [p.grad.flatten() for n, p in pm.named_parameters() if "lora_A" in n]
        )
        assert all(p.grad is None for n, p in pm.named_parameters() if "lora_" not in n)
    assert losses["fp8"] == pytest.approx(losses["lora"], rel=0.01)
    cosine = torch.nn.functional.cosine_similarity(grads["fp8"], grads["lora"], dim=0)
    assert cosine > 0.98


def test_projections_that_read_the_same_input_quantise_it_once(monkeypatch):
    """q/k/v and gate/up share their input: 4 quantisations per layer in the forward, not 7,
    and the outputs and gradients are those of quantising each input on its own."""
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(5))
    calls = []
    real = fp8._quantize

    def counting(t, column_scale=None):
        calls.append(column_scale is None)
        return real(t, column_scale)

    monkeypatch.setattr(fp8, "_quantize", counting)
    results = {}
    for shared in (True, False):
        torch.manual_seed(7)
        pm = modeling.prepare_for_training(_tiny_model(), SPEC, {"method": "fp8"})
        if not shared:  # every lookup misses: each projection quantises its own input
            monkeypatch.setattr(fp8._shared_input, "source", None)
            monkeypatch.setattr(
                fp8._SharedInput, "quantize", lambda self, x, flat: fp8._quantize(flat)
            )
        calls.clear()
        loss = pm(input_ids=ids, labels=ids).loss
        forward_calls = len(calls)
        # down_proj shares no input: after the last layer nothing is held for the loss's peak
        assert fp8._shared_input.source is None
        loss.backward()
        layers = pm.config.num_hidden_layers
        results[shared] = (
            forward_calls,
            len(calls) - forward_calls,
            loss.item(),
            [p.grad.clone() for n, p in pm.named_parameters() if "lora_A" in n],
        )
        assert all(calls[:forward_calls]) and not any(calls[forward_calls:])
    assert results[True][0] == 4 * layers and results[False][0] == 7 * layers
    # Every output gradient is quantised on its own; the first layer's q/k/v need none (the
    # frozen embeddings' output needs no gradient).
    assert results[True][1] == results[False][1] == 7 * layers - 3
    assert results[True][2] == results[False][2]
    for a, b in zip(results[True][3], results[False][3], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_an_in_place_change_of_a_shared_input_is_quantised_again():
    torch.manual_seed(2)
    layer = fp8.float8_linear_class().from_linear(torch.nn.Linear(64, 32, bias=False))
    layer.shares_input = True
    x = torch.randn(16, 64)
    first = layer(x)
    x.mul_(2)  # same tensor object, new version: the cached quantisation is stale
    torch.testing.assert_close(layer(x), _reference(x, layer.weight, layer.weight_scale))
    assert not torch.equal(layer(x), first)


def test_gpus_without_fp8_tensor_cores_are_refused_before_training(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "NVIDIA A100")
    ok, why = fp8.supported("cuda")
    assert not ok and "A100" in why and "8.9" in why
    found = preflight.problems({"method": "fp8", "fusedKernels": False}, "cuda", launch=False)
    assert any("plan.method is 'fp8'" in p for p in found)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    assert fp8.supported("cuda") == (True, "")
    assert preflight.problems({"method": "fp8", "fusedKernels": False}, "cuda", launch=False) == []


def test_an_fp8_run_trains_and_its_adapter_merges_into_the_bf16_base(worker_config, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from finetune_api import AdapterManifest
    from finetune_worker.train import run_training

    config = worker_config(fmt="alpaca", method="fp8", max_steps=12, packing=True)
    result = run_training(config)
    layers = [m for m in result.model.modules() if isinstance(m, fp8.float8_linear_class())]
    assert layers and all(m.weight.dtype == torch.float8_e4m3fn for m in layers)
    assert result.train_loss is not None and result.global_step == 12
    assert AdapterManifest.read(result.adapter_dir).method == "fp8"

    # The adapter was trained against the FP8 base; it merges into the bf16 base like any
    # other, and the merged model is exactly base + adapter.
    merged_dir = tmp_path / "merged"
    root = Path(config.paths.claim_mounts["models"])
    assert merge_adapter(result.adapter_dir, merged_dir, root, "--dtype", "float32") == 0
    probe = torch.tensor([[1, 4, 60, 61, 62, 63, 64, 65, 6]])
    base = AutoModelForCausalLM.from_pretrained(root / "tiny", dtype=torch.float32)
    reference = PeftModel.from_pretrained(base, str(result.adapter_dir)).eval()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    assert not any(isinstance(m, fp8.float8_linear_class()) for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(
            merged(probe).logits, reference(probe).logits, atol=1e-4, rtol=1e-4
        )
        # and the adapter learned something: the merged model is not the base
        plain = AutoModelForCausalLM.from_pretrained(root / "tiny", dtype=torch.float32).eval()
        assert (merged(probe).logits - plain(probe).logits).abs().max() > 1e-2
