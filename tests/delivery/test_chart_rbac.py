"""The chart's RBAC, proven on the real API server.

- the operator's own integration suites pass when the operator authenticates as the
  chart's ServiceAccount (FINETUNE_TEST_OPERATOR_RBAC=chart, in a pytest process of its
  own, so no admin-credentialed operator can do the work instead);
- `kubectl auth can-i --list` for that ServiceAccount matches a reviewed snapshot with
  no wildcards and no Secret listing or watching;
- the worker Role the operator creates passes the API server's escalation check without
  `escalate` or `bind`, and anything broader is refused;
- namespaced mode grants nothing outside the watched namespaces.

Refresh the snapshot after a reviewed RBAC change with
`FINETUNE_UPDATE_SNAPSHOTS=1 pytest tests/delivery/test_chart_rbac.py -k snapshot`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest
import yaml
from charttest import (
    IDENTITY_NAMESPACE,
    ROOT,
    install_identity,
    write_token_kubeconfig,
)
from kubetest import Kube

pytestmark = pytest.mark.cluster

SNAPSHOT = ROOT / "tests" / "snapshots" / "chart_operator_can_i.txt"
# The operator's suites re-run under the chart's identity.
SUITES = ["tests/controller/test_operator_lifecycle.py", "tests/delivery/test_gitops.py"]


def can_i_list(admin: Kube, user: str, namespace: str) -> set[tuple[str, str, str, str]]:
    """`kubectl auth can-i --list` as rows (resource, non-resource URL, names, verbs)."""
    out = admin.kubectl(
        "auth", "can-i", "--list", "--as", user, "-n", namespace, namespaced=False
    ).stdout.splitlines()
    header = out[0]
    starts = [
        header.index(h) for h in ("Resources", "Non-Resource URLs", "Resource Names", "Verbs")
    ] + [None]
    return {
        tuple(line[starts[i] : starts[i + 1]].strip() for i in range(4))
        for line in out[1:]
        if line.strip()
    }


@pytest.fixture(scope="module")
def admin(cluster, crds) -> Kube:
    return Kube(cluster)


@pytest.fixture(scope="module")
def baseline(admin) -> set:
    """What any ServiceAccount may do with no bindings (discovery, self-reviews)."""
    admin.kubectl(
        "create", "serviceaccount", "nobody", "-n", "default", namespaced=False, check=False
    )
    return can_i_list(admin, "system:serviceaccount:default:nobody", "default")


@pytest.fixture(scope="module")
def identity(admin, cluster) -> str:
    sa, _ = install_identity(cluster)
    return f"system:serviceaccount:{IDENTITY_NAMESPACE}:{sa}"


def test_can_i_snapshot_has_no_wildcards_and_no_secret_listing(
    admin, baseline, identity, namespace
):
    granted = can_i_list(admin, identity, namespace) - baseline
    rows = sorted(
        f"{res or url} {names} {verbs}".replace("  ", " ") for res, url, names, verbs in granted
    )
    for row in rows:
        assert "*" not in row, f"wildcard granted: {row}"
    for res, _url, _names, verbs in granted:
        assert not {"escalate", "bind", "impersonate"} & set(verbs.strip("[]").split()), res
    (secrets,) = [r for r in rows if r.startswith("secrets ")]
    assert secrets == "secrets [] [get]", f"Secrets beyond get-by-name: {secrets}"
    text = "\n".join(rows) + "\n"
    if os.environ.get("FINETUNE_UPDATE_SNAPSHOTS") == "1":
        SNAPSHOT.parent.mkdir(exist_ok=True)
        SNAPSHOT.write_text(text)
    assert text == SNAPSHOT.read_text(), (
        "the chart's effective permissions changed; review the diff and refresh the snapshot "
        "(FINETUNE_UPDATE_SNAPSHOTS=1)"
    )


def _worker_rbac(name: str, namespace: str) -> list[dict]:
    from finetune_api.finetunejob import FineTuneJob
    from finetune_operator.builders.training import build_rbac

    doc = yaml.safe_load((ROOT / "examples" / "finetunejob-demo.yaml").read_text())
    doc["metadata"].update(name=name, namespace=namespace, uid=str(uuid.uuid4()))
    return build_rbac(FineTuneJob.model_validate(doc))


def test_operator_may_create_the_worker_role_but_nothing_broader(
    admin, cluster, identity, namespace, tmp_path
):
    sa = identity.rsplit(":", 1)[1]
    token = Kube(cluster, IDENTITY_NAMESPACE).kubectl("create", "token", sa).stdout.strip()
    as_operator = write_token_kubeconfig(cluster, tmp_path / "kc", token, identity)
    objects = _worker_rbac("esc-check", namespace)
    # Created for real, in the operator's order: binding a Role without `bind` is allowed
    # only when the Role exists and the binder holds everything it grants.
    res = admin.kubectl(
        "create",
        "-f",
        "-",
        "-n",
        namespace,
        input=yaml.safe_dump_all(objects),
        kubeconfig=as_operator,
        namespaced=False,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    assert (
        Kube(cluster, namespace).get("rolebinding", "esc-check-worker")["roleRef"]["name"]
        == "esc-check-worker"
    )
    role = next(o for o in objects if o["kind"] == "Role")
    role["metadata"]["name"] = "esc-check-broader"
    role["rules"].append({"apiGroups": [""], "resources": ["secrets"], "verbs": ["list"]})
    res = admin.kubectl(
        "create",
        "--dry-run=server",
        "-f",
        "-",
        "-n",
        namespace,
        input=yaml.safe_dump(role),
        kubeconfig=as_operator,
        namespaced=False,
        check=False,
    )
    assert res.returncode != 0
    assert "attempting to grant RBAC permissions not currently held" in res.stderr, res.stderr


def test_namespaced_mode_grants_nothing_outside_its_namespaces(admin, cluster, namespace):
    watched = f"watched-{uuid.uuid4().hex[:5]}"
    admin.kubectl("create", "namespace", watched, namespaced=False)
    try:
        sa, _ = install_identity(
            cluster,
            release="ftop-ns",
            set_values=["watch.mode=namespaces", f"watch.namespaces={{{watched}}}"],
        )
        user = f"system:serviceaccount:{IDENTITY_NAMESPACE}:{sa}"

        def can(verb: str, resource: str, ns: str, *extra: str) -> bool:
            return (
                admin.kubectl(
                    "auth",
                    "can-i",
                    verb,
                    resource,
                    *extra,
                    "--as",
                    user,
                    "-n",
                    ns,
                    namespaced=False,
                    check=False,
                ).stdout.strip()
                == "yes"
            )

        assert can("create", "jobs.batch", watched)
        assert can("patch", "finetunejobs.finetune.dev", watched, "--subresource=status")
        assert not can("patch", "finetunejobs.finetune.dev", watched)  # never the spec
        assert can("list", "customresourcedefinitions.apiextensions.k8s.io", watched)
        for verb, resource in (
            ("create", "jobs.batch"),
            ("list", "finetunejobs.finetune.dev"),
            ("get", "secrets"),
            ("list", "pods"),
        ):
            assert not can(verb, resource, namespace), f"{verb} {resource} outside {watched}"
    finally:
        admin.kubectl("delete", "namespace", watched, "--wait=false", namespaced=False, check=False)


def test_operator_suites_pass_with_only_the_charts_rbac(tmp_path):
    """The operator's integration tests, with the operator holding only the chart's RBAC.

    A separate pytest process: its session has its own control plane and its only
    operator is the chart-identity one, and its fixture fails on any RBAC denial the
    operator logs.
    """
    suites = [s for s in SUITES if (ROOT / s).exists()]
    assert "tests/controller/test_operator_lifecycle.py" in suites
    env = {**os.environ, "FINETUNE_TEST_OPERATOR_RBAC": "chart"}
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            *suites,
            "-q",
            "-p",
            "no:cacheprovider",
            f"--basetemp={tmp_path / 'inner'}",
            "-o",
            "addopts=",
            "-rfE",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=840,
        check=False,
    )
    tail = (res.stdout + res.stderr)[-6000:]
    assert res.returncode == 0, f"the operator's suites failed under the chart's RBAC:\n{tail}"
    summary = res.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "error" not in summary and "skipped" not in summary, tail
    # Evidence that the operator really ran as the chart's ServiceAccount: the API
    # client logs the kubeconfig context and user it loaded.
    logs = list((tmp_path / "inner").rglob("operator.log"))
    assert logs, "the suites started no operator"
    for log in logs:
        text = log.read_text(errors="replace")
        assert f"context system:serviceaccount:{IDENTITY_NAMESPACE}:" in text, log
        assert "dev-admin" not in text, f"{log}: the operator used the admin credentials"
