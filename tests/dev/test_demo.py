"""`finetune-dev demo`, the README's main command, run the way `make demo` runs it.

The same flow as the demo with shorter training: its own control plane, the local node
agent, the operator as a process, examples/finetunejob-demo.yaml applied with kubectl.
The first test runs it to the end; the second runs it again in the same data folder (the
"twice in a row" case: the model is reused, the old adapter removed) and interrupts it
with Ctrl-C while the worker trains, then checks that nothing it started is left.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEMO = [sys.executable, "-m", "finetune_dev.cli", "demo"]

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("demo")


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.split(") ", 1)[1][0] != "Z"


def test_demo_trains_merges_and_deploys(data_dir):
    summary_path = data_dir / "summary.json"
    res = subprocess.run(
        [
            *DEMO,
            "--data-dir",
            str(data_dir),
            "--max-steps",
            "4",
            "--timeout",
            "240",
            "--summary-json",
            str(summary_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        check=False,
    )
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-6000:]
    # It says what it does at every step.
    for step in range(1, 9):
        assert f"==> [{step}/8]" in out, out[-3000:]
    summary = json.loads(summary_path.read_text())

    ftj = summary["fineTuneJob"]
    status = ftj["status"]
    assert status["phase"] == "Succeeded"
    assert status["progress"]["step"] == 4
    metrics = status["metrics"]
    assert metrics["tokensPerSecond"] > 0 and metrics["samplesPerSecond"] > 0
    # On a CPU node the memory measured is the worker's peak host memory (no VRAM): in the
    # status and in its termination message (the pod's status).
    assert metrics["peakRSSBytes"] > 0 and metrics["device"] == "cpu"
    assert summary["workerSummary"]["metrics"]["peakRSSBytes"] > 0
    assert "peak host memory (RSS)" in out
    assert status["plan"]["method"] in ("lora", "qlora") and status["plan"]["reason"]
    for line in ("adapter:", "plan:", "measured:", "merge:", "deployment:"):
        assert line in out

    # The adapter is on disk where pvc://demo-adapters/demo points, and reloads.
    adapter_dir = Path(summary["adapterDir"])
    assert adapter_dir == data_dir / "pvc" / "demo-adapters" / "demo"
    assert (adapter_dir / "adapter_config.json").is_file()
    assert (adapter_dir / "adapter_model.safetensors").is_file()
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = data_dir / "pvc" / "demo-models" / "tiny-llama"
    base = AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir)
    tok = AutoTokenizer.from_pretrained(base_dir)
    with torch.no_grad():
        logits = model(**tok("What colour is the sky?", return_tensors="pt")).logits
    assert torch.isfinite(logits).all()
    lora_weights = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_weights and any(p.abs().sum() > 0 for p in lora_weights), (
        "lora_B is all zeros: the saved adapter was never trained"
    )

    # The follow-ups: the merge ran and wrote a model; the deployment was created and
    # its vLLM pod was refused by the node agent with a clear reason.
    merge = summary["adapterMerge"]
    assert merge is not None and merge["status"]["phase"] == "Succeeded"
    merged = Path(summary["mergedDir"])
    assert (merged / "config.json").is_file()
    assert list(merged.glob("*.safetensors"))
    assert summary["adapterDeployment"] is not None
    assert summary["adapterDeployment"]["spec"]["adapters"][0]["fineTuneJobRef"]["name"] == "demo"

    # Everything it started is stopped.
    assert not (data_dir / "processes.json").exists()
    assert not (data_dir / "cluster").exists()
    for pod in summary["pods"]:
        for cs in pod["status"].get("containerStatuses") or []:
            pid = cs.get("containerID", "").rpartition("//")[2]
            if pid.isdigit():
                assert not _alive(int(pid)), f"{pod['metadata']['name']} still runs"


def test_demo_runs_again_and_ctrl_c_stops_everything(data_dir):
    """Second run in the same folder; Ctrl-C while the worker trains."""
    model_made = (data_dir / "pvc" / "demo-models" / "tiny-llama" / "config.json").exists()
    had_adapter = (data_dir / "pvc" / "demo-adapters" / "demo").exists()
    # Far more steps than the test waits for: a fast CPU must not finish before the Ctrl-C.
    proc = subprocess.Popen(
        [*DEMO, "--data-dir", str(data_dir), "--max-steps", "100000", "--timeout", "240"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
    )
    lines: list[str] = []
    deadline = time.monotonic() + 240
    try:
        for line in proc.stdout:
            lines.append(line)
            if "step " in line and "/100000" in line:  # the worker reported progress
                break
            assert time.monotonic() < deadline, "".join(lines)[-3000:]
        else:
            pytest.fail("the demo ended before training started:\n" + "".join(lines)[-3000:])
        text = "".join(lines)
        if model_made:  # made once, on the first run
            assert "tiny model: reusing" in text
        if had_adapter:  # a new run trains from scratch
            assert "removing the previous run's output" in text
        started = json.loads((data_dir / "processes.json").read_text())
        cluster = json.loads((data_dir / "cluster" / "state.json").read_text())
        workers = [int(p) for p in _worker_pids(data_dir)]
        assert workers, "no worker process found under the node agent"
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, rest[-3000:]
    assert "interrupted: stopping everything" in rest
    for pid in [*started.values(), *cluster["pids"].values(), *workers]:
        assert not _alive(pid), f"pid {pid} survived Ctrl-C"
    assert not (data_dir / "cluster").exists()


def _worker_pids(data_dir: Path) -> list[str]:
    """Processes running the worker from this environment with a config under data_dir."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if any(c.endswith("finetune-worker") for c in cmd[:2]) and any(
            str(data_dir) in c for c in cmd
        ):
            pids.append(entry.name)
    return pids


def test_the_two_gpu_example_trains_with_two_processes(tmp_path):
    """examples/finetunejob-2gpu.yaml on the node agent's two stand-in GPUs: one pod,
    torchrun with two gloo processes, each taking half of every batch."""
    summary_path = tmp_path / "summary.json"
    res = subprocess.run(
        [
            *DEMO,
            "--data-dir",
            str(tmp_path),
            "--max-steps",
            "4",
            "--manifest",
            str(ROOT / "examples" / "finetunejob-2gpu.yaml"),
            "--timeout",
            "300",
            "--summary-json",
            str(summary_path),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
        check=False,
    )
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-6000:]
    summary = json.loads(summary_path.read_text())
    status = summary["fineTuneJob"]["status"]
    assert status["phase"] == "Succeeded" and status["progress"]["step"] == 4
    plan = status["plan"]
    assert (plan["strategy"], plan["worldSize"]) == ("ddp", 2)
    assert plan["microBatchSize"] * plan["gradientAccumulation"] * 2 == 8
    assert status["metrics"]["worldSize"] == 2
    worker = next(p for p in summary["pods"] if p["metadata"]["name"].startswith("demo-2gpu-train"))
    assert worker["spec"]["containers"][0]["command"][:2] == ["finetune-worker", "launch"]
    adapter_dir = Path(summary["adapterDir"])
    assert (adapter_dir / "adapter_model.safetensors").is_file()
