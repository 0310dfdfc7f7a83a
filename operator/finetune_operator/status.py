"""From observed children to a FineTuneJob's status: phase, conditions and reasons.

Pure functions over plain dicts (the Job, its pods, the previous status). The operator
owns phase, conditions, plan, jobName, specHash, adapter, followUp and the times; the
worker owns progress and metrics (it patches them itself), so nothing here writes those
two except from the termination message, when the worker could not reach the API.
"""

from __future__ import annotations

from dataclasses import dataclass

from finetune_api.constants import ConditionType as C
from finetune_api.constants import Phase, Reason
from finetune_api.exit_codes import FAILURE_CODES, WorkerExitCode

from .builders.training import PERMANENT_EXIT_CODES
from .conditions import find, set_condition
from .constants import WORKER_CONTAINER


@dataclass(frozen=True)
class Outcome:
    """What the Job and its pods say, reduced to one phase and one reason."""

    phase: Phase
    reason: str
    message: str
    termination: dict | None = None
    """The worker's JSON summary from its container's termination message, if any."""


def _job_condition(job: dict, type_: str) -> dict | None:
    for c in (job.get("status") or {}).get("conditions") or []:
        if c.get("type") == type_ and c.get("status") == "True":
            return c
    return None


def _terminated(pod: dict) -> dict | None:
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        if cs.get("name") == WORKER_CONTAINER:
            state = cs.get("state") or {}
            return state.get("terminated") or (cs.get("lastState") or {}).get("terminated")
    return None


def termination_summary(pod: dict) -> dict | None:
    """The worker's final report (api.WorkerReport), from `/dev/termination-log`; None when
    there is none or it is not one (FallbackToLogsOnError puts a log tail there)."""
    from pydantic import ValidationError

    from finetune_api.worker_report import WorkerReport

    term = _terminated(pod)
    if not term or not term.get("message"):
        return None
    try:
        report = WorkerReport.model_validate_json(term["message"])
    except (ValidationError, ValueError):
        return None
    return report.model_dump(mode="json", by_alias=True, exclude_none=True)


def _newest(pods: list[dict]) -> list[dict]:
    return sorted(pods, key=lambda p: p["metadata"].get("creationTimestamp") or "", reverse=True)


def _disrupted(pod: dict) -> bool:
    for c in (pod.get("status") or {}).get("conditions") or []:
        if c.get("type") == "DisruptionTarget" and c.get("status") == "True":
            return True
    return (pod.get("status") or {}).get("reason") == "Evicted"


def _worker_verdict(pod: dict) -> bool:
    """Whether the pod's worker exited with one of its documented failure codes."""
    code = (_terminated(pod) or {}).get("exitCode")
    return code in FAILURE_CODES


def explain_pod_failure(pod: dict) -> tuple[str, str]:
    """(reason, message) for a failed worker pod: exit codes, OOM kills, evictions."""
    name = pod["metadata"]["name"]
    if _disrupted(pod):
        return "Evicted", f"pod {name} was evicted or preempted"
    term = _terminated(pod) or {}
    code = term.get("exitCode")
    summary = termination_summary(pod) or {}
    detail = summary.get("error") or summary.get("message") or ""
    if term.get("reason") == "OOMKilled":
        return (
            "HostOutOfMemory",
            (
                f"pod {name} was killed for exceeding its host memory limit (OOMKilled); "
                "raise spec.resources.memory (this is host RAM, not GPU memory)"
            ),
        )
    if code is not None:
        try:
            known = WorkerExitCode(code)
        except ValueError:
            known = None
        if known is not None and known is not WorkerExitCode.SUCCESS:
            text = f"worker exited with code {code} ({known.meaning})"
            return known.reason, f"{text}: {detail}" if detail else text
        text = f"worker in pod {name} exited with code {code}"
        if term.get("message") and not summary:
            text += ": " + term["message"].strip().splitlines()[-1][:300]
        return Reason.POD_FAILED, text
    return Reason.POD_FAILED, f"pod {name} failed: {(pod.get('status') or {}).get('message', '')}"


def observe_training(
    job: dict | None, pods: list[dict], *, user_suspended: bool, queued: bool
) -> Outcome:
    """Reduce the training Job and its pods to one phase with a reason people can act on."""
    if job is None:
        return Outcome(Phase.PENDING, Reason.NOT_STARTED, "creating the training Job")
    newest = _newest(pods)
    complete = _job_condition(job, "Complete") or _job_condition(job, "SuccessCriteriaMet")
    if complete:
        done = [p for p in newest if (p.get("status") or {}).get("phase") == "Succeeded"]
        # In a multi-node job only pod 0 (global rank 0) writes the summary.
        succeeded = next((p for p in done if termination_summary(p)), done[0] if done else None)
        return Outcome(
            Phase.SUCCEEDED,
            Reason.TRAINING_COMPLETE,
            "training finished",
            termination_summary(succeeded) if succeeded else None,
        )
    failed = _job_condition(job, "Failed") or _job_condition(job, "FailureTarget")
    if failed:
        failed_pods = [p for p in newest if (p.get("status") or {}).get("phase") == "Failed"]
        # In a multi-node job the pod whose worker exited with one of its own codes says
        # why; its peers only saw their collectives break.
        failed_pods.sort(key=lambda p: not _worker_verdict(p))
        job_reason = failed.get("reason") or ""
        if job_reason == "DeadlineExceeded":
            return Outcome(
                Phase.FAILED,
                Reason.DEADLINE_EXCEEDED,
                "the Job ran longer than spec.activeDeadlineSeconds "
                f"({job['spec'].get('activeDeadlineSeconds')}s); raise it or "
                "reduce spec.training",
            )
        if failed_pods:
            reason, message = explain_pod_failure(failed_pods[0])
            summary = termination_summary(failed_pods[0])
            if job_reason == "BackoffLimitExceeded" and reason == Reason.POD_FAILED:
                return Outcome(
                    Phase.FAILED,
                    Reason.BACKOFF_LIMIT_EXCEEDED,
                    f"{len(failed_pods)} pod(s) failed, more than spec.backoffLimit "
                    f"({job['spec'].get('backoffLimit')}); last: {message}",
                    summary,
                )
            return Outcome(Phase.FAILED, reason, message, summary)
        return Outcome(
            Phase.FAILED,
            job_reason or Reason.POD_FAILED,
            failed.get("message") or "the training Job failed",
        )
    if (job.get("spec") or {}).get("suspend"):
        if user_suspended:
            return Outcome(
                Phase.SUSPENDED,
                Reason.SUSPENDED_BY_USER,
                "suspended by spec.suspend; checkpoints are kept and training "
                "resumes from the latest one when it is set back to false",
            )
        if queued:
            return Outcome(
                Phase.QUEUED,
                Reason.WAITING_FOR_QUOTA,
                "waiting for Kueue to admit the Job into its ClusterQueue",
            )
    running = [p for p in newest if (p.get("status") or {}).get("phase") == "Running"]
    evicted = [p for p in newest if _disrupted(p)]
    if running:
        if evicted:
            return Outcome(
                Phase.RUNNING,
                "EvictedAndResumed",
                f"{evicted[0]['metadata']['name']} was evicted or preempted; a new "
                "pod resumes from the latest checkpoint",
            )
        retried = [p for p in newest if (p.get("status") or {}).get("phase") == "Failed"]
        if retried:
            reason, message = explain_pod_failure(retried[0])
            return Outcome(
                Phase.RUNNING,
                Reason.RESUMED_FROM_CHECKPOINT,
                f"retrying after a failure ({reason}: {message}); resuming from the "
                "latest checkpoint",
            )
        return Outcome(
            Phase.RUNNING, Reason.TRAINING, f"pod {running[0]['metadata']['name']} is training"
        )
    # The pod is done but the Job controller has not yet marked the Job: still Running,
    # not back to Pending (the next Job event settles it).
    finished = [p for p in newest if (p.get("status") or {}).get("phase") == "Succeeded"]
    if finished and not (job.get("spec") or {}).get("suspend"):
        return Outcome(
            Phase.RUNNING,
            Reason.TRAINING,
            f"pod {finished[0]['metadata']['name']} finished; the Job is completing",
        )
    pending = [p for p in newest if (p.get("status") or {}).get("phase") == "Pending"]
    for pod in pending:
        for c in (pod.get("status") or {}).get("conditions") or []:
            if c.get("type") == "PodScheduled" and c.get("status") == "False":
                return Outcome(
                    Phase.QUEUED,
                    c.get("reason") or "Unschedulable",
                    "no node can run the worker yet: " + (c.get("message") or ""),
                )
    # A failed pod the Job controller has not acted on yet. A permanent exit code fails the
    # Job (podFailurePolicy) and one failure past backoffLimit does too: say Failed now
    # rather than flash a retry that will not happen. Otherwise a new pod is on its way.
    retried = [
        p for p in newest if (p.get("status") or {}).get("phase") == "Failed" and not _disrupted(p)
    ]
    if retried:
        reason, message = explain_pod_failure(retried[0])
        code = (_terminated(retried[0]) or {}).get("exitCode")
        if code in PERMANENT_EXIT_CODES:
            return Outcome(Phase.FAILED, reason, message, termination_summary(retried[0]))
        limit = (job.get("spec") or {}).get("backoffLimit")
        if limit is not None and len(retried) > limit:
            return Outcome(
                Phase.FAILED,
                Reason.BACKOFF_LIMIT_EXCEEDED,
                f"{len(retried)} pod(s) failed, more than spec.backoffLimit "
                f"({limit}); last: {message}",
                termination_summary(retried[0]),
            )
        return Outcome(
            Phase.PENDING,
            Reason.RETRYING_AFTER_FAILURE,
            f"retrying after a failure ({reason}: {message}); a new worker pod is "
            "starting and resumes from the latest checkpoint",
        )
    return Outcome(Phase.PENDING, Reason.PODS_STARTING, "the worker pod is starting")


def apply_outcome(status: dict, outcome: Outcome, generation: int | None) -> dict:
    """Set phase and the lifecycle conditions from an Outcome (returns a new status).

    Each condition's reason must be true of the job when read: `Admitted` only after it
    was queued, a Running reason other than `NotStarted` only once a Job exists
    (`status.jobName`, recorded before this is called)."""
    conds = list(status.get("conditions") or [])
    phase = outcome.phase
    has_job = bool(status.get("jobName"))
    suspended = outcome.reason == Reason.SUSPENDED_BY_USER
    conds = set_condition(
        conds,
        C.SUSPENDED,
        suspended,
        Reason.SUSPENDED_BY_USER if suspended else "NotSuspended",
        outcome.message if suspended else "",
        generation,
    )
    was_queued = (find(conds, C.QUEUED) or {}).get("status") == "True" or (
        (find(conds, C.QUEUED) or {}).get("reason") == Reason.ADMITTED
    )
    conds = set_condition(
        conds,
        C.QUEUED,
        phase == Phase.QUEUED,
        outcome.reason
        if phase == Phase.QUEUED
        else (Reason.ADMITTED if was_queued else Reason.NOT_QUEUED),
        outcome.message if phase == Phase.QUEUED else "",
        generation,
    )
    if phase == Phase.RUNNING or (phase == Phase.PENDING and has_job):
        running = (outcome.reason, outcome.message)  # e.g. PodsStarting, RetryingAfterFailure
    elif phase.finished and has_job:
        running = (phase.value, "")
    else:
        running = (Reason.NOT_STARTED, "")
    conds = set_condition(conds, C.RUNNING, phase == Phase.RUNNING, *running, generation)
    conds = set_condition(
        conds,
        C.SUCCEEDED,
        phase == Phase.SUCCEEDED,
        outcome.reason
        if phase == Phase.SUCCEEDED
        else Reason.IN_PROGRESS
        if not phase.finished
        else outcome.reason,
        outcome.message if phase == Phase.SUCCEEDED else "",
        generation,
    )
    conds = set_condition(
        conds,
        C.FAILED,
        phase == Phase.FAILED,
        outcome.reason if phase == Phase.FAILED else "NoFailure",
        outcome.message if phase == Phase.FAILED else "",
        generation,
    )
    return {**status, "phase": phase.value, "conditions": conds}


def phase_of(status: dict) -> str | None:
    return status.get("phase")


def condition_reason(status: dict, type_: str) -> str | None:
    c = find(status.get("conditions") or [], type_)
    return c.get("reason") if c else None
