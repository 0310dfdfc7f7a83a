"""One level-based reconcile pass for an AdapterMerge: a Job running `finetune-worker merge`."""

from __future__ import annotations

import kopf

from finetune_api.adaptermerge import AdapterMerge
from finetune_api.common import API_VERSION
from finetune_api.constants import ConditionType as C
from finetune_api.constants import Phase, Reason
from finetune_api.finetunejob import ModelSource

from .. import events, k8s
from ..builders import merge
from ..conditions import find, now, set_condition
from ..status import Outcome, apply_outcome, observe_training
from .settings import OperatorSettings

KIND = "AdapterMerge"


async def _adapter_source(am: AdapterMerge) -> tuple[str, ModelSource, int | None] | Outcome:
    """Where the adapter is, which base it belongs to and the base's size if the plan
    knows it; or why we must wait or fail."""
    if am.spec.adapter_uri:
        return am.spec.adapter_uri, am.spec.base_model, None
    ref = am.spec.fine_tune_job_ref.name
    ftj = await k8s.get(API_VERSION, "FineTuneJob", am.metadata.namespace, ref)
    if ftj is None:
        return Outcome(
            Phase.PENDING,
            Reason.FINE_TUNE_JOB_NOT_FOUND,
            f"FineTuneJob {ref!r} (spec.fineTuneJobRef) does not exist in "
            f"namespace {am.metadata.namespace}",
        )
    status = ftj.get("status") or {}
    if status.get("phase") == Phase.FAILED:
        return Outcome(
            Phase.FAILED,
            Reason.FINE_TUNE_JOB_FAILED,
            f"FineTuneJob {ref!r} failed, so there is no adapter to merge",
        )
    if status.get("phase") != Phase.SUCCEEDED:
        return Outcome(
            Phase.PENDING,
            Reason.NOT_STARTED,
            f"waiting for FineTuneJob {ref!r} to succeed "
            f"(phase {status.get('phase') or 'Pending'})",
        )
    uri = (status.get("adapter") or {}).get("uri") or ftj["spec"]["output"]["uri"]
    total_params = (status.get("plan") or {}).get("totalParams")
    return uri, ModelSource.model_validate(ftj["spec"]["model"]), total_params


async def reconcile(namespace: str, name: str, settings: OperatorSettings) -> None:
    body = await k8s.get(API_VERSION, KIND, namespace, name)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return
    am = AdapterMerge.model_validate(body)
    old = dict(body.get("status") or {})
    generation = body["metadata"].get("generation")
    if old.get("phase") in (Phase.SUCCEEDED, Phase.FAILED):
        # A merge is a one-shot computation; its spec is immutable. Its last Event may still
        # be missing (a crash after the status write).
        await events.ensure(body, transition_event(old))
        return

    source = await _adapter_source(am)
    job = None
    if isinstance(source, Outcome):
        outcome = source
    else:
        adapter_uri, base, total_params = source
        for child in (
            merge.build_config_map(am, adapter_uri, base),
            merge.build_merge_job(
                am,
                adapter_uri,
                base,
                default_image=settings.worker_image,
                total_params=total_params,
            ),
        ):
            kopf.adopt(child, owner=body)
            obj, _ = await k8s.create_if_absent(child)
            if child["kind"] == "Job":
                job = obj
        pods = await k8s.list_objects("v1", "Pod", namespace, f"job-name={job['metadata']['name']}")
        outcome = observe_training(job, pods, user_suspended=False, queued=False)
        if outcome.phase == Phase.SUCCEEDED:
            outcome = Outcome(
                Phase.SUCCEEDED,
                Reason.MERGE_COMPLETE,
                f"merged into {am.spec.output.uri}",
                outcome.termination,
            )

    status = {**old, "observedGeneration": generation}
    if job is not None:
        status["jobName"] = job["metadata"]["name"]
    status = apply_outcome(status, outcome, generation)
    # Merges have no queue and no suspend: keep the conditions that mean something here.
    status["conditions"] = [
        c for c in status["conditions"] if c["type"] in (C.RUNNING, C.SUCCEEDED, C.FAILED)
    ]
    if job is not None and outcome.phase == Phase.RUNNING and not status.get("startTime"):
        status["startTime"] = now()
    if outcome.phase.finished:
        status.setdefault("completionTime", now())
    if outcome.phase == Phase.SUCCEEDED:
        summary = outcome.termination or {}
        merged = summary.get("merged") or summary.get("artifact") or {}
        status["merged"] = {
            "uri": am.spec.output.uri,
            **{k: merged[k] for k in ("sizeBytes", "sha256") if k in merged},
        }
        status["conditions"] = set_condition(
            status["conditions"],
            C.SUCCEEDED,
            True,
            Reason.MERGE_COMPLETE,
            outcome.message,
            generation,
        )
    if status != old:
        await k8s.patch_status(body, status)
    await events.ensure(body, transition_event(status, outcome))


# The conditions a merge keeps; each follows the phase (apply_outcome), so the latest of their
# transition times is when the current phase began.
LIFECYCLE = (C.RUNNING, C.SUCCEEDED, C.FAILED)


def transition_event(status: dict, outcome: Outcome | None = None) -> events.Transition | None:
    """The Event of the phase `status` is in: the pass's outcome, or for a finished merge
    (whose passes stop early) its Succeeded or Failed condition, which holds the same."""
    phase = status.get("phase")
    if outcome is None:
        cond_type = {Phase.SUCCEEDED: C.SUCCEEDED, Phase.FAILED: C.FAILED}.get(phase, C.RUNNING)
        cond = find(status.get("conditions") or [], cond_type) or {}
        reason, message = cond.get("reason") or phase, cond.get("message") or ""
    else:
        reason, message = outcome.reason, outcome.message
    return events.phase_transition(
        status,
        LIFECYCLE,
        type="Warning" if phase == Phase.FAILED else "Normal",
        reason=reason,
        message=f"{phase}: {message}",
    )
