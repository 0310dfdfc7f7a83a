"""One level-based reconcile pass for an AdapterDeployment: observe, decide, apply, report.

AdapterDeployments share vLLM servers (see builders/server_group.py), so a pass is about the
server groups this object touches, not only the object: the group it belongs to now, and
any group whose server still lists it as an owner (it moved, or it was deleted). Each
group's Deployment and Service are rebuilt from the group's current members and applied
server-side; a group left without a servable adapter loses its server. Then the object's
own status is written once, only if it changed.

Called for every event of an AdapterDeployment (DELETED included), of a server
Deployment (for each AdapterDeployment it serves), of a FineTuneJob an adapter refers to,
and by the periodic resync.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from pydantic import ValidationError

from finetune_api import adapter_checks
from finetune_api.adapterdeployment import AdapterDeployment, AdapterSource
from finetune_api.common import API_VERSION
from finetune_api.constants import (
    ADAPTER_MANIFEST_FILENAME,
    LABEL_COMPONENT,
    LABEL_SERVER,
    Phase,
    Reason,
)
from finetune_api.constants import ConditionType as C
from finetune_api.finetunejob import FineTuneJob
from finetune_api.worker_config import describe_errors

from .. import events, k8s, references
from ..builders import serving, vllm
from ..builders.server_group import ServingDefaults, served_base_name, server_config, server_name
from ..builders.serving import Member
from ..builders.storage import locate
from ..builders.vllm import ServedAdapter
from ..conditions import find, set_condition
from ..constants import SERVER_COMPONENT
from .settings import OperatorSettings

log = logging.getLogger(__name__)
KIND = "AdapterDeployment"
SERVER_SELECTOR = f"{LABEL_COMPONENT}={SERVER_COMPONENT}"


@dataclass
class AdapterDecision:
    """What this pass decided for one adapter of one AdapterDeployment."""

    name: str
    state: str  # Accepted | Pending | Refused (Loaded is reported, not decided)
    reason: str
    message: str
    uri: str | None = None
    sha256: str | None = None
    rank: int | None = None
    fine_tune_job: dict | None = None
    served: ServedAdapter | None = None


@dataclass
class Desired:
    """One AdapterDeployment with its server config and adapter decisions."""

    body: dict
    ad: AdapterDeployment
    config: dict
    server: str
    decisions: list[AdapterDecision] = field(default_factory=list)
    missing: list[references.Missing] = field(default_factory=list)
    """Secrets and PVCs it names that do not exist (this pass)."""

    @property
    def name(self) -> str:
        return self.ad.metadata.name

    def member(self) -> Member | None:
        served = tuple(d.served for d in self.decisions if d.served is not None)
        if not served:
            return None
        return Member(
            name=self.name,
            uid=self.ad.metadata.uid,
            replicas=self.ad.spec.replicas,
            adapters=served,
        )


# --- observe + decide: adapters ---------------------------------------------------------------


def _local_dir(uri: str, settings: OperatorSettings) -> str | None:
    """`<pvc_root>/<claim>/<path>` for a pvc:// URI, when the dev setting provides one."""
    if not settings.pvc_root or not uri.startswith("pvc://"):
        return None
    return os.path.join(settings.pvc_root, uri[len("pvc://") :])


def _facts_from_job(ftj: FineTuneJob, name: str) -> dict:
    model = ftj.spec.model
    return {
        "name": name,
        "baseModel": {
            k: v
            for k, v in (("name", model.name), ("uri", model.uri), ("revision", model.revision))
            if v
        },
        "revisionDeclared": True,
        "r": ftj.spec.lora.r,
        "targetModules": list(ftj.spec.lora.target_modules),
        "useDoRA": ftj.spec.lora.use_do_ra,
    }


def _claim(uri: str | None) -> str | None:
    return locate(uri).claim if uri else None


def server_references(ad: AdapterDeployment) -> list[references.Reference]:
    """What the whole server needs: without one of these no pod of it starts."""
    spec = ad.spec
    refs = []
    if spec.hf_token_secret_ref:
        refs.append(
            references.Reference(
                "Secret",
                spec.hf_token_secret_ref.name,
                "spec.hfTokenSecretRef",
                spec.hf_token_secret_ref.key,
            )
        )
    if spec.storage_secret_ref:
        refs.append(
            references.Reference("Secret", spec.storage_secret_ref.name, "spec.storageSecretRef")
        )
    for field_name, uri in (
        ("spec.baseModel.uri", spec.base_model.uri),
        ("spec.baseModel.tokenizer", spec.base_model.tokenizer),
    ):
        if uri and (claim := _claim(uri)):
            refs.append(references.Reference("PersistentVolumeClaim", claim, field_name))
    return refs


def adapter_reference(
    index: int, source: AdapterSource, jobs: dict[str, dict]
) -> references.Reference | None:
    """The PVC one adapter is read from, with the field that names it."""
    if source.uri is not None:
        claim, where = _claim(source.uri), f"spec.adapters[{index}].uri"
    else:
        job = jobs.get(source.fine_tune_job_ref.name) or {}
        uri = ((job.get("status") or {}).get("adapter") or {}).get("uri") or (
            (job.get("spec") or {}).get("output") or {}
        ).get("uri")
        claim = _claim(uri)
        where = f"the adapter URI of FineTuneJob {source.fine_tune_job_ref.name!r}"
    return references.Reference("PersistentVolumeClaim", claim, where) if claim else None


def decide_adapter(
    source: AdapterSource,
    ad: AdapterDeployment,
    config: dict,
    jobs: dict[str, dict],
    settings: OperatorSettings,
    missing: list[references.Missing] = (),
) -> AdapterDecision:
    """Accept, wait for, or refuse one adapter, with the reason people will read.

    `missing`: the Secrets and PVCs of the deployment that do not exist; an adapter that
    needs one waits for it (a pod mounting a missing claim never schedules, and one pod
    held back holds back the whole shared server)."""
    spec_limit = ad.spec.max_lora_rank
    facts: dict = {"name": source.name}
    sha256 = None
    job_ref = None
    uri = source.uri
    if source.fine_tune_job_ref is not None:
        job_name = source.fine_tune_job_ref.name
        body = jobs.get(job_name)
        if body is None:
            return AdapterDecision(
                source.name,
                "Pending",
                Reason.FINE_TUNE_JOB_NOT_FOUND,
                f"adapter {source.name!r}: FineTuneJob {job_name!r} not found in namespace "
                f"{ad.metadata.namespace}; create it or fix adapters[].fineTuneJobRef",
            )
        job_ref = {
            "name": job_name,
            "namespace": ad.metadata.namespace,
            "uid": body["metadata"].get("uid"),
        }
        try:
            ftj = FineTuneJob.model_validate(body)
        except ValidationError as exc:
            return AdapterDecision(
                source.name,
                "Refused",
                Reason.INVALID_SPEC,
                f"adapter {source.name!r}: FineTuneJob {job_name!r} has an invalid spec "
                f"({_one_line(exc)}); fix it or point adapters[].fineTuneJobRef elsewhere",
                fine_tune_job=job_ref,
            )
        status = body.get("status") or {}
        phase = status.get("phase") or Phase.PENDING
        if phase == Phase.FAILED:
            return AdapterDecision(
                source.name,
                "Refused",
                Reason.FINE_TUNE_JOB_FAILED,
                f"adapter {source.name!r}: FineTuneJob {job_name!r} failed; it has no adapter "
                "to serve",
                fine_tune_job=job_ref,
            )
        if phase != Phase.SUCCEEDED:
            return AdapterDecision(
                source.name,
                "Pending",
                Reason.ADAPTER_NOT_READY,
                f"adapter {source.name!r}: waiting for FineTuneJob {job_name!r} to succeed "
                f"(phase {phase})",
                fine_tune_job=job_ref,
            )
        artifact = status.get("adapter") or {}
        uri = artifact.get("uri") or ftj.spec.output.uri
        sha256 = artifact.get("sha256")
        facts = _facts_from_job(ftj, source.name)

    claim = _claim(uri)
    blocking = [
        m
        for m in missing
        if m.reference.kind == "Secret"
        or m.reference.field.startswith("spec.baseModel")
        or (m.reference.name == claim and claim is not None)
    ]
    if blocking:
        what = " and ".join(m.describe() for m in blocking)
        return AdapterDecision(
            source.name,
            "Pending",
            blocking[0].reason,
            f"adapter {source.name!r}: waiting for {what} in namespace "
            f"{ad.metadata.namespace}; it is served as soon as "
            f"{'it exists' if len(blocking) == 1 else 'they exist'}",
            uri=uri,
            sha256=sha256,
            fine_tune_job=job_ref,
        )

    problems: list[list[str]] = []
    local = _local_dir(uri, settings)
    if local is not None:
        # Dev/demo only: the operator can read the volume, so it runs the file checks the
        # init container would run, and refuses before a pod is ever created.
        file_problems, manifest_facts = adapter_checks.verify_adapter_dir(
            local,
            {
                "name": source.name,
                "sha256": sha256,
                "uri": uri,
                "manifest": ADAPTER_MANIFEST_FILENAME,
            },
        )
        problems += file_problems
        if source.fine_tune_job_ref is None:
            facts = {**facts, **manifest_facts}
            # The digest of what was checked: it goes into the pod template, so new files
            # roll the server, and the init container checks the pod sees these files.
            sha256 = manifest_facts.get("sha256")
        else:  # the spec says what was asked; the manifest what was resolved
            for key in ("r", "targetModules", "useDoRA", "modulesToSave"):
                if manifest_facts.get(key) is not None:
                    facts[key] = manifest_facts[key]
    problems += adapter_checks.adapter_problems(facts, vllm.server_check_inputs(config, spec_limit))
    rank = facts.get("r")
    if problems:
        return AdapterDecision(
            source.name,
            "Refused",
            problems[0][0],
            "; ".join(m for _, m in problems),
            uri=uri,
            sha256=sha256,
            rank=rank,
            fine_tune_job=job_ref,
        )
    served = ServedAdapter(
        name=source.name,
        uri=uri,
        deployment=ad.metadata.name,
        max_rank=rank if rank is not None else min(spec_limit, vllm.VLLM_LORA_RANKS[-1]),
        sha256=sha256,
        fine_tune_job=job_ref["name"] if job_ref else None,
    )
    return AdapterDecision(
        source.name,
        "Accepted",
        Reason.ADAPTERS_COMPATIBLE,
        "",
        uri=uri,
        sha256=sha256,
        rank=rank,
        fine_tune_job=job_ref,
        served=served,
    )


def _refuse_name_conflicts(group: list[Desired]) -> None:
    """Model names are unique per server, and bound: the oldest AdapterDeployment that lists
    a name owns it, whatever its adapter's state this pass. An owner whose adapter waits
    (its job runs) or is refused (its files are unreadable for a moment) keeps the name,
    so a client asking for it never gets another AdapterDeployment's adapter."""
    group.sort(key=lambda d: (d.body["metadata"].get("creationTimestamp") or "", d.name))
    owners: dict[str, str] = {}
    for d in group:
        base_name = served_base_name(d.config)
        for dec in d.decisions:
            owner = owners.setdefault(dec.name, d.name)
            if dec.name != base_name and owner == d.name:
                continue
            what = (
                "the base model's name"
                if dec.name == base_name
                else f"an adapter of AdapterDeployment {owner!r}, the oldest that lists "
                "it (it keeps the name while it lists it, served or not)"
            )
            dec.state, dec.reason, dec.served = "Refused", Reason.ADAPTER_NAME_CONFLICT, None
            dec.message = (
                f"adapter {dec.name!r}: on the shared server this name belongs to "
                f"{what}; rename adapters[].name"
            )


# --- the pass ---------------------------------------------------------------------------------


async def reconcile(namespace: str, name: str, settings: OperatorSettings) -> None:
    defaults = settings.serving
    # --- observe ------------------------------------------------------------------------------
    bodies = [
        b
        for b in await k8s.list_objects(API_VERSION, KIND, namespace)
        if not b["metadata"].get("deletionTimestamp")
    ]
    servers = {
        d["metadata"]["name"]: d
        for d in await k8s.list_objects("apps/v1", "Deployment", namespace, SERVER_SELECTOR)
    }
    desired: dict[str, Desired] = {}
    invalid: dict[str, tuple[dict, str]] = {}
    for body in bodies:
        # One object the API let through but the models refuse (stored before a CRD rule
        # existed, say) must not stop its neighbours: it is left out of every server and
        # told why, and the pass goes on with the others.
        try:
            desired[body["metadata"]["name"]] = _desired(body, defaults)
        except ValidationError as exc:
            invalid[body["metadata"]["name"]] = (body, _one_line(exc))
    me = desired.get(name)

    # The groups this object touches: where it belongs now, and where it was served before.
    affected = {me.server} if me else set()
    affected |= {
        s
        for s, dep in servers.items()
        if any(
            ref.get("kind") == KIND and ref.get("name") == name
            for ref in dep["metadata"].get("ownerReferences") or []
        )
    }
    if not affected:
        if name in invalid:
            await _write_invalid(*invalid[name])
        return
    jobs = {
        j["metadata"]["name"]: j
        for j in await k8s.list_objects(API_VERSION, "FineTuneJob", namespace)
    }
    found: dict[tuple[str, str], dict | None] = {}

    async def missing_of(d: Desired) -> list[references.Missing]:
        refs = server_references(d.ad) + [
            r
            for i, src in enumerate(d.ad.spec.adapters)
            if (r := adapter_reference(i, src, jobs)) is not None
        ]
        out = []
        for ref in refs:
            if (ref.kind, ref.name) not in found:
                found[ref.kind, ref.name] = await k8s.get("v1", ref.kind, namespace, ref.name)
            if (m := references.check(ref, found[ref.kind, ref.name])) is not None:
                out.append(m)
        return out

    # --- decide + apply, per server group ------------------------------------------------------
    applied: dict[str, dict | None] = {}
    for server in sorted(affected):
        group = [d for d in desired.values() if d.server == server]
        for d in group:
            d.missing = await missing_of(d)
            d.decisions = [
                decide_adapter(src, d.ad, d.config, jobs, settings, d.missing)
                for src in d.ad.spec.adapters
            ]
        _refuse_name_conflicts(group)
        members = [m for m in (d.member() for d in group) if m is not None]
        applied[server] = await _apply_server(
            namespace, server, group, members, defaults, servers.get(server)
        )

    # --- report -------------------------------------------------------------------------------
    if name in invalid:
        await _write_invalid(*invalid[name])
    if me is not None:
        deployment = applied.get(me.server)
        pods = []
        if deployment is not None:
            pods = await k8s.list_objects("v1", "Pod", namespace, f"{LABEL_SERVER}={me.server}")
        await _write_status(me, deployment, pods)


def _one_line(exc: ValidationError) -> str:
    return "; ".join(line.strip() for line in describe_errors(exc).splitlines())


def _desired(body: dict, defaults: ServingDefaults) -> Desired:
    ad = AdapterDeployment.model_validate(body)
    config = server_config(ad, defaults)
    return Desired(body, ad, config, server_name(config))


async def _apply_server(
    namespace: str,
    server: str,
    group: list[Desired],
    members: list[Member],
    defaults: ServingDefaults,
    existing: dict | None,
) -> dict | None:
    if not members:
        if existing is not None:
            log.info("removing server %s/%s: no adapter left to serve", namespace, server)
        await k8s.delete("apps/v1", "Deployment", namespace, server)
        await k8s.delete("v1", "Service", namespace, server)
        return None
    config = next(d.config for d in group if d.member() is not None)
    deployment, service = serving.build_server(config, members, defaults)
    await k8s.server_side_apply(service)
    applied = await k8s.server_side_apply(deployment)
    if existing is None:
        log.info(
            "created server %s/%s for %s", namespace, server, ", ".join(m.name for m in members)
        )
    return applied


# --- report -----------------------------------------------------------------------------------


def _rolled_out(deployment: dict) -> bool:
    """Every replica runs the current pod template and is ready."""
    spec_replicas = deployment["spec"].get("replicas", 1)
    st = deployment.get("status") or {}
    return (
        spec_replicas > 0
        and st.get("observedGeneration", 0) >= deployment["metadata"].get("generation", 0)
        and st.get("updatedReplicas", 0) >= spec_replicas
        and st.get("readyReplicas", 0) >= spec_replicas
        and st.get("replicas", 0) == st.get("updatedReplicas", 0)
    )


def pod_failures(pods: list[dict]) -> list[str]:
    """Why server pods cannot start: failed adapter checks, failed fetches, crash loops."""
    failures = []
    for pod in pods:
        st = pod.get("status") or {}
        for cs in (st.get("initContainerStatuses") or []) + (st.get("containerStatuses") or []):
            state = cs.get("state") or {}
            term = state.get("terminated") or (cs.get("lastState") or {}).get("terminated")
            waiting = (state.get("waiting") or {}).get("reason")
            if (
                term
                and term.get("exitCode", 0) != 0
                and (waiting in ("CrashLoopBackOff", "Error") or state.get("terminated"))
            ):
                text = (term.get("message") or term.get("reason") or "").strip()
                failures.append(
                    f"{cs['name']} in pod {pod['metadata']['name']} exited with "
                    f"code {term.get('exitCode')}" + (f": {text}" if text else "")
                )
    return failures


def pod_scheduling_problems(pods: list[dict]) -> list[str]:
    """Why server pods wait for a node: the scheduler's own words (a claim not found, no
    node with the GPUs asked for, a taint not tolerated)."""
    problems = []
    for pod in pods:
        for c in (pod.get("status") or {}).get("conditions") or []:
            if c.get("type") == "PodScheduled" and c.get("status") == "False":
                problems.append(
                    f"pod {pod['metadata']['name']} cannot be scheduled "
                    f"({c.get('reason') or 'Unschedulable'}): "
                    f"{(c.get('message') or '').strip()}"
                )
    return problems


def _adapter_states(me: Desired, loaded: bool) -> list[dict]:
    out = []
    for d in me.decisions:
        state = "Loaded" if (d.state == "Accepted" and loaded) else d.state
        entry = {"name": d.name, "state": state}
        if d.state != "Accepted":
            entry.update({"reason": d.reason, "message": d.message})
        for key, value in (
            ("uri", d.uri),
            ("sha256", d.sha256),
            ("rank", d.rank),
            ("fineTuneJob", d.fine_tune_job),
        ):
            if value is not None:
                entry[key] = value
        out.append(entry)
    return out


def desired_status(me: Desired, deployment: dict | None, pods: list[dict], old: dict) -> dict:
    """The AdapterDeployment's status from its decisions and its server's observed state."""
    generation = me.body["metadata"].get("generation")
    conds = list(old.get("conditions") or [])
    dep_status = (deployment or {}).get("status") or {}
    loaded = deployment is not None and _rolled_out(deployment)
    served = [d for d in me.decisions if d.state == "Accepted"]
    refused = [d for d in me.decisions if d.state == "Refused"]
    pending = [d for d in me.decisions if d.state == "Pending"]
    failures = pod_failures(pods) if deployment is not None else []

    if not served:
        why = refused + pending
        reason = why[0].reason if why else Reason.NO_SERVABLE_ADAPTER
        message = (
            "; ".join(d.message for d in why)
            if why
            else "spec.adapters is empty; add an adapter to serve"
        )
        ready = (False, Reason.NO_SERVABLE_ADAPTER if refused else reason, message)
    elif deployment is not None and deployment["spec"].get("replicas") == 0:
        ready = (False, Reason.SCALED_TO_ZERO, "spec.replicas is 0")
    elif loaded:
        names = ", ".join(d.name for d in served)
        ready = (
            True,
            Reason.REPLICAS_READY,
            f"{dep_status.get('readyReplicas')}/{deployment['spec']['replicas']} replicas "
            f"of {deployment['metadata']['name']} ready, serving {names}"
            + (f"; still waiting for {', '.join(d.name for d in pending)}" if pending else ""),
        )
    else:
        unscheduled = pod_scheduling_problems(pods) if deployment is not None else []
        ready = (
            False,
            Reason.ROLLING_OUT if dep_status.get("readyReplicas") else Reason.REPLICAS_NOT_READY,
            (
                f"{dep_status.get('readyReplicas') or 0}/{deployment['spec']['replicas']} "
                f"replicas of {deployment['metadata']['name']} ready with the current "
                "adapters" + (f"; {'; '.join(unscheduled[:3])}" if unscheduled else "")
            )
            if deployment
            else "creating the server",
        )
    conds = set_condition(conds, C.READY, *ready, generation)
    if me.missing:
        what = " and ".join(m.describe() for m in me.missing)
        resolved = (
            False,
            me.missing[0].reason,
            (
                f"waiting for {what} in namespace {me.ad.metadata.namespace}; what "
                f"needs {'it' if len(me.missing) == 1 else 'them'} is served as soon as "
                f"{'it exists' if len(me.missing) == 1 else 'they exist'}"
            ),
        )
    else:
        resolved = (True, Reason.REFERENCES_FOUND, "every Secret and PVC the spec names exists")
    conds = set_condition(conds, C.REFERENCES_RESOLVED, *resolved, generation)

    if refused:
        degraded = (True, refused[0].reason, "; ".join(d.message for d in refused))
    elif failures:
        degraded = (True, Reason.ADAPTER_LOAD_FAILED, "; ".join(failures[:3]))
    else:
        degraded = (False, "AsExpected", "")
    conds = set_condition(conds, C.DEGRADED, *degraded, generation)

    status = {
        "observedGeneration": generation,
        "conditions": conds,
        "replicas": dep_status.get("replicas", 0),
        "readyReplicas": dep_status.get("readyReplicas", 0),
        "loadedAdapters": [d.name for d in served] if loaded else [],
        "adapters": _adapter_states(me, loaded),
        "baseModelName": served_base_name(me.config),
    }
    if deployment is not None:
        status.update(
            {
                "deploymentName": me.server,
                "serviceName": me.server,
                "endpoint": serving.endpoint(me.config),
            }
        )
    else:
        status.update({"deploymentName": None, "serviceName": None, "endpoint": None})
    return status


def invalid_status(body: dict, errors: str, old: dict) -> dict:
    """The status of an AdapterDeployment the models refuse: not served, and which field."""
    generation = body["metadata"].get("generation")
    message = (
        f"the spec is invalid, so nothing of it is served: {errors}; fix the "
        "field(s) named (the other AdapterDeployments are not affected)"
    )
    conds = list(old.get("conditions") or [])
    conds = set_condition(conds, C.READY, False, Reason.INVALID_SPEC, message, generation)
    conds = set_condition(conds, C.DEGRADED, True, Reason.INVALID_SPEC, message, generation)
    return {
        "observedGeneration": generation,
        "conditions": conds,
        "replicas": 0,
        "readyReplicas": 0,
        "loadedAdapters": [],
        "adapters": [],
        "deploymentName": None,
        "serviceName": None,
        "endpoint": None,
    }


async def _write_invalid(body: dict, errors: str) -> None:
    log.warning(
        "AdapterDeployment %s/%s is invalid and left out of its server: %s",
        body["metadata"]["namespace"],
        body["metadata"]["name"],
        errors,
    )
    old = dict(body.get("status") or {})
    await _write(body, old, invalid_status(body, errors, old))


async def _write_status(me: Desired, deployment: dict | None, pods: list[dict]) -> None:
    old = dict(me.body.get("status") or {})
    await _write(me.body, old, desired_status(me, deployment, pods, old))


async def _write(body: dict, old: dict, new: dict) -> None:
    """Write the status if it changed; then make sure the Event of its Ready transition
    exists (every pass: one after a crash posts what was lost)."""
    if not (
        all(old.get(k) == v for k, v in new.items() if v is not None)
        and all(old.get(k) is None for k, v in new.items() if v is None)
    ):
        await k8s.patch_status(body, new)
    # Whether it was Ready before is history the status does not keep: this pass saw the
    # flip, or this process confirmed a Ready=True Event as the object's last.
    last = events.POSTED.get(body["metadata"].get("uid") or "") or ""
    was_ready = _is_true(old, C.READY) or last.startswith(READY_TRUE)
    await events.ensure(body, ready_transition(new, was_ready=was_ready))


READY_TRUE = f"{C.READY}=True@"


def ready_transition(status: dict, *, was_ready: bool) -> events.Transition | None:
    """The Event-worthy Ready transition `status` describes, or None.

    An Event per Ready flip, and one for each spec generation found invalid (an invalid spec
    is news even to an object that was never ready); an object that was never Ready gets none
    for merely not being ready yet. Known limit: a True -> False flip whose Event was lost in
    a crash is not posted by the restarted operator, which cannot know it was Ready."""
    cond = find(status.get("conditions") or [], C.READY)
    if cond is None:
        return None
    at = cond.get("lastTransitionTime")
    ready = cond.get("status") == "True"
    if ready:
        key = f"{READY_TRUE}{at}"
    elif cond.get("reason") == Reason.INVALID_SPEC:
        key = f"{C.READY}=False@{at}/{Reason.INVALID_SPEC}@{status.get('observedGeneration')}"
    elif was_ready:
        key = f"{C.READY}=False@{at}"
    else:
        return None
    return events.Transition(
        key,
        at,
        "Normal" if ready else "Warning",
        cond["reason"],
        cond.get("message") or cond["reason"],
    )


def _is_true(status: dict, type_: str) -> bool:
    return any(
        c.get("type") == type_ and c.get("status") == "True" for c in status.get("conditions") or []
    )


class References:
    """Which AdapterDeployments take an adapter from which FineTuneJob, as the
    AdapterDeployment watch last said (`note` on each of its events).

    Read on every FineTuneJob event to re-check the deployments waiting for it: a lookup,
    where a list of the namespace's AdapterDeployments per event was most of a burst's
    reads. Knowledge the watch has not delivered yet (just after a start) costs nothing:
    each AdapterDeployment's own first event reconciles it against the job's current state.
    """

    def __init__(self) -> None:
        self._jobs: dict[tuple[str, str], frozenset[str]] = {}

    def note(self, body: dict, deleted: bool = False) -> None:
        md = body.get("metadata") or {}
        key = (md.get("namespace") or "", md.get("name") or "")
        if deleted:
            self._jobs.pop(key, None)
            return
        self._jobs[key] = frozenset(
            ref["name"]
            for adapter in (body.get("spec") or {}).get("adapters") or []
            if (ref := adapter.get("fineTuneJobRef") or {}).get("name")
        )

    def referencing(self, namespace: str, job_name: str) -> list[str]:
        """AdapterDeployments with an adapter from this FineTuneJob (to re-check on its
        events)."""
        return sorted(
            name for (ns, name), jobs in self._jobs.items() if ns == namespace and job_name in jobs
        )


REFERENCES = References()


async def served_by(namespace: str, server: str) -> list[str]:
    """The AdapterDeployments a server Deployment serves (its owners)."""
    if not server:
        return []
    deployment = await k8s.get("apps/v1", "Deployment", namespace, server)
    return [
        ref["name"]
        for ref in ((deployment or {}).get("metadata") or {}).get("ownerReferences") or []
        if ref.get("kind") == KIND
    ]
