"""On a GPU machine: does the worker train in the environment its image gives it?

Runs the worker's real entrypoint (`python -m finetune_worker.cli train`, what the image's
`finetune-worker train` runs) on a small Llama-architecture model made on the spot, in four
environments, and prints one table:

1. `no-compiler`: PATH holds only the Python environment's bin directory, as in the slim image
   before gcc was added. Expected: exit 16 (WorkerEnvironmentError) in seconds, naming the
   missing compiler.
2. `broken-compiler`: CC points at a compiler that always fails. The static checks pass, so
   this shows the preflight's real kernel launch catching what they cannot. Expected: exit 16.
3. `pod-lora` / `pod-qlora`: the pod as the operator runs it, emulated
   (tests/support/podsandbox.py):
   uid 65532 with no passwd entry, no HOME, read-only root, no network, caches on a scratch
   tmpfs, the image's ENV with the compiler on PATH. LoRA with packing (fused kernels and the
   flash varlen kernel), QLoRA (bitsandbytes' CUDA library). Expected: exit 0, trained.

Usage, from the repository root, as root on the GPU machine (needs the worker's packages):
    python bench/worker_image_gpu_check.py --out results.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests" / "support")]

from podsandbox import POD_UID, image_env, run_as_pod
from tinymodel import DATA_DIR, make_tiny_model
from worker_configs import worker_config_dict

PYTHON = sys.executable
ENTRYPOINT = [PYTHON, "-m", "finetune_worker.cli", "train", "--config"]


def write_config(
    directory: Path, *, method: str, packing: bool, mount: Path | None = None, tag: str = "run"
):
    """A worker config for the small model; paths as seen from `mount` (the sandbox) if given."""
    seen = mount or directory
    config = worker_config_dict(
        seen,
        seen / "models",
        data_dir=seen / "data",
        method=method,
        packing=packing,
        max_steps=20,
        seq_length=256,
        micro_batch=8,
    )
    config["plan"]["fusedKernels"] = True
    config["paths"] |= {
        "outputDir": str(seen / "out" / tag / "adapter"),
        "checkpointDir": str(seen / "out" / tag / "checkpoints"),
    }
    config["paths"]["claimMounts"]["out"] = str(seen / "out")
    path = directory / "config" / f"{tag}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    import yaml

    path.write_text(yaml.safe_dump(config))
    return path, seen / "config" / path.name


def prepare(directory: Path) -> None:
    make_tiny_model(
        directory / "models" / "tiny", hidden=512, layers=4, intermediate=1024, max_positions=512
    )
    (directory / "data").mkdir()
    shutil.copy(DATA_DIR / "chat.jsonl", directory / "data" / "chat.jsonl")
    (directory / "out").mkdir()


def summary_of(log: Path) -> dict:
    try:
        return json.loads(log.read_text())
    except (OSError, ValueError):
        return {}


def run_direct(name: str, directory: Path, env: dict) -> dict:
    config, _ = write_config(directory, method="lora", packing=True, tag=name)
    log = directory / f"{name}.termination-log"
    env = {**env, "FINETUNE_WORKER_TERMINATION_LOG": str(log)}
    started = time.perf_counter()
    result = subprocess.run(
        [*ENTRYPOINT, str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    return {
        "run": name,
        "exitCode": result.returncode,
        "seconds": round(time.perf_counter() - started, 1),
        **pick(summary_of(log)),
        "stderrTail": result.stderr[-1500:],
    }


def run_in_pod(name: str, directory: Path, method: str, packing: bool) -> dict:
    from finetune_operator.builders.training import worker_container

    for sub in ("config", "models", "data", "out"):
        (directory / sub).mkdir(exist_ok=True)
    _, config_in_pod = write_config(directory, method=method, packing=packing, mount=Path("/mnt"))
    out = directory / "out"
    shutil.rmtree(out)
    out.mkdir()
    for path in [directory, *directory.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    os.chown(out, POD_UID, POD_UID)
    env = image_env(
        ROOT / "Dockerfile.worker",
        prefix_replacements={"/opt/worker/bin": str(Path(PYTHON).parent)},
    )
    container = worker_container(
        "image", ["finetune-worker", "train"], [], {}, scratch_dir="/mnt/scratch"
    )
    env.update({e["name"]: e["value"] for e in container["env"]})
    env.pop("HOME", None)
    env["FINETUNE_WORKER_TERMINATION_LOG"] = "/mnt/out/termination-log"
    # This machine's packages are not installed into its Python: the same path the caller has.
    env["PYTHONPATH"] = os.environ.get("PYTHONPATH", "")
    for key in ("NVIDIA_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES", "LD_LIBRARY_PATH"):
        if key in os.environ:
            env[key] = os.environ[key]
    binds = {f"/mnt/{sub}": directory / sub for sub in ("config", "models", "data", "out")}
    started = time.perf_counter()
    result = run_as_pod(
        [*ENTRYPOINT, str(config_in_pod)], env, binds=binds, writable=["/mnt/out", "/mnt/scratch"]
    )
    return {
        "run": name,
        "exitCode": result.returncode,
        "seconds": round(time.perf_counter() - started, 1),
        **pick(summary_of(out / "termination-log")),
        "stderrTail": result.stderr[-1500:],
    }


def pick(summary: dict) -> dict:
    metrics = summary.get("metrics") or {}
    return {
        "reason": summary.get("reason"),
        "message": summary.get("message"),
        "tokensPerSecond": metrics.get("tokensPerSecond"),
        "peakVRAMBytes": metrics.get("peakVRAMBytes"),
        "steps": (summary.get("progress") or {}).get("step"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    results = []
    base_env = {k: v for k, v in os.environ.items() if k != "CC"}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepare(work)
        print("model and data ready", flush=True)
        for name, env in (
            (
                "no-compiler",
                {
                    **base_env,
                    "PATH": str(Path(PYTHON).parent),
                    "TRITON_CACHE_DIR": str(work / "triton-a"),
                },
            ),
            (
                "broken-compiler",
                {**base_env, "CC": "/bin/false", "TRITON_CACHE_DIR": str(work / "triton-b")},
            ),
        ):
            results.append(run_direct(name, work, env))
            print(f"{name}: exit {results[-1]['exitCode']}", flush=True)
        for name, method, packing in (("pod-lora", "lora", True), ("pod-qlora", "qlora", False)):
            pod_dir = work / name
            pod_dir.mkdir()
            for volume in ("models", "data"):
                shutil.copytree(work / volume, pod_dir / volume)
            results.append(run_in_pod(name, pod_dir, method, packing))
            print(f"{name}: exit {results[-1]['exitCode']}", flush=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(
        f"\n{'run':16} {'exit':>4} {'s':>6} {'steps':>5} {'tok/s':>9} {'peak MiB':>9}"
        "  reason / message"
    )
    for r in results:
        peak = f"{r['peakVRAMBytes'] / 2**20:.0f}" if r.get("peakVRAMBytes") else "-"
        tps = f"{r['tokensPerSecond']:.0f}" if r.get("tokensPerSecond") else "-"
        print(
            f"{r['run']:16} {r['exitCode']:>4} {r['seconds']:>6} {r.get('steps') or '-':>5} "
            f"{tps:>9} {peak:>9}  {r.get('reason')}: {(r.get('message') or '')[:300]}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
