"""kopf entry point: registers handlers and start-up settings, nothing else.

Run with `kopf run -m finetune_operator.main` (or `finetune-operator run`). Every
handler hands off to one reconcile function per kind, with the operator's settings, which
the start-up handler reads from the environment once (`memo.operator_settings`); importing
this module reads nothing. A handler starts the pass as a task of its own and returns
(`start_pass`): kopf holds the event it delivered (the body and its own copies of it) until
the handler returns, and during a burst a pass waits for a slot behind hundreds of others.
Handlers are `on.event`:
level-triggered, no per-object progress annotations and no finalizers, so the operator
never writes to a user's object except its status subresource (GitOps tools see no
drift) and deletion is left to owner references and the garbage collector.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import logging
import os
import sys
import time
from datetime import UTC, datetime, timedelta

import kopf

from finetune_api.common import API_VERSION, GROUP, VERSION
from finetune_api.constants import (
    LABEL_ADAPTERMERGE,
    LABEL_COMPONENT,
    LABEL_FINETUNEJOB,
    LABEL_SERVER,
    MANAGED_BY,
)

from . import coalesce, heap, k8s, kubeconfig, metrics, requeue, resync, urgency
from .coalesce import Priority
from .constants import SERVER_COMPONENT
from .reconcile import adapterdeployment, adaptermerge, finetunejob
from .reconcile.settings import OperatorSettings

log = logging.getLogger("finetune_operator")

RECONCILERS = {
    "FineTuneJob": finetunejob.reconcile,
    "AdapterMerge": adaptermerge.reconcile,
    "AdapterDeployment": adapterdeployment.reconcile,
}
# One pass at a time per object, and at most one more waiting (coalesce.py): an event of the
# FineTuneJob and several of its Job and pods may arrive together; the pass that starts
# after them sees them all.
PASSES = coalesce.Coalescer()
# What the FineTuneJob events showed of each job's completion, for its passes' priority.
URGENCY = urgency.Urgency()


# At most this many passes at once, over all objects (FINETUNE_MAX_CONCURRENT_PASSES), by
# priority, then in order (coalesce.Slots). Set at start-up.
_pass_slots: coalesce.Slots | None = None
# Freed memory back to the OS when the passes drain (heap.py); a no-op until start-up finds
# glibc's malloc_trim.
HEAP = heap.Trimmer()
CONFLICT_ATTEMPTS = 4
RETRIES = requeue.RetryQueue()


async def _attempts(
    settings: OperatorSettings, kind: str, namespace: str, name: str, priority: Priority
) -> Exception | None:
    """The pass, with its conflict retries, once a slot is free; -> what made it fail, or
    None. The last pass of a burst, the one that leaves no pass running or waiting, gives
    freed memory back to the OS on its way out (heap.py, rate-limited)."""
    slot = _pass_slots.hold(priority, (kind, namespace, name)) if _pass_slots else None
    async with slot or contextlib.nullcontext():
        failure = await _attempts_now(settings, kind, namespace, name)
    HEAP.worked()
    if _pass_slots is None or not _pass_slots.busy:
        HEAP.quiet()
    return failure


async def _attempts_now(
    settings: OperatorSettings, kind: str, namespace: str, name: str
) -> Exception | None:
    failure: Exception | None = None
    started = time.monotonic()
    for attempt in range(CONFLICT_ATTEMPTS):
        try:
            await RECONCILERS[kind](namespace, name, settings)
            failure = None
            break
        except k8s.Conflict as exc:
            metrics.API_RETRIES.labels(kind=kind).inc()
            log.debug(
                "conflict on %s %s/%s (attempt %d); reconciling again",
                kind,
                namespace,
                name,
                attempt + 1,
            )
            failure = exc
        except k8s.Gone as exc:
            log.debug("%s %s/%s went away during the pass: %s", kind, namespace, name, exc)
            failure = None
            break
        except Exception as exc:
            metrics.RECONCILE_ERRORS.labels(kind=kind, error=type(exc).__name__).inc()
            failure = exc
            break
    metrics.RECONCILE_SECONDS.labels(kind=kind).observe(time.monotonic() - started)
    return failure


async def run_reconcile(
    settings: OperatorSettings,
    kind: str,
    namespace: str,
    name: str,
    *,
    priority: Priority = Priority.OTHER,
) -> None:
    """One pass for the object, repeated at once on a write conflict (a fresh read settles
    it), or nothing when a pass for it is already waiting to start (coalesce.py). A pass
    that still fails for a reason that passes (the API's 429 or 5xx after k8s._call's own
    attempts, a dropped connection, a conflict on every attempt) is scheduled again with
    backoff (requeue.py): kopf does not retry `on.event` handlers, and waiting for the next
    event or resync could take minutes. Nothing escapes to kopf. Passes take free slots by
    `priority` (urgency.py); a request answered by the pass already waiting for the object
    lends that pass its priority."""
    key = (kind, namespace, name)
    outcome: list[Exception | None] = []

    async def one_pass() -> None:
        outcome.append(await _attempts(settings, kind, namespace, name, priority))

    if _pass_slots is not None and priority < Priority.OTHER:
        # A pass for the object that waits for a slot, or will wait behind the running one,
        # answers this request (coalesce.py): it goes as early as this one would.
        _pass_slots.raise_priority(key, priority)
    if not await PASSES.run(key, one_pass):
        return  # the pass waiting to start reads what this one would have
    failure = outcome[0]
    if failure is None:
        RETRIES.succeeded(key)
        return
    reason = requeue.retry_reason(failure)
    if reason is None:
        metrics.RECONCILE_FAILURES.labels(kind=kind, error=type(failure).__name__).inc()
        log.error(
            "reconcile of %s %s/%s failed; the next event or resync runs it again",
            kind,
            namespace,
            name,
            exc_info=failure,
        )
        return
    code, retry_after = reason
    delay = RETRIES.retry(key, retry_after, lambda: _requeued_pass(settings, kind, namespace, name))
    metrics.RECONCILE_REQUEUES.labels(kind=kind, code=code).inc()
    log.warning(
        "reconcile of %s %s/%s failed for now (%s: %s); running it again in %.1fs",
        kind,
        namespace,
        name,
        code,
        failure,
        delay,
    )


# The passes the event handlers started, until each is done (`start_pass`).
_STARTED: set[asyncio.Task] = set()


def start_pass(
    settings: OperatorSettings,
    kind: str,
    namespace: str,
    name: str,
    *,
    priority: Priority = Priority.OTHER,
) -> None:
    """`run_reconcile` as a task of its own, so that the event handler returns at once.

    kopf keeps an event (its body, kopf's copies of it, the handler's arguments) alive until
    the handler returns. Awaiting the pass in the handler held each event as long as its pass
    waited for a slot: in a burst of 1,000 FineTuneJobs, their Jobs and pods, thousands of
    bodies at once, and the heap they grew stayed with the process once freed (CPython
    returns its small-object memory only in whole arenas). The task holds only the key.
    Nothing is lost: the pass reads the object afresh, and the coalescer (coalesce.py) gives
    the events of one object at most one pass running and one waiting, as before."""
    task = asyncio.get_running_loop().create_task(
        run_reconcile(settings, kind, namespace, name, priority=priority),
        name=f"pass {kind} {namespace}/{name}",
    )
    _STARTED.add(task)
    task.add_done_callback(_pass_done)


def _pass_done(task: asyncio.Task) -> None:
    _STARTED.discard(task)
    if not task.cancelled() and task.exception() is not None:  # run_reconcile lets none out
        log.error("%s raised", task.get_name(), exc_info=task.exception())


async def started_passes() -> None:
    """Until every pass the handlers started (and those started meanwhile) is done."""
    while _STARTED:
        await asyncio.gather(*list(_STARTED), return_exceptions=True)


async def _requeued_pass(settings: OperatorSettings, kind: str, namespace: str, name: str) -> None:
    # A standby that took over no lead since the failure must not write: kopf pauses its
    # watchers when outranked, not this queue.
    try:
        if await outranked(settings):
            log.debug("a higher-priority operator is active; no re-run of %s/%s", namespace, name)
            return
    except Exception:  # the pass itself meets the same API and says what is wrong
        pass
    await run_reconcile(settings, kind, namespace, name)


@kopf.on.login()
def login(**_) -> kopf.ConnectionInfo:
    """kopf's watches authenticate as k8s.py's requests do (kubeconfig.py): the pod's service
    account, or the kubeconfig. kopf calls this again when the API server answers 401 (a
    rotated token), and its own default would pick a client library's loader instead."""
    credentials = kubeconfig.load()
    token = credentials.bearer_token()
    return kopf.ConnectionInfo(
        server=credentials.server,
        ca_path=credentials.ca_file,
        ca_data=credentials.ca_data,
        insecure=credentials.insecure or None,
        certificate_path=credentials.cert_file,
        certificate_data=credentials.cert_data,
        private_key_path=credentials.key_file,
        private_key_data=credentials.key_data,
        scheme="Bearer" if token else None,
        token=token,
        default_namespace=credentials.namespace,
        proxy_url=credentials.proxy_url,
        trust_env=k8s.trust_environment(),
    )


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_) -> None:
    """Everything the operator does once, in order: its own settings first (a bad value
    stops it here, as kopf never retries a permanent error), then kopf's, the API client,
    the metrics endpoint and the periodic resync."""
    try:
        ours = OperatorSettings.from_env()
    except ValueError as exc:
        raise kopf.PermanentError(f"invalid operator environment: {exc}") from exc
    memo.operator_settings = ours
    global _pass_slots, HEAP
    _pass_slots = coalesce.Slots(ours.max_concurrent_passes)
    HEAP = heap.Trimmer(trim=heap.libc_malloc_trim())
    # Our own annotation prefix and finalizer name, should kopf ever need them.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    # A watch that goes silent (a dropped connection no one noticed) is restarted.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 30
    settings.networking.request_timeout = 60
    # Proxies from the environment for kopf's watches as for our own requests (k8s.py).
    settings.networking.trust_env = k8s.trust_environment()
    # Only warnings of kopf's own go to Kubernetes Events; ours are posted explicitly.
    settings.posting.level = logging.WARNING
    settings.peering.name = ours.peering_name
    settings.peering.stealth = True
    if ours.peering:
        # An active/standby pair: without its peering object an operator must wait, not
        # run unpaired next to the other one.
        settings.peering.mandatory = True
    else:
        settings.peering.standalone = True
    _kopf_settings.append(settings)
    await k8s.connect()
    _start_metrics_server(ours.metrics_port)
    memo.resync = asyncio.get_running_loop().create_task(_resync_forever(ours))


def _start_metrics_server(port: int) -> None:
    from prometheus_client import start_http_server

    if port:
        try:
            start_http_server(port)
        except OSError as exc:  # a second operator in the same pod network (tests)
            log.warning("metrics endpoint not started on :%s: %s", port, exc)


@kopf.on.cleanup()
async def shutdown(memo: kopf.Memo, **_) -> None:
    # The resync's passes, spread over its interval, are nearly always under way, and so
    # may be those the handlers started: they stop before the client they use is closed.
    resync_task = getattr(memo, "resync", None)
    if resync_task is not None:
        resync_task.cancel()
        await asyncio.gather(resync_task, return_exceptions=True)
    started = list(_STARTED)
    for task in started:
        task.cancel()
    await asyncio.gather(*started, return_exceptions=True)
    RETRIES.cancel_all()
    await k8s.close()


@kopf.on.probe(id="apiserver")
async def apiserver_reachable(**_) -> str:
    await k8s.list_objects(API_VERSION, "FineTuneJob", None)
    return "ok"


@kopf.on.event(GROUP, VERSION, "finetunejobs")
async def finetunejob_event(
    type: str, name: str, namespace: str, memo: kopf.Memo, status: dict | None = None, **_
) -> None:
    priority = URGENCY.finetunejob((namespace, name), status, deleted=type == "DELETED")
    if type != "DELETED":
        start_pass(memo.operator_settings, "FineTuneJob", namespace, name, priority=priority)


@kopf.on.event(GROUP, VERSION, "adaptermerges")
async def adaptermerge_event(type: str, name: str, namespace: str, memo: kopf.Memo, **_) -> None:
    if type != "DELETED":
        start_pass(memo.operator_settings, "AdapterMerge", namespace, name)


@kopf.on.event(GROUP, VERSION, "adapterdeployments")
async def adapterdeployment_event(
    type: str, body: kopf.Body, name: str, namespace: str, memo: kopf.Memo, **_
) -> None:
    adapterdeployment.REFERENCES.note(body, deleted=type == "DELETED")
    # DELETED too: the shared server drops the adapters (or goes) with the deployment.
    start_pass(memo.operator_settings, "AdapterDeployment", namespace, name)


@kopf.on.event("apps", "v1", "deployments", labels=MANAGED_BY)
async def server_event(meta: dict, namespace: str, memo: kopf.Memo, **_) -> None:
    # A vLLM server is owned by every AdapterDeployment it serves.
    for ref in meta.get("ownerReferences") or []:
        if ref.get("kind") == "AdapterDeployment":
            start_pass(memo.operator_settings, "AdapterDeployment", namespace, ref["name"])


@kopf.on.event("", "v1", "pods", labels={**MANAGED_BY, LABEL_COMPONENT: SERVER_COMPONENT})
async def server_pod_event(labels: dict, namespace: str, memo: kopf.Memo, **_) -> None:
    # A server pod that cannot start (a failed adapter check) degrades its deployments now,
    # not at the next resync.
    for ad_name in await adapterdeployment.served_by(namespace, labels.get(LABEL_SERVER, "")):
        start_pass(memo.operator_settings, "AdapterDeployment", namespace, ad_name)


@kopf.on.event(GROUP, VERSION, "finetunejobs")
async def finetunejob_adapters_event(name: str, namespace: str, memo: kopf.Memo, **_) -> None:
    # An adapter waiting for this job is served as soon as the job succeeds.
    for ad_name in adapterdeployment.REFERENCES.referencing(namespace, name):
        start_pass(memo.operator_settings, "AdapterDeployment", namespace, ad_name)


def _owner_kind(labels: dict) -> tuple[str, str] | None:
    if labels.get(LABEL_ADAPTERMERGE):
        return "AdapterMerge", labels[LABEL_ADAPTERMERGE]
    if labels.get(LABEL_FINETUNEJOB):
        return "FineTuneJob", labels[LABEL_FINETUNEJOB]
    return None


def _child_event(
    settings: OperatorSettings, labels: dict, namespace: str, finished: bool, event_type: str
) -> None:
    owner = _owner_kind(labels)
    if not owner:
        return
    priority = Priority.OTHER
    if finished and owner[0] == "FineTuneJob":
        key = (namespace, owner[1])
        priority = URGENCY.child_finished(key, deleted=event_type == "DELETED")
    start_pass(settings, owner[0], namespace, owner[1], priority=priority)


@kopf.on.event("batch", "v1", "jobs", labels=MANAGED_BY)
async def job_event(
    type: str, labels: dict, namespace: str, memo: kopf.Memo, status: dict | None = None, **_
) -> None:
    finished = urgency.job_finished(status)
    _child_event(memo.operator_settings, labels, namespace, finished, type)


@kopf.on.event("", "v1", "pods", labels=MANAGED_BY)
async def pod_event(
    type: str, labels: dict, namespace: str, memo: kopf.Memo, status: dict | None = None, **_
) -> None:
    finished = urgency.pod_finished(status)
    _child_event(memo.operator_settings, labels, namespace, finished, type)


async def _resync_forever(settings: OperatorSettings) -> None:
    """Level-based safety net: every object reconciled once per interval, events or not,
    the passes spread over the interval (resync.py)."""
    await resync.run_forever(settings.resync_seconds, lambda: resync_once(settings))


def _watched(namespace: str, settings: OperatorSettings) -> bool:
    return not settings.namespaces or any(
        fnmatch.fnmatchcase(namespace, pattern) for pattern in settings.namespaces
    )


_kopf_settings: list[kopf.OperatorSettings] = []


async def outranked(settings: OperatorSettings) -> bool:
    """Whether a live peer of higher priority holds the lead (we are the paused standby).

    kopf pauses its own watchers then, but not this resync task; the rule is kopf's: a
    peer counts until its lastseen + lifetime has passed.
    """
    if not _kopf_settings or _kopf_settings[0].peering.standalone:
        return False
    peering = _kopf_settings[0].peering
    if peering.clusterwide:
        obj = await k8s.get("kopf.dev/v1", "ClusterKopfPeering", None, peering.name)
    else:
        first = next((n for n in settings.namespaces if not any(c in n for c in "*?[")), None)
        obj = await k8s.get("kopf.dev/v1", "KopfPeering", first, peering.name) if first else None
    now = datetime.now(UTC)
    for info in ((obj or {}).get("status") or {}).values():
        try:
            seen = datetime.fromisoformat(info["lastseen"])
            alive = seen + timedelta(seconds=int(info.get("lifetime", 60))) > now
        except (KeyError, TypeError, ValueError):
            continue
        if alive and int(info.get("priority", 0)) > peering.priority:
            return True
    return False


# A resync pass that starts later than this share of the interval after its place says so.
RESYNC_BEHIND_WARNING = 0.25


async def resync_once(settings: OperatorSettings) -> None:
    """One resync cycle: list every object, then reconcile each at its place in the
    interval (resync.py), at most `resync_concurrency` at a time."""
    if await outranked(settings):
        log.debug("a higher-priority operator is active; standby skips the resync")
        return
    # Exact names are listed one by one (a namespaced install may not list cluster-wide);
    # patterns, like kopf's own `--namespace 'team-*'`, need a cluster-wide list.
    exact = [n for n in settings.namespaces if not any(c in n for c in "*?[")]
    scopes = exact if exact and len(exact) == len(settings.namespaces) else [None]
    counts: dict[tuple[str, str], int] = {}
    # Only keys are kept for the cycle, not the listed objects: each pass reads its own.
    items: list[tuple[tuple[str, str, str], str]] = []
    for ns in scopes:
        for kind in RECONCILERS:
            for obj in await k8s.list_objects(API_VERSION, kind, ns):
                md = obj["metadata"]
                if not _watched(md["namespace"], settings):
                    continue
                items.append(((kind, md["namespace"], md["name"]), md.get("uid") or md["name"]))
                if kind == "FineTuneJob":
                    key = (md["namespace"], (obj.get("status") or {}).get("phase") or "Pending")
                    counts[key] = counts.get(key, 0) + 1
    metrics.JOBS_BY_PHASE.clear()
    for (ns, phase), n in counts.items():
        metrics.JOBS_BY_PHASE.labels(namespace=ns, phase=phase).set(n)

    async def visit(key: tuple[str, str, str]) -> None:
        await run_reconcile(settings, *key)

    cycle = await resync.run_cycle(
        items, settings.resync_seconds, visit, concurrency=settings.resync_concurrency
    )
    log.info("resync complete: %d FineTuneJobs in %.1fs", sum(counts.values()), cycle.took)
    if cycle.behind > RESYNC_BEHIND_WARNING * settings.resync_seconds:
        log.warning(
            "resync passes started up to %.0fs after their places in the %.0fs interval: "
            "they are slower than objects come (raise FINETUNE_RESYNC_CONCURRENCY or the "
            "interval)",
            cycle.behind,
            settings.resync_seconds,
        )


def main(argv: list[str]) -> int:
    """`finetune-operator run [kopf run options]`: kopf with this module and sane defaults."""
    args = list(argv)
    if not any(a.startswith(("--namespace", "-n", "--all-namespaces", "-A")) for a in args):
        args.append("--all-namespaces")
    os.execvp(sys.executable, [sys.executable, "-m", "kopf", "run", "-m", __name__, *args])
    return 0  # not reached
