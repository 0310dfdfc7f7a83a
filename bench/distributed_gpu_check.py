"""On one GPU: the distributed paths the CPU cannot run, through the worker's real entrypoints.

A Llama-architecture model (8 layers, hidden 2048, made on the spot) trained 12 steps, four
ways, same data and seed:

1. `single`: `finetune-worker train`, one process, no torchrun (the reference).
2. `launch-ddp`: `finetune-worker launch --nnodes 1 --nproc-per-node 1 -- train`: torchrun,
   the NCCL process group, rank 0's reporting; one process, so no gradient exchange.
3. `launch-fsdp`: the same with plan.strategy fsdp: FULL_SHARD wrapping, sharded checkpoint,
   the adapter gathered on rank 0.
4. `single-qlora` and `launch-fsdp-qlora`: FSDP over the NF4 base (bnb_4bit_quant_storage
   bf16) against one process.

Prints exit codes, the largest per-step loss difference against the one-process run of the
same method (`single`, `single-qlora`: the same mathematics, so precision differences only),
peaks against the planner's per-GPU prediction for the same shape, and tokens/s. Usage
(repository root, the worker's packages importable):
    python bench/distributed_gpu_check.py --out results.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests" / "support")]

from tinymodel import make_tiny_model
from worker_configs import worker_config_dict

SIZES = {
    "hidden": 2048,
    "layers": 8,
    "intermediate": 5632,
    "heads": 16,
    "kv_heads": 8,
    "max_positions": 1024,
}


def config_for(work: Path, name: str, method: str, strategy: str, lr: float) -> Path:
    config = worker_config_dict(
        work / name,
        work,
        method=method,
        max_steps=12,
        seq_length=512,
        micro_batch=8,
        packing=True,
        fmt="chat",
        learningRate=lr,
    )
    config["plan"].update(
        {
            "strategy": strategy,
            "nodes": 1,
            "processesPerNode": 1,
            "worldSize": 1,
            "fusedKernels": True,
        }
    )
    config["spec"]["training"]["checkpointSteps"] = 6  # a checkpoint is saved (FSDP: sharded)
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def losses_of(work: Path, name: str) -> list[float]:
    states = list((work / name).rglob("checkpoint-*/trainer_state.json"))
    if not states:
        return []
    last = max(states, key=lambda p: int(p.parent.name.rsplit("-", 1)[1]))
    return [h["loss"] for h in json.loads(last.read_text())["log_history"] if "loss" in h]


def run(name: str, argv: list[str], work: Path) -> dict:
    log = work / f"{name}.termination-log"
    env = {**os.environ, "FINETUNE_WORKER_TERMINATION_LOG": str(log)}
    started = time.perf_counter()
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=500, check=False)
    summary = json.loads(log.read_text()) if log.exists() and log.read_text() else {}
    metrics = summary.get("metrics") or {}
    return {
        "run": name,
        "exitCode": result.returncode,
        "seconds": round(time.perf_counter() - started, 1),
        "reason": summary.get("reason"),
        "message": (summary.get("message") or "")[:400],
        "tokensPerSecond": metrics.get("tokensPerSecond"),
        "peakVRAMBytes": metrics.get("peakVRAMBytes"),
        "peakVRAMPerRankBytes": metrics.get("peakVRAMPerRankBytes"),
        "worldSize": metrics.get("worldSize"),
        "adapter": (work / name / "out" / "adapter" / "adapter_model.safetensors").exists(),
        "losses": losses_of(work, name),
        "stderrTail": result.stderr[-2500:],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--lr", type=float, default=2e-4, help="learning rate (API default)")
    parser.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="a tiny model and the two runs a CPU can do (checks this script)",
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dist-check-"))
    make_tiny_model(work / "tiny", **({} if args.cpu_smoke else SIZES))
    train = [sys.executable, "-m", "finetune_worker.cli"]
    runs = [
        ("single", "lora", "single", None),
        ("launch-ddp", "lora", "ddp", True),
        ("launch-fsdp", "lora", "fsdp", True),
        ("single-qlora", "qlora", "single", None),
        ("launch-fsdp-qlora", "qlora", "fsdp", True),
    ]
    results = []
    for name, method, strategy, launch in runs[:2] if args.cpu_smoke else runs:
        config = config_for(work, name, method, strategy, args.lr)
        argv = (
            [
                *train,
                "launch",
                "--nnodes",
                "1",
                "--nproc-per-node",
                "1",
                "--",
                "train",
                "--config",
                str(config),
            ]
            if launch
            else [*train, "train", "--config", str(config)]
        )
        results.append(run(name, argv, work))
        print(f"{name}: exit {results[-1]['exitCode']} in {results[-1]['seconds']} s", flush=True)
    references = {
        "lora": results[0]["losses"],
        "qlora": next((r["losses"] for r in results if r["run"] == "single-qlora"), []),
    }
    for r in results:
        reference = references["qlora" if "qlora" in r["run"] else "lora"]
        pairs = list(zip(r["losses"], reference, strict=False))
        r["maxLossDifference"] = max((abs(a - b) for a, b in pairs), default=None)
    args.out.write_text(json.dumps(results, indent=2))
    print(
        f"\n{'run':20} {'exit':>4} {'steps':>5} {'max |dloss|':>11} {'peak MiB':>9} "
        f"{'tok/s':>8} adapter  reason"
    )
    for r in results:
        peak = f"{r['peakVRAMBytes'] / 2**20:.0f}" if r.get("peakVRAMBytes") else "-"
        diff = f"{r['maxLossDifference']:.4f}" if r["maxLossDifference"] is not None else "-"
        tps = f"{r['tokensPerSecond']:.0f}" if r.get("tokensPerSecond") else "-"
        print(
            f"{r['run']:20} {r['exitCode']:>4} {len(r['losses']):>5} {diff:>11} {peak:>9} "
            f"{tps:>8} {r['adapter']!s:7}  {r['reason']}: {r['message'][:160]}"
        )
    for r in results:
        if r["exitCode"] != 0:
            print(f"--- {r['run']} stderr tail ---\n{r['stderrTail'][-1500:]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
