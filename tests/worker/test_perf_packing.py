"""Padding-free packing trains the same mathematics as running each sequence on its own.

A tiny random Llama (built from a config, no downloads) on the CPU, in float32 so that the
comparison is exact up to summation order.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import tinymodel

from finetune_worker import packing

SEQ_LEN = 64


def tiny_llama(attn: str = "sdpa"):
    return tinymodel.tiny_llama(attn=attn).eval()


class Tok:
    pad_token_id = 0
    eos_token_id = 1


def examples(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(2, 256, (n,), generator=g).tolist()
        labels = list(ids)
        labels[: n // 3] = [packing.IGNORE_INDEX] * (n // 3)  # a masked prompt, as in SFT data
        out.append({"input_ids": ids, "labels": labels})
    return out


def token_loss_sum(model, batch):
    """Sum of per-token losses and count of trained tokens, from the model's logits."""
    out = model(**{k: v for k, v in batch.items() if k != "labels"})
    logits = out.logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    mask = labels != packing.IGNORE_INDEX
    loss = torch.nn.functional.cross_entropy(logits[mask], labels[mask], reduction="sum")
    return loss, int(mask.sum())


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_rows_with_padding_tail_give_the_same_loss(attn):
    """Rows of seq_len: the shorter row ends in a padding segment that must not change the loss."""
    model = tiny_llama(attn)
    data = examples([40, 30, 20, 10, 60])
    packed = packing.make_collator(Tok(), SEQ_LEN, packing=True)(data)
    assert packed["input_ids"].shape[1] <= SEQ_LEN and packed["input_ids"].shape[0] >= 3
    one_row = packing.make_collator(Tok(), SEQ_LEN, packing=True, row_tokens=10_000)(data)
    with torch.no_grad():
        a, na = token_loss_sum(model, packed)
        b, nb = token_loss_sum(model, one_row)
    assert na == nb
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_per_sequence_loss(attn):
    model = tiny_llama(attn)
    data = examples([17, 40, 5, 64, 23])
    collate_packed = packing.make_collator(Tok(), SEQ_LEN, packing=True, row_tokens=1024)
    packed = collate_packed(data)
    assert packed["input_ids"].shape == (1, 17 + 40 + 5 + 64 + 23)
    assert "attention_mask" not in packed
    # position ids restart at every sequence start
    starts = (packed["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert starts == [0, 17, 57, 62, 126]

    with torch.no_grad():
        packed_sum, packed_n = token_loss_sum(model, packed)
        sep_sum, sep_n = 0.0, 0
        for ex in data:
            s, n = token_loss_sum(model, packing.make_collator(Tok(), SEQ_LEN, packing=False)([ex]))
            sep_sum += s
            sep_n += n
        # the model's own loss (mean over trained tokens) agrees too
        packed_mean = model(**packed).loss
    assert packed_n == sep_n
    assert torch.allclose(packed_sum, torch.as_tensor(sep_sum), rtol=1e-5, atol=1e-4)
    assert torch.allclose(packed_mean, packed_sum / packed_n, rtol=1e-5)


def test_packed_loss_differs_without_position_resets():
    """Guard against a vacuous pass: the same row with plain 0..N-1 positions (no resets) lets
    sequences attend to each other and must give a different loss."""
    model = tiny_llama()
    packed = packing.make_collator(Tok(), SEQ_LEN, packing=True, row_tokens=1000)(
        examples([30, 30, 30])
    )
    broken = dict(packed, position_ids=torch.arange(packed["input_ids"].shape[1])[None])
    with torch.no_grad():
        good = model(**packed).loss
        bad = model(**broken).loss
    assert not torch.allclose(good, bad, rtol=1e-4)


def test_padded_batch_loss_equals_packed_loss_and_gradients():
    model = tiny_llama()
    model.train()
    data = examples([9, 33, 21, 50])
    padded = packing.make_collator(Tok(), SEQ_LEN, packing=False)(data)
    packed = packing.make_collator(Tok(), SEQ_LEN, packing=True)(data)
    assert padded["input_ids"].shape == (4, 50)  # padded to the longest, not to seq_len
    assert packed["input_ids"].shape == (2, 59)  # first-fit decreasing: [50, 9] and [33, 21]
    assert int(padded["attention_mask"].sum()) == packing.example_tokens(data, SEQ_LEN) == 113
    assert packing.trained_tokens(padded) == packing.trained_tokens(packed)

    grads = []
    for batch in (padded, packed):
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        grads.append((loss.detach(), model.model.layers[0].mlp.down_proj.weight.grad.clone()))
    assert torch.allclose(grads[0][0], grads[1][0], rtol=1e-5)
    assert torch.allclose(grads[0][1], grads[1][1], rtol=1e-4, atol=1e-6)


def test_truncation_and_first_token_masking():
    data = [{"input_ids": list(range(2, 102)), "labels": list(range(2, 102))}]
    packed = packing.make_collator(Tok(), 32, packing=True, row_tokens=64)(data + data)
    assert packed["input_ids"].shape == (1, 64)
    labels = packed["labels"][0].tolist()
    assert labels[0] == packing.IGNORE_INDEX and labels[32] == packing.IGNORE_INDEX
    assert labels[1] == 3 and labels[33] == 3


def test_pack_rows_first_fit_decreasing():
    rows = packing.pack_rows([300, 200, 500, 100, 12], 512)
    assert sorted(i for r in rows for i in r) == [0, 1, 2, 3, 4]
    assert all(sum([300, 200, 500, 100, 12][i] for i in r) <= 512 for r in rows)
    assert len(rows) == 3


def test_token_budget_batches_respects_budget_and_order():
    lengths = [100, 300, 50, 400, 10, 10, 700, 5]
    batches = list(packing.token_budget_batches(lengths, 512))
    assert [i for b in batches for i in b] == list(range(len(lengths)))
    for b in batches:
        assert sum(lengths[i] for i in b) <= 512 or len(b) == 1
    # an example longer than the budget still gets its own micro-batch (truncated by seq_len)
    assert [6] in batches
    assert list(packing.token_budget_batches([900], 512, seq_len=512)) == [[0]]


def test_right_padding_without_mask_gives_the_same_loss():
    """Under a causal mask right padding is invisible to real tokens, so the mask can be left out
    (which lets SDPA use its flash kernel)."""
    model = tiny_llama()
    data = examples([12, 40, 33, 7])
    with_mask = packing.make_collator(Tok(), SEQ_LEN, packing=False)(data)
    without = packing.make_collator(Tok(), SEQ_LEN, packing=False, attention_mask=False)(data)
    assert "attention_mask" not in without
    with torch.no_grad():
        a, na = token_loss_sum(model, with_mask)
        b, nb = token_loss_sum(model, without)
    assert na == nb
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-4)


def test_length_grouped_batches_bound_padded_size_and_cover_everything():
    import random

    rnd = random.Random(0)
    lengths = [rnd.randint(5, 512) for _ in range(300)]
    batches = packing.length_grouped_batches(lengths, 2048, window=100)
    assert sorted(i for b in batches for i in b) == list(range(300))
    for b in batches:
        assert max(lengths[i] for i in b) * len(b) <= 2048
        assert all(0 <= i // 100 == b[0] // 100 for i in b)  # never mixes windows
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    assert padded < 1.1 * sum(lengths)  # sorting leaves little padding


def test_length_grouped_widths_rounded_to_a_multiple():
    import random

    rnd = random.Random(1)
    lengths = [rnd.randint(5, 512) for _ in range(200)]
    batches = packing.length_grouped_batches(lengths, 4096, window=200, multiple=64)
    collate = packing.make_collator(
        Tok(), 512, packing=False, attention_mask=False, pad_to_multiple_of=64
    )
    data = [{"input_ids": [3] * n, "labels": [3] * n} for n in lengths]
    for b in batches:
        batch = collate([data[i] for i in b])
        assert batch["input_ids"].shape[1] % 64 == 0
        assert batch["input_ids"].numel() <= 4096 or len(b) == 1


def test_token_budget_batch_sampler_feeds_a_dataloader():
    from torch.utils.data import DataLoader

    data = examples([30, 200, 64, 17, 120, 90, 300, 45] * 4)
    lengths = [len(e["input_ids"]) for e in data]
    sampler = packing.TokenBudgetBatchSampler(lengths, 512, seq_len=256, multiple=64, window=16)
    collate = packing.make_collator(
        Tok(), 256, packing=False, attention_mask=False, pad_to_multiple_of=64
    )
    loader = DataLoader(data, batch_sampler=sampler, collate_fn=collate)
    seen = 0
    for batch in loader:
        assert batch["input_ids"].numel() <= 512 or batch["input_ids"].shape[0] == 1
        assert batch["input_ids"].shape[1] % 64 == 0
        seen += batch["input_ids"].shape[0]
    assert seen == len(data) and len(sampler) == len(list(sampler))
    sampler.set_epoch(1)
    assert sorted(i for b in sampler for i in b) == list(range(len(data)))


# --- varlen packed rows (attention.py): one row of exactly the token budget per micro-batch ---


def varlen_llama():
    from finetune_worker import attention

    model = tiny_llama()
    attention.use_varlen(model)
    assert model.config._attn_implementation == attention.VARLEN
    return model


def test_varlen_row_has_the_budget_shape_and_segment_boundaries():
    data = examples([17, 40, 5, 64, 23])
    batch = packing.make_varlen_collator(Tok(), SEQ_LEN, row_tokens=192)(data)
    assert batch["input_ids"].shape == (1, 192)  # the budget, whatever the examples' lengths
    assert "attention_mask" not in batch
    # every example a segment, then the padding tail (149 real tokens) as one more
    assert batch["cu_seq_lens_q"].tolist() == [0, 17, 57, 62, 126, 149, 192]
    assert batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["max_length_q"] == batch["max_length_k"] == 64
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert starts == [0, 17, 57, 62, 126, 149]
    assert (batch["labels"][0, 149:] == packing.IGNORE_INDEX).all()
    assert batch["labels"][0, 17] == packing.IGNORE_INDEX  # never predict the next example
    with pytest.raises(ValueError, match="token budget"):
        packing.make_varlen_collator(Tok(), SEQ_LEN, row_tokens=100)(data)


def test_varlen_loss_and_gradients_equal_per_sequence_training():
    data = examples([17, 40, 5, 64, 23])
    batch = packing.make_varlen_collator(Tok(), SEQ_LEN, row_tokens=160)(data)
    varlen = varlen_llama().train()
    reference = tiny_llama().train()
    loss = varlen(**batch).loss
    loss.backward()
    total, count = 0.0, 0
    for ex in data:
        one = packing.make_collator(Tok(), SEQ_LEN, packing=False)([ex])
        s, n = token_loss_sum(reference, one)
        total, count = total + s, count + n
    (total / count).backward()
    assert count == packing.trained_tokens(batch)
    assert torch.allclose(loss, total / count, rtol=1e-5)
    for a, b in zip(varlen.parameters(), reference.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6)


def test_varlen_boundaries_are_what_separates_the_examples():
    """Guard against a vacuous pass: the same row declared as a single segment lets examples
    attend to each other and must change the loss."""
    data = examples([30, 30, 30])
    batch = packing.make_varlen_collator(Tok(), SEQ_LEN, row_tokens=90)(data)
    from finetune_worker import attention

    merged = dict(batch, **attention.boundaries([90]))
    model = varlen_llama()
    with torch.no_grad():
        assert not torch.allclose(model(**batch).loss, model(**merged).loss, rtol=1e-4)


def test_varlen_model_without_boundaries_runs_padded_batches_as_before():
    """Eval and generate calls bring ordinary padded batches: plain SDPA, same result."""
    data = examples([12, 40, 33])
    padded = packing.make_collator(Tok(), SEQ_LEN, packing=False)(data)
    with torch.no_grad():
        assert torch.allclose(varlen_llama()(**padded).loss, tiny_llama()(**padded).loss, rtol=1e-5)


def test_packed_batches_fill_the_budget_and_keep_every_example_once():
    import random

    rnd = random.Random(0)
    lengths = [min(512, int(rnd.lognormvariate(5.5, 0.8))) + 1 for _ in range(2000)]
    for budget in (1024, 4096, 13312):
        batches = packing.packed_batches(lengths, budget)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in b) <= budget for b in batches)
        full = batches[
            :-1
        ]  # all but the last are filled to ~99% (half an example empty without lookahead)
        fill = sum(lengths[i] for b in full for i in b) / (len(full) * budget)
        assert fill > 0.97, (budget, fill)
    # a single example longer than the budget still gets a micro-batch of its own
    assert packing.packed_batches([900, 10], 512) == [[0], [1]]


def test_packed_batch_sampler_reshuffles_per_epoch_and_feeds_a_dataloader():
    from torch.utils.data import DataLoader

    data = examples([30, 200, 64, 17, 120, 90, 300, 45] * 4)
    lengths = [len(e["input_ids"]) for e in data]
    sampler = packing.PackedBatchSampler(lengths, 512, seq_len=256, seed=3)
    loader = DataLoader(
        data,
        batch_sampler=sampler,
        collate_fn=packing.make_varlen_collator(Tok(), 256, row_tokens=512),
    )
    seen = 0
    for group, batch in zip(list(sampler), loader, strict=True):
        assert batch["input_ids"].shape == (1, 512)
        real = sum(min(lengths[i], 256) for i in group)
        assert batch["cu_seq_lens_q"][len(group)] == real  # the group's examples, then padding
        seen += len(group)
    assert seen == len(data)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    assert first != second and sorted(i for b in second for i in b) == list(range(len(data)))


def test_an_unpacked_micro_batch_as_one_varlen_row_trains_like_the_padded_batch():
    """packing: false keeps "micro-batch = N whole examples"; they travel as one padding-free
    row instead of N rows padded to the longest: same loss, same gradients."""
    data = examples([17, 40, 5, 64])
    padded = packing.make_collator(Tok(), SEQ_LEN, packing=False)(data)
    row = packing.make_varlen_collator(Tok(), SEQ_LEN, pad_to_multiple_of=64)(data)
    assert tuple(padded["input_ids"].shape) == (4, 64)  # 256 positions, 126 of them real
    assert tuple(row["input_ids"].shape) == (1, 128)  # 126 tokens padded to a multiple of 64
    reference, varlen = tiny_llama().train(), varlen_llama().train()
    loss_padded = reference(**padded).loss
    loss_padded.backward()
    loss_row = varlen(**row).loss
    loss_row.backward()
    assert torch.allclose(loss_row, loss_padded, rtol=1e-5)
    for a, b in zip(varlen.parameters(), reference.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6)


# --- unpacked steps (make_step_collator): a step's whole examples in the fewest varlen rows ---


def test_a_step_splits_into_the_fewest_rows_of_the_budget_each_example_once():
    """Eight examples (one longer than seq_len, truncated) of 279 real tokens at a budget of 100
    need three rows: first-fit decreasing finds three, none over the budget, every example in
    exactly one row, each row padded to a multiple of 64 with boundaries of its own."""
    data = examples([60, 50, 40, 30, 20, 10, 80, 5])
    budget = 100
    batch = packing.make_step_collator(Tok(), SEQ_LEN, budget, pad_to_multiple_of=64)(data)
    rows = batch[packing.ROWS_KEY]
    # 279 tokens: no fewer than 3 rows of 100; each row's examples in the step's order, then
    # its padding segment up to 128
    assert len(rows) == 3
    expected = [([30, 64, 5], 99), ([60, 40], 100), ([50, 20, 10], 80)]
    row_cus = [[0, 30, 94, 99, 128], [0, 60, 100, 128], [0, 50, 70, 80, 128]]
    assert [(row["start"], row["end"]) for row in rows] == [(0, 128), (128, 256), (256, 384)]
    assert batch["input_ids"].shape == (1, 384)
    seen = []
    for row, (lengths, real), cu in zip(rows, expected, row_cus, strict=True):
        assert real <= budget
        inputs = packing.step_row(batch, row)
        assert packing.ROWS_KEY not in inputs
        assert tuple(inputs["input_ids"].shape) == (1, 128)
        assert inputs["cu_seq_lens_q"].tolist() == inputs["cu_seq_lens_k"].tolist() == cu
        assert inputs["cu_seq_lens_q"].dtype == torch.int32
        assert inputs["max_length_q"] == inputs["max_length_k"] == max(lengths + [128 - real])
        starts = (inputs["position_ids"][0] == 0).nonzero().flatten().tolist()
        assert starts == cu[:-1]  # positions restart at every segment, the padding's too
        for start, end in zip(cu, cu[1:-1], strict=False):
            assert inputs["labels"][0, start] == packing.IGNORE_INDEX  # nothing across examples
            seen.append(inputs["input_ids"][0, start:end].tolist())
        assert (inputs["labels"][0, real:] == packing.IGNORE_INDEX).all()  # padding: no loss
        assert (inputs["input_ids"][0, real:] == Tok.pad_token_id).all()
        assert row["items"] == packing.trained_tokens({"labels": inputs["labels"]})
    assert sorted(seen) == sorted(e["input_ids"][:SEQ_LEN] for e in data)  # each exactly once
    # the whole batch is the rows side by side as one varlen row (what the Trainer counts)
    assert batch["cu_seq_lens_q"].tolist() == [0] + [
        offset + c for offset, cu in zip((0, 128, 256), row_cus, strict=True) for c in cu[1:]
    ]
    assert sum(row["items"] for row in rows) == packing.trained_tokens(batch)

    # a budget that holds the whole step: one row, exactly the one varlen row of before
    one = packing.make_step_collator(Tok(), SEQ_LEN, 1000, pad_to_multiple_of=64)(data)
    assert len(one[packing.ROWS_KEY]) == 1
    reference = packing.make_varlen_collator(Tok(), SEQ_LEN, pad_to_multiple_of=64)(data)
    for key, value in reference.items():
        assert torch.equal(torch.as_tensor(one[key]), torch.as_tensor(value)), key
    # the planner's worst case: examples of seq_len, micro-batch 2 -> ceil(5 / 2) rows
    full = packing.make_step_collator(Tok(), SEQ_LEN, 2 * SEQ_LEN)(examples([SEQ_LEN] * 5))
    assert len(full[packing.ROWS_KEY]) == 3
