"""Invalid manifests: the API server (OpenAPI + CEL from the generated CRDs) and the
pydantic models (what the worker and operator use) must both reject each one, and both
must name the offending field in their message."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from pydantic import ValidationError

from finetune_api import AdapterDeployment, AdapterMerge, FineTuneJob

DELETE = object()


def finetunejob() -> dict:
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "valid"},
        "spec": {
            "model": {"name": "meta-llama/Meta-Llama-3-8B"},
            "dataset": {"uri": "hf://tatsu-lab/alpaca", "format": "alpaca"},
            "training": {"maxSteps": 10},
            "resources": {"gpu": {"memory": "24Gi"}},
            "output": {"uri": "pvc://adapters/llama3"},
        },
    }


def adaptermerge() -> dict:
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "AdapterMerge",
        "metadata": {"name": "valid-merge"},
        "spec": {"fineTuneJobRef": {"name": "valid"}, "output": {"uri": "pvc://models/m"}},
    }


def adapterdeployment() -> dict:
    return {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "AdapterDeployment",
        "metadata": {"name": "valid-deploy"},
        "spec": {
            "baseModel": {"name": "meta-llama/Meta-Llama-3-8B"},
            "adapters": [{"name": "a", "uri": "pvc://adapters/a"}],
        },
    }


BASES = {"ftj": finetunejob, "merge": adaptermerge, "deploy": adapterdeployment}
MODELS = {
    "FineTuneJob": FineTuneJob,
    "AdapterMerge": AdapterMerge,
    "AdapterDeployment": AdapterDeployment,
}


def mutate(doc: dict, path: str, value: Any) -> dict:
    doc = copy.deepcopy(doc)
    *parents, last = path.split(".")
    node: Any = doc
    for key in parents:
        if isinstance(node, list):
            node = node[int(key)]
        else:
            node = node.setdefault(key, {})
    if isinstance(node, list):
        node[int(last)] = value
    elif value is DELETE:
        del node[last]
    else:
        node[last] = value
    return doc


# (id, base, [(path, value), ...], the field path both rejections must mention)
INVALID = [
    ("r-zero", "ftj", [("spec.lora.r", 0)], "spec.lora.r"),
    ("r-too-large", "ftj", [("spec.lora.r", 2048)], "spec.lora.r"),
    ("alpha-zero", "ftj", [("spec.lora.alpha", 0)], "spec.lora.alpha"),
    ("alpha-negative", "ftj", [("spec.lora.alpha", -8)], "spec.lora.alpha"),
    ("dropout-one", "ftj", [("spec.lora.dropout", 1.0)], "spec.lora.dropout"),
    ("dropout-negative", "ftj", [("spec.lora.dropout", -0.1)], "spec.lora.dropout"),
    ("target-modules-empty", "ftj", [("spec.lora.targetModules", [])], "spec.lora.targetModules"),
    ("seq-length-short", "ftj", [("spec.training.seqLength", 8)], "spec.training.seqLength"),
    ("seq-length-long", "ftj", [("spec.training.seqLength", 262144)], "spec.training.seqLength"),
    ("gpu-memory-zero", "ftj", [("spec.resources.gpu.memory", "0Gi")], "spec.resources.gpu.memory"),
    (
        "gpu-memory-negative",
        "ftj",
        [("spec.resources.gpu.memory", "-24Gi")],
        "spec.resources.gpu.memory",
    ),
    (
        "gpu-memory-not-quantity",
        "ftj",
        [("spec.resources.gpu.memory", "lots")],
        "spec.resources.gpu.memory",
    ),
    (
        "gpu-memory-missing",
        "ftj",
        [("spec.resources.gpu.memory", DELETE)],
        "spec.resources.gpu.memory",
    ),
    ("epochs-and-max-steps", "ftj", [("spec.training.epochs", 1)], "spec.training"),
    (
        "epochs-zero",
        "ftj",
        [("spec.training.maxSteps", DELETE), ("spec.training.epochs", 0)],
        "spec.training.epochs",
    ),
    (
        "learning-rate-zero",
        "ftj",
        [("spec.training.learningRate", 0)],
        "spec.training.learningRate",
    ),
    (
        "micro-batch-word",
        "ftj",
        [("spec.training.microBatchSize", "big")],
        "spec.training.microBatchSize",
    ),
    (
        "micro-batch-zero",
        "ftj",
        [("spec.training.microBatchSize", 0)],
        "spec.training.microBatchSize",
    ),
    (
        "batch-not-split-over-gpus",
        "ftj",
        [("spec.resources.gpu.count", 3), ("spec.training.batchSize", 16)],
        "spec.training.batchSize",
    ),
    (
        "batch-below-micro-batch",
        "ftj",
        [("spec.training.batchSize", 2), ("spec.training.microBatchSize", 8)],
        "spec.training.microBatchSize",
    ),
    (
        "batch-not-multiple-of-micro-batch",
        "ftj",
        [("spec.training.batchSize", 12), ("spec.training.microBatchSize", 8)],
        "spec.training.microBatchSize",
    ),
    (
        "micro-batch-does-not-divide-per-gpu-batch",
        "ftj",
        [
            ("spec.resources.gpu.count", 2),
            ("spec.training.batchSize", 16),
            ("spec.training.microBatchSize", 3),
        ],
        "spec.training.microBatchSize",
    ),
    ("gpu-nodes-zero", "ftj", [("spec.resources.gpu.nodes", 0)], "spec.resources.gpu.nodes"),
    (
        "checkpointing-maybe",
        "ftj",
        [("spec.training.gradientCheckpointing", "maybe")],
        "spec.training.gradientCheckpointing",
    ),
    (
        "model-uri-http",
        "ftj",
        [("spec.model.name", DELETE), ("spec.model.uri", "https://example.com/model")],
        "spec.model.uri",
    ),
    ("model-name-and-uri", "ftj", [("spec.model.uri", "pvc://models/llama")], "spec.model"),
    (
        "model-pvc-claim-not-dns",
        "ftj",
        [("spec.model.name", DELETE), ("spec.model.uri", "pvc://My_Claim/x")],
        "spec.model.uri",
    ),
    (
        "dataset-uri-ftp",
        "ftj",
        [("spec.dataset.uri", "ftp://data/alpaca.json")],
        "spec.dataset.uri",
    ),
    ("dataset-format-unknown", "ftj", [("spec.dataset.format", "sharegpt")], "spec.dataset.format"),
    (
        "eval-fraction-too-big",
        "ftj",
        [("spec.dataset.evalFraction", 0.9)],
        "spec.dataset.evalFraction",
    ),
    (
        "eval-split-and-fraction",
        "ftj",
        [("spec.dataset.evalFraction", 0.1), ("spec.dataset.evalSplit", "test")],
        "spec.dataset",
    ),
    ("output-local-path", "ftj", [("spec.output.uri", "/tmp/adapter")], "spec.output.uri"),
    ("method-full", "ftj", [("spec.method", "full")], "spec.method"),
    (
        "quantization-with-lora",
        "ftj",
        [("spec.method", "lora"), ("spec.quantization", {"type": "nf4"})],
        "spec.quantization",
    ),
    (
        "quantization-with-fp8",
        "ftj",
        [("spec.method", "fp8"), ("spec.quantization", {"type": "nf4"})],
        "spec.quantization",
    ),
    (
        "allowed-methods-with-lora",
        "ftj",
        [("spec.method", "lora"), ("spec.allowedMethods", ["lora"])],
        "spec.allowedMethods",
    ),
    ("allowed-methods-empty", "ftj", [("spec.allowedMethods", [])], "spec.allowedMethods"),
    (
        "allowed-methods-repeated",
        "ftj",
        [("spec.allowedMethods", ["lora", "lora"])],
        "spec.allowedMethods",
    ),
    ("allowed-methods-full", "ftj", [("spec.allowedMethods", ["full"])], "spec.allowedMethods"),
    (
        "quantization-int8",
        "ftj",
        [("spec.method", "qlora"), ("spec.quantization", {"type": "int8"})],
        "spec.quantization.type",
    ),
    (
        "inline-token",
        "ftj",
        [("spec.hfTokenSecretRef", {"name": "hf", "token": "hf_abc"})],
        "spec.hfTokenSecretRef.token",
    ),
    (
        "queue-name-not-dns",
        "ftj",
        [("spec.resources.queueName", "GPU Queue")],
        "spec.resources.queueName",
    ),
    (
        "deploy-name-not-dns",
        "ftj",
        [("spec.followUp", {"deploy": {"enabled": True, "name": "Bad_Name"}})],
        "spec.followUp.deploy.name",
    ),
    (
        "merge-dtype-int8",
        "ftj",
        [("spec.followUp", {"merge": {"dtype": "int8"}})],
        "spec.followUp.merge.dtype",
    ),
    ("backoff-negative", "ftj", [("spec.backoffLimit", -1)], "spec.backoffLimit"),
    ("name-not-dns-label", "ftj", [("metadata.name", "llama.v1")], "metadata.name"),
    ("name-too-long", "ftj", [("metadata.name", "a" * 50)], "metadata.name"),
    (
        "merge-two-sources",
        "merge",
        [("spec.adapterURI", "pvc://adapters/a"), ("spec.baseModel", {"name": "gpt2"})],
        "spec.fineTuneJobRef",
    ),
    (
        "merge-uri-without-base",
        "merge",
        [("spec.fineTuneJobRef", DELETE), ("spec.adapterURI", "pvc://adapters/a")],
        "spec.baseModel",
    ),
    ("merge-output-hf", "merge", [("spec.output.uri", "hf://me/merged")], "spec.output.uri"),
    (
        "deploy-adapter-two-sources",
        "deploy",
        [("spec.adapters.0.fineTuneJobRef", {"name": "valid"})],
        "spec.adapters[0]",
    ),
    (
        "deploy-adapter-names-repeat",
        "deploy",
        [("spec.adapters", [{"name": "a", "uri": "pvc://x/a"}, {"name": "a", "uri": "pvc://x/b"}])],
        "spec.adapters",
    ),
    ("deploy-max-lora-rank-zero", "deploy", [("spec.maxLoraRank", 0)], "spec.maxLoraRank"),
    ("deploy-runtime-tgi", "deploy", [("spec.runtime", "tgi")], "spec.runtime"),
    ("deploy-name-starts-with-digit", "deploy", [("metadata.name", "8b-llama")], "metadata.name"),
    ("merge-name-not-dns-label", "merge", [("metadata.name", "merge.v1")], "metadata.name"),
    # Kubernetes quantities may carry a sign (`isQuantity('-2')` is true): ours may not.
    ("ftj-cpu-negative", "ftj", [("spec.resources.cpu", "-2")], "spec.resources.cpu"),
    ("ftj-memory-negative", "ftj", [("spec.resources.memory", "-64Gi")], "spec.resources.memory"),
    (
        "ftj-gpu-memory-plus-sign",
        "ftj",
        [("spec.resources.gpu.memory", "+24Gi")],
        "spec.resources.gpu.memory",
    ),
    (
        "ftj-deploy-cpu-negative",
        "ftj",
        [("spec.followUp", {"deploy": {"enabled": True, "resources": {"cpu": "-2"}}})],
        "spec.followUp.deploy.resources.cpu",
    ),
    (
        "ftj-deploy-memory-negative",
        "ftj",
        [("spec.followUp", {"deploy": {"enabled": True, "resources": {"memory": "-1Gi"}}})],
        "spec.followUp.deploy.resources.memory",
    ),
    ("merge-cpu-negative", "merge", [("spec.resources", {"cpu": "-2"})], "spec.resources.cpu"),
    (
        "merge-memory-negative",
        "merge",
        [("spec.resources", {"memory": "-16Gi"})],
        "spec.resources.memory",
    ),
    ("deploy-cpu-negative", "deploy", [("spec.resources", {"cpu": "-2"})], "spec.resources.cpu"),
    (
        "deploy-memory-negative",
        "deploy",
        [("spec.resources", {"memory": "-32Gi"})],
        "spec.resources.memory",
    ),
    (
        "deploy-memory-not-quantity",
        "deploy",
        [("spec.resources", {"memory": "lots"})],
        "spec.resources.memory",
    ),
]

# Rules only the API server can check (they need metadata or the previous object).
SERVER_ONLY = {
    "name-not-dns-label",
    "name-too-long",
    "deploy-name-starts-with-digit",
    "merge-name-not-dns-label",
}


def invalid_manifest(base: str, changes: list) -> dict:
    doc = BASES[base]()
    for path, value in changes:
        doc = mutate(doc, path, value)
    return doc


def pydantic_message(exc: ValidationError) -> str:
    # Pydantic locations index lists with integers; print them as the API server does.
    lines = []
    for error in exc.errors():
        where = ""
        for part in error["loc"]:
            where += f"[{part}]" if isinstance(part, int) else f".{part}" if where else str(part)
        lines.append(f"{where}: {error['msg']}")
    return "\n".join(lines)


def test_the_table_is_large_enough():
    assert len(INVALID) >= 25
    assert len({case[0] for case in INVALID}) == len(INVALID)


@pytest.mark.parametrize("base", sorted(BASES))
def test_the_valid_bases_are_valid(base):
    doc = BASES[base]()
    MODELS[doc["kind"]].model_validate(doc)


MODEL_CASES = [c for c in INVALID if c[0] not in SERVER_ONLY]


@pytest.mark.parametrize(
    "case_id, base, changes, field", MODEL_CASES, ids=[c[0] for c in MODEL_CASES]
)
def test_models_reject_invalid_manifest(case_id, base, changes, field):
    doc = invalid_manifest(base, changes)
    with pytest.raises(ValidationError) as err:
        MODELS[doc["kind"]].model_validate(doc)
    message = pydantic_message(err.value)
    assert field.split("[")[0] in message, message


@pytest.mark.cluster
@pytest.mark.parametrize("case_id, base, changes, field", INVALID, ids=[c[0] for c in INVALID])
def test_api_server_rejects_invalid_manifest(crds, kube, case_id, base, changes, field):
    doc = invalid_manifest(base, changes)
    result = kube.create(doc, check=False)
    assert result.returncode != 0, f"{case_id} was accepted:\n{result.stdout}"
    assert field in result.stderr, result.stderr
    # Nothing was stored.
    assert kube.get_or_none(doc["kind"].lower(), doc["metadata"]["name"]) is None


# --- the name rule: one message, on the field ------------------------------------------------

NAME_RULE_KINDS = {"ftj": "finetunejobs", "merge": "adaptermerges", "deploy": "adapterdeployments"}


@pytest.mark.parametrize("base", sorted(NAME_RULE_KINDS))
def test_name_rule_reports_on_metadata_name_and_defers_to_the_server(base):
    """The root rule names the field it checks, and it passes names the API server's own
    DNS-subdomain check already rejects (so those get one message, not two)."""
    from finetune_api import crdgen
    from finetune_api.common import DNS_SUBDOMAIN_PATTERN

    crd = crdgen.crd_for(
        *next((m, e) for m, e in crdgen.RESOURCES if e["plural"] == NAME_RULE_KINDS[base])
    )
    root = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    # fieldPath must resolve against the schema, hence the declared name.
    assert root["properties"]["metadata"]["properties"]["name"] == {"type": "string"}
    rules = [r for r in root["x-kubernetes-validations"] if "metadata.name" in r["rule"]]
    assert len(rules) == 1
    rule = rules[0]
    assert rule["fieldPath"] == ".metadata.name"
    assert rule["message"].startswith("must be a DNS label of at most 45 characters")
    # The rule opens with the server's own condition as an escape hatch.
    assert rule["rule"].startswith(
        f"self.metadata.name.size() > 253 || "
        f"!self.metadata.name.matches(r'{DNS_SUBDOMAIN_PATTERN}') || "
    )


@pytest.mark.cluster
@pytest.mark.parametrize(
    "name, ours", [("llama.v1", True), ("a" * 50, True), ("Llama3", False), ("llama_3", False)]
)
def test_api_server_names_the_field_once(crds, kube, name, ours):
    doc = mutate(finetunejob(), "metadata.name", name)
    result = kube.create(doc, check=False)
    assert result.returncode != 0, result.stdout
    assert "<nil>" not in result.stderr, result.stderr
    assert f'metadata.name: Invalid value: "{name}"' in result.stderr or (
        "metadata.name: Invalid value" in result.stderr
    ), result.stderr
    # One message per bad name: ours for names the server's own check lets through,
    # the server's (RFC 1123) for the others.
    assert result.stderr.count("metadata.name") == 1, result.stderr
    assert ("must be a DNS label of at most 45 characters" in result.stderr) == ours, result.stderr
