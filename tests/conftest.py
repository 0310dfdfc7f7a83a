"""Shared fixtures: one real control plane per test session, a namespace per test."""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import pytest

# The helpers every test area shares (tests/README.md says what each is for) are
# imported by module name, so a test reads `from kubetest import Kube`.
sys.path.insert(0, str(Path(__file__).resolve().parent / "support"))

from kubetest import Kube  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    """A real etcd + kube-apiserver + controller-manager + scheduler + kwok.

    Built from Go modules on first use (cached); if that is impossible the session
    fails with the reason: there is no silent skip.
    """
    from finetune_dev.devcluster import controlplane

    directory = tmp_path_factory.mktemp("cluster")
    c = controlplane.up(directory)
    yield c
    controlplane.down(directory, quiet=True)


@pytest.fixture
def namespace(cluster, request) -> str:
    # Tests that run the operator get "op-" namespaces, the only ones it watches.
    prefix = "op" if "operator_process" in request.fixturenames else "t"
    name = (
        f"{prefix}-{request.node.name[:30].lower().replace('_', '-').strip('-')}-"
        f"{uuid.uuid4().hex[:5]}"
    )
    name = "".join(ch if ch.isalnum() or ch == "-" else "-" for ch in name)
    Kube(cluster).kubectl("create", "namespace", name, namespaced=False)
    yield name
    Kube(cluster).kubectl(
        "delete",
        "namespace",
        name,
        "--wait=false",
        "--ignore-not-found",
        namespaced=False,
        check=False,
    )


@pytest.fixture
def kube(cluster, namespace) -> Kube:
    return Kube(cluster, namespace)


@pytest.fixture(scope="session")
def admin_kube(cluster) -> Kube:
    return Kube(cluster, "default")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def crds(cluster):
    """The generated CRDs, applied and Established."""
    from kubetest import Kube, wait_for

    admin = Kube(cluster)
    admin.kubectl(
        "apply",
        "--server-side",
        "--field-manager=tests",
        "-f",
        str(ROOT / "crds"),
        namespaced=False,
    )
    for crd in ("finetunejobs", "adaptermerges", "adapterdeployments"):
        wait_for(
            lambda crd=crd: (
                admin.kubectl(
                    "get",
                    "crd",
                    f"{crd}.finetune.dev",
                    "-o",
                    "jsonpath={.status.conditions[?(@.type=='Established')].status}",
                    namespaced=False,
                ).stdout
                == "True"
            ),
            what=f"CRD {crd} Established",
        )
    return True


@pytest.fixture(scope="session")
def kueue(cluster):
    """Kueue's controller manager (built from `sigs.k8s.io/kueue` on first use, cached like
    the control plane) with its CRDs, running against the test control plane.

    Started only for the tests that ask for it, stopped at the end of the session. A
    start-up failure names the manager's log; `kueue.describe()` says whether it still
    runs and where the log is, for a test's own failure messages.
    """
    from finetune_dev.devcluster import kueue as kueue_process

    k = kueue_process.start(cluster)
    yield k
    kueue_process.stop(k)


@pytest.fixture(scope="session")
def operator_process(cluster, crds, tmp_path_factory):
    """The operator (kopf run) as a real process against the test control plane.

    Yields an `OperatorProcess` with `.restart()` / `.kill()` and the log path.
    With FINETUNE_TEST_OPERATOR_RBAC=chart the operator authenticates as the Helm chart's
    ServiceAccount (only the chart's RBAC), and any Forbidden it logs fails the session.
    """
    from operator_harness import OperatorProcess

    kubeconfig = None
    as_chart = os.environ.get("FINETUNE_TEST_OPERATOR_RBAC", "admin") == "chart"
    if as_chart:
        from charttest import chart_identity_kubeconfig

        kubeconfig = chart_identity_kubeconfig(cluster, tmp_path_factory.mktemp("identity"))
    proc = OperatorProcess(cluster, tmp_path_factory.mktemp("operator"), kubeconfig=kubeconfig)
    proc.start()
    yield proc
    proc.stop()
    if as_chart:
        from charttest import assert_no_forbidden

        assert_no_forbidden(proc.log_text())


MANUAL_NODE = "manual-gpu-0"


@pytest.fixture(scope="session")
def manual_node(cluster) -> str:
    """A GPU node no kwok manages: a test plays its kubelet, writing pod statuses by hand
    (exit codes, termination messages, init-container failures). Tainted so that only
    pods meant for it (tolerating `finetune.dev/test-node`) land there."""
    import json

    from kubetest import Kube

    from finetune_dev.devcluster.controlplane import fake_gpu_node

    node = fake_gpu_node(MANUAL_NODE, product="NVIDIA-H100-80GB-HBM3", memory_mib=81559)
    node["metadata"]["annotations"] = {}
    node["metadata"]["labels"]["finetune.dev/test-node"] = "manual"
    node["spec"]["taints"] = [
        {"key": "finetune.dev/test-node", "value": "manual", "effect": "NoSchedule"}
    ]
    admin = Kube(cluster)
    admin.apply(node)
    admin.kubectl(
        "patch",
        "node",
        MANUAL_NODE,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps(
            {
                "status": {
                    "conditions": [
                        {
                            "type": "Ready",
                            "status": "True",
                            "reason": "TestKubelet",
                            "message": "the test acts as this node's kubelet",
                        }
                    ]
                }
            }
        ),
        namespaced=False,
    )
    return MANUAL_NODE
