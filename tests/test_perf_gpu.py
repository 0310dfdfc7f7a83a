"""The GPU half of the varlen attention tests: PyTorch's flash varlen kernel against the
per-example reference the CPU tests use. Skipped without CUDA (CI has none); run on the H200
by the benchmark's device script (worker/finetune_worker/bench/scripts/)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _qkv(lengths, heads=32, kv_heads=8, dim=128, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    total = sum(lengths)
    shape = lambda h: (1, h, total, dim)  # noqa: E731 - transformers' (B, H, T, D) layout
    return [torch.randn(shape(h), device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
            for h in (heads, kv_heads, kv_heads)]


def test_flash_varlen_kernel_matches_per_example_attention_with_gqa():
    from finetune_worker import attention

    assert attention.supported("cuda"), "this PyTorch has no varlen kernel"
    lengths = [300, 17, 512, 1, 100, 94]
    q, k, v = _qkv(lengths)
    cu = attention.boundaries(lengths)
    out, _ = attention.varlen_attention_forward(None, q, k, v, None, scaling=128**-0.5, **cu)
    grad = torch.randn_like(out)
    (out * grad).sum().backward()
    fast = [out.detach(), q.grad, k.grad, v.grad]
    for t in (q, k, v):
        t.grad = None
    ref = attention._per_segment(*(t[0].transpose(0, 1) for t in (q, k, v)),
                                 cu["cu_seq_lens_q"], 128**-0.5).unsqueeze(0)
    (ref * grad).sum().backward()
    slow = [ref.detach(), q.grad, k.grad, v.grad]
    for a, b in zip(fast, slow):
        assert a.shape == b.shape
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


def test_varlen_llama_on_gpu_equals_per_sequence_loss():
    import transformers

    from finetune_worker import attention, packing

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                                   use_cache=False)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).cuda()
    lengths = [40, 7, 128, 65]
    data = [{"input_ids": torch.randint(2, 512, (n,)).tolist()} for n in lengths]
    for e in data:
        e["labels"] = e["input_ids"]
    with torch.no_grad():
        per_seq = [model(input_ids=torch.tensor([e["input_ids"]], device="cuda"),
                         labels=torch.tensor([e["labels"]], device="cuda")).loss.float() * (len(e["input_ids"]) - 1)
                   for e in data]
        attention.use_varlen(model)
        row = packing.make_varlen_collator(None, 512, row_tokens=256)(data)
        row = {k: v.cuda() if hasattr(v, "cuda") else v for k, v in row.items()}
        packed = model(**row).loss.float()
    expected = sum(per_seq) / sum(n - 1 for n in lengths)
    torch.testing.assert_close(packed, expected, rtol=1e-2, atol=1e-2)
