"""`finetune-worker train | launch | merge`: the entrypoint of the worker image.

Only argument parsing, logging and the mapping from failures to exit codes live here;
heavy imports happen inside the commands so `--help` is instant. Exit codes are the
contract with the operator's pod failure policy (finetune_api.exit_codes):
0 success, 10 invalid config, 11 data error, 12 CUDA out of memory, 13 non-finite loss,
14 storage error, 15 model load error, 16 worker environment error (preflight.py); 143 when
SIGTERM stopped training after a checkpoint (the pod was preempted and the Job may retry).

`launch` runs `train` as several processes under torchrun (launch.py) when the plan's
worldSize is above 1, and exits with the same codes: the failing rank's, or 1 when a rank
crashed or was killed. Only global rank 0 reports status and writes the adapter and the
summary. Environment read by a distributed run:
  FINETUNE_WORKER_COLLECTIVE_TIMEOUT_SECONDS  how long a rank waits in a collective for its
      peers before failing (default 600): a dead or hung peer ends the job instead of
      holding its GPUs forever
  TORCH_ELASTIC_SHUTDOWN_TIMEOUT  seconds the launcher gives the ranks to checkpoint after
      SIGTERM before killing them (default 150, inside the pod's 180 s grace period)
  JOB_COMPLETION_INDEX  the pod's node rank when `launch --node-rank` is not given
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from finetune_api.exit_codes import PREEMPTED_EXIT_CODE

if TYPE_CHECKING:  # none of these is imported for `--help`
    from finetune_api import WorkerConfig

    from .distributed import World
    from .status import StatusReporter
    from .train import TrainResult

log = logging.getLogger("finetune_worker")

DEFAULT_CONFIG = "/etc/finetune-worker/worker-config.yaml"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="finetune-worker",
        description="Train a LoRA/QLoRA adapter for a FineTuneJob, or merge one into its base.",
    )
    parser.add_argument("--log-level", default=os.environ.get("FINETUNE_WORKER_LOG_LEVEL", "INFO"))
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train the adapter a worker config describes")
    train.add_argument(
        "--config",
        default=os.environ.get("FINETUNE_WORKER_CONFIG", DEFAULT_CONFIG),
        help=f"worker config file (YAML/JSON; default {DEFAULT_CONFIG} or $FINETUNE_WORKER_CONFIG)",
    )

    check = commands.add_parser(
        "preflight",
        help="check that this environment can run a worker config's plan "
        "(C compiler for Triton, fused kernels, bitsandbytes); exit 16 if not",
    )
    check.add_argument(
        "--config",
        default=os.environ.get("FINETUNE_WORKER_CONFIG"),
        help="worker config whose plan to check (default: a GPU LoRA plan with fused kernels)",
    )
    check.add_argument(
        "--device",
        choices=["auto", "cuda", "cpu"],
        default="auto",
        help="check for this device (default: cuda when a GPU is visible)",
    )
    check.add_argument(
        "--no-launch",
        action="store_true",
        help="only the checks that need no GPU: imports, compiler, headers, cache",
    )

    launch = commands.add_parser(
        "launch",
        help="run `train` as several processes (one per GPU) of a torchrun world, "
        "this pod's share of it",
        usage="finetune-worker launch --nnodes M --nproc-per-node N [--node-rank R] "
        "[--master-addr HOST] [--master-port P] -- train --config FILE",
    )
    from .launch import add_arguments as add_launch_arguments

    add_launch_arguments(launch)

    merge = commands.add_parser("merge", help="merge an adapter into its unquantised base model")
    merge.add_argument(
        "--config",
        default=os.environ.get("FINETUNE_WORKER_MERGE_CONFIG"),
        help="merge config written by the operator (MergeConfig YAML); gives "
        "the adapter, output, base model, dtype and claim mounts",
    )
    merge.add_argument(
        "--adapter", help="adapter directory (with its manifest); required without --config"
    )
    merge.add_argument("--output", help="directory for the merged model; required without --config")
    merge.add_argument("--base-model", help="base model path or Hub id (default: the manifest's)")
    merge.add_argument("--revision", help="revision of a Hub base model")
    merge.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    merge.add_argument("--hf-token-file", help="file holding a Hugging Face token")
    merge.add_argument(
        "--claim-mount",
        action="append",
        default=[],
        metavar="CLAIM=PATH",
        help="where a PVC named in the manifest is mounted (repeatable)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format=f"%(asctime)s {rank_prefix()}%(levelname)s %(name)s: %(message)s",
    )
    command = {
        "train": train_command,
        "launch": launch_command,
        "preflight": preflight_command,
        "merge": merge_command,
    }[args.command]
    return command(args)


def rank_prefix() -> str:
    """`rank 1 ` in each log line of a distributed run: the ranks of a pod share its log."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ:
        return f"rank {os.environ['RANK']} "
    return ""


def _summary(result: str, code: int, message: str, *, reason: str | None = None, **extra) -> dict:
    from finetune_api import WorkerExitCode

    if reason is None:
        reason = WorkerExitCode(code).reason if code in iter(WorkerExitCode) else result
    return {"result": result, "exitCode": code, "reason": reason, "message": message, **extra}


def _fail(exc, reporter=None, **extra) -> int:
    from .memory import peak_memory_metrics
    from .termination import write_termination_message

    log.error("%s: %s", type(exc).__name__, exc)
    metrics = peak_memory_metrics()
    if reporter is not None:
        reporter.final(metrics=metrics)
    write_termination_message(
        _summary("Failed", int(exc.exit_code), str(exc), metrics=metrics, **extra)
    )
    return int(exc.exit_code)


def launch_command(args: argparse.Namespace) -> int:
    from .errors import InvalidConfigError
    from .launch import launch, options_from_args, torchrun_args

    options = options_from_args(args)
    try:
        torchrun_args(options)  # refuse bad options before any process starts
    except InvalidConfigError as exc:
        return _fail(exc)
    return launch(options)


def train_command(args: argparse.Namespace) -> int:
    from finetune_api import WorkerConfigError, load_worker_config

    from .distributed import World, shutdown
    from .errors import InvalidConfigError, WorkerError

    try:
        config = load_worker_config(args.config)
    except WorkerConfigError as exc:
        return _fail(InvalidConfigError(str(exc)))
    reporter = make_reporter(config, World.from_environment())
    try:
        from .train import run_training

        result = run_training(config, reporter=reporter)
    except WorkerError as exc:
        return _fail(exc, reporter, specHash=config.spec_hash)
    except Exception as exc:
        # A bug, not a verdict on the job: exit 1 (retryable) but still leave a summary.
        from .termination import write_termination_message

        write_termination_message(
            _summary(
                "Failed",
                1,
                f"{type(exc).__name__}: {exc}",
                reason="WorkerCrashed",
                specHash=config.spec_hash,
            )
        )
        raise
    code = report_success(config, result, reporter)
    shutdown()
    return code


def preflight_command(args: argparse.Namespace) -> int:
    from finetune_api import WorkerConfigError, load_worker_config

    from .errors import InvalidConfigError, WorkerEnvironmentError
    from .preflight import run_preflight

    plan, packing = {"method": "lora", "fused_kernels": True}, False
    if args.config:
        try:
            config = load_worker_config(args.config)
        except WorkerConfigError as exc:
            return _fail(InvalidConfigError(str(exc)))
        plan, packing = config.plan, config.spec.training.packing
    device = args.device
    if device == "auto":
        from .train import training_device

        device = training_device()
    try:
        run_preflight(plan, device, packing=packing, launch=not args.no_launch)
    except WorkerEnvironmentError as exc:
        return _fail(exc)
    print(f"preflight passed for {device}")
    return 0


def make_reporter(config: WorkerConfig, world: World) -> StatusReporter:
    """The status reporter; one per run, on global rank 0 (the other ranks' sends nothing)."""
    from .status import KubeStatusClient, StatusReporter

    patch = config.report.status_patch and world.is_main
    client = KubeStatusClient.from_environment() if patch else None
    if patch and client is None:
        log.warning(
            "status patching is on but there is no in-cluster service account; "
            "the final numbers go to the termination message only"
        )
    return StatusReporter(
        config.job.namespace,
        config.job.name,
        client,
        min_interval_s=config.report.min_interval_seconds,
    )


def report_success(config: WorkerConfig, result: TrainResult, reporter: StatusReporter) -> int:
    from .termination import write_termination_message

    if not result.reports:  # a rank other than 0: rank 0 reports for the world
        return PREEMPTED_EXIT_CODE if result.preempted else 0
    reporter.final(progress=result.progress, metrics=result.metrics)
    if result.preempted:
        message = (
            f"stopped by SIGTERM at step {result.global_step} after saving "
            f"checkpoint-{result.global_step}; a new pod resumes from it"
        )
        write_termination_message(
            {
                "result": "Preempted",
                "exitCode": PREEMPTED_EXIT_CODE,
                "reason": "Preempted",
                "message": message,
                "specHash": config.spec_hash,
                "metrics": result.metrics,
                "progress": result.progress,
            }
        )
        log.warning(message)
        return PREEMPTED_EXIT_CODE
    adapter = {
        "path": str(result.adapter_dir),
        "sha256": result.adapter_digest,
        "sizeBytes": result.adapter_size_bytes,
        "uri": config.spec.output.uri,
    }
    write_termination_message(
        _summary(
            "Succeeded",
            0,
            f"trained {result.global_step} steps"
            + (f", resumed from {result.resumed_from.name}" if result.resumed_from else ""),
            specHash=config.spec_hash,
            metrics=result.metrics,
            progress=result.progress,
            adapter=adapter,
        )
    )
    log.info("done: %s", result.metrics)
    return 0


def merge_command(args: argparse.Namespace) -> int:
    from .errors import InvalidConfigError, WorkerError

    try:
        from .merge import merge_adapter
        from .sources import Source
        from .train import read_secret_file

        mounts = {}
        for item in args.claim_mount:
            claim, sep, path = item.partition("=")
            if not sep or not claim or not path:
                raise InvalidConfigError(f"--claim-mount {item!r} must look like CLAIM=/path")
            mounts[claim] = path
        base = None
        if args.base_model:
            local = Path(args.base_model)
            base = (
                Source(local_path=local)
                if local.is_absolute() or local.exists()
                else Source(hub_id=args.base_model, revision=args.revision)
            )
        if args.config:
            args, base, mounts = _merge_args_from_config(args)
        elif not args.adapter or not args.output:
            raise InvalidConfigError(
                "finetune-worker merge needs --config, or both --adapter and --output"
            )
        token = read_secret_file(args.hf_token_file, "Hugging Face token")
        result = merge_adapter(
            Path(args.adapter),
            Path(args.output),
            base=base,
            claim_mounts=mounts,
            dtype=args.dtype,
            token=token,
        )
    except WorkerError as exc:
        return _fail(exc)
    except Exception as exc:
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            from .errors import OutOfMemoryError

            return _fail(
                OutOfMemoryError(
                    f"out of memory while merging: {exc}; merging needs "
                    "the whole base model in memory at --dtype"
                )
            )
        raise
    from finetune_api import Reason

    from .termination import write_termination_message

    write_termination_message(
        _summary(
            "Succeeded",
            0,
            f"merged into {result.output_dir}",
            reason=Reason.MERGE_COMPLETE,
            base=result.base,
            output=str(result.output_dir),
        )
    )
    return 0


def _merge_args_from_config(args):
    """`--config`: the operator's MergeConfig fills what the options would say."""
    from finetune_api import WorkerConfigError
    from finetune_api.merge_config import load_merge_config
    from finetune_api.worker_config import WorkerPaths

    from .errors import InvalidConfigError
    from .sources import model_source

    try:
        config = load_merge_config(args.config)
    except WorkerConfigError as exc:
        raise InvalidConfigError(str(exc)) from None
    paths = WorkerPaths(
        output_dir=config.output_dir,
        checkpoint_dir=config.output_dir,
        claim_mounts=config.claim_mounts,
    )
    args.adapter, args.output, args.dtype = config.adapter_dir, config.output_dir, config.dtype
    args.hf_token_file = config.hf_token_file
    return args, model_source(config.base_model, paths), dict(config.claim_mounts)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
