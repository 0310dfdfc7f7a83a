"""Trainer callbacks: progress reporting, the non-finite-loss guard, checkpoint marking
and time- or signal-triggered saves.

Every rank of a distributed run runs them; what they decide must be the same on every rank
(a save is collective), and only global rank 0 (`state.is_world_process_zero`) logs progress
and marks checkpoints. Imported only from `train.py`, after transformers is loaded.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

from . import distributed
from .checkpoints import mark_complete
from .errors import NonFiniteLossError
from .status import StatusReporter

if TYPE_CHECKING:
    from types import FrameType

    from transformers import TrainerControl, TrainerState, TrainingArguments

log = logging.getLogger(__name__)


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class ProgressCallback(TrainerCallback):
    """One line per logged step, and rate-limited status updates.

    Throughput and ETA are measured from this process's first step, so a resumed run
    reports its own speed rather than an average diluted by the restart. The steady rate
    leaves out the first STEADY_AFTER_STEPS steps too (Triton's first compiles, the caching
    allocator growing, cuBLAS picking kernels): what the job runs at, for comparing with a
    benchmark, next to the overall rate a user waits through.
    """

    STEADY_AFTER_STEPS = 3

    def __init__(self, reporter: StatusReporter | None):
        self.reporter = reporter
        self._t0: float | None = None
        self._step0 = 0
        self._tokens0 = 0
        self.last_progress: dict = {}
        self.tokens_per_second: float | None = None
        self.seconds = 0.0  # from the first step of this process to the end of training
        self.tokens = 0  # non-padding tokens trained on in that time
        self._steady0: tuple[float, int] | None = None  # (time, tokens) when warm-up ended
        self.steady_seconds = 0.0
        self.steady_tokens = 0

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # The first step, not on_train_begin: the Trainer restores a checkpoint's state
        # after on_train_begin, and the clock should not include loading.
        if self._t0 is None:
            self._t0 = time.perf_counter()
            self._step0 = state.global_step
            self._tokens0 = int(state.num_input_tokens_seen or 0)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._steady0 is None and state.global_step - self._step0 == self.STEADY_AFTER_STEPS:
            self._steady0 = (time.perf_counter(), int(state.num_input_tokens_seen or 0))

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        now = time.perf_counter()
        if self._t0 is not None:
            self.seconds = now - self._t0
            self.tokens = int(state.num_input_tokens_seen or 0) - self._tokens0
        if self._steady0 is not None:
            self.steady_seconds = now - self._steady0[0]
            self.steady_tokens = int(state.num_input_tokens_seen or 0) - self._steady0[1]

    def steady_tokens_per_second(self) -> float | None:
        """Tokens/s since warm-up ended, while training runs or after it ended."""
        if self._steady0 is None:
            return None
        if self.steady_seconds:
            return self.steady_tokens / self.steady_seconds if self.steady_tokens else None
        return None

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        logs = logs or {}
        if "loss" not in logs or self._t0 is None:
            return  # eval and end-of-training summaries are reported by run_training
        elapsed = max(time.perf_counter() - self._t0, 1e-9)
        done = state.global_step - self._step0
        total = state.max_steps or None
        tokens = int(state.num_input_tokens_seen or 0) - self._tokens0
        self.tokens_per_second = tokens / elapsed if tokens else None
        eta = None
        if total and done > 0:
            eta = round((total - state.global_step) * elapsed / done)
        progress = {
            "step": state.global_step,
            "totalSteps": total,
            "epoch": round(float(state.epoch or 0.0), 4),
            "percent": round(100.0 * state.global_step / total, 2) if total else None,
            "loss": _finite_or_none(logs.get("loss")),
            "learningRate": _finite_or_none(logs.get("learning_rate")),
            "etaSeconds": eta,
            "updatedAt": utc_now(),
        }
        progress = {k: v for k, v in progress.items() if v is not None}
        self.last_progress = progress
        if not state.is_world_process_zero:
            return  # one progress line and one reporter per run, not per rank
        log.info(
            "step %s/%s loss %s lr %.3g tokens/s %s eta %ss",
            state.global_step,
            total,
            logs.get("loss"),
            logs.get("learning_rate") or 0.0,
            f"{self.tokens_per_second:.0f}" if self.tokens_per_second else "-",
            eta,
        )
        if self.reporter is not None:
            metrics = (
                {"tokensPerSecond": round(self.tokens_per_second, 2)}
                if self.tokens_per_second
                else {}
            )
            if self._steady0 is not None:
                seconds = time.perf_counter() - self._steady0[0]
                steady = int(state.num_input_tokens_seen or 0) - self._steady0[1]
                if steady and seconds > 0:
                    metrics["steadyTokensPerSecond"] = round(steady / seconds, 2)
            metrics = metrics or None
            self.reporter.update(progress=progress, metrics=metrics)


def _finite_or_none(value):
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


class NonFiniteLossGuard(TrainerCallback):
    """Stops the run after `patience` consecutive NaN/inf losses.

    One bad step can be a fluke that the optimizer survives; several in a row means the
    run has diverged and every further GPU-hour is wasted. Needs `logging_steps=1` and
    `logging_nan_inf_filter=False`, otherwise the Trainer hides the NaNs.
    """

    def __init__(self, patience: int = 3):
        self.patience = patience
        self.consecutive = 0

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        # The logged loss is already the mean over all ranks (the Trainer gathers it), so
        # every rank counts the same steps and stops at the same one.
        if not logs or "loss" not in logs:
            return
        if math.isfinite(float(logs["loss"])):
            self.consecutive = 0
            return
        self.consecutive += 1
        if self.consecutive >= self.patience:
            raise NonFiniteLossError(
                f"the training loss was {logs['loss']} for {self.consecutive} consecutive steps "
                f"(up to step {state.global_step}); the run has diverged. Lower "
                f"spec.training.learningRate (now {args.learning_rate}) or raise warm-up, and "
                "check the data for empty or extreme rows."
            )


class CheckpointCallback(TrainerCallback):
    """Marks each saved checkpoint complete, and triggers saves on time and on SIGTERM.

    A preempted pod gets SIGTERM and a grace period: the handler only sets a flag, and
    the next step end turns it into save + stop, so the save happens on the training
    thread between steps, never in the middle of an optimizer update. Under DDP or FSDP a
    save is a collective: the signal and the clock are per process, so at each step end the
    ranks agree (one all_reduce MAX) to save and stop when any of them would.
    """

    def __init__(
        self, spec_hash: str, *, interval_s: float | None = None, plan: dict | None = None
    ):
        self.spec_hash = spec_hash
        self.plan = plan or {}
        self.interval_s = interval_s
        self.preempted = threading.Event()
        self._last_save = time.monotonic()
        self.saved_steps: list[int] = []

    def request_stop(self, signum: int | None = None, frame: FrameType | None = None) -> None:
        if not self.preempted.is_set():
            log.warning(
                "received %s: saving a checkpoint at the end of this step, then stopping",
                signal.Signals(signum).name if signum else "a stop request",
            )
        self.preempted.set()

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        due = bool(self.interval_s) and time.monotonic() - self._last_save >= self.interval_s
        stop, due = distributed.any_rank(self.preempted.is_set(), due)
        if stop:
            if not self.preempted.is_set():
                log.warning(
                    "another rank received SIGTERM: saving a checkpoint at the end of "
                    "this step, then stopping"
                )
            self.preempted.set()
            control.should_save = True
            control.should_training_stop = True
        elif due:
            control.should_save = True
        return control

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> TrainerControl:
        # Every rank writes part of a checkpoint (its RNG state; FSDP shards): the marker,
        # which vouches for all the files, comes after the last rank has finished.
        distributed.barrier()
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if checkpoint.is_dir():
            if state.is_world_process_zero:
                mark_complete(checkpoint, self.spec_hash, state.global_step, self.plan)
            self.saved_steps.append(state.global_step)
        self._last_save = time.monotonic()
        return control


class SigtermToCheckpoint:
    """Context manager routing SIGTERM to `CheckpointCallback.request_stop` while training."""

    def __init__(self, callback: CheckpointCallback):
        self.callback = callback
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self.callback.request_stop)
        return self.callback

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        return False
