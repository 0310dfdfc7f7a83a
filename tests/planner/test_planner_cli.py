"""`finetune-operator plan`: JSON for machines, a table for people, exit codes for scripts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from finetune_operator.cli import main as operator_main
from finetune_operator.planner.cli import main

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_flags_print_a_plan_as_json(capsys):
    rc, out, _ = run(
        capsys,
        "--model",
        "meta-llama/Meta-Llama-3-8B",
        "--memory",
        "80Gi",
        "--seq-len",
        "2048",
        "--packing",
    )
    assert rc == 0
    result = json.loads(out)
    assert result["fits"] is True
    plan = result["plan"]
    assert plan["method"] == "lora" and plan["gradientCheckpointing"] is False
    assert plan["microBatchSize"] * plan["gradientAccumulation"] == 16
    assert plan["trainableParams"] == 41_943_040
    assert plan["estimatedPeakBytes"] <= 80 * 2**30
    assert set(plan["breakdown"]) >= {"baseWeights", "activations", "optimizerState"}


def test_explain_prints_every_candidate_and_marks_the_chosen(capsys):
    rc, out, _ = run(
        capsys,
        "--model",
        "meta-llama/Meta-Llama-3-8B",
        "--memory",
        "12Gi",
        "--seq-len",
        "2048",
        "--explain",
    )
    assert rc == 0
    rows = [line for line in out.splitlines() if line.lstrip("-> ").startswith("single ")]
    # methods x checkpointing (off, 4, 8, ... 28 of the 32 layers, all) x micro-batches 1, 2,
    # 3, 4, 6, 8 (unpacked: divisors and a 1.5x ladder; 12 x 2048 is past the token cap), and
    # where the budget lies between two rungs, the largest row budget that fits between them
    ladder = [line for line in rows if int(line[2:].split()[5]) % 2048 == 0]
    assert len(ladder) == 2 * 9 * 6
    filled = [line for line in rows if line not in ladder]
    assert filled
    for line in filled:
        method, ckpt, _, _, tokens = line[2:].split()[1:6]
        assert line.rstrip().split()[-2] == "yes"
        same = [r[2:].split() for r in ladder if r[2:].split()[1:3] == [method, ckpt]]
        below = max(int(r[5]) for r in same if r[-2] == "yes")
        above = min(int(r[5]) for r in same if r[-2] == "no")
        assert below < int(tokens) < above
    assert {line[2:].split()[2] for line in rows} == {"off", "all", *map(str, range(4, 29, 4))}
    chosen = [line for line in rows if line.startswith("->")]
    assert len(chosen) == 1 and chosen[0][2:].split()[:2] == ["single", "qlora"]
    assert "yes" in chosen[0]
    assert "plan: qlora" in out and "weights" in out


def test_nothing_fits_exits_1_with_the_minimum_memory(capsys):
    rc, out, _ = run(capsys, "--model", "meta-llama/Meta-Llama-3-8B", "--memory", "6Gi")
    assert rc == 1
    result = json.loads(out)
    assert result["fits"] is False and result["plan"] is None
    assert result["minimumGpuMemory"] in result["reason"]
    assert result["minimumGpuMemoryBytes"] > 6 * 2**30


def test_gpu_product_and_allowed_methods_flags_are_the_spec_fields(capsys):
    flags = ("--model", "meta-llama/Meta-Llama-3-8B", "--memory", "80Gi", "--packing")
    rc, out, _ = run(capsys, *flags, "--gpu-product", "NVIDIA-H200")
    assert rc == 0 and json.loads(out)["plan"]["method"] == "fp8"
    rc, out, _ = run(capsys, *flags, "--gpu-product", "NVIDIA-H200", "--allowed-methods", "lora")
    assert rc == 0 and json.loads(out)["plan"]["method"] == "lora"
    rc, _, err = run(capsys, *flags, "--gpu-product", "NVIDIA-A100-SXM4-80GB", "--method", "fp8")
    assert rc == 2 and "spec.method is fp8" in err and "NVIDIA-A100-SXM4-80GB" in err


def test_manifest_file_is_planned_like_the_operator_would(capsys):
    rc, out, _ = run(capsys, "-f", str(EXAMPLES / "finetunejob-llama3-8b.yaml"))
    assert rc == 0
    result = json.loads(out)
    assert result["budgetBytes"] == 24 * 2**30
    assert result["plan"]["method"] in ("lora", "qlora")


def test_local_config_json(tmp_path, capsys):
    config = {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 224,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 1024,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    rc, out, _ = run(capsys, "--config", str(tmp_path), "--memory", "2Gi", "--seq-len", "128")
    assert rc == 0
    assert json.loads(out)["architecture"]["hiddenSize"] == 64


def test_bad_input_exits_2_and_names_what_to_fix(capsys, tmp_path):
    rc, _, err = run(capsys, "--model", "acme/unknown-model", "--memory", "24Gi")
    assert rc == 2 and "spec.model.architecture" in err
    rc, _, err = run(capsys, "--model", "meta-llama/Meta-Llama-3-8B")
    assert rc == 2 and "--memory is required" in err
    rc, _, err = run(capsys, "--model", "meta-llama/Meta-Llama-3-8B", "--memory", "lots")
    assert rc == 2 and "'lots'" in err
    bad = tmp_path / "job.yaml"
    bad.write_text("apiVersion: finetune.dev/v1alpha1\nkind: FineTuneJob\nspec: {method: fast}\n")
    rc, _, err = run(capsys, "-f", str(bad))
    assert rc == 2 and "not a valid FineTuneJob" in err


def test_dispatched_by_the_operator_cli(capsys):
    rc = operator_main(["plan", "--model", "Qwen/Qwen2.5-7B", "--memory", "24Gi"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["model"] == "Qwen/Qwen2.5-7B"


def test_plan_command_does_not_import_torch():
    code = (
        "import sys; from finetune_operator.planner.cli import main; "
        "main(['--model', 'meta-llama/Meta-Llama-3-8B', '--memory', '24Gi']); "
        "sys.exit(1 if 'torch' in sys.modules or 'transformers' in sys.modules else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_explain_runs_as_a_module():
    """`python -m finetune_operator.planner.cli` runs main() as the module loads: everything
    the table needs must be defined before that (a helper after the `__main__` guard was not)."""
    result = subprocess.run(
        [sys.executable, "-m", "finetune_operator.planner.cli", "--memory", "24Gi", "--explain"]
        + ["-f", str(EXAMPLES / "finetunejob-llama3-8b.yaml")],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "->single" in result.stdout and "plan: " in result.stdout
