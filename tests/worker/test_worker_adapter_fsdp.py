"""The adapter written from FSDP's gathered state dict is the adapter peft writes.

Under FSDP (FULL_SHARD, each LoRA matrix a unit of its own, as the worker wraps it) peft's own
save selected nothing from the gathered state dict and wrote an adapter without weights; the
worker writes it from the state dict itself (adapter.save_gathered_adapter). These tests run
FSDP1 for real on CPU processes (gloo) where accelerate would refuse to.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tinymodel import make_tiny_model

ROOT = Path(__file__).resolve().parents[2]


def _peft_model(model_dir: Path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    # as the worker configures it (modeling.py): a causal-LM task, all linear projections
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM", target_modules="all-linear")
    )
    for name, parameter in peft_model.named_parameters():
        if "lora_B" in name:  # non-zero, so a missing or misnamed B matrix shows
            torch.nn.init.normal_(
                parameter, std=0.1, generator=torch.Generator().manual_seed(len(name))
            )
    return peft_model


def _files(directory: Path):
    from safetensors.torch import load_file

    weights = load_file(str(directory / "adapter_model.safetensors"))
    config = json.loads((directory / "adapter_config.json").read_text())
    return weights, config


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fsdp-adapter")
    make_tiny_model(root / "tiny")
    return root / "tiny"


def test_the_adapter_from_a_full_state_dict_is_the_one_peft_writes(model_dir, tmp_path):
    from finetune_worker.adapter import save_gathered_adapter

    peft_model = _peft_model(model_dir)
    peft_model.save_pretrained(str(tmp_path / "peft"), safe_serialization=True)
    (tmp_path / "ours").mkdir()
    save_gathered_adapter(peft_model, peft_model.state_dict(), tmp_path / "ours")
    (peft_weights, peft_config), (our_weights, our_config) = (
        _files(tmp_path / "peft"),
        _files(tmp_path / "ours"),
    )
    assert set(our_weights) == set(peft_weights) and len(our_weights) > 0
    for key, tensor in peft_weights.items():
        assert torch.equal(our_weights[key], tensor), key
    assert our_config == peft_config


def test_an_adapter_without_weights_is_refused(tmp_path):
    from safetensors.torch import save_file

    from finetune_worker.adapter import require_weights
    from finetune_worker.errors import WorkerEnvironmentError

    save_file({}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(WorkerEnvironmentError, match="no weights"):
        require_weights(tmp_path)


RANK_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path
    import torch, torch.distributed as dist
    sys.path[:0] = [{tests!r}, {support!r}]
    from test_worker_adapter_fsdp import _peft_model
    from peft.utils.other import fsdp_auto_wrap_policy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from finetune_worker.adapter import save_gathered_adapter

    dist.init_process_group("gloo")
    peft_model = _peft_model(Path({model_dir!r}))
    # As the worker's FSDP plan wraps it: decoder layers and each LoRA matrix their own unit.
    sharded = FSDP(peft_model, auto_wrap_policy=fsdp_auto_wrap_policy(peft_model),
                   use_orig_params=False, device_id=torch.device("cpu"))
    config = FullStateDictConfig(offload_to_cpu=True, rank0_only=True)
    with FSDP.state_dict_type(sharded, StateDictType.FULL_STATE_DICT, config):
        state_dict = sharded.state_dict()
    if dist.get_rank() == 0:
        peft_model.save_pretrained({peft_dir!r}, safe_serialization=True,
                                   state_dict=state_dict)
        Path({ours_dir!r}).mkdir()
        save_gathered_adapter(peft_model, state_dict, Path({ours_dir!r}))
    dist.destroy_process_group()
""")


@pytest.mark.slow
def test_two_fsdp_ranks_write_every_adapter_weight(model_dir, tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(
        RANK_SCRIPT.format(
            tests=str(ROOT / "tests" / "worker"),
            support=str(ROOT / "tests" / "support"),
            model_dir=str(model_dir),
            peft_dir=str(tmp_path / "peft-fsdp"),
            ours_dir=str(tmp_path / "ours"),
        )
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            str(script),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    reference = _peft_model(model_dir)  # the same seeded weights, never sharded
    reference.save_pretrained(str(tmp_path / "single"), safe_serialization=True)
    expected, _ = _files(tmp_path / "single")
    ours, _ = _files(tmp_path / "ours")
    assert set(ours) == set(expected) and len(ours) > 0
    for key, tensor in expected.items():
        assert torch.equal(ours[key], tensor), key
    # what peft's own save wrote from the same state dict (the defect this path avoids)
    peft_fsdp, _ = _files(tmp_path / "peft-fsdp")
    assert len(peft_fsdp) < len(expected)
