"""Synthetic instruction data with realistic, uneven lengths.

No data set can be downloaded where the benchmark runs, so it generates its own. What matters for
speed and memory is the length distribution (it decides padding waste and packing density), not
the words. Lengths follow a two-part log-normal model of instruction-tuning data: a prompt
(instruction + input, chat template included) and a response, each log-normal. The parameters
(prompt median 48 tokens, response median 170, long right tails) are set to resemble summary
statistics reported for Alpaca-style GPT-4 instruction sets in the Llama-3 tokenizer; they were not
fitted to a downloaded copy (none can be fetched). Median example ~240 tokens, mean ~330, about a
sixth above 512 tokens and a few in a thousand above 2,048: most examples are far shorter than the
sequence limit, which is why padding to a fixed length wastes so much.

Token ids follow a Zipf law over a shuffled vocabulary, like word frequencies, so the loss of a
random-weight model falls visibly as it learns the unigram statistics and two runs' loss curves
can be compared. Prompt tokens carry label -100 (trained on the response only), as SFT does.
"""

from __future__ import annotations

import math

PROMPT_MEDIAN, PROMPT_SIGMA = 48.0, 0.8
RESPONSE_MEDIAN, RESPONSE_SIGMA = 170.0, 0.95
MIN_TOKENS, MAX_TOKENS = 8, 8192
IGNORE_INDEX = -100


def sample_lengths(n: int, seed: int = 0) -> list[tuple[int, int]]:
    """(prompt_tokens, response_tokens) for n examples."""
    import numpy as np

    rng = np.random.default_rng(seed)
    prompt = np.exp(rng.normal(math.log(PROMPT_MEDIAN), PROMPT_SIGMA, n))
    response = np.exp(rng.normal(math.log(RESPONSE_MEDIAN), RESPONSE_SIGMA, n))
    prompt = np.clip(np.rint(prompt), 4, MAX_TOKENS // 2).astype(int)
    response = np.clip(np.rint(response), 4, MAX_TOKENS // 2).astype(int)
    return list(zip(prompt.tolist(), response.tolist(), strict=True))


def make_examples(n: int, vocab_size: int, seed: int = 0, *, zipf_s: float = 1.1) -> list[dict]:
    """n tokenised examples {"input_ids", "labels"} with the lengths of sample_lengths."""
    import numpy as np

    rng = np.random.default_rng(seed + 1)
    special = 3  # ids 0..2: pad / eos / unk in the benchmark's tokenizer
    ranks = np.arange(1, vocab_size - special + 1, dtype=np.float64)
    p = ranks**-zipf_s
    p /= p.sum()
    perm = rng.permutation(vocab_size - special) + special
    out = []
    for prompt_n, response_n in sample_lengths(n, seed):
        total = prompt_n + response_n
        ids = perm[rng.choice(len(p), size=total, p=p)].tolist()
        labels = [IGNORE_INDEX] * prompt_n + ids[prompt_n:]
        out.append({"input_ids": ids, "labels": labels})
    return out


def fixed_examples(n: int, seq_len: int, vocab_size: int, seed: int = 0) -> list[dict]:
    """n examples of exactly seq_len tokens, all trained on: the calibration's worst case."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab_size, size=(n, seq_len))
    return [{"input_ids": row.tolist(), "labels": row.tolist()} for row in ids]


def length_summary(examples: list[dict], seq_len: int | None = None) -> dict:
    import numpy as np

    n = np.array([len(e["input_ids"]) for e in examples])
    if seq_len:
        n = np.minimum(n, seq_len)
    return {
        "examples": len(n),
        "mean": round(float(n.mean()), 1),
        "median": float(np.median(n)),
        "p90": float(np.percentile(n, 90)),
        "p99": float(np.percentile(n, 99)),
        "max": int(n.max()),
        "share_over_512": round(
            float((np.array([len(e["input_ids"]) for e in examples]) > 512).mean()), 3
        ),
    }
