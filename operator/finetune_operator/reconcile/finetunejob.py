"""One level-based reconcile pass for a FineTuneJob: observe, decide, apply, report.

Called for every event of the FineTuneJob and of its Job and pods, and by the periodic
resync. Each pass reads the current state, derives the desired children from the spec
and the plan, creates what is missing (deterministic names, so a repeated or interrupted
pass creates nothing twice), and writes the status once, only if it changed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import kopf

from finetune_api.common import API_VERSION, format_bytes
from finetune_api.constants import ConditionType as C
from finetune_api.constants import Phase, Reason
from finetune_api.finetunejob import FineTuneJob, TrainingPlan
from finetune_api.spec_hash import spec_hash

from .. import events, inventory, k8s, metrics, references
from ..builders import followups, training
from ..conditions import find, now, set_condition
from ..planning import PlanningFailed, plan_job
from ..status import Outcome, apply_outcome, observe_training
from .settings import OperatorSettings

log = logging.getLogger(__name__)
KIND = "FineTuneJob"


@dataclass
class Observed:
    body: dict
    ftj: FineTuneJob
    job: dict | None
    pods: list[dict]


async def reconcile(namespace: str, name: str, settings: OperatorSettings) -> None:
    body = await k8s.get(API_VERSION, KIND, namespace, name)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return  # children go with it through owner references and the garbage collector
    ftj = FineTuneJob.model_validate(body)
    old = dict(body.get("status") or {})
    generation = body["metadata"].get("generation")
    status = {**old, "observedGeneration": generation}
    phase = old.get("phase")

    if phase in (Phase.SUCCEEDED, Phase.FAILED) and old.get("specHash") == spec_hash(ftj.spec):
        status = await _finish(body, ftj, status, settings)
        await _write(body, old, status)
        return

    # --- decide: the plan (once per spec) ---------------------------------------------------
    shash = spec_hash(ftj.spec)
    plan = _recorded_plan(old, shash)
    if plan is None:
        try:
            plan = await plan_job(ftj, settings)
        except PlanningFailed as exc:
            if exc.transient:
                # Say why it waits, then let the pass fail so it runs again with backoff.
                await _write(body, old, _planning_waits(status, exc, generation))
                raise
            await _write(body, old, _planning_failed(status, exc, generation))
            return
        status["plan"] = plan.model_dump(mode="json", by_alias=True, exclude_none=True)
        status["specHash"] = shash
        status["conditions"] = set_condition(
            status.get("conditions") or [],
            C.PLANNED,
            True,
            Reason.PLAN_FITS,
            _plan_summary(plan),
            generation,
        )

    # --- decide: what the spec names exists (until the Job does; then the pod says) -------
    job = await k8s.get("batch/v1", "Job", namespace, training.names(name)["job"])
    if job is None:
        missing = [
            m
            for ref in references.references(ftj)
            if (m := references.check(ref, await k8s.get("v1", ref.kind, namespace, ref.name)))
        ]
        status = references.resolve(
            status,
            missing,
            namespace=namespace,
            generation=generation,
            wait_seconds=settings.reference_wait_seconds,
        )
        if missing:
            await _write(body, old, status)
            return

    unshareable = await _claims_not_shareable(ftj, plan)
    if unshareable:
        status = _failed(status, Reason.VOLUME_NOT_SHAREABLE, unshareable, generation)
        await _write(body, old, status)
        return

    # --- apply: children, created once ------------------------------------------------------
    job = await _ensure_children(body, ftj, plan, shash, settings, job)
    job = await _sync_suspend(ftj, job)
    pods = await k8s.list_objects("v1", "Pod", namespace, f"job-name={job['metadata']['name']}")

    # --- report ----------------------------------------------------------------------------
    outcome = observe_training(
        job, pods, user_suspended=ftj.spec.suspend, queued=ftj.spec.resources.queue_name is not None
    )
    status["jobName"] = job["metadata"]["name"]
    status = apply_outcome(status, outcome, generation)
    if outcome.phase == Phase.RUNNING and not status.get("startTime"):
        status["startTime"] = now()
    if outcome.phase.finished:
        status.setdefault("completionTime", now())
        if outcome.termination:
            status = _merge_termination(status, outcome.termination)
        status = await _finish(body, ftj, status, settings)
    await _write(body, old, status)


def _recorded_plan(status: dict, shash: str) -> TrainingPlan | None:
    if status.get("plan") and status.get("specHash") == shash:
        return TrainingPlan.model_validate(status["plan"])
    return None


def _plan_summary(plan: TrainingPlan) -> str:
    return (
        f"{plan.method}, micro-batch {plan.micro_batch_size} x accumulation "
        f"{plan.gradient_accumulation}, gradient checkpointing "
        f"{'on' if plan.gradient_checkpointing else 'off'}, predicted peak "
        f"{format_bytes(plan.estimated_peak_bytes)}"
        + (f" of {format_bytes(plan.budget_bytes)}" if plan.budget_bytes else "")
        + (f": {plan.reason}" if plan.reason else "")
    )


def _not_planned(status: dict, exc: PlanningFailed, generation: int | None) -> dict:
    conds = set_condition(
        status.get("conditions") or [], C.PLANNED, False, exc.reason, str(exc), generation
    )
    return {**status, "conditions": conds}


def _planning_waits(status: dict, exc: PlanningFailed, generation: int | None) -> dict:
    return {**_not_planned(status, exc, generation), "phase": Phase.PLANNING}


def _planning_failed(status: dict, exc: PlanningFailed, generation: int | None) -> dict:
    return _failed(_not_planned(status, exc, generation), exc.reason, str(exc), generation)


def _failed(status: dict, reason: str, message: str, generation: int | None) -> dict:
    failed = apply_outcome(status, Outcome(Phase.FAILED, reason, message), generation)
    return {**failed, "completionTime": status.get("completionTime") or now()}


async def _claims_not_shareable(ftj: FineTuneJob, plan: TrainingPlan) -> str | None:
    """Why the pods of a multi-node job cannot all mount the spec's PVCs, or None.

    A ReadWriteOnce claim attaches to one node: the other pods would wait in
    ContainerCreating (Multi-Attach) forever. Access modes are immutable, so this is final.
    Claims that do not exist yet were waited for before (references.py).
    """
    if plan.nodes == 1:
        return None
    for claim, (field_name, writes) in training.claim_fields(ftj).items():
        pvc = await k8s.get("v1", "PersistentVolumeClaim", ftj.metadata.namespace, claim)
        if pvc is None:
            continue
        modes = set((pvc.get("spec") or {}).get("accessModes") or [])
        needed = {"ReadWriteMany"} if writes else {"ReadWriteMany", "ReadOnlyMany"}
        if not modes & needed:
            return (
                f"{field_name} names PVC {claim!r} with access modes {sorted(modes)}, but "
                f"spec.resources.gpu.nodes is {plan.nodes}: every worker pod mounts it, "
                f"each on its own node, which needs {' or '.join(sorted(needed))}. Use such "
                "a claim, or one node (spec.resources.gpu.nodes 1)"
            )
    return None


async def _ensure_children(
    body: dict,
    ftj: FineTuneJob,
    plan: TrainingPlan,
    shash: str,
    settings: OperatorSettings,
    job: dict | None,
) -> dict:
    """Create the children that are missing; -> the Job.

    Without a Job (the first pass, or the Job was deleted) every child goes through
    create-if-absent (`first_children`): this is the moment not to trust knowledge that may
    be a resync old. With a Job, the others are checked against the inventory
    (inventory.py): no request for those known to exist, a POST for those that are not.
    """
    if job is None:
        *others, manifest = first_children(body, ftj, plan, shash, settings)
        for child in others:
            await inventory.create(child)
        job, _ = await inventory.create(manifest)
        return job
    # The worker config is rendered only for a pass that creates it: rendering it (a model
    # round trip and a YAML dump) on every pass was a tenth of the operator's CPU in a burst.
    config = training.config_map_stub(ftj)
    children = await inventory.not_known(_others(ftj, plan, config), settings.resync_seconds)
    for child in children:
        full = training.build_config_map(ftj, plan, shash) if child is config else child
        kopf.adopt(full, owner=body)
        await inventory.create(full)
    return job


def _others(ftj: FineTuneJob, plan: TrainingPlan, config: dict) -> list[dict]:
    """The children other than the Job, `config` for the worker ConfigMap, in creation order."""
    rendezvous = training.build_rendezvous_service(ftj, plan)
    return [config, *training.build_rbac(ftj), *([rendezvous] if rendezvous else [])]


def first_children(
    body: dict, ftj: FineTuneJob, plan: TrainingPlan, shash: str, settings: OperatorSettings
) -> list[dict]:
    """Every child of a FineTuneJob without a Job, owned by it, in the order they are
    created: the Job last, as its pods must find their ServiceAccount and config.

    Also what `bench/scale.py --floor` creates without the operator, so that the floor it
    measures is for the very objects the operator creates."""
    children = [
        *_others(ftj, plan, training.build_config_map(ftj, plan, shash)),
        training.build_training_job(
            ftj,
            plan,
            shash,
            default_image=settings.worker_image,
            default_tolerations=settings.gpu_tolerations,
        ),
    ]
    for child in children:
        kopf.adopt(child, owner=body)
    return children


async def _sync_suspend(ftj: FineTuneJob, job: dict) -> dict:
    """spec.suspend drives Job.spec.suspend; a Kueue-managed Job is un-suspended by Kueue."""
    want = ftj.spec.suspend
    have = bool(job["spec"].get("suspend"))
    if want == have or (not want and ftj.spec.resources.queue_name):
        return job
    return await k8s.merge_patch(
        "batch/v1",
        "Job",
        job["metadata"]["namespace"],
        job["metadata"]["name"],
        {"spec": {"suspend": want}},
    )


def _merge_termination(status: dict, summary: dict) -> dict:
    """Fill what the worker could not patch itself from its termination message (an
    api.WorkerReport, validated when read: its metrics are status metrics already)."""
    status = dict(status)
    from_term = summary.get("metrics") or {}
    if from_term:
        status["metrics"] = {**from_term, **(status.get("metrics") or {})}
    adapter = summary.get("adapter")
    if adapter and adapter.get("uri") and not status.get("adapter"):
        # status.adapter is the report's Artifact without the pod-local path
        status["adapter"] = {k: v for k, v in adapter.items() if k != "path"}
    return status


async def _finish(body: dict, ftj: FineTuneJob, status: dict, settings: OperatorSettings) -> dict:
    """Follow-ups of a successful job: created once, recorded in status."""
    if status.get("phase") != Phase.SUCCEEDED:
        return status
    follow = dict(status.get("followUp") or {})
    for key, build in (
        ("merge", followups.build_adapter_merge),
        ("deployment", followups.build_adapter_deployment),
    ):
        if follow.get(key):
            continue  # created before: deleting it later does not bring it back
        child = build(ftj, status)
        if child is None:
            continue
        kopf.adopt(child, owner=body)
        obj, _ = await k8s.create_if_absent(child)
        follow[key] = {
            "name": obj["metadata"]["name"],
            "namespace": obj["metadata"]["namespace"],
            "uid": obj["metadata"]["uid"],
        }
    if follow:
        status = {**status, "followUp": follow}
    return status


def _comparable(status: dict) -> dict:
    return {k: v for k, v in status.items() if k not in ("progress", "metrics")}


async def _write(body: dict, old: dict, status: dict) -> None:
    """Write status only if the operator's part changed; then make sure the Event of the
    phase it describes exists (every pass: one after a crash posts what was lost)."""
    # Progress and metrics belong to the worker: never written back from a stale read,
    # except metrics the operator filled from the termination message.
    new = {k: v for k, v in status.items() if k != "progress"}
    # The reason behind the phase, as a field: `kubectl get ftj -o wide` shows it.
    new["reason"] = (_phase_condition(new) or {}).get("reason")
    if new.get("metrics") == old.get("metrics"):
        new.pop("metrics", None)
    if not (_comparable(new) == _comparable(old) and "metrics" not in new):
        await k8s.patch_status(body, new)
        if new.get("phase") != old.get("phase"):
            metrics.TRANSITIONS.labels(phase=new.get("phase")).inc()
    await events.ensure(body, transition_event(new))


# The conditions that follow the phase (apply_outcome): one of them flips with every phase
# change, so the latest of their transition times is when the current phase began.
LIFECYCLE = (C.SUSPENDED, C.QUEUED, C.RUNNING, C.SUCCEEDED, C.FAILED)


def transition_event(status: dict) -> events.Transition | None:
    """The Event of the phase `status` is in: the phase's condition's reason and message."""
    phase = status.get("phase")
    cond = _phase_condition(status) or {}
    return events.phase_transition(
        status,
        LIFECYCLE,
        type="Warning" if phase == Phase.FAILED else "Normal",
        reason=cond.get("reason") or phase,
        message=f"{phase}: {cond.get('message') or f'phase is now {phase}'}",
    )


def _phase_condition(status: dict) -> dict | None:
    wanted = {
        Phase.FAILED: C.FAILED,
        Phase.SUCCEEDED: C.SUCCEEDED,
        Phase.RUNNING: C.RUNNING,
        Phase.QUEUED: C.QUEUED,
        Phase.SUSPENDED: C.SUSPENDED,
    }.get(status.get("phase"), C.PLANNED)
    waiting = find(status.get("conditions") or [], C.REFERENCES_RESOLVED)
    if wanted == C.PLANNED and waiting and waiting.get("status") == "False":
        return waiting  # Pending because a Secret or PVC is missing
    if wanted == C.PLANNED and status.get("jobName"):
        wanted = C.RUNNING  # Pending with a Job: why its pod is not running (yet, or again)
    for c in status.get("conditions") or []:
        if c["type"] == wanted:
            return c
    return None
