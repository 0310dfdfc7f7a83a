"""The plan's GPU memory budget is a cap, not only a prediction: the worker limits PyTorch's
caching allocator on its GPU to the budget less the CUDA context, before anything loads, so a
job on a card shared by time-slicing cannot take more than it asked, and an allocation past the
budget ends in the worker's own CUDA out-of-memory exit.

On the CPU: the arithmetic, and the training path with torch.cuda's entry points replaced, so
what the worker asks of CUDA (which device, which fraction, when) is what is checked.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
from worker_configs import worker_config_dict

from finetune_api import WorkerConfig
from finetune_api.constants import CUDA_CONTEXT_BYTES
from finetune_api.exit_codes import WorkerExitCode

torch = pytest.importorskip("torch")


GiB = 2**30
H100 = 80 * 10**9  # what an 80 GB card reports as total_memory, about 74.5 GiB


def test_the_cap_is_the_budget_less_the_cuda_context_as_a_share_of_the_device():
    from finetune_worker.memory import allocator_fraction

    fraction = allocator_fraction(24 * GiB, CUDA_CONTEXT_BYTES, H100)
    assert fraction == pytest.approx((24 * GiB - CUDA_CONTEXT_BYTES) / H100)
    assert int(fraction * H100) == pytest.approx(24 * GiB - 768 * 2**20, abs=1)
    # Never more than the device: a budget the size of the card leaves the allocator uncapped.
    assert allocator_fraction(200 * GiB, CUDA_CONTEXT_BYTES, H100) == 1.0
    # A budget the context alone fills: every allocation fails, never an uncapped process.
    tiny = allocator_fraction(CUDA_CONTEXT_BYTES, CUDA_CONTEXT_BYTES, H100)
    assert 0 < tiny < 1e-9
    # No budget to keep to (a hand-written config): nothing to cap at.
    assert allocator_fraction(None, CUDA_CONTEXT_BYTES, H100) is None
    for budget in (1, 2**20, GiB, 24 * GiB, 74 * GiB, 75 * GiB, 10**12):
        assert 0 < allocator_fraction(budget, CUDA_CONTEXT_BYTES, H100) <= 1


def test_the_planner_and_the_worker_count_the_same_context():
    from finetune_operator.planner.memory import DEFAULT_CONSTANTS

    assert DEFAULT_CONSTANTS.cuda_context_bytes == CUDA_CONTEXT_BYTES


class FakeCuda:
    """torch.cuda's entry points on the training path, on a machine without CUDA."""

    def __init__(self, monkeypatch, total: int = H100):
        self.total = total
        self.fractions: list[tuple[float, str]] = []
        self.set_devices: list[int] = []
        cuda = torch.cuda
        monkeypatch.setattr(cuda, "is_available", lambda: True)
        monkeypatch.setattr(cuda, "set_device", self.set_devices.append)
        monkeypatch.setattr(cuda, "reset_peak_memory_stats", lambda *a, **k: None)
        monkeypatch.setattr(
            cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=self.total)
        )
        monkeypatch.setattr(
            cuda,
            "set_per_process_memory_fraction",
            lambda fraction, device=None: self.fractions.append((fraction, device)),
        )
        from finetune_worker import preflight

        monkeypatch.setattr(preflight, "run_preflight", lambda *a, **k: None)


class ModelLoadStarted(Exception):
    pass


def test_training_caps_its_own_gpu_before_anything_loads(
    tmp_path, tiny_model_root, monkeypatch, caplog
):
    """Rank 1 of a two-process DDP job caps cuda:1, its own GPU, before the Trainer's
    arguments (which join the process group) and long before the model."""
    from finetune_worker import train

    cuda = FakeCuda(monkeypatch)
    raw = worker_config_dict(tmp_path, tiny_model_root)
    raw["plan"].update(strategy="ddp", worldSize=2, processesPerNode=2)
    config = WorkerConfig.model_validate(raw)
    for var, value in (("WORLD_SIZE", 2), ("RANK", 1), ("LOCAL_RANK", 1), ("LOCAL_WORLD_SIZE", 2)):
        monkeypatch.setenv(var, str(value))

    def args_then_stop(*args, **kwargs):
        assert cuda.fractions, "the allocator must be capped before the process group starts"
        raise ModelLoadStarted

    monkeypatch.setattr(train, "build_sft_config", args_then_stop)
    with caplog.at_level(logging.INFO, logger="finetune_worker"):
        with pytest.raises(ModelLoadStarted):
            train.run_training(config)
    assert cuda.set_devices == [1]
    assert cuda.fractions == [(pytest.approx((24 * GiB - CUDA_CONTEXT_BYTES) / H100), "cuda:1")]
    capped = [r.getMessage() for r in caplog.records if "capped at" in r.getMessage()]
    assert len(capped) == 1 and "cuda:1" in capped[0] and "24.0Gi budget" in capped[0]


def test_an_allocation_past_the_cap_is_the_documented_out_of_memory_exit(
    tmp_path, tiny_model_root, monkeypatch
):
    from finetune_worker import train
    from finetune_worker.errors import OutOfMemoryError

    cuda = FakeCuda(monkeypatch)
    config = WorkerConfig.model_validate(worker_config_dict(tmp_path, tiny_model_root))
    monkeypatch.setattr(train, "build_sft_config", lambda *a, **k: SimpleNamespace())

    def past_the_cap(*args, **kwargs):
        # What the capped allocator raises when the model needs more than the budget.
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train, "load_model", past_the_cap)
    with pytest.raises(OutOfMemoryError) as caught:
        train.run_training(config)
    assert caught.value.exit_code is WorkerExitCode.CUDA_OOM
    assert cuda.fractions and cuda.fractions[0][1] == "cuda:0"
    cap = 24 * GiB - CUDA_CONTEXT_BYTES
    from finetune_api import format_bytes

    assert f"allocator was capped at {format_bytes(cap)} per GPU" in str(caught.value)


def test_no_cap_without_a_budget(monkeypatch, tmp_path, tiny_model_root):
    from finetune_worker.memory import cap_gpu_memory

    cuda = FakeCuda(monkeypatch)
    raw = worker_config_dict(tmp_path, tiny_model_root)
    del raw["plan"]["budgetBytes"]
    assert cap_gpu_memory(WorkerConfig.model_validate(raw).plan, "cuda:0") is None
    assert cuda.fractions == []
