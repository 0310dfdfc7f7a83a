"""The scale benchmark, small: 40 FineTuneJobs created at once on 5 kwok GPU nodes, the
operator (its own process, as the chart runs it) killed with SIGKILL three times while it
creates their Jobs. Every FineTuneJob ends with exactly one Job and one of each child, owned
by it, nothing is orphaned, and every status says what its Job did, within a deadline.

The same code as `make bench-scale` (bench/finetune_bench/scale.py), on the test control
plane, in this test's namespace (the operator it starts watches only that one; the session
operator watches only `op-` namespaces). Its nodes are tainted for its pods alone and are
removed afterwards.
"""

from __future__ import annotations

import pytest
from kubetest import Kube

pytestmark = pytest.mark.cluster

JOBS, NODES, KILLS = 40, 5, 3
DEADLINE_S = 120


def test_a_burst_with_kills_converges_without_duplicates_or_orphans(
    cluster, crds, kube: Kube, tmp_path
):
    from finetune_bench import scale

    cfg = scale.Config(
        jobs=JOBS,
        nodes=NODES,
        kills=KILLS,
        namespace=kube.namespace,
        all_namespaces=False,
        steady_seconds=0,
        timeout=DEADLINE_S,
        workdir=str(tmp_path),
    )
    result = _converged_run(cluster, kube, cfg, tmp_path / "operator.log")
    assert result.kills_done == KILLS, "the kills must fall in the burst of Job creation"
    assert result.duplicates == []
    assert result.orphans == []
    assert result.without_job == []
    assert result.lost_events == []  # each job's Succeeded Event, whatever the kills hit
    # The watches saw each FineTuneJob's Job, and its Succeeded status.
    assert result.latency_n == result.status_lag_n == JOBS
    jobs = kube.items("jobs", "app.kubernetes.io/managed-by=finetune-operator")
    assert sorted(j["metadata"]["name"] for j in jobs) == [
        f"scale-{i:05d}-train" for i in range(JOBS)
    ]
    statuses = [f.get("status", {}) for f in kube.items("finetunejobs")]
    assert [s.get("phase") for s in statuses] == ["Succeeded"] * JOBS


def test_the_floor_creates_each_job_s_children_once_and_nothing_else(
    cluster, crds, kube: Kube, tmp_path
):
    """`bench/scale.py --floor`: the operator's first-pass children, created by the floor
    creator alone (one POST each, no status, no read but the planner's), measured like the
    operator."""
    from finetune_bench import scale

    jobs = 5
    cfg = scale.Config(
        jobs=jobs,
        nodes=1,
        namespace=kube.namespace,
        all_namespaces=False,
        floor=True,
        timeout=DEADLINE_S,
        workdir=str(tmp_path),
    )
    result = _converged_run(cluster, kube, cfg, tmp_path / "floor.log")
    assert (result.duplicates, result.orphans, result.without_job) == ([], [], [])
    children = ("configmaps", "jobs", "rolebindings", "roles", "serviceaccounts")
    posts = {k: n for k, n in result.requests_by_kind.items() if k.startswith("POST ")}
    assert posts == {f"POST {kind}": jobs for kind in children}
    # Besides the creates, only the planner's read of the GPU nodes (gpunodes.py, at most
    # one per plan): the operator plans the same way.
    others = {k: n for k, n in result.requests_by_kind.items() if k not in posts}
    assert set(others) <= {"GET nodes"} and others.get("GET nodes", 0) <= jobs
    assert result.creates == jobs * (1 + len(children))
    assert result.latency_n == jobs
    assert 0 < result.latency_s["max"] <= result.jobs_created_s < DEADLINE_S


def _converged_run(cluster, kube: Kube, cfg, log_path):
    """scale.run with its objects cleaned up after; the result of a run that converged (the
    creator's log tail in the failure message otherwise)."""
    from finetune_bench import scale

    try:
        result = scale.run(cluster, cfg, say=print)
    finally:
        scale.cleanup(cluster, kube.namespace)
    print(result.report())
    log = log_path.read_text(errors="replace")[-3000:]
    assert result.converged, f"not converged in {DEADLINE_S}s:\n{result.report()}\n{log}"
    return result
