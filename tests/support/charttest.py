"""Test-side helpers for the Helm chart: helm itself, rendering, and the chart's identity.

`chart_identity_kubeconfig` is what makes "the operator's permissions are enough" a
test: it renders the chart (cluster-wide mode), applies only its ServiceAccount,
ClusterRole and ClusterRoleBinding, mints a token for that ServiceAccount and writes a
kubeconfig that authenticates as it. The `operator_process` fixture uses it when
FINETUNE_TEST_OPERATOR_RBAC=chart, so the operator then holds exactly the chart's RBAC.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import yaml
from kubetest import Kube

from finetune_dev.devcluster import binaries
from finetune_dev.devcluster.controlplane import Cluster

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "finetune-operator"
# The test control plane's Kubernetes version: helm template assumes v1.20 otherwise.
KUBE_VERSION = "1.36.0"
IDENTITY_RELEASE = "ftop-identity"
IDENTITY_NAMESPACE = "finetune-system"
RBAC_KINDS = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")


def helm_path() -> Path:
    return binaries.ensure_built(["helm"])["helm"]


def helm(
    *args: str, kubeconfig: str | None = None, check: bool = True, timeout: float = 180
) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HELM_CACHE_HOME": str(_helm_home() / "cache"),
        "HELM_CONFIG_HOME": str(_helm_home() / "config"),
        "HELM_DATA_HOME": str(_helm_home() / "data"),
    }
    argv = [str(helm_path()), *args]
    if kubeconfig:
        argv += ["--kubeconfig", kubeconfig]
    res = subprocess.run(
        argv, capture_output=True, text=True, env=env, timeout=timeout, check=False
    )
    if check and res.returncode != 0:
        raise AssertionError(
            f"helm {' '.join(args)} failed ({res.returncode}):\n"
            f"{res.stderr.strip()}\n{res.stdout[-2000:]}"
        )
    return res


def _helm_home() -> Path:
    # Helm's repository cache and config stay out of the user's home directory.
    home = Path(os.environ.get("PYTEST_HELM_HOME", "/tmp/finetune-operator-helm-home"))
    home.mkdir(parents=True, exist_ok=True)
    return home


def render(
    release: str = "ftop",
    namespace: str = "finetune-system",
    *,
    values_files: list[Path] = (),
    set_values: list[str] = (),
) -> list[dict]:
    """`helm template` -> the rendered objects (hooks included)."""
    args = [
        "template",
        release,
        str(CHART),
        "--namespace",
        namespace,
        "--kube-version",
        KUBE_VERSION,
    ]
    for f in values_files:
        args += ["-f", str(f)]
    for s in set_values:
        args += ["--set", s]
    return [d for d in yaml.safe_load_all(helm(*args).stdout) if d]


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def write_token_kubeconfig(cluster: Cluster, path: Path, token: str, user: str) -> str:
    """A kubeconfig for the same API server that authenticates with a bearer token."""
    admin = yaml.safe_load(Path(cluster.kubeconfig).read_text())
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": admin["clusters"],
                "users": [{"name": user, "user": {"token": token}}],
                "contexts": [
                    {
                        "name": user,
                        "context": {
                            "cluster": admin["clusters"][0]["name"],
                            "user": user,
                            "namespace": "default",
                        },
                    }
                ],
                "current-context": user,
            }
        )
    )
    path.chmod(0o600)
    return str(path)


def install_identity(
    cluster: Cluster,
    *,
    release: str = IDENTITY_RELEASE,
    namespace: str = IDENTITY_NAMESPACE,
    set_values: list[str] = (),
) -> tuple[str, list[dict]]:
    """Apply the chart's ServiceAccount and RBAC (only those) -> (SA name, objects)."""
    objects = [
        o
        for o in render(release, namespace, set_values=["crds.enabled=false", *set_values])
        if o["kind"] in RBAC_KINDS
    ]
    admin = Kube(cluster, namespace)
    if admin.get_or_none("namespace", namespace, namespaced=False) is None:
        admin.kubectl("create", "namespace", namespace, namespaced=False)
    admin.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(objects), namespaced=False)
    (sa,) = by_kind(objects, "ServiceAccount")
    return sa["metadata"]["name"], objects


def chart_identity_kubeconfig(cluster: Cluster, workdir: Path) -> str:
    """A kubeconfig acting as the chart's ServiceAccount, for the test operator.

    Rendered in cluster mode with the same namespaces the test harness serves (kopf
    patterns such as `op-*`, which the chart supports as `watch.namespaces`).
    """
    import operator_harness

    served = [n for n in getattr(operator_harness, "OPERATOR_NAMESPACES", "").split(",") if n]
    set_values = [f"watch.namespaces={{{','.join(served)}}}"] if served else []
    sa, _ = install_identity(cluster, release="ftop-harness", set_values=set_values)
    token = (
        Kube(cluster, IDENTITY_NAMESPACE)
        .kubectl("create", "token", sa, "--duration", "2h")
        .stdout.strip()
    )
    return write_token_kubeconfig(
        cluster,
        workdir / "chart-identity.kubeconfig",
        token,
        f"system:serviceaccount:{IDENTITY_NAMESPACE}:{sa}",
    )


# An RBAC denial reads `... is forbidden: User "system:serviceaccount:..." cannot list
# resource ...`; kopf's own says "Not enough permissions". Other 403s (a namespace being
# terminated under a test) are not about RBAC.
RBAC_DENIAL = re.compile(r"cannot [a-z]+ resource|not enough permissions", re.IGNORECASE)


def assert_no_forbidden(log: str) -> None:
    """The operator never hit a permission it lacks (kopf and the API client both say so)."""
    hits = [line for line in log.splitlines() if RBAC_DENIAL.search(line)]
    assert not hits, (
        "the operator was refused by RBAC while running with the chart's "
        "permissions; add the rule to charts/finetune-operator/templates/"
        "_rbac_rules.tpl (with the reason):\n" + "\n".join(hits[:20])
    )
