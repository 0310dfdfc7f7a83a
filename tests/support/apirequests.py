"""The operator's API requests so far, by (method, resource), from its own metric
(`finetune_operator_api_requests_total`, the one the scale benchmark reads): for tests that
run the operator's passes in this process and count what they asked of the API server."""

from __future__ import annotations

from collections import Counter


def requests_so_far() -> Counter:
    from finetune_operator import metrics

    counts: Counter = Counter()
    for family in metrics.API_REQUESTS.collect():
        for sample in family.samples:
            if sample.name.endswith("_total"):
                counts[(sample.labels["method"], sample.labels["resource"])] += int(sample.value)
    return counts
