"""The Helm chart against the real test control plane: dry run, install, upgrade, uninstall.

KWOK plays the kubelet: the operator pod is scheduled onto a fake node and marked
Running and Ready, which is what "installed" means here (the container does not run).
"""

from __future__ import annotations

import json
import uuid

import pytest
import yaml
from charttest import CHART, by_kind, helm, render
from kubetest import Kube, KubectlError, wait_for

pytestmark = pytest.mark.cluster

VALUES_FILES = sorted((CHART / "ci").glob("*.yaml"))
FINETUNE_CRDS = (
    "finetunejobs.finetune.dev",
    "adaptermerges.finetune.dev",
    "adapterdeployments.finetune.dev",
)
KOPF_CRDS = ("clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev")
# Stands in for the Prometheus Operator's CRD so a ServiceMonitor can be sent to the API
# server; the ServiceMonitor's shape is asserted in test_chart.py.
SERVICEMONITOR_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "servicemonitors.monitoring.coreos.com"},
    "spec": {
        "group": "monitoring.coreos.com",
        "scope": "Namespaced",
        "names": {
            "kind": "ServiceMonitor",
            "plural": "servicemonitors",
            "singular": "servicemonitor",
            "listKind": "ServiceMonitorList",
        },
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
                        },
                    }
                },
            }
        ],
    },
}


def _crd_established(admin: Kube, name: str) -> bool:
    return (
        admin.kubectl(
            "get",
            "crd",
            name,
            "-o",
            "jsonpath={.status.conditions[?(@.type=='Established')].status}",
            namespaced=False,
            check=False,
        ).stdout
        == "True"
    )


def ensure_namespace(admin: Kube, name: str) -> None:
    if admin.get_or_none("namespace", name, namespaced=False) is None:
        admin.kubectl("create", "namespace", name, namespaced=False)


def adopt_crds(admin: Kube, release: str, namespace: str) -> None:
    """Hand the session's CRDs (applied by the `crds` fixture) to this Helm release.

    Helm refuses to install over objects it does not own; these are the labels and
    annotations it checks. The same step adopts CRDs installed by `kubectl apply -f crds/`
    into a release in a real cluster.
    """
    for crd in (*FINETUNE_CRDS, *KOPF_CRDS):
        if admin.get_or_none("crd", crd, namespaced=False) is None:
            continue
        admin.kubectl(
            "label",
            "crd",
            crd,
            "app.kubernetes.io/managed-by=Helm",
            "--overwrite",
            namespaced=False,
        )
        admin.kubectl(
            "annotate",
            "crd",
            crd,
            f"meta.helm.sh/release-name={release}",
            f"meta.helm.sh/release-namespace={namespace}",
            "--overwrite",
            namespaced=False,
        )


@pytest.fixture(scope="module")
def admin(cluster, crds) -> Kube:
    return Kube(cluster)


@pytest.fixture
def release_namespace(admin):
    name = f"ftop-chart-{uuid.uuid4().hex[:6]}"
    ensure_namespace(admin, name)
    yield name
    admin.kubectl("delete", "namespace", name, "--wait=false", namespaced=False, check=False)


@pytest.mark.parametrize("values", VALUES_FILES, ids=lambda p: p.stem)
def test_rendered_chart_passes_server_side_dry_run(admin, values, release_namespace):
    objects = render("dry", release_namespace, values_files=[values])
    for obj in objects:
        ns = obj["metadata"].get("namespace")
        if ns:
            ensure_namespace(admin, ns)
    # CRDs the rendering needs before its own objects can be checked: kopf's peering CRDs
    # (standby) and the ServiceMonitor stand-in. The finetune.dev CRDs are the session's.
    needed = [
        o for o in by_kind(objects, "CustomResourceDefinition") if o["spec"]["group"] == "kopf.dev"
    ]
    if by_kind(objects, "ServiceMonitor"):
        needed.append(SERVICEMONITOR_CRD)
    if needed:
        admin.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(needed), namespaced=False)
        for crd in needed:
            wait_for(
                lambda c=crd["metadata"]["name"]: _crd_established(admin, c),
                what=f"CRD {crd['metadata']['name']} Established",
            )
    res = admin.kubectl(
        "apply",
        "--dry-run=server",
        "-f",
        "-",
        input=yaml.safe_dump_all(objects),
        namespaced=False,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    assert len([ln for ln in res.stdout.splitlines() if "(server dry run)" in ln]) == len(objects)


def _operator_pod(kube: Kube, role: str = "active") -> dict | None:
    pods = [
        p
        for p in kube.items("pods", f"finetune.dev/operator-role={role}")
        if not p["metadata"].get("deletionTimestamp")
    ]
    return pods[0] if len(pods) == 1 else None


def _running_and_ready(pod: dict | None) -> bool:
    if not pod or pod["status"].get("phase") != "Running":
        return False
    return any(
        c["type"] == "Ready" and c["status"] == "True"
        for c in pod["status"].get("conditions") or []
    )


def _env(pod: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}


def _manifest_objects(release: str, namespace: str, kubeconfig: str) -> list[dict]:
    text = helm("get", "manifest", release, "-n", namespace, kubeconfig=kubeconfig).stdout
    return [d for d in yaml.safe_load_all(text) if d]


def test_install_creates_everything_and_upgrade_rolls_the_operator(
    admin, cluster, release_namespace
):
    release, ns, kc = "ftop", release_namespace, cluster.kubeconfig
    kube = Kube(cluster, ns)
    adopt_crds(admin, release, ns)
    helm("install", release, str(CHART), "-n", ns, "--wait", "--timeout", "120s", kubeconfig=kc)
    try:
        # Everything the chart rendered exists in the cluster.
        objects = _manifest_objects(release, ns, kc)
        kinds = {o["kind"] for o in objects}
        assert {
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "Deployment",
            "Service",
            "CustomResourceDefinition",
        } <= kinds
        for obj in objects:
            args = ["get", obj["kind"].lower(), obj["metadata"]["name"], "-o", "name"]
            if obj["metadata"].get("namespace"):
                args += ["-n", obj["metadata"]["namespace"]]
            admin.kubectl(*args, namespaced=False)
        # The operator pod is scheduled onto a (kwok) node and Running.
        pod = wait_for(
            lambda: (p := _operator_pod(kube)) and _running_and_ready(p) and p,
            timeout=60,
            what="the operator pod Running and Ready",
        )
        node = admin.get("node", pod["spec"]["nodeName"], namespaced=False)
        assert node["metadata"]["annotations"].get("kwok.x-k8s.io/node") == "fake"
        assert pod["spec"]["serviceAccountName"] == "ftop-finetune-operator"
        assert _env(pod)["FINETUNE_RESYNC_SECONDS"] == "60"

        # Changed values roll the operator: Recreate replaces the pod, the new one has them.
        helm(
            "upgrade",
            release,
            str(CHART),
            "-n",
            ns,
            "--reuse-values",
            "--wait",
            "--timeout",
            "120s",
            "--set",
            "operator.resyncSeconds=30",
            "--set",
            "standby.enabled=true",
            kubeconfig=kc,
        )
        new = wait_for(
            lambda: (
                (p := _operator_pod(kube))
                and p["metadata"]["uid"] != pod["metadata"]["uid"]
                and _running_and_ready(p)
                and p
            ),
            timeout=60,
            what="a new operator pod after the upgrade",
        )
        assert _env(new)["FINETUNE_RESYNC_SECONDS"] == "30"
        assert _env(new)["FINETUNE_PEERING"] == "true"
        assert kube.get_or_none("pod", pod["metadata"]["name"]) is None
        deployment = kube.get("deployment", "ftop-finetune-operator")
        assert deployment["metadata"]["generation"] >= 2
        standby = wait_for(
            lambda: (p := _operator_pod(kube, "standby")) and _running_and_ready(p) and p,
            timeout=60,
            what="the standby pod",
        )
        assert "--priority=50" in standby["spec"]["containers"][0]["args"]
        # The peering object both operators meet in (a post-upgrade hook).
        peering = admin.get("clusterkopfpeering", "finetune-operator", namespaced=False)
        assert peering["metadata"]["name"] == "finetune-operator"
        history = json.loads(helm("history", release, "-n", ns, "-o", "json", kubeconfig=kc).stdout)
        assert [h["status"] for h in history] == ["superseded", "deployed"]
    finally:
        helm("uninstall", release, "-n", ns, "--wait", kubeconfig=kc, check=False)


def test_uninstall_keeps_crds_and_users_jobs(admin, cluster, release_namespace, namespace):
    release, ns, kc = "ftop-keep", release_namespace, cluster.kubeconfig
    adopt_crds(admin, release, ns)
    helm(
        "install",
        release,
        str(CHART),
        "-n",
        ns,
        "--wait",
        "--timeout",
        "120s",
        "--set",
        "crds.keep=true",
        kubeconfig=kc,
    )
    users = Kube(cluster, namespace)
    job = yaml.safe_load((CHART.parent.parent / "examples" / "finetunejob-demo.yaml").read_text())
    job["metadata"]["name"] = "kept-across-uninstall"
    users.apply(job)
    uid = users.get("finetunejob", "kept-across-uninstall")["metadata"]["uid"]

    out = helm("uninstall", release, "-n", ns, "--wait", kubeconfig=kc)
    assert "kept due to the resource policy" in out.stdout + out.stderr
    # The release's own objects are gone ...
    assert admin.get_or_none("clusterrole", "ftop-keep-finetune-operator", namespaced=False) is None
    assert Kube(cluster, ns).get_or_none("deployment", "ftop-keep-finetune-operator") is None
    # ... the CRDs and the users' jobs are not.
    for crd in FINETUNE_CRDS:
        assert _crd_established(admin, crd), f"{crd} was deleted by helm uninstall"
    assert users.get("finetunejob", "kept-across-uninstall")["metadata"]["uid"] == uid


def test_crds_without_keep_would_be_removed_by_helm(admin):
    """The keep annotation is what protects the CRDs: without it Helm owns their deletion."""
    crds = by_kind(render(set_values=["crds.keep=false"]), "CustomResourceDefinition")
    assert crds and all(
        "helm.sh/resource-policy" not in (c["metadata"].get("annotations") or {}) for c in crds
    )
    try:
        admin.kubectl(
            "apply", "--dry-run=server", "-f", "-", input=yaml.safe_dump_all(crds), namespaced=False
        )
    except KubectlError as exc:  # pragma: no cover - reported with the server's reason
        raise AssertionError(f"the chart's CRDs are not valid for the API server: {exc}") from exc
