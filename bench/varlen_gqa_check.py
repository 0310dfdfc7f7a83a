"""Does PyTorch's varlen flash attention take grouped K/V heads as they are?

The worker repeats K/V to the query heads before `varlen_attn` (torch 2.11 has no GQA flag):
for Llama-3-8B that is 4x the K/V activations kept for backward. This checks, on random bf16
inputs of the 8B's head layout, whether passing 8 K/V heads for 32 query heads gives the same
output and gradients as the repeated call, and how long each takes.
    python bench/varlen_gqa_check.py
"""

from __future__ import annotations

import torch
from torch.nn.attention.varlen import varlen_attn


def run(q, k, v, cu, longest):
    return varlen_attn(q, k, v, cu, cu, longest, longest, window_size=(-1, 0))


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def main() -> None:
    torch.manual_seed(0)
    lengths = [512, 1700, 300, 2048, 900, 3000, 1200, 2700]
    tokens, heads, kv_heads, dim = sum(lengths), 32, 8, 128
    cu = torch.tensor(
        [0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda"
    )
    q = torch.randn(tokens, heads, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(tokens, kv_heads, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(tokens, kv_heads, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(tokens, heads, dim, device="cuda", dtype=torch.bfloat16)
    groups = heads // kv_heads
    rep = run(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), cu, max(lengths))
    rep.backward(grad)
    ref_grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    try:
        gqa = run(q, k, v, cu, max(lengths))
    except Exception as exc:  # noqa: BLE001
        print(f"GQA call refused: {type(exc).__name__}: {str(exc).splitlines()[0]}")
        return
    gqa.backward(grad)
    print(
        f"output rel diff {rel(gqa, rep):.2e}; grads q {rel(q.grad, ref_grads[0]):.2e} "
        f"k {rel(k.grad, ref_grads[1]):.2e} v {rel(v.grad, ref_grads[2]):.2e}"
    )
    for name, fn in (
        (
            "repeated",
            lambda: run(
                q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), cu, max(lengths)
            ),
        ),
        ("grouped", lambda: run(q, k, v, cu, max(lengths))),
    ):
        for _ in range(3):
            fn().backward(grad)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            fn().backward(grad)
        end.record()
        torch.cuda.synchronize()
        print(
            f"{name}: {start.elapsed_time(end) / 20:.3f} ms per forward+backward ({tokens} tokens)"
        )


if __name__ == "__main__":
    main()
