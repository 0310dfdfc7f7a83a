"""Unknown spec fields, on the real API server: who rejects them, who drops them.

A structural schema cannot reject unknown fields itself (the last two tests pin why), so
what happens to a typo such as `spec.suspnd` depends on the request's `fieldValidation`:
Strict rejects, Warn and Ignore prune (Warn with a warning), and server-side apply rejects
whatever it says. docs/operations.md ("Unknown fields") tells users which tool sends what.
"""

from __future__ import annotations

import json
import ssl
import urllib.request
from pathlib import Path

import pytest
import yaml
from kubetest import Kube, finetunejob_manifest

pytestmark = pytest.mark.cluster


def with_typos(name: str) -> dict:
    doc = finetunejob_manifest(name)
    doc["spec"]["suspnd"] = True  # a typo of `suspend`
    doc["spec"]["dataset"]["formatt"] = "sharegpt"  # and one a level down
    return doc


def apply(kube: Kube, name: str, *flags: str):
    return kube.kubectl(
        "apply", *flags, "-f", "-", input=yaml.safe_dump(with_typos(name)), check=False
    )


def assert_pruned(kube: Kube, name: str) -> None:
    spec = kube.get("ftj", name)["spec"]
    assert "suspnd" not in spec and "formatt" not in spec["dataset"], spec
    assert spec["suspend"] is False and spec["dataset"]["format"] == "alpaca"


def test_kubectl_apply_rejects_unknown_fields_by_default(crds, kube):
    res = apply(kube, "strict")
    assert res.returncode != 0
    assert 'strict decoding error: unknown field "spec.dataset.formatt"' in res.stderr
    assert 'unknown field "spec.suspnd"' in res.stderr
    assert kube.get_or_none("ftj", "strict") is None


@pytest.mark.parametrize("validate", ["true", "false"])
def test_server_side_apply_rejects_unknown_fields_whatever_validate_says(crds, kube, validate):
    res = apply(kube, f"ssa-{validate}", "--server-side", f"--validate={validate}")
    assert res.returncode != 0
    assert ".spec.suspnd: field not declared in schema" in res.stderr, res.stderr
    assert kube.get_or_none("ftj", f"ssa-{validate}") is None


def test_validate_warn_prunes_with_a_warning(crds, kube):
    res = apply(kube, "warned", "--validate=warn")
    assert res.returncode == 0, res.stderr
    assert 'Warning: unknown field "spec.suspnd"' in res.stderr
    assert 'Warning: unknown field "spec.dataset.formatt"' in res.stderr
    assert_pruned(kube, "warned")


def test_validate_false_prunes_silently(crds, kube):
    res = apply(kube, "ignored", "--validate=false")
    assert res.returncode == 0, res.stderr
    assert "unknown field" not in res.stderr, res.stderr
    assert_pruned(kube, "ignored")


def test_a_client_that_sends_no_field_validation_gets_warnings(crds, kube):
    """The server's default, when a request names no `fieldValidation`, is Warn."""
    directory = Path(kube.cluster.directory)
    context = ssl.create_default_context(cafile=str(directory / "pki" / "ca.crt"))
    context.load_cert_chain(
        str(directory / "pki" / "admin.crt"), str(directory / "pki" / "admin.key")
    )
    request = urllib.request.Request(
        f"{kube.cluster.server}/apis/finetune.dev/v1alpha1/namespaces/{kube.namespace}/"
        "finetunejobs",
        data=json.dumps(with_typos("raw")).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, context=context, timeout=30) as response:
        assert response.status == 201
        warnings = response.headers.get_all("Warning") or []
    assert any('unknown field \\"spec.suspnd\\"' in w for w in warnings), warnings
    assert_pruned(kube, "raw")


def probe_crd(name: str, spec_schema: dict) -> dict:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{name}s.probe.finetune.dev"},
        "spec": {
            "group": "probe.finetune.dev",
            "scope": "Namespaced",
            "names": {"kind": name.capitalize(), "plural": f"{name}s"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {"type": "object", "properties": {"spec": spec_schema}}
                    },
                }
            ],
        },
    }


def test_a_structural_schema_cannot_forbid_unknown_fields(admin_kube):
    """Why the CRDs do not reject unknown fields themselves: neither way is accepted."""
    # additionalProperties: false next to properties is forbidden in a CRD...
    closed = probe_crd(
        "closed",
        {
            "type": "object",
            "additionalProperties": False,
            "properties": {"size": {"type": "integer"}},
        },
    )
    res = admin_kube.kubectl(
        "apply",
        "--dry-run=server",
        "-f",
        "-",
        input=yaml.safe_dump(closed),
        check=False,
        namespaced=False,
    )
    assert res.returncode != 0
    assert "additionalProperties and properties are mutual exclusive" in res.stderr
    # ...and keeping unknown fields for a CEL rule to list them does not compile: an object
    # with properties is not a map a CEL macro can range over.
    listed = probe_crd(
        "listed",
        {
            "type": "object",
            "x-kubernetes-preserve-unknown-fields": True,
            "properties": {"size": {"type": "integer"}},
            "x-kubernetes-validations": [{"rule": "self.all(k, k in ['size'])"}],
        },
    )
    res = admin_kube.kubectl(
        "apply",
        "--dry-run=server",
        "-f",
        "-",
        input=yaml.safe_dump(listed),
        check=False,
        namespaced=False,
    )
    assert res.returncode != 0
    assert "cannot be range of a comprehension" in res.stderr, res.stderr


def test_helm_install_prunes_with_a_warning(crds, kube, tmp_path):
    """Helm 3 (and tools built on it) get the Warn behaviour: installed, field dropped."""
    from charttest import helm

    chart = tmp_path / "typo-chart"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: typo\nversion: 0.1.0\n")
    (chart / "templates" / "job.yaml").write_text(yaml.safe_dump(with_typos("helmed")))
    res = helm(
        "install",
        f"typo-{kube.namespace}"[:53],
        str(chart),
        "-n",
        kube.namespace,
        kubeconfig=kube.kubeconfig,
    )
    assert "STATUS: deployed" in res.stdout
    assert 'unknown field \\"spec.suspnd\\"' in res.stderr, res.stderr
    assert_pruned(kube, "helmed")
