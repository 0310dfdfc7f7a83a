"""The GPU half of the varlen attention tests: PyTorch's flash varlen kernel (grouped K/V heads
passed as they are, on torch >= 2.11) against the per-example reference the CPU tests use.
Skipped without CUDA (CI has none); on a GPU machine:
    python -m pytest tests/worker/test_perf_gpu.py --noconftest -o addopts=""
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _qkv(lengths, heads=32, kv_heads=8, dim=128, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    total = sum(lengths)  # transformers' (B, H, T, D) layout
    return [
        torch.randn(
            (1, h, total, dim), device="cuda", dtype=torch.bfloat16, generator=g
        ).requires_grad_()
        for h in (heads, kv_heads, kv_heads)
    ]


def _attend(fn, q, k, v, grad):
    """Output and input gradients of an attention function, for one upstream gradient."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    (out * grad).sum().backward()
    return [out.detach().float(), q.grad.float(), k.grad.float(), v.grad.float()]


def test_flash_varlen_kernel_is_as_accurate_as_per_example_attention_with_gqa():
    """Against float32 per-example attention, the bf16 varlen kernel's output and gradients
    must be as close as bf16 per-example SDPA's (both round in bf16; neither may be wrong).

    Compared by root-mean-square error, with the largest single error bounded loosely: the
    largest of ~10^5 bf16 roundings is one unlucky element, and comparing two kernels by it
    alone failed now and then on an unseeded upstream gradient although both were right. A
    wrong kernel (a segment attending across its boundary, a dropped K/V group) is off by
    the size of the values themselves, orders of magnitude beyond either bound."""
    from finetune_worker import attention

    assert attention.supported("cuda"), "this PyTorch has no varlen kernel"
    lengths = [300, 17, 512, 1, 100, 94]
    q, k, v = _qkv(lengths)
    cu = attention.boundaries(lengths)
    scale = 128**-0.5
    g = torch.Generator(device="cuda").manual_seed(1)
    grad = torch.randn(1, sum(lengths), 32, 128, device="cuda", dtype=torch.bfloat16, generator=g)

    def varlen(q, k, v):
        return attention.varlen_attention_forward(None, q, k, v, None, scaling=scale, **cu)[0]

    def per_example(q, k, v):
        return attention._per_segment(
            *(t[0].transpose(0, 1) for t in (q, k, v)), cu["cu_seq_lens_q"], scale
        ).unsqueeze(0)

    exact = _attend(per_example, *(t.float() for t in (q, k, v)), grad.float())
    fast = _attend(varlen, q, k, v, grad)
    ref = _attend(per_example, q, k, v, grad)
    for name, e, a, b in zip(("out", "dq", "dk", "dv"), exact, fast, ref, strict=True):
        assert a.shape == e.shape, name
        rms_fast, rms_ref = ((x - e).pow(2).mean().sqrt().item() for x in (a, b))
        max_fast, max_ref = ((x - e).abs().max().item() for x in (a, b))
        print(
            f"{name}: rms |varlen - fp32| {rms_fast:.3g}, |bf16 sdpa - fp32| {rms_ref:.3g}; "
            f"max {max_fast:.3g} / {max_ref:.3g}; rms |fp32| {e.pow(2).mean().sqrt().item():.3g}"
        )
        assert rms_fast <= 2 * rms_ref + 1e-4, name
        assert max_fast <= 4 * max_ref + 1e-3, name


def test_varlen_llama_on_gpu_equals_per_sequence_loss():
    import transformers

    from finetune_worker import attention, packing

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        use_cache=False,
    )
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).cuda()
    lengths = [40, 7, 128, 65]
    data = [{"input_ids": torch.randint(2, 512, (n,)).tolist()} for n in lengths]
    for e in data:
        e["labels"] = e["input_ids"]
    with torch.no_grad():
        per_seq = [
            model(
                input_ids=torch.tensor([e["input_ids"]], device="cuda"),
                labels=torch.tensor([e["labels"]], device="cuda"),
            ).loss.float()
            * (len(e["input_ids"]) - 1)
            for e in data
        ]
        attention.use_varlen(model)
        row = packing.make_varlen_collator(None, 512, row_tokens=256)(data)
        row = {k: v.cuda() if hasattr(v, "cuda") else v for k, v in row.items()}
        packed = model(**row).loss.float()
    expected = sum(per_seq) / sum(n - 1 for n in lengths)
    torch.testing.assert_close(packed, expected, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("column_scale", [False, True])
def test_fp8_triton_quantiser_equals_the_reference_on_cuda(column_scale):
    """The Triton kernel the FP8 layers use on CUDA gives exactly quantize_rows' e4m3 values and
    scales: rows wider than one block, a non-contiguous input, a scale per column (backward)."""
    from finetune_worker import fp8

    if torch.cuda.get_device_capability() < fp8.MIN_CAPABILITY:
        pytest.skip("no FP8 on this GPU")
    g = torch.Generator(device="cuda").manual_seed(3)
    wide = torch.randn((2 * 333, 14336), device="cuda", dtype=torch.bfloat16, generator=g)
    x = wide[::2] * 7  # every other row: a row stride of two rows
    cols = torch.rand((1, 14336), device="cuda", generator=g) + 0.5 if column_scale else None
    q, s = fp8._quantize_triton(x, cols)
    rq, rs = fp8.quantize_rows(x, cols)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (333, 1)
    torch.testing.assert_close(s, rs, rtol=0, atol=0)
    assert torch.equal(q.view(torch.uint8), rq.view(torch.uint8))
