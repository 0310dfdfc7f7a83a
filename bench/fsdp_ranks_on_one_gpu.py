"""FSDP with several real ranks on one GPU: does the base really shard, and is it exact?

A machine with one GPU cannot run NCCL with two ranks (NCCL refuses two ranks on one
device), and accelerate refuses FSDP on CPUs. gloo runs every collective FSDP needs on CUDA
tensors (through host copies: slow, but the same arithmetic), so W worker processes can
share one GPU, each with its own CUDA context and its own allocator: each process's peak is
what one GPU of a W-GPU job would hold, and the losses are what W GPUs would compute.

Each rank is the worker's real `finetune-worker train` (cli.main) with the environment
torchrun would give it (RANK, WORLD_SIZE, LOCAL_WORLD_SIZE), except LOCAL_RANK 0 for all
(one device) and a gloo process group opened before the worker starts, which accelerate
adopts. The launcher itself (torchrun) is covered by distributed_gpu_check.py.

Runs, same model, data, seed and global batch (micro-batch 2 x accumulation x world = 8):
  single-<method>       one process, accumulation 4 (the reference)
  fsdp<W>-<method>      W ranks, FULL_SHARD, accumulation 4/W      (W = 2, 4)
  ddp2-lora             2 ranks, DDP (whole replica on each), for the per-rank contrast

Prints per run: exit, steps, largest per-step loss difference against the reference, largest
adapter weight difference, each rank's peak (allocated and reserved) and the planner's
per-GPU prediction for the same shape. Usage (repository root, worker packages importable):
    python bench/fsdp_ranks_on_one_gpu.py --out results.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
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

# Big enough that the frozen base dominates a rank's memory (about 1.0B parameters), small
# enough to write and load in seconds.
SIZES = {
    "hidden": 2048,
    "layers": 16,
    "intermediate": 5632,
    "heads": 16,
    "kv_heads": 8,
    "max_positions": 1024,
}
STEPS, SEQ, MICRO, BATCH = 10, 512, 2, 8

# What a rank runs: join the gloo group on this one GPU, then the worker's own entrypoint.
RANK_PROGRAM = """
import datetime, sys
import torch, torch.distributed as dist
if torch.cuda.is_available():
    torch.cuda.set_device(0)
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=600))
import os
if os.environ.get("BENCH_FSDP_NO_MIXED_PRECISION"):
    # a variant: FSDP keeps every flat parameter in its own dtype (no bf16 copies)
    import finetune_worker.train as train
    train.fp32_gradient_reduction = lambda policy: None
from finetune_worker.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config_for(work: Path, name: str, method: str, strategy: str, world: int) -> Path:
    config = worker_config_dict(
        work / name,
        work,
        method=method,
        max_steps=STEPS,
        seq_length=SEQ,
        micro_batch=MICRO,
        packing=True,
        fmt="chat",
        learningRate=1e-3,
        batchSize=BATCH,
    )
    config["plan"].update(
        {
            "strategy": strategy,
            "nodes": 1,
            "processesPerNode": world,
            "worldSize": world,
            "gradientAccumulation": BATCH // MICRO // world,
            "fusedKernels": True,
        }
    )
    from worker_configs import rehash

    config = rehash(config)
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def launch(name: str, config: Path, world: int, work: Path) -> dict:
    port, procs, logs = free_port(), [], []
    variant = {"BENCH_FSDP_NO_MIXED_PRECISION": "1"} if name.endswith("-nomp") else {}
    started = time.perf_counter()
    for rank in range(world):
        log = work / f"{name}.rank{rank}.termination-log"
        logs.append(log)
        env = {**os.environ, "FINETUNE_WORKER_TERMINATION_LOG": str(log), **variant}
        if world > 1:
            env.update(
                RANK=str(rank),
                WORLD_SIZE=str(world),
                LOCAL_RANK="0",
                LOCAL_WORLD_SIZE=str(world),
                GROUP_RANK="0",
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
            )
            argv = [sys.executable, "-c", RANK_PROGRAM, "train", "--config", str(config)]
        else:
            argv = [sys.executable, "-m", "finetune_worker.cli", "train", "--config", str(config)]
        procs.append(
            subprocess.Popen(
                argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    summary = json.loads(logs[0].read_text()) if logs[0].exists() else {}
    metrics = summary.get("metrics") or {}
    return {
        "run": name,
        "world": world,
        "exitCodes": [p.returncode for p in procs],
        "seconds": round(time.perf_counter() - started, 1),
        "reason": summary.get("reason"),
        "message": (summary.get("message") or "")[:300],
        "peakVRAMBytes": metrics.get("peakVRAMBytes"),
        "peakVRAMPerRankBytes": metrics.get("peakVRAMPerRankBytes")
        or [metrics.get("peakVRAMBytes")],
        "peakVRAMAllocatedBytes": metrics.get("peakVRAMAllocatedBytes"),
        "tokensPerSecond": metrics.get("tokensPerSecond"),
        "losses": losses_of(work / name),
        "outputTail": [o[-2500:] for o in outputs],
    }


def history_of(run: Path, key: str) -> list[float]:
    states = list(run.rglob("checkpoint-*/trainer_state.json"))
    if not states:
        return []
    last = max(states, key=lambda p: int(p.parent.name.rsplit("-", 1)[1]))
    return [h[key] for h in json.loads(last.read_text())["log_history"] if key in h]


def losses_of(run: Path) -> list[float]:
    return history_of(run, "loss")


def adapter_of(run: Path):
    path = run / "out" / "adapter" / "adapter_model.safetensors"
    if not path.exists():
        return None
    from safetensors.torch import load_file

    return load_file(str(path))


def predicted_bytes(model_dir: Path, method: str, strategy: str, world: int) -> int:
    from finetune_operator.planner.arch import arch_from_config_json
    from finetune_operator.planner.memory import TrainingShape, estimate_memory

    arch = arch_from_config_json(json.loads((model_dir / "config.json").read_text()))
    shape = TrainingShape(
        method=method,
        lora_r=8,
        lora_dropout=0.0,
        seq_len=SEQ,
        micro_batch=MICRO,
        packing=True,
        gpu_count=world,
        strategy=strategy,
        gradient_accumulation=BATCH // MICRO // world,
    )
    return estimate_memory(arch, shape).total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--worlds", default="2,4", help="FSDP world sizes to run")
    parser.add_argument("--methods", default="lora,qlora")
    parser.add_argument(
        "--no-mixed-precision-variant",
        action="store_true",
        help="also FSDP over 2 ranks without FSDP's mixed-precision policy",
    )
    parser.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="the tiny test model, the single and DDP runs only (checks the "
        "script where there is no GPU)",
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fsdp-one-gpu-"))
    print(f"making the model in {work}", flush=True)
    make_tiny_model(work / "tiny", **({} if args.cpu_smoke else SIZES))
    worlds = [int(w) for w in args.worlds.split(",") if w]
    runs = []
    for method in args.methods.split(","):
        runs.append((f"single-{method}", method, "single", 1))
        runs += [(f"fsdp{w}-{method}", method, "fsdp", w) for w in worlds]
    runs.append(("ddp2-lora", "lora", "ddp", 2))
    if args.no_mixed_precision_variant:
        runs.append(("fsdp2-lora-nomp", "lora", "fsdp", 2))
    if args.cpu_smoke:
        runs = [r for r in runs if r[2] != "fsdp" and r[1] == "lora"]
    results = []
    for name, method, strategy, world in runs:
        print(f"{name}: {world} process(es) ...", flush=True)
        result = launch(name, config_for(work, name, method, strategy, world), world, work)
        result.update(
            method=method,
            strategy=strategy,
            predictedBytes=predicted_bytes(work / "tiny", method, strategy, world),
        )
        results.append(result)
        print(f"{name}: exit {result['exitCodes']} in {result['seconds']} s", flush=True)
    adapters = {r["run"]: adapter_of(work / r["run"]) for r in results}
    for r in results:
        tensors = adapters[r["run"]] or {}
        r["adapterTensors"] = {k: list(v.shape) for k, v in sorted(tensors.items())[:4]}
        r["adapterTensorCount"] = len(tensors)
        r["gradNorms"] = history_of(work / r["run"], "grad_norm")
        reference = next(x for x in results if x["run"] == f"single-{r['method']}")
        pairs = list(zip(r["losses"], reference["losses"], strict=False))
        r["steps"] = len(r["losses"])
        r["maxLossDifference"] = max((abs(a - b) for a, b in pairs), default=None)
        mine, theirs = adapters[r["run"]], adapters[reference["run"]]
        r["maxAdapterDifference"] = (
            max(float((mine[k].float() - theirs[k].float()).abs().max()) for k in theirs)
            if mine and theirs and set(mine) == set(theirs)
            else None
        )
    args.out.write_text(json.dumps(results, indent=2))
    gib = 2**30
    print(
        f"\n{'run':14} {'exit':>9} {'steps':>5} {'max|dloss|':>10} {'max|dW|':>8} "
        f"{'peak GiB per rank (reserved)':>30} {'predicted':>9} {'tok/s':>7}"
    )
    for r in results:
        peaks = ",".join(f"{p / gib:.2f}" for p in r["peakVRAMPerRankBytes"] if p)
        diff = f"{r['maxLossDifference']:.2e}" if r["maxLossDifference"] is not None else "-"
        dw = f"{r['maxAdapterDifference']:.1e}" if r["maxAdapterDifference"] is not None else "-"
        tps = f"{r['tokensPerSecond']:.0f}" if r.get("tokensPerSecond") else "-"
        print(
            f"{r['run']:14} {str(r['exitCodes']):>9} {r['steps']:>5} {diff:>10} {dw:>8} "
            f"{peaks:>30} {r['predictedBytes'] / gib:>9.2f} {tps:>7}"
        )
    for r in results:
        if any(r["exitCodes"]):
            print(f"--- {r['run']}: {r['reason']}: {r['message']}")
            for tail in r["outputTail"]:
                print(tail[-1500:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
