"""The cluster's GPU nodes as NVIDIA GPU Feature Discovery labels them, read for the planner.

`method: auto` may give a job that names no `spec.resources.gpu.product` an FP8 base only when
every GPU node that could take it has FP8 tensor cores; planner/gpus.py decides that from
the nodes' labels. This module only reads them: one list of the schedulable (not
cordoned) nodes that carry `nvidia.com/gpu.memory`, metadata only (labels are all the
planner needs; a node's status is most of its bytes), kept for `max_age` seconds
(FINETUNE_GPU_NODES_CACHE_SECONDS) so that a burst of new jobs costs one request rather than
one per job; the passes of a burst wait for the list in flight instead of each sending their
own.

Planning never fails for want of the nodes. A list that is refused (no `list nodes` in the
operator's RBAC, e.g. the chart in namespaces mode without rbac.clusterDiscovery) or that
fails is kept as "unknown" for `max_age` as well: auto then leaves fp8 out and the plan's
reason says why. The warning is logged once, and again only after a list has succeeded.

Nodes come and go while a job waits or runs. Its plan is made once per spec (status.plan),
and an fp8 plan's pods require FP8 nodes by the same labels (builders/training.py), so a
node that joins later cannot make a recorded plan wrong.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from . import k8s
from .constants import GPU_MEMORY_LABEL

log = logging.getLogger(__name__)

NodeLabels = dict[str, dict[str, str]]
"""Node name -> its labels."""


class GpuNodes:
    """The last list of GPU nodes (None: it failed) and when it was sent."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.labels: NodeLabels | None = None
        self.listed_at: float | None = None
        self.warned = False
        self._lock: asyncio.Lock | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def fresh(self, max_age: float) -> bool:
        return self.listed_at is not None and self.clock() - self.listed_at < max_age

    def lock(self) -> asyncio.Lock:
        """The lock of the running event loop: the operator has one, but in-process tests
        run several in turn, and a lock waited on in one cannot be waited on in another."""
        loop = asyncio.get_running_loop()
        if self._lock is None or self._loop is not loop:
            self._lock, self._loop = asyncio.Lock(), loop
        return self._lock


GPU_NODES = GpuNodes()


SCHEDULABLE = "spec.unschedulable=false"
"""Cordoned nodes take no new pods, so they are left out of the list by the API server
(metadata only cannot show `spec.unschedulable`): a cordoned node without FP8 no longer keeps
fp8 out. Uncordoned later, it still never gets an fp8 plan's pods, which require FP8 by the
same labels (builders/training.py)."""


async def list_gpu_node_labels() -> NodeLabels:
    """One list of the schedulable nodes GPU Feature Discovery labelled (metadata only): their
    labels. Raises what the request raises (k8s.REQUEST_FAILURES)."""
    listed = await k8s.list_metadata("v1", "Node", None, GPU_MEMORY_LABEL, SCHEDULABLE)
    return {md["name"]: dict(md.get("labels") or {}) for md in listed}


async def gpu_node_labels(max_age: float, nodes: GpuNodes | None = None) -> NodeLabels | None:
    """The labels of the nodes GPU Feature Discovery labelled, at most `max_age` seconds old;
    None when they could not be listed (logged, never raised)."""
    nodes = nodes or GPU_NODES
    if nodes.fresh(max_age):
        return nodes.labels
    async with nodes.lock():
        if nodes.fresh(max_age):
            return nodes.labels  # listed while this pass waited
        started = nodes.clock()
        try:
            labels = await list_gpu_node_labels()
        except k8s.REQUEST_FAILURES as exc:
            (log.debug if nodes.warned else log.warning)(
                "could not list the cluster's GPU nodes (%s): method auto leaves fp8 out "
                "for jobs that name no spec.resources.gpu.product until a list succeeds "
                "(the operator needs `list` on nodes; the chart's ClusterRole grants it)",
                k8s.describe_failure(exc),
            )
            nodes.warned = True
            labels = None
        else:
            if nodes.warned:
                log.info("listed the cluster's GPU nodes again (%d)", len(labels))
            nodes.warned = False
        nodes.labels, nodes.listed_at = labels, started
    return nodes.labels
