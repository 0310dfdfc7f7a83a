"""Distributed training on the CPU: real torchrun worlds of two processes over gloo.

`finetune-worker launch` (launch.py) builds torchrun's arguments and maps the ranks' outcome to
the worker's exit codes and one termination message; `train` under it trains one DDP world
that must equal one process accumulating the same micro-batches, with only global rank 0
writing outputs. The training tests run the real entrypoint as a subprocess, as a pod does.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from kubetest import wait_for
from worker_configs import worker_config_dict

torch = pytest.importorskip("torch")

# tiny_model_root fixture

FINETUNE_WORKER = [sys.executable, "-m", "finetune_worker.cli"]


# --- launch: torchrun's arguments and the outcome's exit code (no processes) -----------


def _options(**kwargs):
    from finetune_worker.launch import LaunchOptions

    return LaunchOptions(
        **{
            "nnodes": 1,
            "nproc_per_node": 2,
            "command": ["train", "--config", "/etc/finetune/worker-config.yaml"],
            **kwargs,
        }
    )


def test_one_pod_uses_the_standalone_rendezvous_without_restarts():
    from finetune_worker.launch import torchrun_args

    assert torchrun_args(_options(), {}) == [
        "--nnodes",
        "1",
        "--nproc-per-node",
        "2",
        "--max-restarts",
        "0",
        "--standalone",
        "--module",
        "finetune_worker.cli",
        "train",
        "--config",
        "/etc/finetune/worker-config.yaml",
    ]


def test_several_pods_use_a_static_rendezvous_at_pod_0_ranked_by_completion_index():
    from finetune_worker.launch import torchrun_args

    options = _options(nnodes=3, nproc_per_node=8, master_addr="ftj-train-0.ftj-workers")
    args = torchrun_args(options, {"JOB_COMPLETION_INDEX": "2"})
    assert args[:6] == ["--nnodes", "3", "--nproc-per-node", "8", "--max-restarts", "0"]
    assert args[6:14] == [
        "--rdzv-backend",
        "static",
        "--node-rank",
        "2",
        "--master-addr",
        "ftj-train-0.ftj-workers",
        "--master-port",
        "29500",
    ]
    # --node-rank wins over the environment
    assert (
        "0"
        == torchrun_args(
            _options(nnodes=3, node_rank=0, master_addr="h"), {"JOB_COMPLETION_INDEX": "2"}
        )[9]
    )
    # the parsed options are torchrun's own
    from torch.distributed.run import parse_args

    parsed = parse_args(args)
    assert (
        parsed.nnodes,
        parsed.nproc_per_node,
        parsed.node_rank,
        parsed.master_addr,
        parsed.master_port,
        parsed.max_restarts,
        parsed.module,
    ) == ("3", "8", 2, "ftj-train-0.ftj-workers", 29500, 0, True)
    assert parsed.training_script == "finetune_worker.cli"
    assert parsed.training_script_args == ["train", "--config", "/etc/finetune/worker-config.yaml"]


@pytest.mark.parametrize(
    "options, env, expected",
    [
        ({"nnodes": 2, "master_addr": "h"}, {}, "needs this pod's node rank: pass --node-rank"),
        ({"nnodes": 2}, {"JOB_COMPLETION_INDEX": "1"}, "needs --master-addr"),
        (
            {"nnodes": 2, "master_addr": "h"},
            {"JOB_COMPLETION_INDEX": "2"},
            "node rank 2 is outside 0..1",
        ),
        ({"command": ["merge"]}, {}, "launch runs `-- train ...` in every rank"),
    ],
)
def test_launch_refuses_options_that_cannot_form_a_world(options, env, expected):
    from finetune_worker.errors import InvalidConfigError
    from finetune_worker.launch import torchrun_args

    with pytest.raises(
        InvalidConfigError,
        match=expected.replace("(", r"\(").replace(")", r"\)").replace(".", r"\."),
    ):
        torchrun_args(_options(**options), env)


def test_launch_parses_the_operators_command_line():
    from finetune_worker.cli import build_parser
    from finetune_worker.launch import options_from_args

    args = build_parser().parse_args(
        [
            "launch",
            "--nnodes",
            "2",
            "--nproc-per-node",
            "4",
            "--master-addr",
            "a.b",
            "--",
            "train",
            "--config",
            "x",
        ]
    )
    assert options_from_args(args) == _options(
        nnodes=2, nproc_per_node=4, master_addr="a.b", command=["train", "--config", "x"]
    )


def _failure(exitcode, timestamp=100, local_rank=0):
    return SimpleNamespace(
        exitcode=exitcode,
        timestamp=timestamp,
        local_rank=local_rank,
        signal_name=lambda: signal.Signals(-exitcode).name,
    )


def _child_failed(failures):
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    error = ChildFailedError.__new__(ChildFailedError)
    error.name, error.failures = "finetune_worker.cli", failures
    return error


def test_the_root_failure_is_a_verdict_or_a_signal_before_a_peer_that_crashed_with_it():
    from finetune_worker.launch import root_failure

    # one poll: rank 0 died of rank 1's SIGKILL (its collective broke), or torchrun stopped it
    for consequence in (1, -15):
        rank, failure = root_failure(
            _child_failed({0: _failure(consequence), 1: _failure(-9, local_rank=1)})
        )
        assert rank == 1 and failure.exitcode == -9
    rank, _ = root_failure(_child_failed({0: _failure(-15), 2: _failure(1), 3: _failure(12)}))
    assert rank == 3
    # between equals, the earlier, then the lower rank
    rank, _ = root_failure(_child_failed({0: _failure(1, timestamp=101), 1: _failure(1)}))
    assert rank == 1
    rank, _ = root_failure(_child_failed({2: _failure(-9), 1: _failure(-9)}))
    assert rank == 1
    # a rank that checkpointed and stopped (143) before torchrun killed its slower peer
    rank, _ = root_failure(_child_failed({0: _failure(-15), 1: _failure(143, local_rank=1)}))
    assert rank == 1
    # ... but a crash that made the others stop explains more than their 143
    rank, _ = root_failure(_child_failed({0: _failure(143), 1: _failure(1, local_rank=1)}))
    assert rank == 1


def test_a_ranks_exit_code_becomes_the_pods_and_its_summary_is_kept(tmp_path):
    from finetune_worker.launch import failure_outcome

    (tmp_path / "rank-3.json").write_text(
        json.dumps(
            {
                "result": "Failed",
                "exitCode": 12,
                "reason": "CUDAOutOfMemory",
                "message": "CUDA out of memory at step 9",
            }
        )
    )
    code, summary = failure_outcome(3, 1, _failure(12, local_rank=1), tmp_path)
    assert code == 12 and summary["message"] == "CUDA out of memory at step 9"
    code, summary = failure_outcome(2, 1, _failure(-9), tmp_path)
    assert code == 1 and summary["reason"] == "WorkerCrashed"
    assert summary["message"] == (
        "rank 2 (node 1, local rank 0) was killed by SIGKILL; the other ranks were stopped"
    )
    code, summary = failure_outcome(2, 0, _failure(11), tmp_path)
    assert code == 11 and summary["reason"] == "DataError"


def test_world_memory_is_the_largest_peak_and_every_ranks():
    from finetune_worker.memory import world_memory_metrics

    gib = 2**30
    ranks = [
        {
            "peakRSSBytes": 5 * gib,
            "peakVRAMBytes": 30 * gib,
            "peakVRAM": "30.0Gi",
            "peakVRAMAllocatedBytes": 28 * gib,
            "device": "cuda",
        },
        {
            "peakRSSBytes": 6 * gib,
            "peakVRAMBytes": 31 * gib,
            "peakVRAM": "31.0Gi",
            "peakVRAMAllocatedBytes": 27 * gib,
            "device": "cuda",
        },
    ]
    metrics = world_memory_metrics(ranks)
    assert metrics["peakVRAMPerRankBytes"] == [30 * gib, 31 * gib]
    assert metrics["peakVRAMBytes"] == 31 * gib and metrics["peakVRAM"] == "31.0Gi"
    assert metrics["peakVRAMAllocatedBytes"] == 28 * gib
    assert metrics["peakRSSBytes"] == 6 * gib and metrics["worldSize"] == 2
    from finetune_api.finetunejob import TrainingMetrics

    TrainingMetrics.model_validate(metrics)  # the status accepts it as it is


# --- train: the world must match the plan ---------------------------------------------


def _write(path: Path, config: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(config))
    return path


def _distributed_config(
    tmp_path, model_root, *, world_size: int, accumulation: int = 1, strategy: str = "ddp", **kwargs
) -> dict:
    # the global batch the plan describes: micro-batch x accumulation x world
    kwargs.setdefault("batchSize", kwargs.get("micro_batch", 4) * accumulation * world_size)
    config = worker_config_dict(tmp_path, model_root, **kwargs)
    config["plan"].update(
        strategy=strategy if world_size > 1 else "single",
        nodes=1,
        processesPerNode=world_size,
        worldSize=world_size,
        gradientAccumulation=accumulation,
    )
    return config


def test_a_plan_for_two_processes_run_as_one_exits_10_naming_plan_world_size(
    tmp_path, tiny_model_root, monkeypatch
):
    from finetune_worker.cli import main

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    log = tmp_path / "termination-log"
    monkeypatch.setenv("FINETUNE_WORKER_TERMINATION_LOG", str(log))
    config = _write(
        tmp_path / "c.yaml", _distributed_config(tmp_path, tiny_model_root, world_size=2)
    )
    assert main(["train", "--config", str(config)]) == 10
    summary = json.loads(log.read_text())
    assert summary["reason"] == "InvalidConfig"
    assert summary["message"].startswith(
        "plan.worldSize is 2 (strategy 'ddp') but the worker runs as one process without torchrun"
    )
    assert "finetune-worker launch --nnodes 1 --nproc-per-node 2" in summary["message"]


# --- real worlds of two processes -----------------------------------------------------


def _run(
    args: list[str], tmp_path: Path, name: str, *, env: dict | None = None, timeout: float = 300
) -> tuple[int, str, Path]:
    """Run the worker to completion; (exit code, output, termination log)."""
    log = tmp_path / f"{name}.termination-log"
    out = tmp_path / f"{name}.out"
    environment = {
        **os.environ,
        "FINETUNE_WORKER_TERMINATION_LOG": str(log),
        "OMP_NUM_THREADS": "1",
        **(env or {}),
    }
    with open(out, "w") as stream:
        code = subprocess.run(
            [*FINETUNE_WORKER, *args],
            check=False,
            stdout=stream,
            stderr=subprocess.STDOUT,
            env=environment,
            timeout=timeout,
        ).returncode
    return code, out.read_text(), log


def _launch(config: Path, world_size: int = 2) -> list[str]:
    return [
        "launch",
        "--nnodes",
        "1",
        "--nproc-per-node",
        str(world_size),
        "--",
        "train",
        "--config",
        str(config),
    ]


def _step_losses(checkpoint: Path) -> list[float]:
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


def _adapter_weights(adapter: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(adapter / "adapter_model.safetensors")


STEPS = 8


def _one_and_two_processes(make_dir, model_root, **config) -> dict[str, SimpleNamespace]:
    """The same global batch trained by one process (micro-batch 2, accumulation 2) and by a
    DDP world of two (micro-batch 2, accumulation 1 each), packed, through the entrypoints a
    pod runs; `config` adds to the worker config."""
    runs = {}
    for name, world_size, accumulation in (("single", 1, 2), ("ddp", 2, 1)):
        tmp = make_dir(name)
        config_file = _write(
            tmp / "worker-config.yaml",
            _distributed_config(
                tmp,
                model_root,
                world_size=world_size,
                accumulation=accumulation,
                fmt="alpaca",
                packing=True,
                micro_batch=2,
                **config,
            ),
        )
        summaries = tmp / "rank-summaries"
        summaries.mkdir()
        args = _launch(config_file) if world_size > 1 else ["train", "--config", str(config_file)]
        started = time.monotonic()
        code, output, log = _run(
            args,
            tmp,
            name,
            env={"FINETUNE_WORKER_RANK_SUMMARY_DIR": str(summaries)} if world_size > 1 else None,
        )
        assert code == 0, output
        runs[name] = SimpleNamespace(
            tmp=tmp,
            output=output,
            summary=json.loads(log.read_text()),
            summaries=summaries,
            seconds=time.monotonic() - started,
        )
    return runs


@pytest.fixture(scope="module")
def one_and_two_processes(tmp_path_factory, tiny_model_root):
    """LoRA with gradient checkpointing (non-reentrant, which DDP needs), over almost three
    epochs, by one process and by two."""
    return _one_and_two_processes(
        tmp_path_factory.mktemp, tiny_model_root, max_steps=STEPS, checkpointing=True
    )


@pytest.mark.slow
def test_two_ddp_processes_train_exactly_what_one_process_accumulating_trains(
    one_and_two_processes,
):
    """Per-step losses and the final adapter of a 2-process DDP world equal one process's.

    Both see the same micro-batches per optimizer step: accelerate deals the packed sampler's
    micro-batches to the ranks in turn (rank r gets r, r + 2, ...), which is the order one
    process accumulates them in, and each epoch has an even number of micro-batches (6), so
    no rank repeats one to even out; the run crosses two epoch boundaries, where the sampler
    reshuffles (accelerate must pass the new epoch to our sampler inside its shard). The
    adapters start from the seed's weights (set_seed before LoRA). The numerics are the same
    too: each micro-batch is computed alone with the same kernels on one thread
    (OMP_NUM_THREADS=1, as torchrun sets for several ranks), each rank's loss is its token sum
    over the whole step's tokens (average_tokens_across_devices) times the world size, and DDP
    averages the two gradients: (2a + 2b) / 2 is exactly a + b in binary floating point, the
    sum one process accumulates. So the runs agree to the last bit here (measured: difference
    0.0); the tolerance of 1e-6 only leaves room for a gloo that sums in another order.
    """
    runs = one_and_two_processes
    single = _step_losses(runs["single"].tmp / "checkpoints" / f"checkpoint-{STEPS}")
    ddp = _step_losses(runs["ddp"].tmp / "checkpoints" / f"checkpoint-{STEPS}")
    assert len(single) == len(ddp) == STEPS
    assert ddp == pytest.approx(single, abs=1e-6, rel=0)
    assert single[-1] < 0.7 * single[0]  # it trained
    one = _adapter_weights(runs["single"].tmp / "out" / "adapter")
    two = _adapter_weights(runs["ddp"].tmp / "out" / "adapter")
    assert one.keys() == two.keys() and one
    for name, weight in one.items():
        assert torch.allclose(two[name], weight, rtol=0, atol=1e-6), name
    # the global batch is micro-batch x accumulation x world: both saw the same tokens
    assert (
        runs["ddp"].summary["metrics"]["trainedTokens"]
        == runs["single"].summary["metrics"]["trainedTokens"]
    )


@pytest.mark.slow
def test_two_ddp_processes_train_an_fp8_base_as_one_process_does(tmp_path, tiny_model_root):
    """`method: fp8` under DDP: the frozen FP8 weights stay out of DDP's broadcasts (gloo
    cannot send float8 at all, and every rank quantises the same weights), and the world
    trains what one process accumulating the same micro-batches trains."""

    def make_dir(name):
        (tmp_path / name).mkdir()
        return tmp_path / name

    runs = _one_and_two_processes(make_dir, tiny_model_root, method="fp8", max_steps=4)
    losses = {
        name: _step_losses(run.tmp / "checkpoints" / "checkpoint-4") for name, run in runs.items()
    }
    assert len(losses["single"]) == 4
    assert losses["ddp"] == pytest.approx(losses["single"], abs=1e-5, rel=0)


def _rows_per_rank(config: dict, world_size: int) -> list[list[int]]:
    """Rows each rank runs per step of the first epoch, from the one-process run's steps: under
    DDP rank r gets the r-th of every world_size consecutive batches of batchSize / world
    examples, which is the r-th slice of one process's step of batchSize examples."""
    from finetune_api import WorkerConfig
    from finetune_worker import packing, train

    worker_config = WorkerConfig.model_validate(config)
    tokenizer = train.load_tokenizer(worker_config, None)
    splits = train.load_training_data(worker_config, tokenizer, None)
    model, _ = train.load_model(worker_config, None, "cpu")
    trainer, _, _ = train.build_trainer(worker_config, model, tokenizer, splits, "cpu", None)
    steps, collate = [], trainer.data_collator
    trainer.data_collator = lambda examples: steps.append(examples) or collate(examples)
    for _ in trainer.get_train_dataloader():
        pass
    share = len(steps[0]) // world_size
    slices = [slice(r * share, (r + 1) * share) for r in range(world_size)]
    return [[len(collate(step[part])[packing.ROWS_KEY]) for part in slices] for step in steps]


@pytest.mark.slow
def test_two_ddp_processes_train_unpacked_steps_of_uneven_rows_as_one_process(
    tmp_path, tiny_model_root
):
    """Unpacked (steps of whole examples split into rows of micro-batch x seqLength tokens):
    a DDP world of two, whose ranks run different numbers of rows in the same step, trains what
    one process does with the whole step. The rows but the last run under no_sync, so each
    rank all-reduces once per step whatever its row count (a rank with one row more would
    otherwise wait for an all-reduce the other never starts), and every row's loss is over
    the whole world's step tokens. The rows differ between the runs (one process packs four
    examples, each rank two), so the numbers agree to rounding, not to the bit."""
    runs = {}
    for name, world_size in (("single", 1), ("ddp", 2)):
        tmp = tmp_path / name
        tmp.mkdir()
        config = _distributed_config(
            tmp,
            tiny_model_root,
            world_size=world_size,
            # the planner's worst case: a row per example
            accumulation=4 // world_size,
            fmt="chat",
            # rows of 64 tokens: two chat examples (16-44 tokens) fit one row or need two
            micro_batch=1,
            seq_length=64,
            batchSize=4,
            max_steps=STEPS,
        )
        if name == "single":
            rows = _rows_per_rank(config, 2)
            assert any(a != b for a, b in rows), rows  # some step: different row counts
            assert max(max(step) for step in rows) == 2
        path = _write(tmp / "worker-config.yaml", config)
        args = _launch(path) if world_size > 1 else ["train", "--config", str(path)]
        code, output, log = _run(args, tmp, name)
        assert code == 0, output
        runs[name] = SimpleNamespace(
            losses=_step_losses(tmp / "checkpoints" / f"checkpoint-{STEPS}"),
            weights=_adapter_weights(tmp / "out" / "adapter"),
            summary=json.loads(log.read_text()),
        )
    single, ddp = runs["single"], runs["ddp"]
    assert len(single.losses) == len(ddp.losses) == STEPS
    # the first step, from the same weights: the same loss up to summation order
    assert ddp.losses[0] == pytest.approx(single.losses[0], rel=1e-6)
    # later steps: the bf16 base rounds the slightly different updates (the rows' gradients
    # summed in another order) differently now and then (measured: equal to 1e-7 for six
    # steps, then 1e-3), as in the FSDP test
    assert ddp.losses == pytest.approx(single.losses, abs=2e-2)
    assert single.losses[-1] < 0.7 * single.losses[0]  # it trained
    assert single.weights.keys() == ddp.weights.keys() and single.weights
    for name, weight in single.weights.items():
        assert torch.allclose(ddp.weights[name], weight, rtol=0, atol=3e-3), name
    assert ddp.summary["metrics"]["trainedTokens"] == single.summary["metrics"]["trainedTokens"]


@pytest.mark.slow
def test_only_rank_0_writes_the_adapter_and_summary_and_reports_the_world(one_and_two_processes):
    run = one_and_two_processes["ddp"]
    assert [p.name for p in run.summaries.iterdir()] == ["rank-0.json"]
    assert json.loads((run.summaries / "rank-0.json").read_text()) == run.summary
    summary = run.summary
    assert summary["result"] == "Succeeded" and summary["exitCode"] == 0
    metrics = summary["metrics"]
    assert metrics["worldSize"] == 2 and metrics["device"] == "cpu"
    assert metrics["peakRSSBytes"] > 100 * 2**20 and metrics["tokensPerSecond"] > 0
    assert "rank 0 INFO finetune_worker.adapter: adapter written" in run.output
    assert "rank 1 INFO finetune_worker.adapter" not in run.output
    assert [p.name for p in (run.tmp / "out").iterdir()] == ["adapter"]
    from finetune_worker.adapter import verify_adapter

    manifest = verify_adapter(run.tmp / "out" / "adapter")
    assert manifest.metrics.world_size == 2
    # one checkpoint marker, written after both ranks saved their part
    from finetune_worker.checkpoints import checkpoint_problem

    checkpoint = run.tmp / "checkpoints" / f"checkpoint-{STEPS}"
    assert checkpoint_problem(checkpoint, summary["specHash"]) is None
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(
        json.loads((checkpoint / "COMPLETE").read_text())["files"]
    )


def _children(pid: int) -> dict[int, int]:
    """{LOCAL_RANK: pid} of the launcher's rank processes, from /proc."""
    ranks = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            if parent != pid:
                continue
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        for item in environ:
            if item.startswith(b"LOCAL_RANK="):
                ranks[int(item.split(b"=", 1)[1])] = int(entry.name)
    return ranks


def _start_long_run(tmp_path, tiny_model_root, **training):
    config = _write(
        tmp_path / "worker-config.yaml",
        _distributed_config(
            tmp_path, tiny_model_root, world_size=2, fmt="completion", max_steps=100_000, **training
        ),
    )
    log = tmp_path / "termination-log"
    out = tmp_path / "launch.out"
    env = {
        **os.environ,
        "FINETUNE_WORKER_TERMINATION_LOG": str(log),
        # bound how long torchrun waits for the other rank after stopping it
        "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "30",
    }
    with open(out, "w") as stream:
        proc = subprocess.Popen(
            [*FINETUNE_WORKER, *_launch(config)], stdout=stream, stderr=subprocess.STDOUT, env=env
        )
    return proc, out, log


def _wait_exit(proc, timeout: float) -> int:
    return (
        wait_for(lambda: proc.poll() is not None, timeout=timeout, what="the launcher to exit")
        and proc.returncode
    )


@pytest.mark.slow
def test_a_killed_rank_ends_the_world_within_a_deadline_naming_the_rank(tmp_path, tiny_model_root):
    proc, out, log = _start_long_run(tmp_path, tiny_model_root)
    try:
        wait_for(
            lambda: (
                "rank 0 INFO finetune_worker.callbacks: step 3/" in out.read_text()
                or proc.poll() is not None
            ),
            timeout=180,
            what="training to run",
        )
        assert proc.poll() is None, out.read_text()
        ranks = _children(proc.pid)
        assert sorted(ranks) == [0, 1], ranks
        os.kill(ranks[1], signal.SIGKILL)
        killed = time.monotonic()
        code = _wait_exit(proc, timeout=60)
        print(f"launcher exited {time.monotonic() - killed:.1f} s after the SIGKILL")
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 1, out.read_text()
    summary = json.loads(log.read_text())
    assert summary["exitCode"] == 1 and summary["reason"] == "WorkerCrashed"
    assert summary["message"].startswith(
        "rank 1 (node 0, local rank 1) was killed by SIGKILL; the other ranks were stopped"
    ), summary
    # the other rank was stopped too: no rank outlives the launcher
    assert not any(Path(f"/proc/{pid}").exists() for pid in ranks.values())


@pytest.mark.slow
@pytest.mark.parametrize("target", ["launcher", "rank 1"])
def test_sigterm_checkpoints_every_rank_at_one_step_and_exits_143(
    tmp_path, tiny_model_root, target
):
    """SIGTERM to the launcher (a preempted pod) reaches every rank through torchrun; SIGTERM
    to one rank alone must still stop them all at one step (the ranks agree each step), or
    that rank's collective save would wait forever for the others."""
    from finetune_worker.checkpoints import MARKER, find_resumable_checkpoint

    proc, out, log = _start_long_run(tmp_path, tiny_model_root, checkpointSteps=1000)
    try:
        wait_for(
            lambda: (
                "rank 0 INFO finetune_worker.callbacks: step 3/" in out.read_text()
                or proc.poll() is not None
            ),
            timeout=180,
            what="training to run",
        )
        assert proc.poll() is None, out.read_text()
        pid = proc.pid if target == "launcher" else _children(proc.pid)[1]
        os.kill(pid, signal.SIGTERM)
        code = _wait_exit(proc, timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = out.read_text()
    assert code == 143, output
    summary = json.loads(log.read_text())
    assert summary["result"] == "Preempted", summary
    step = summary["progress"]["step"]
    checkpoints = tmp_path / "checkpoints"
    assert (
        find_resumable_checkpoint(checkpoints, summary["specHash"])
        == checkpoints / f"checkpoint-{step}"
    )
    assert (checkpoints / f"checkpoint-{step}" / MARKER).is_file()
    assert "rank 1 WARNING finetune_worker.callbacks: received SIGTERM" in output
    if target == "rank 1":
        assert "rank 0 WARNING finetune_worker.callbacks: another rank received SIGTERM" in output


@pytest.mark.slow
def test_a_ranks_data_error_makes_the_launcher_exit_11_not_1(tmp_path, tiny_model_root):
    from tinymodel import DATA_DIR

    config = _write(
        tmp_path / "worker-config.yaml",
        _distributed_config(
            tmp_path,
            tiny_model_root,
            world_size=2,
            fmt="alpaca",
            data_dir=DATA_DIR / "corrupt",
            dataset_file="alpaca-bad-json.jsonl",
        ),
    )
    code, output, log = _run(_launch(config), tmp_path, "corrupt", timeout=180)
    assert code == 11, output
    summary = json.loads(log.read_text())
    assert summary["reason"] == "DataError" and "alpaca-bad-json.jsonl" in summary["message"]


@pytest.mark.slow
def test_fsdp_on_the_cpu_is_refused_with_exit_16(tmp_path, tiny_model_root):
    """accelerate shards with FSDP only on accelerators: on the CPU it would silently train
    unsharded replicas (measured with accelerate 1.15: FSDP2 config ignored, MULTI_CPU;
    FSDP1 fails in its plugin: "There are currently no available devices found")."""
    config = _write(
        tmp_path / "worker-config.yaml",
        _distributed_config(tmp_path, tiny_model_root, world_size=2, strategy="fsdp", fmt="text"),
    )
    code, output, log = _run(_launch(config), tmp_path, "fsdp", timeout=180)
    assert code == 16, output
    assert (
        "plan.strategy is 'fsdp', but FSDP through accelerate needs a GPU"
        in json.loads(log.read_text())["message"]
    )


@pytest.mark.slow
@pytest.mark.skipif(
    torch.cuda.device_count() < 2,
    reason="FSDP through accelerate needs two GPUs; on the CPU the worker refuses it (test above)",
)
@pytest.mark.parametrize("shape", ["packed", "unpacked, uneven rows"])
def test_two_fsdp_processes_train_what_one_process_accumulating_trains(
    tmp_path, tiny_model_root, shape
):
    """As the DDP test, sharded: FSDP reduce-scatters the same averaged gradients. bf16
    autocast on GPUs and a different reduction (reduce-scatter of flat shards) make the
    numbers close rather than equal: losses within 1e-3, adapter weights within 1e-3.
    Unpacked, with the rows of the DDP test (ranks with different row counts in some steps):
    every rank runs as many rows as the busiest, the extra ones empty, or the ranks' parameter
    gathers would not pair up. Its rows differ from one process's, so its later steps drift
    as in the DDP test. (Not yet run: it needs two GPUs.)"""
    unpacked = shape != "packed"
    if unpacked:
        data = dict(fmt="chat", packing=False, micro_batch=1, seq_length=64, batchSize=4)
    else:
        data = dict(fmt="alpaca", packing=True, micro_batch=2)
    losses, weights = {}, {}
    for name, world_size, accumulation, strategy in (
        ("single", 1, 4 if unpacked else 2, "single"),
        ("fsdp", 2, 2 if unpacked else 1, "fsdp"),
    ):
        tmp = tmp_path / name
        tmp.mkdir()
        config = _distributed_config(
            tmp,
            tiny_model_root,
            world_size=world_size,
            accumulation=accumulation,
            strategy=strategy,
            max_steps=STEPS,
            **data,
        )
        if unpacked and name == "single":
            rows = _rows_per_rank(config, 2)
            assert any(a != b for a, b in rows), rows
        path = _write(tmp / "worker-config.yaml", config)
        args = _launch(path) if world_size > 1 else ["train", "--config", str(path)]
        code, output, _ = _run(args, tmp, name)
        assert code == 0, output
        losses[name] = _step_losses(tmp / "checkpoints" / f"checkpoint-{STEPS}")
        weights[name] = _adapter_weights(tmp / "out" / "adapter")
    assert len(losses["fsdp"]) == len(losses["single"]) == STEPS
    if unpacked:
        assert losses["fsdp"][0] == pytest.approx(losses["single"][0], abs=1e-3)
    assert losses["fsdp"] == pytest.approx(losses["single"], abs=2e-2 if unpacked else 1e-3)
    for name, weight in weights["single"].items():
        assert torch.allclose(weights["fsdp"][name], weight, atol=3e-3 if unpacked else 1e-3), name


def test_a_plan_made_for_fsdp_refuses_to_train_an_unsharded_model():
    """Seen on one H200: QLoRA under strategy fsdp trained exactly like one plain process."""
    import torch

    from finetune_worker.errors import WorkerEnvironmentError
    from finetune_worker.train import require_sharded

    plain = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(WorkerEnvironmentError, match="plan.strategy is fsdp"):
        require_sharded(plain)

    class FullyShardedDataParallel(torch.nn.Module):  # the wrapper's name is what is checked
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

    require_sharded(FullyShardedDataParallel(plain))


def test_fsdp_units_wrap_each_lora_matrix_and_keep_every_parameter_dtype():
    """The worker's FSDP configuration (measured on one GPU with 2 gloo ranks,
    bench/fsdp_ranks_on_one_gpu.py): no mixed-precision policy, so the first steps are
    identical to one process; each LoRA matrix its own unit, apart from the frozen layers."""
    from types import SimpleNamespace

    from peft import LoraConfig, get_peft_model
    from torch.distributed.fsdp import MixedPrecision

    from finetune_worker.train import configure_fsdp

    base = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["0", "1"]))
    plugin = SimpleNamespace(
        auto_wrap_policy=None,
        mixed_precision_policy=MixedPrecision(
            param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16, buffer_dtype=torch.bfloat16
        ),
    )
    configure_fsdp(plugin, model)
    assert plugin.mixed_precision_policy is None
    lora_a = model.base_model.model[0].lora_A["default"]
    assert plugin.auto_wrap_policy(module=lora_a, recurse=False, nonwrapped_numel=16)
    assert not plugin.auto_wrap_policy(
        module=model.base_model.model[0].base_layer, recurse=False, nonwrapped_numel=72
    )
