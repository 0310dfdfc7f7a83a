"""`finetune-worker launch`: one pod's share of a torchrun world, with the worker's exit codes.

The operator runs it when plan.worldSize > 1:

    finetune-worker launch --nnodes M --nproc-per-node N [--node-rank R]
        [--master-addr HOST] [--master-port P] -- train --config FILE

It builds torchrun's arguments and calls PyTorch's own launcher (`torch.distributed.run`) in
this process, each rank running `python -m finetune_worker.cli train ...`. It adds only what
the worker's contract with the operator needs:

- Rendezvous: one pod uses torchrun's standalone rendezvous on localhost. Several pods use a
  static rendezvous at pod 0 (`--master-addr`, `--master-port`), each pod's node rank being
  its Indexed Job completion index (JOB_COMPLETION_INDEX), so global rank 0, which writes the
  adapter, the status and the summary, is always on pod 0.
- No restarts (`--max-restarts 0`): the Job restarts pods and the run resumes from its last
  checkpoint.
- Exit codes: torchrun exits 1 whatever failed, which would hide the worker's codes (10-16,
  143) from the operator's podFailurePolicy. The launcher exits with the failing rank's code
  when it is one of those, and 1 (retryable) when a rank crashed or was killed by a signal.
- The pod's termination message: each rank writes its summary to a file of its own
  (termination.RANK_SUMMARY_DIR_ENV); the launcher, the only writer of the pod's termination
  log, keeps rank 0's on success, the failing rank's on failure, and writes one naming the
  rank, its node and how it died when that rank left none (a SIGKILL leaves nothing).
- SIGTERM (a preempted pod): torchrun forwards it to the ranks, which agree to save a
  checkpoint at the next step end and exit 143; torchrun waits TORCH_ELASTIC_SHUTDOWN_TIMEOUT
  seconds for them (150 unless set: inside the pod's 180 s grace period) before killing them.
  The launcher then exits 143.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from finetune_api.constants import RENDEZVOUS_PORT
from finetune_api.exit_codes import FAILURE_CODES as WORKER_CODES
from finetune_api.exit_codes import PREEMPTED_EXIT_CODE, WorkerExitCode

from .errors import InvalidConfigError
from .termination import (
    RANK_SUMMARY_DIR_ENV,
    rank_summary_path,
    termination_log_path,
    write_termination_message,
)

if TYPE_CHECKING:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

log = logging.getLogger(__name__)

NODE_RANK_ENV = "JOB_COMPLETION_INDEX"  # set by an Indexed Job in each pod
SHUTDOWN_TIMEOUT_ENV = "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"
SHUTDOWN_TIMEOUT_S = 150
CRASHED_EXIT_CODE = 1  # retryable: the operator's podFailurePolicy counts it against backoff
DISTRIBUTED_COMMANDS = ("train",)


@dataclass(frozen=True)
class LaunchOptions:
    nnodes: int
    nproc_per_node: int
    command: list[str]
    node_rank: int | None = None
    master_addr: str | None = None
    master_port: int = RENDEZVOUS_PORT


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nnodes", type=int, required=True, help="worker pods (torchrun --nnodes)")
    parser.add_argument(
        "--nproc-per-node",
        type=int,
        required=True,
        help="training processes in this pod, one per GPU",
    )
    parser.add_argument(
        "--node-rank",
        type=int,
        help=f"this pod's node rank (default: ${NODE_RANK_ENV}); several pods only",
    )
    parser.add_argument(
        "--master-addr", help="pod 0's address for the static rendezvous; several pods only"
    )
    parser.add_argument(
        "--master-port",
        type=int,
        default=RENDEZVOUS_PORT,
        help=f"the rendezvous port on pod 0 (default {RENDEZVOUS_PORT})",
    )
    parser.add_argument(
        "worker_command",
        nargs=argparse.REMAINDER,
        metavar="-- train ...",
        help="the worker command each rank runs",
    )


def options_from_args(args: argparse.Namespace) -> LaunchOptions:
    command = list(args.worker_command)
    if command[:1] == ["--"]:
        command = command[1:]
    return LaunchOptions(
        nnodes=args.nnodes,
        nproc_per_node=args.nproc_per_node,
        command=command,
        node_rank=args.node_rank,
        master_addr=args.master_addr,
        master_port=args.master_port,
    )


def torchrun_args(options: LaunchOptions, environ: dict[str, str] | None = None) -> list[str]:
    """torchrun's argv for this pod; InvalidConfigError when the options cannot form a world."""
    env = os.environ if environ is None else environ
    if options.nnodes < 1 or options.nproc_per_node < 1:
        raise InvalidConfigError(
            f"launch needs --nnodes and --nproc-per-node >= 1, got "
            f"{options.nnodes} and {options.nproc_per_node}"
        )
    if options.command[:1] != ["train"]:
        raise InvalidConfigError(
            f"launch runs `-- {' '.join(DISTRIBUTED_COMMANDS)} ...` in "
            f"every rank, got {options.command or 'no command'}"
        )
    args = [
        "--nnodes",
        str(options.nnodes),
        "--nproc-per-node",
        str(options.nproc_per_node),
        "--max-restarts",
        "0",
    ]
    if options.nnodes == 1:
        args.append("--standalone")
    else:
        args += [
            "--rdzv-backend",
            "static",
            "--node-rank",
            str(node_rank(options, env)),
            "--master-addr",
            master_addr(options),
            "--master-port",
            str(options.master_port),
        ]
    return [*args, "--module", "finetune_worker.cli", *options.command]


def node_rank(options: LaunchOptions, env: Mapping[str, str]) -> int:
    if options.node_rank is not None:
        rank = options.node_rank
    else:
        raw = env.get(NODE_RANK_ENV)
        if raw is None:
            raise InvalidConfigError(
                f"launch --nnodes {options.nnodes} needs this pod's node rank: pass --node-rank "
                f"or run it in an Indexed Job, which sets {NODE_RANK_ENV}"
            )
        try:
            rank = int(raw)
        except ValueError:
            raise InvalidConfigError(f"{NODE_RANK_ENV} is {raw!r}; expected an integer") from None
    if not 0 <= rank < options.nnodes:
        raise InvalidConfigError(
            f"node rank {rank} is outside 0..{options.nnodes - 1} (--nnodes {options.nnodes})"
        )
    return rank


def master_addr(options: LaunchOptions) -> str:
    if not options.master_addr:
        raise InvalidConfigError(
            f"launch --nnodes {options.nnodes} needs --master-addr, the "
            "address of pod 0 (node rank 0)"
        )
    return options.master_addr


def launch(options: LaunchOptions) -> int:
    """Run the world's ranks on this pod; return the exit code the pod should report."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    pod_log = termination_log_path()
    args = torchrun_args(options)
    node = 0 if options.nnodes == 1 else node_rank(options, os.environ)
    # The ranks inherit the environment: their summaries go to files of their own, in a
    # directory of the launcher's unless the caller names one (to inspect them).
    given = os.environ.get(RANK_SUMMARY_DIR_ENV)
    summaries = Path(given or tempfile.mkdtemp(prefix="finetune-rank-summaries-"))
    os.environ[RANK_SUMMARY_DIR_ENV] = str(summaries)
    os.environ.setdefault(SHUTDOWN_TIMEOUT_ENV, str(SHUTDOWN_TIMEOUT_S))
    log.info("launching torchrun %s", " ".join(args))
    try:
        torchrun.run(torchrun.parse_args(args))
    except ChildFailedError as exc:
        rank, failure = root_failure(exc)
        code, summary = failure_outcome(rank, node, failure, summaries)
    except SignalException as exc:
        code, summary = stopped_outcome(exc.sigval, summaries, options.nproc_per_node)
    except Exception as exc:  # the rendezvous or the agent itself failed: retryable
        log.exception("torchrun failed")
        code, summary = (
            CRASHED_EXIT_CODE,
            {
                "result": "Failed",
                "exitCode": CRASHED_EXIT_CODE,
                "reason": "WorkerCrashed",
                "message": f"torchrun failed on node {node} ({type(exc).__name__}: {exc})",
            },
        )
    else:
        code, summary = 0, first_summary(summaries)
    if summary is not None:
        write_termination_message(summary, pod_log)
    if not given:
        os.environ.pop(RANK_SUMMARY_DIR_ENV, None)
        shutil.rmtree(summaries, ignore_errors=True)
    return code


def root_failure(error: ChildFailedError) -> tuple[int, ProcessFailure]:
    """(global rank, ProcessFailure) that explains the run's failure.

    torchrun reports every rank it found dead in the poll that noticed the first one, and its
    own choice (`get_first_failure`) is the earliest timestamp; but a timestamp is whole
    seconds and, for a rank that left no error file (the worker's ranks write none), the time
    the agent looked, so the ranks of one poll tie. Among them the cause comes before its
    consequences: a worker verdict (one of our exit codes), then a rank that died of a signal
    of its own (SIGKILL, SIGSEGV, ...), then a crash (exit 1, often a collective broken by
    the dead peer), then a rank that checkpointed and exited 143, and last the ranks torchrun
    itself stopped with SIGTERM.
    """
    return min(
        error.failures.items(),
        key=lambda item: (_explains(item[1].exitcode), item[1].timestamp, item[0]),
    )


def _explains(exitcode: int) -> int:
    """How well an exit explains the run's end (lower first; see root_failure)."""
    if exitcode in WORKER_CODES:
        return 0
    if exitcode == -signal.SIGTERM:  # killed by torchrun stopping the others
        return 4
    if exitcode == PREEMPTED_EXIT_CODE:
        # A rank that checkpointed and stopped: the run's end when the ranks agreed to stop
        # (torchrun may kill the slower ones before their own 143), a consequence when
        # another rank crashed first.
        return 3
    return 1 if exitcode < 0 else 2


def failure_outcome(
    rank: int, node: int, failure: ProcessFailure, summaries: Path
) -> tuple[int, dict]:
    """(exit code, summary) of the pod when global rank `rank` failed first."""
    own = read_summary(rank_summary_path(summaries, rank))
    where = f"rank {rank} (node {node}, local rank {failure.local_rank})"
    code = failure.exitcode
    if code in WORKER_CODES or code == PREEMPTED_EXIT_CODE:
        if own is not None:
            return code, own
        reason = WorkerExitCode(code).reason if code in WORKER_CODES else "Preempted"
        return code, {
            "result": "Failed" if code in WORKER_CODES else "Preempted",
            "exitCode": code,
            "reason": reason,
            "message": f"{where} exited with code {code}; the other ranks were stopped",
        }
    if code < 0:
        how = f"was killed by {signal_name(-code)}"
    else:
        how = f"exited with code {code}"
    message = f"{where} {how}; the other ranks were stopped"
    if own is not None:  # a crash the rank could still describe (cli.py's WorkerCrashed)
        own = {
            **own,
            "exitCode": CRASHED_EXIT_CODE,
            "message": f"{message}: {own.get('message', '')}",
        }
        return CRASHED_EXIT_CODE, own
    return CRASHED_EXIT_CODE, {
        "result": "Failed",
        "exitCode": CRASHED_EXIT_CODE,
        "reason": "WorkerCrashed",
        "message": message,
    }


def stopped_outcome(sigval: int, summaries: Path, local_ranks: int) -> tuple[int, dict]:
    """SIGTERM/SIGINT reached the launcher: torchrun forwarded it and waited for the ranks."""
    name = signal_name(int(sigval))
    summary = first_summary(summaries)
    if summary is not None and summary.get("result") == "Preempted":
        return PREEMPTED_EXIT_CODE, summary
    return PREEMPTED_EXIT_CODE, {
        "result": "Preempted",
        "exitCode": PREEMPTED_EXIT_CODE,
        "reason": "Preempted",
        "message": f"{name} stopped the {local_ranks} ranks of this pod before they reported a "
        "checkpoint; a new pod resumes from the last complete one",
    }


def first_summary(summaries: Path) -> dict | None:
    """The summary of the lowest rank that wrote one (rank 0 on pod 0)."""
    files = sorted(summaries.glob("rank-*.json"), key=lambda p: int(p.stem.split("-")[1]))
    for path in files:
        summary = read_summary(path)
        if summary is not None:
            return summary
    return None


def read_summary(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
