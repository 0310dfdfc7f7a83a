"""The generated CRDs: committed files match the models, schemas are structural, and on a
real API server they install, re-apply as a no-op, accept every example, keep spec
immutable except `suspend`, and take status writes without bumping the generation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from kubetest import condition, wait_for

from finetune_api import FineTuneJobSpec, FineTuneJobStatus, crdgen, to_k8s

ROOT = Path(__file__).resolve().parents[2]
CRD_DIR = ROOT / "crds"
CRD_NAMES = [
    "finetunejobs.finetune.dev",
    "adaptermerges.finetune.dev",
    "adapterdeployments.finetune.dev",
]


def crd_schema(plural: str) -> dict:
    crd = yaml.safe_load((CRD_DIR / f"finetune.dev_{plural}.yaml").read_text())
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


# --- generation (no cluster) ----------------------------------------------------------------


def test_committed_crds_match_the_models(capsys):
    assert crdgen.main(["--check"]) == 0, capsys.readouterr().out


def test_check_reports_a_diff_for_a_drifted_file(tmp_path, capsys):
    assert crdgen.main(["--output-dir", str(tmp_path)]) == 0
    path = tmp_path / "finetune.dev_finetunejobs.yaml"
    path.write_text(path.read_text().replace("maximum: 1024", "maximum: 4096", 1))
    (tmp_path / "stale.yaml").write_text("kind: Nothing\n")
    capsys.readouterr()
    assert crdgen.main(["--check", "--output-dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert (
        "-                    maximum: 4096" in out and "+                    maximum: 1024" in out
    )
    assert "stale.yaml: not generated" in out


def _walk(node, path="$"):
    if isinstance(node, dict):
        yield path, node
        for key, value in node.get("properties", {}).items():
            yield from _walk(value, f"{path}.{key}")
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                yield from _walk(node[key], f"{path}[]")


@pytest.mark.parametrize("plural", ["finetunejobs", "adaptermerges", "adapterdeployments"])
def test_schemas_are_structural(plural):
    for path, node in _walk(crd_schema(plural)):
        for forbidden in (
            "$ref",
            "anyOf",
            "oneOf",
            "allOf",
            "title",
            "nullable",
            "const",
            "propertyNames",
        ):
            assert forbidden not in node, f"{path} has {forbidden}"
        assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{path} has no type"
        if node.get("type") == "string" and "enum" not in node and path.startswith("$.spec"):
            # Strings are bounded so the CEL cost estimate stays under the server's budget.
            assert "maxLength" in node, f"{path} is an unbounded string"
        if node.get("type") == "array" and path.startswith("$.spec"):
            assert "maxItems" in node, f"{path} is an unbounded list"


def _fields(node):
    """Every field (a named property) of a schema; list items and map values are not
    fields of their own and `kubectl explain` shows them under their parent."""
    return ((path, value) for path, value in _walk(node) if path != "$" and not path.endswith("[]"))


@pytest.mark.parametrize("plural", ["finetunejobs", "adaptermerges", "adapterdeployments"])
def test_every_field_explains_itself(plural):
    """`kubectl explain` shows a field's description and nothing of its default or of the
    int-or-string marker, so the description must carry them."""
    fields = list(_fields(crd_schema(plural)))
    assert len(fields) > 20
    # metadata may carry nothing but name rules (the API server's rule); kubectl explain
    # shows ObjectMeta's documentation for it.
    undescribed = [
        path
        for path, node in fields
        if not node.get("description", "").strip() and not path.startswith("$.metadata")
    ]
    assert not undescribed, f"fields without a description: {undescribed}"
    for path, node in fields:
        default = node.get("default")
        if path.startswith("$.spec") and default not in (None, {}, [], ""):
            assert "default" in node["description"].lower(), f"{path} hides its default"
        if node.get("x-kubernetes-int-or-string"):
            assert "int-or-string" in node["description"], path


def test_descriptions_state_defaults_and_int_or_string():
    training = crd_schema("finetunejobs")["properties"]["spec"]["properties"]["training"]
    fields = training["properties"]
    assert fields["learningRate"]["description"].endswith("Default: 0.0002.")
    assert fields["microBatchSize"]["description"].startswith("(int-or-string) ")
    assert "Default: auto." in fields["microBatchSize"]["description"]


def test_finetunejob_crd_names_columns_and_rules():
    crd = yaml.safe_load((CRD_DIR / "finetune.dev_finetunejobs.yaml").read_text())
    assert crd["spec"]["names"]["shortNames"] == ["ftj"]
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = version["additionalPrinterColumns"]
    assert [c["name"] for c in columns if not c.get("priority")] == [
        "Method",
        "Phase",
        "Progress",
        "Peak VRAM",
        "Tokens/s",
        "Age",
    ]
    # -o wide adds why the job is in its phase
    assert [c["name"] for c in columns if c.get("priority")] == ["Reason"]
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    immutable = {r["fieldPath"] for r in spec["x-kubernetes-validations"] if "oldSelf" in r["rule"]}
    # Every spec field but suspend is guarded, including ones added later.
    assert immutable == {f".{name}" for name in spec["properties"]} - {".suspend"}
    micro = spec["properties"]["training"]["properties"]["microBatchSize"]
    assert micro["x-kubernetes-int-or-string"] is True and micro["default"] == "auto"
    conditions = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"][
        "conditions"
    ]
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]


# --- on the API server ----------------------------------------------------------------------


@pytest.mark.cluster
def test_crds_are_accepted_and_established(crds, admin_kube):
    for name in CRD_NAMES:
        crd = admin_kube.get("crd", name, namespaced=False)
        assert condition(crd, "Established")["status"] == "True"
        assert condition(crd, "NamesAccepted")["status"] == "True"
        # The server reports non-structural schemas as a condition; there must be none.
        assert condition(crd, "NonStructuralSchema") is None


@pytest.mark.cluster
def test_reapplying_the_crds_is_a_no_op(crds, admin_kube):
    # The `crds` fixture applied them server-side as field manager `tests`; applying the
    # same files again must not write anything (no new resourceVersion, no new generation).
    before = {n: admin_kube.get("crd", n, namespaced=False)["metadata"] for n in CRD_NAMES}
    admin_kube.kubectl(
        "apply", "--server-side", "--field-manager=tests", "-f", str(CRD_DIR), namespaced=False
    )
    for name in CRD_NAMES:
        after = admin_kube.get("crd", name, namespaced=False)["metadata"]
        assert after["resourceVersion"] == before[name]["resourceVersion"]
        assert after["generation"] == before[name]["generation"]


@pytest.mark.cluster
def test_client_side_reapply_is_a_no_op(crds, admin_kube):
    # What a user runs: `kubectl apply -f crds/`. The first apply may record its
    # last-applied annotation; the second must change nothing.
    admin_kube.kubectl("apply", "-f", str(CRD_DIR), namespaced=False)
    before = {n: admin_kube.get("crd", n, namespaced=False)["metadata"] for n in CRD_NAMES}
    out = admin_kube.kubectl("apply", "-f", str(CRD_DIR), namespaced=False).stdout
    assert out.count(" unchanged") == len(CRD_NAMES), out
    for name in CRD_NAMES:
        after = admin_kube.get("crd", name, namespaced=False)["metadata"]
        assert after["resourceVersion"] == before[name]["resourceVersion"]


@pytest.mark.cluster
@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_examples_apply_cleanly(crds, kube, path):
    result = kube.kubectl("apply", "-f", str(path))
    assert "Warning" not in result.stderr, result.stderr
    for doc in yaml.safe_load_all(path.read_text()):
        stored = dict(_leaves(kube.get(doc["kind"].lower(), doc["metadata"]["name"])["spec"]))
        # Everything written was kept as written (nothing pruned, nothing rewritten).
        for field, value in _leaves(doc["spec"]):
            assert stored.get(field) == value, f"{path.name}: spec{field}"


def minimal_job(name: str = "job") -> dict:
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"uri": "pvc://models/tiny"},
            "dataset": {"uri": "pvc://data/alpaca.jsonl", "format": "alpaca"},
            "training": {"maxSteps": 10},
            "resources": {"gpu": {"memory": "4Gi"}},
            "output": {"uri": "pvc://adapters/job"},
        },
    }


def _leaves(node, prefix=""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _leaves(value, f"{prefix}.{key}")
    else:
        yield prefix, node


@pytest.mark.cluster
def test_server_defaults_agree_with_the_models(crds, kube):
    kube.create(minimal_job())
    stored = kube.get("finetunejob", "job")["spec"]
    model = to_k8s(FineTuneJobSpec.model_validate(minimal_job()["spec"]))
    model_leaves = dict(_leaves(model))
    server_leaves = dict(_leaves(stored))
    # The server filled in defaults (e.g. lora.r) and each equals the model's default.
    assert server_leaves[".lora.r"] == 16 and server_leaves[".training.microBatchSize"] == "auto"
    for path, value in server_leaves.items():
        assert model_leaves.get(path) == value, (
            f"{path}: server {value!r}, model {model_leaves.get(path)!r}"
        )


@pytest.mark.cluster
def test_status_writes_do_not_bump_generation(crds, kube):
    kube.create(minimal_job())
    generation = kube.get("finetunejob", "job")["metadata"]["generation"]
    status = FineTuneJobStatus.model_validate(
        {
            "observedGeneration": generation,
            "phase": "Running",
            "conditions": [
                {
                    "type": "Running",
                    "status": "True",
                    "reason": "Training",
                    "message": "step 3/10",
                    "lastTransitionTime": "2026-11-29T14:00:00Z",
                    "observedGeneration": generation,
                }
            ],
            "plan": {
                "method": "qlora",
                "reason": "bf16 base does not fit in 4Gi",
                "estimatedPeakBytes": 3 * 2**30,
                "budgetBytes": 4 * 2**30,
                "breakdown": {"baseWeights": 2**30, "activations": 2**31},
                "microBatchSize": 2,
                "gradientAccumulation": 8,
                "gradientCheckpointing": True,
                "trainableParams": 1_000_000,
            },
            "progress": {
                "step": 3,
                "totalSteps": 10,
                "percent": 30.0,
                "loss": 1.5,
                "updatedAt": "2026-11-29T14:01:00Z",
            },
            "metrics": {"peakVRAMBytes": 3 * 2**30, "peakVRAM": "3.0Gi", "tokensPerSecond": 1234.5},
            "jobName": "job-train",
        }
    )
    kube.patch_status("finetunejob", "job", {"status": to_k8s(status)})
    stored = kube.get("finetunejob", "job")
    assert stored["metadata"]["generation"] == generation
    # Everything the models write survives the schema (nothing pruned).
    assert FineTuneJobStatus.model_validate(stored["status"]) == status

    table = kube.kubectl("get", "ftj", "job").stdout
    header, row = table.splitlines()[:2]
    assert header.split()[:7] == ["NAME", "METHOD", "PHASE", "PROGRESS", "PEAK", "VRAM", "TOKENS/S"]
    assert row.split()[:6] == ["job", "qlora", "Running", "30", "3.0Gi", "1234.5"]


@pytest.mark.cluster
def test_spec_is_immutable_except_suspend(crds, kube):
    kube.create(minimal_job())
    generation = kube.get("finetunejob", "job")["metadata"]["generation"]

    for patch, field in [
        ({"lora": {"r": 8}}, "spec.lora"),
        ({"training": {"learningRate": 0.1}}, "spec.training"),
        ({"image": "example.com/worker:2"}, "spec.image"),
        ({"resources": {"gpu": {"memory": "8Gi"}}}, "spec.resources"),
    ]:
        result = kube.kubectl(
            "patch",
            "finetunejob",
            "job",
            "--type=merge",
            "-p",
            json.dumps({"spec": patch}),
            check=False,
        )
        assert result.returncode != 0, f"{patch} was accepted"
        assert f"{field}: Invalid value" in result.stderr and "immutable" in result.stderr, (
            result.stderr
        )

    kube.kubectl(
        "patch", "finetunejob", "job", "--type=merge", "-p", json.dumps({"spec": {"suspend": True}})
    )
    stored = kube.get("finetunejob", "job")
    assert stored["spec"]["suspend"] is True
    assert stored["metadata"]["generation"] == generation + 1


@pytest.mark.cluster
def test_adapterdeployment_spec_stays_mutable_and_scales(crds, kube):
    doc = yaml.safe_load((ROOT / "examples" / "adapterdeployment.yaml").read_text())
    kube.create(doc)
    name = doc["metadata"]["name"]
    kube.kubectl(
        "patch",
        "adapterdeployment",
        name,
        "--type=merge",
        "-p",
        json.dumps({"spec": {"maxLoraRank": 128}}),
    )
    kube.kubectl("scale", "adapterdeployment", name, "--replicas=3")
    stored = wait_for(
        lambda: (d := kube.get("adapterdeployment", name))["spec"]["replicas"] == 3 and d,
        what="scale subresource to set spec.replicas",
    )
    assert stored["spec"]["maxLoraRank"] == 128


@pytest.mark.cluster
def test_adaptermerge_spec_is_immutable(crds, kube):
    docs = list(yaml.safe_load_all((ROOT / "examples" / "adaptermerge.yaml").read_text()))
    kube.create(docs[0])
    result = kube.kubectl(
        "patch",
        "adaptermerge",
        docs[0]["metadata"]["name"],
        "--type=merge",
        "-p",
        json.dumps({"spec": {"dtype": "float16"}}),
        check=False,
    )
    assert result.returncode != 0 and "immutable" in result.stderr, result.stderr


@pytest.mark.cluster
def test_kubectl_explain_shows_the_model_docstrings(crds, admin_kube):
    # The descriptions come from the models' docstrings: one text for code and for users.
    out = wait_for(
        lambda: (
            admin_kube.kubectl(
                "explain", "finetunejob.spec.lora.r", namespaced=False, check=False
            ).stdout
        ),
        what="the FineTuneJob schema to be published for kubectl explain",
    )
    assert "Rank of the update matrices." in out
    out = admin_kube.kubectl(
        "explain", "finetunejob.spec.training.microBatchSize", namespaced=False
    ).stdout
    assert "(int-or-string)" in out and "Default: auto." in out, out
