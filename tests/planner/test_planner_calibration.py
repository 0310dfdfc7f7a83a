"""Replay every measured peak under tests/data/calibration/ through the memory model.

Each record is one training run on a real GPU (torch.cuda.max_memory_reserved over the
run); the planner predicts it from the same configuration. Accepted: within the error range
docs/memory-model.md claims for the shipped constants on that record's side of the held-out
split (finetune_bench.memory_fit: its rule and CLAIMED, the one place those numbers live).
docs/memory-model.md tabulates the points; test_planner_heldout.py checks the refit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune_bench.memory_fit import CLAIMED, FIT, HELD_OUT, SHIPPED, held_out_reasons
from finetune_operator.planner import estimate_memory
from finetune_operator.planner.calibration import is_measurement, point_from_record

CALIBRATION_DIR = Path(__file__).resolve().parents[1] / "data" / "calibration"


def _records():
    for path in sorted(CALIBRATION_DIR.glob("*.jsonl")):
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            record = json.loads(line)
            if is_measurement(record):
                yield pytest.param(path.name, record, id=f"{path.stem}:{number}")


RECORDS = list(_records())


def test_calibration_data_is_present():
    assert len(RECORDS) >= 13, "tests/data/calibration/ lost its measurements"


@pytest.mark.parametrize("source,record", RECORDS)
def test_measured_peak_is_predicted(source, record):
    point = point_from_record(record, source)
    predicted = estimate_memory(point.arch, point.shape).total
    measured = point.peak_reserved_bytes
    error = (predicted - measured) / measured
    side = HELD_OUT if held_out_reasons(point) else FIT
    low, high = CLAIMED[SHIPPED, side]
    where = (
        f"{point.label} ({source}, {side}): predicted {predicted / 2**30:.2f} GiB, "
        f"measured {measured / 2**30:.2f} GiB, error {error:+.2%}; docs/memory-model.md "
        f"claims {low:+.1%} .. {high:+.1%} for the {side} points"
    )
    assert low <= error <= high, where


WEIGHT_RECORDS = [p for p in RECORDS if p.values[1].get("model_bytes_after_load")]


@pytest.mark.parametrize("source,record", WEIGHT_RECORDS)
def test_measured_base_model_bytes_match_the_weights_term(source, record):
    # The grid records torch.cuda.memory_allocated() right after building (and quantising)
    # the base model: the weights term, plus the two 32 MiB cuBLAS workspaces when an earlier
    # run in the same process had already created them.
    from finetune_operator.planner import DEFAULT_CONSTANTS
    from finetune_operator.planner.memory import weight_bytes

    point = point_from_record(record, source)
    predicted = weight_bytes(point.arch, point.shape)
    extra = record["model_bytes_after_load"] - predicted
    assert (
        -0.005 * predicted
        <= extra
        <= (DEFAULT_CONSTANTS.cublas_workspace_bytes + 0.005 * predicted)
    ), point.label
