"""The vLLM server builder and the adapter checks, without a cluster.

The rendered `vllm serve` arguments are parsed by a parser that mirrors vLLM's documented
flags (table below, with where each one is defined), so an argument vLLM would reject, or
a second `--lora-modules` flag that would silently drop the adapters before it, fails here.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from finetune_api import adapter_checks
from finetune_api.adapter_manifest import AdapterManifest, BaseModelRef, describe_files
from finetune_api.adapterdeployment import AdapterDeployment
from finetune_api.constants import ADAPTER_MANIFEST_FILENAME, ANNOTATION_ADAPTERS, Reason
from finetune_operator.builders import server_group, serving, vllm
from finetune_operator.builders.server_group import ServingDefaults
from finetune_operator.builders.serving import Member
from finetune_operator.builders.training import RESTRICTED_CONTAINER_SECURITY
from finetune_operator.builders.vllm import ServedAdapter
from finetune_operator.constants import HF_TOKEN_PATH, STORAGE_CREDENTIALS_DIR

BASE = "meta-llama/Meta-Llama-3-8B"

# vLLM's documented CLI for `vllm serve` (v0.11, the default serving image), the flags the
# operator renders:
#   --host, --port, --lora-modules: vllm/entrypoints/openai/cli_args.py (FrontendArgs,
#       BaseFrontendArgs; `lora_modules` is a list, so one flag takes every module, and its
#       LoRAParserAction *replaces* the list each time the flag appears; items are
#       `name=path` or JSON {"name", "path", "base_model_name"})
#   --served-model-name (nargs +), --revision, --tokenizer, --tensor-parallel-size:
#       vllm/engine/arg_utils.py (EngineArgs from ModelConfig / ParallelConfig)
#   --enable-lora, --max-loras, --max-cpu-loras, --max-lora-rank: vllm/engine/arg_utils.py
#       from vllm/config/lora.py (LoRAConfig; MaxLoRARanks = 1, 8, 16, 32, 64, 128, 256,
#       320, 512)
#   docs/features/lora.md ("Serving LoRA Adapters"): `vllm serve <model> --enable-lora
#       --lora-modules name=path ...`; requests select an adapter with `model`.
VLLM_MAX_LORA_RANKS = [1, 8, 16, 32, 64, 128, 256, 320, 512]


class _LoRAModules(argparse.Action):
    """vLLM's LoRAParserAction semantics: parse each item; the last flag wins."""

    def __call__(self, parser, namespace, values, option_string=None):
        modules = []
        for item in values:
            if "=" in item and "," not in item:
                name, path = item.split("=")  # vLLM splits exactly like this
                modules.append({"name": name, "path": path})
            else:
                data = json.loads(item)
                assert set(data) <= {"name", "path", "base_model_name"}, data
                modules.append(data)
        setattr(namespace, self.dest, modules)


def vllm_serve_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vllm serve", exit_on_error=False)
    p.add_argument("model_tag")
    p.add_argument("--host")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", nargs="+")
    p.add_argument("--revision")
    p.add_argument("--tokenizer")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--enable-lora", action="store_true")
    p.add_argument("--max-loras", type=int, default=1)
    p.add_argument("--max-cpu-loras", type=int)
    p.add_argument("--max-lora-rank", type=int, choices=VLLM_MAX_LORA_RANKS, default=16)
    p.add_argument("--lora-modules", nargs="+", action=_LoRAModules)
    p.add_argument("--gpu-memory-utilization", type=float)

    def error(message):  # fail the test instead of exiting
        raise AssertionError(f"vLLM would reject the arguments: {message}")

    p.error = error
    return p


def parse_vllm(args: list[str]) -> argparse.Namespace:
    ns = vllm_serve_parser().parse_args(args)
    assert ns.max_cpu_loras is None or ns.max_cpu_loras >= ns.max_loras  # LoRAConfig rule
    return ns


def ad(
    name: str, adapters: list[dict], *, namespace: str = "team", uid: str | None = None, **spec
) -> AdapterDeployment:
    doc = {
        "metadata": {"name": name, "namespace": namespace, "uid": uid or f"uid-{name}"},
        "spec": {"baseModel": {"name": BASE}, "adapters": adapters, **spec},
    }
    return AdapterDeployment.model_validate(doc)


def member(name: str, *adapters: ServedAdapter, replicas: int = 1) -> Member:
    return Member(name=name, uid=f"uid-{name}", replicas=replicas, adapters=tuple(adapters))


def served(
    name: str, uri: str, *, rank: int = 16, deployment: str = "d", sha256: str | None = None
) -> ServedAdapter:
    return ServedAdapter(name=name, uri=uri, deployment=deployment, max_rank=rank, sha256=sha256)


DEFAULTS = ServingDefaults()


def config_of(obj: AdapterDeployment, defaults: ServingDefaults = DEFAULTS) -> dict:
    return server_group.server_config(obj, defaults)


def vllm_container(deployment: dict) -> dict:
    return deployment["spec"]["template"]["spec"]["containers"][0]


# --- one server per base model and runtime settings -------------------------------------------


def test_three_adapters_on_one_base_render_one_deployment_listing_all_three():
    cfg = config_of(ad("a", []))
    members = [
        member("a", served("support", "pvc://adapters/support", deployment="a")),
        member("b", served("alpaca", "hf://acme/alpaca-lora", rank=8, deployment="b")),
        member("c", served("sql", "s3://adapters/sql", rank=64, deployment="c", sha256="ab" * 32)),
    ]
    dep, svc = serving.build_server(cfg, members, DEFAULTS)
    args = vllm_container(dep)["args"]
    assert args.count("--lora-modules") == 1  # a second flag would drop the first list
    ns = parse_vllm(args)
    assert ns.model_tag == BASE and ns.served_model_name == [BASE]
    assert ns.enable_lora
    assert ns.lora_modules == [
        {"name": "alpaca", "path": "acme/alpaca-lora"},
        {"name": "sql", "path": "/adapters/sql"},
        {"name": "support", "path": "/mnt/adapters/support"},
    ]
    assert ns.max_lora_rank == 64  # the largest adapter's
    assert ns.max_loras == 3 and ns.max_cpu_loras == 3
    assert ns.port == vllm.PORT and ns.host == "0.0.0.0"
    # Owned by all three, controlled by none: the GC removes it after the last one.
    refs = dep["metadata"]["ownerReferences"]
    assert [r["name"] for r in refs] == ["a", "b", "c"]
    assert all(r["kind"] == "AdapterDeployment" and r["controller"] is False for r in refs)
    assert svc["metadata"]["ownerReferences"] == refs
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert svc["spec"]["ports"][0]["port"] == vllm.PORT
    assert serving.endpoint(cfg) == f"http://{dep['metadata']['name']}.team.svc:8000/v1"


def test_members_order_does_not_matter_and_removal_rolls_the_template():
    cfg = config_of(ad("a", []))
    a = member("a", served("one", "pvc://adapters/one"))
    b = member("b", served("two", "pvc://adapters/two", sha256="cd" * 32))
    c = member("c", served("three", "pvc://adapters/three"))
    first, _ = serving.build_server(cfg, [a, b, c], DEFAULTS)
    again, _ = serving.build_server(cfg, [c, a, b], DEFAULTS)
    assert first == again
    without_b, _ = serving.build_server(cfg, [a, c], DEFAULTS)
    assert "two=/mnt/adapters/two" not in vllm_container(without_b)["args"]
    assert [r["name"] for r in without_b["metadata"]["ownerReferences"]] == ["a", "c"]

    def annotations(d):
        return d["spec"]["template"]["metadata"]["annotations"]

    assert annotations(first) != annotations(without_b)
    assert annotations(without_b)[ANNOTATION_ADAPTERS] == ("one=unverified,three=unverified")


def test_server_identity_follows_base_model_and_runtime_settings_only():
    one = server_group.server_name(config_of(ad("a", [], maxLoraRank=16)))
    assert one == server_group.server_name(config_of(ad("b", [], replicas=3, maxLoraRank=128)))
    assert one.startswith("vllm-") and len(one) <= 63
    others = [
        ad("c", [], baseModel={"name": "mistralai/Mistral-7B-v0.3"}),
        ad("d", [], baseModel={"name": BASE, "revision": "main"}),
        ad("e", [], image="vllm/vllm-openai:v0.10.2"),
        ad("f", [], resources={"gpu": {"count": 2}}),
        ad("g", [], resources={"tolerations": [{"key": "gpu", "operator": "Exists"}]}),
        ad("h", [], namespace="other"),
        ad("i", [], hfTokenSecretRef={"name": "hf"}),
    ]
    names = {server_group.server_name(config_of(o)) for o in others}
    assert one not in names and len(names) == len(others)
    # `hf://name` and `name` are the same base model, but different servers would be fine
    # too: what matters is that the adapters' base check treats them as equal.
    assert adapter_checks.base_model_identity({"uri": f"hf://{BASE}"}) == BASE


def test_replicas_are_the_largest_any_member_asks_for():
    cfg = config_of(ad("a", []))
    dep, _ = serving.build_server(
        cfg,
        [
            member("a", served("x", "pvc://a/x"), replicas=1),
            member("b", served("y", "pvc://a/y"), replicas=3),
        ],
        DEFAULTS,
    )
    assert dep["spec"]["replicas"] == 3


# --- rank ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "need,rank",
    [(1, 1), (2, 8), (8, 8), (16, 16), (17, 32), (64, 64), (65, 128), (300, 320), (512, 512)],
)
def test_server_rank_rounds_up_to_a_rank_vllm_accepts(need, rank):
    assert vllm.server_rank([1, need]) == rank
    assert vllm.server_rank([need]) in VLLM_MAX_LORA_RANKS


def test_rank_above_vllms_maximum_is_an_error():
    with pytest.raises(ValueError, match="above vLLM's maximum 512"):
        vllm.server_rank([600])


# --- the rest of the pod --------------------------------------------------------------------


def test_pod_is_restricted_probes_health_and_keeps_secrets_in_files():
    cfg = config_of(
        ad(
            "a",
            [],
            hfTokenSecretRef={"name": "hf", "key": "tok"},
            storageSecretRef={"name": "s3"},
            resources={"gpu": {"count": 2, "product": "NVIDIA-H200"}, "cpu": "8", "memory": "64Gi"},
        )
    )
    dep, _ = serving.build_server(cfg, [member("a", served("x", "s3://bucket/x"))], DEFAULTS)
    pod = dep["spec"]["template"]["spec"]
    c = vllm_container(dep)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    # A new pod is ready before an old one stops: a bad adapter never takes the server down.
    assert dep["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for container in pod["containers"] + pod["initContainers"]:
        assert container["securityContext"] == RESTRICTED_CONTAINER_SECURITY
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}
    assert c["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    assert c["resources"]["limits"] == {"nvidia.com/gpu": "2", "cpu": "8", "memory": "64Gi"}
    assert c["resources"]["requests"] == c["resources"]["limits"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H200"}
    assert parse_vllm(c["args"]).tensor_parallel_size == 2
    # Secrets are mounted files; nothing secret-valued in any env.
    env = {e["name"]: e for e in c["env"]}
    assert env["HF_TOKEN_PATH"]["value"] == HF_TOKEN_PATH
    assert all(
        "valueFrom" not in e
        for ct in pod["containers"] + pod["initContainers"]
        for e in ct.get("env", [])
    )
    secrets = {v["name"]: v["secret"] for v in pod["volumes"] if "secret" in v}
    assert secrets["hf-token"]["secretName"] == "hf"
    assert secrets["hf-token"]["items"] == [{"key": "tok", "path": "token"}]
    assert secrets["storage-credentials"]["secretName"] == "s3"
    # The s3 adapter is fetched, then verified, before vLLM starts.
    fetch, verify = pod["initContainers"]
    assert fetch["name"] == "fetch" and fetch["args"] == ["s3://bucket/x", "/adapters/x"]
    assert fetch["image"] == DEFAULTS.fetch_image
    assert any(m["mountPath"] == STORAGE_CREDENTIALS_DIR for m in fetch["volumeMounts"])
    assert verify["name"] == "verify-adapters" and verify["image"] == cfg["image"]


def test_hub_adapters_need_no_init_containers_and_pvcs_are_mounted_read_only():
    cfg = config_of(ad("a", []))
    dep, _ = serving.build_server(cfg, [member("a", served("x", "hf://acme/x"))], DEFAULTS)
    assert "initContainers" not in dep["spec"]["template"]["spec"]
    dep, _ = serving.build_server(cfg, [member("a", served("x", "pvc://claim/runs/x"))], DEFAULTS)
    pod = dep["spec"]["template"]["spec"]
    assert {
        "name": "pvc-claim",
        "persistentVolumeClaim": {"claimName": "claim", "readOnly": True},
    } in pod["volumes"]
    assert [i["name"] for i in pod["initContainers"]] == ["verify-adapters"]


def test_defaults_apply_unless_the_deployment_sets_its_own():
    defaults = ServingDefaults.from_env(
        {
            "FINETUNE_SERVING_DEFAULTS": json.dumps(
                {
                    "tolerations": [
                        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
                    ],
                    "nodeSelector": {"pool": "serving"},
                    "cpu": "4",
                    "memory": "32Gi",
                    "extraArgs": ["--gpu-memory-utilization", "0.85"],
                    "maxSurge": 0,
                    "maxUnavailable": 1,
                }
            )
        },
        image="registry/vllm:1",
    )
    cfg = server_group.server_config(ad("a", []), defaults)
    dep, _ = serving.build_server(cfg, [member("a", served("x", "hf://acme/x"))], defaults)
    pod = dep["spec"]["template"]["spec"]
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert pod["nodeSelector"] == {"pool": "serving"}
    assert dep["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
    c = vllm_container(dep)
    assert c["image"] == "registry/vllm:1"
    assert c["resources"]["limits"]["memory"] == "32Gi"
    assert parse_vllm(c["args"]).gpu_memory_utilization == 0.85
    own = server_group.server_config(
        ad(
            "a",
            [],
            image="mine:2",
            resources={"tolerations": [], "nodeSelector": {"pool": "mine"}, "cpu": "2"},
        ),
        defaults,
    )
    dep, _ = serving.build_server(own, [member("a", served("x", "hf://acme/x"))], defaults)
    pod = dep["spec"]["template"]["spec"]
    assert "tolerations" not in pod and pod["nodeSelector"] == {"pool": "mine"}
    assert vllm_container(dep)["image"] == "mine:2"
    assert vllm_container(dep)["resources"]["limits"]["cpu"] == "2"


def test_bad_defaults_are_reported_with_what_is_expected():
    with pytest.raises(ValueError, match="unknown keys \\['tolerance'\\]"):
        ServingDefaults.from_env({"FINETUNE_SERVING_DEFAULTS": '{"tolerance": []}'})
    with pytest.raises(ValueError, match="not valid JSON"):
        ServingDefaults.from_env({"FINETUNE_SERVING_DEFAULTS": "{tolerations"})


def test_paths_vllm_would_misparse_use_the_json_form():
    arg = vllm.lora_module_arg(served("x", "pvc://claim/a=b,c"), BASE)
    ns = parse_vllm([BASE, "--lora-modules", arg])
    assert ns.lora_modules == [{"name": "x", "path": "/mnt/claim/a=b,c", "base_model_name": BASE}]


def test_base_model_revision_tokenizer_and_volume_paths():
    cfg = config_of(
        ad(
            "a",
            [],
            baseModel={
                "uri": "pvc://models/llama3",
                "revision": "v1",
                "tokenizer": "hf://acme/tok",
            },
        )
    )
    dep, _ = serving.build_server(cfg, [member("a", served("x", "hf://acme/x"))], DEFAULTS)
    ns = parse_vllm(vllm_container(dep)["args"])
    assert ns.model_tag == "/mnt/models/llama3"
    assert ns.served_model_name == ["llama3"]
    assert ns.revision == "v1" and ns.tokenizer == "acme/tok"


# --- adapter checks -------------------------------------------------------------------------


def server_inputs(max_rank: int = 64, **base) -> dict:
    return vllm.server_check_inputs({"baseModel": base or {"name": BASE}}, max_rank)


def reasons(problems) -> list[str]:
    return [r for r, _ in problems]


def test_compatible_adapter_has_no_problems():
    facts = {
        "name": "x",
        "baseModel": {"name": BASE},
        "revisionDeclared": True,
        "r": 16,
        "targetModules": ["q_proj", "v_proj"],
        "useDoRA": False,
    }
    assert adapter_checks.adapter_problems(facts, server_inputs()) == []


@pytest.mark.parametrize(
    "facts,server,reason,words",
    [
        (
            {"baseModel": {"name": "mistralai/Mistral-7B-v0.3"}},
            {},
            "BaseModelMismatch",
            "trained on 'mistralai/Mistral-7B-v0.3'",
        ),
        (
            {"baseModel": {"name": BASE, "revision": "abc"}, "revisionDeclared": True},
            {},
            "BaseModelMismatch",
            "revision 'abc'",
        ),
        (
            {"baseModel": {"name": BASE, "revision": "abc"}, "revisionDeclared": False},
            {"revision": "def"},
            "BaseModelMismatch",
            "spec.baseModel.revision",
        ),
        ({"r": 128}, {}, "RankAboveLimit", "raise spec.maxLoraRank to at least 128"),
        ({"r": 1024}, {"maxRank": 2048}, "RankAboveLimit", "vLLM serves ranks up to 512"),
        (
            {"targetModules": ["q_proj", "input_layernorm"]},
            {},
            "UnsupportedTargetModules",
            "['input_layernorm']",
        ),
        ({"useDoRA": True}, {}, "UnsupportedAdapterFeature", "DoRA"),
        ({"modulesToSave": ["lm_head"]}, {}, "UnsupportedAdapterFeature", "modules_to_save"),
    ],
)
def test_incompatible_adapters_are_refused_with_the_reason(facts, server, reason, words):
    inputs = server_inputs(max_rank=server.pop("maxRank", 64), **({"name": BASE, **server}))
    problems = adapter_checks.adapter_problems({"name": "x", **facts}, inputs)
    assert reasons(problems) == [reason]
    assert words in problems[0][1] and "'x'" in problems[0][1]


def test_resolved_revision_is_not_compared_with_an_unpinned_server():
    facts = {
        "name": "x",
        "baseModel": {"name": f"hf://{BASE}".removeprefix("hf://"), "revision": "0123abc"},
        "revisionDeclared": False,
    }
    assert adapter_checks.adapter_problems(facts, server_inputs()) == []


def test_hub_uri_and_name_are_the_same_base_model():
    facts = {"name": "x", "baseModel": {"uri": f"hf://{BASE}"}, "revisionDeclared": True}
    assert adapter_checks.adapter_problems(facts, server_inputs()) == []


# --- adapter files: the operator (pvc_root) and the init container run the same code -------


def write_adapter(
    directory: Path, *, r: int = 16, base: str = BASE, revision: str | None = None
) -> AdapterManifest:
    directory.mkdir(parents=True)
    (directory / "adapter_config.json").write_text(
        json.dumps(
            {
                "r": r,
                "lora_alpha": 32,
                "target_modules": ["q_proj", "v_proj"],
                "use_dora": False,
                "base_model_name_or_path": base,
            }
        )
    )
    (directory / "adapter_model.safetensors").write_bytes(os.urandom(4096))
    manifest = AdapterManifest(
        spec_hash="f" * 64,
        base_model=BaseModelRef(name=base, revision=revision),
        method="lora",
        r=r,
        alpha=32,
        target_modules=["q_proj", "v_proj"],
        files=describe_files(directory),
        created_at=datetime.now(UTC),
    )
    manifest.write(directory)
    return manifest


def test_verified_adapter_reports_its_manifest_facts(tmp_path):
    manifest = write_adapter(tmp_path / "a", revision="0123abc")
    problems, facts = adapter_checks.verify_adapter_dir(
        str(tmp_path / "a"), {"name": "a", "sha256": manifest.digest}
    )
    assert problems == []
    assert facts["r"] == 16 and facts["baseModel"]["revision"] == "0123abc"
    assert (
        adapter_checks.files_digest((f.name, f.sha256) for f in manifest.files) == manifest.digest
    )


def test_missing_corrupt_and_substituted_files_are_refused(tmp_path):
    manifest = write_adapter(tmp_path / "a")
    (tmp_path / "a" / "adapter_model.safetensors").write_bytes(b"tampered")
    problems, _ = adapter_checks.verify_adapter_dir(str(tmp_path / "a"), {"name": "a"})
    assert reasons(problems) == ["AdapterChecksumMismatch"]
    assert "adapter_model.safetensors" in problems[0][1]
    (tmp_path / "a" / "adapter_model.safetensors").unlink()
    problems, _ = adapter_checks.verify_adapter_dir(str(tmp_path / "a"), {"name": "a"})
    assert reasons(problems) == ["AdapterFilesMissing"]
    other = write_adapter(tmp_path / "b")
    problems, _ = adapter_checks.verify_adapter_dir(
        str(tmp_path / "b"), {"name": "b", "sha256": manifest.digest}
    )
    assert other.digest != manifest.digest
    assert reasons(problems) == ["AdapterChecksumMismatch"]
    assert "different adapter" in problems[0][1]
    problems, _ = adapter_checks.verify_adapter_dir(str(tmp_path / "nowhere"), {"name": "c"})
    assert reasons(problems) == ["AdapterFilesMissing"]


def test_plain_peft_adapter_without_manifest_is_checked_for_what_vllm_loads(tmp_path):
    d = tmp_path / "peft"
    d.mkdir()
    (d / "adapter_config.json").write_text(
        json.dumps({"r": 8, "target_modules": "all-linear", "use_dora": True})
    )
    problems, facts = adapter_checks.verify_adapter_dir(str(d), {"name": "p"})
    assert reasons(problems) == ["AdapterFilesMissing"]
    assert reasons(adapter_checks.adapter_problems(facts, server_inputs())) == [
        "UnsupportedAdapterFeature"
    ]


def run_verify_init_container(container: dict, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run the init container's command here (python3 -c <script> <plan>), as the serving
    image runs it: `-I -S` leaves out our packages (and every other installed one)."""
    command = container["command"]
    assert command[:2] == ["python3", "-c"]
    log = tmp_path / "termination-log"
    return subprocess.run(
        [sys.executable, "-I", "-S", "-c", *command[2:]],
        check=False,
        capture_output=True,
        text=True,
        env={**os.environ, "TERMINATION_LOG": str(log)},
        timeout=60,
    )


def test_init_container_verifies_files_and_compatibility_before_vllm_starts(tmp_path, monkeypatch):
    good = write_adapter(tmp_path / "claim" / "good")
    write_adapter(tmp_path / "claim" / "big", r=600)
    cfg = config_of(ad("a", []))
    members = [member("a", served("good", "pvc://claim/good", sha256=good.digest))]
    dep, _ = serving.build_server(cfg, members, DEFAULTS)
    verify = dep["spec"]["template"]["spec"]["initContainers"][0]
    # Point the in-pod paths at the temp dir (the pod would mount the claim at /mnt/claim).
    plan = json.loads(verify["command"][3])
    assert [a["path"] for a in plan["adapters"]] == ["/mnt/claim/good"]
    for a in plan["adapters"]:
        a["path"] = str(tmp_path / "claim" / a["name"])
    verify = {**verify, "command": verify["command"][:3] + [json.dumps(plan)]}
    ok = run_verify_init_container(verify, tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "'good'" in ok.stdout

    plan["adapters"].append({"name": "big", "path": str(tmp_path / "claim" / "big")})
    (tmp_path / "claim" / "good" / "adapter_config.json").write_text("{}")
    bad = run_verify_init_container(
        {**verify, "command": verify["command"][:3] + [json.dumps(plan)]}, tmp_path
    )
    assert bad.returncode == 1
    message = (tmp_path / "termination-log").read_text()
    assert "AdapterChecksumMismatch: adapter 'good'" in message
    # The pod's message names the URI people wrote, not the pod's mount path.
    assert "pvc://claim/good" in message and str(tmp_path) not in message
    assert "RankAboveLimit: adapter 'big' has rank 600" in message


def write_peft_adapter(directory: Path, base: str | None, **config) -> Path:
    """A plain PEFT adapter (no finetune-manifest.json), as `save_pretrained` leaves it."""
    directory.mkdir(parents=True)
    (directory / "adapter_config.json").write_text(
        json.dumps(
            {
                "r": 8,
                "target_modules": ["q_proj", "v_proj"],
                "base_model_name_or_path": base,
                **config,
            }
        )
    )
    (directory / "adapter_model.safetensors").write_bytes(os.urandom(1024))
    return directory


def test_plain_peft_adapter_is_checked_against_the_base_in_its_own_config(tmp_path):
    def problems_for(base, server_base=None, **config):
        d = write_peft_adapter(tmp_path / f"p{len(list(tmp_path.iterdir()))}", base, **config)
        problems, facts = adapter_checks.verify_adapter_dir(str(d), {"name": "p"})
        assert problems == []
        server = server_inputs(**(server_base or {"name": BASE}))
        return adapter_checks.adapter_problems(facts, server)

    mistral = problems_for("mistralai/Mistral-7B-v0.3")
    assert reasons(mistral) == ["BaseModelMismatch"]
    assert (
        "'mistralai/Mistral-7B-v0.3' (base_model_name_or_path in its "
        "adapter_config.json)" in mistral[0][1]
    )
    assert problems_for(BASE) == [] and problems_for(BASE.lower()) == []
    assert problems_for("mistralai/Mistral-7B-v0.3", {"uri": f"hf://{BASE}"}) != []
    # What cannot be compared is not: a training machine's path, a base on a volume.
    assert problems_for("/data/models/mistral") == []
    assert problems_for("./mistral") == []
    assert problems_for(None) == []
    assert problems_for("mistralai/Mistral-7B-v0.3", {"uri": "pvc://models/llama3"}) == []
    # A PEFT revision is compared only with a pinned server revision.
    assert reasons(problems_for(BASE, {"name": BASE, "revision": "b"}, revision="a")) == [
        "BaseModelMismatch"
    ]


def test_init_container_refuses_a_plain_peft_adapter_of_another_base(tmp_path):
    write_peft_adapter(tmp_path / "claim" / "mistral", "mistralai/Mistral-7B-v0.3")
    cfg = config_of(ad("a", []))
    dep, _ = serving.build_server(
        cfg, [member("a", served("mistral", "pvc://claim/mistral"))], DEFAULTS
    )
    verify = dep["spec"]["template"]["spec"]["initContainers"][0]
    plan = json.loads(verify["command"][3])
    plan["adapters"][0]["path"] = str(tmp_path / "claim" / "mistral")
    result = run_verify_init_container(
        {**verify, "command": verify["command"][:3] + [json.dumps(plan)]}, tmp_path
    )
    assert result.returncode == 1
    assert "BaseModelMismatch: adapter 'mistral' was trained on 'mistralai/Mistral-7B-v0.3'" in (
        (tmp_path / "termination-log").read_text()
    )


def test_an_adapters_digest_is_known_with_or_without_a_manifest(tmp_path):
    manifest = write_adapter(tmp_path / "worker")
    _, facts = adapter_checks.verify_adapter_dir(str(tmp_path / "worker"), {"name": "w"})
    assert facts["sha256"] == manifest.digest
    # A plain PEFT adapter: the digest of its files, by the same formula.
    d = write_peft_adapter(tmp_path / "peft", BASE)
    problems, facts = adapter_checks.verify_adapter_dir(str(d), {"name": "p"})
    assert problems == []
    assert facts["sha256"] == adapter_checks.files_digest(
        (f.name, f.sha256) for f in describe_files(d)
    )
    # What the operator checked is what the pod must see: same files pass, new ones not.
    expected = {"name": "p", "sha256": facts["sha256"]}
    assert adapter_checks.verify_adapter_dir(str(d), expected)[0] == []
    (d / "adapter_model.safetensors").write_bytes(os.urandom(1024))
    problems, newer = adapter_checks.verify_adapter_dir(str(d), expected)
    assert newer["sha256"] != facts["sha256"]
    assert reasons(problems) == ["AdapterChecksumMismatch"]


def test_the_verify_script_runs_on_its_own_as_the_init_container_runs_it(tmp_path):
    """The init container runs verify_script() with a bare `python3 -c`, without this package
    (`-I -S`: no site-packages): it must be standard library only. A manifest adapter and a
    plain PEFT one pass, a changed file fails with exit 1."""
    manifest = write_adapter(tmp_path / "ours")
    write_adapter(tmp_path / "plain")
    (tmp_path / "plain" / ADAPTER_MANIFEST_FILENAME).unlink()
    server = vllm.server_check_inputs({"baseModel": {"name": BASE}}, 64)
    plan = {
        "server": server,
        "adapters": [
            {
                "name": "ours",
                "path": str(tmp_path / "ours"),
                "sha256": manifest.digest,
                "manifest": ADAPTER_MANIFEST_FILENAME,
            },
            {
                "name": "plain",
                "path": str(tmp_path / "plain"),
                "manifest": ADAPTER_MANIFEST_FILENAME,
            },
        ],
    }

    def run():
        return subprocess.run(
            [sys.executable, "-I", "-S", "-c", serving.verify_script(), json.dumps(plan)],
            capture_output=True,
            text=True,
            timeout=60,
            env={"TERMINATION_LOG": str(tmp_path / "term")},
            check=False,
        )

    ok = run()
    assert ok.returncode == 0, ok.stderr
    assert "'ours'" in ok.stdout and "'plain'" in ok.stdout
    (tmp_path / "ours" / "adapter_model.safetensors").write_bytes(b"changed")
    bad = run()
    assert bad.returncode == 1 and "AdapterChecksumMismatch" in bad.stderr


def test_the_init_container_runs_the_adapter_checks_module_the_operator_imports():
    """One source: the init container's program is adapter_checks.py, the whole file, the
    module the operator and `AdapterManifest.digest` import; nothing is assembled."""
    cfg = config_of(ad("a", []))
    dep, _ = serving.build_server(cfg, [member("a", served("x", "pvc://claim/x"))], DEFAULTS)
    verify = dep["spec"]["template"]["spec"]["initContainers"][0]
    assert verify["command"][2] == Path(adapter_checks.__file__).read_text(encoding="utf-8")
    assert verify["command"][2] == serving.verify_script()
    assert adapter_checks.MANIFEST_FILENAME == ADAPTER_MANIFEST_FILENAME


def test_the_init_container_and_the_api_model_compute_the_same_digest(tmp_path):
    """The pod's script, run on its own, accepts a plain adapter exactly when the digest the
    API model computes for its files is the one expected, and refuses any other."""
    d = write_peft_adapter(tmp_path / "claim" / "p", BASE)
    api_digest = AdapterManifest(
        spec_hash="f" * 64,
        base_model=BaseModelRef(name=BASE),
        method="lora",
        r=8,
        alpha=16,
        target_modules=["q_proj", "v_proj"],
        files=describe_files(d),
        created_at=datetime.now(UTC),
    ).digest
    server = vllm.server_check_inputs({"baseModel": {"name": BASE}}, 64)

    def run(sha256: str) -> subprocess.CompletedProcess:
        plan = {
            "server": server,
            "adapters": [
                {
                    "name": "p",
                    "path": str(d),
                    "sha256": sha256,
                    "manifest": ADAPTER_MANIFEST_FILENAME,
                }
            ],
        }
        return run_verify_init_container(
            {"command": ["python3", "-c", serving.verify_script(), json.dumps(plan)]}, tmp_path
        )

    assert run(api_digest).returncode == 0
    refused = run("0" * 64)
    assert refused.returncode == 1 and "AdapterChecksumMismatch" in refused.stderr


def test_the_reasons_the_checks_give_are_the_apis():
    """The checks cannot import `Reason` in the pod: every reason they write is one of its
    values all the same."""
    tree = ast.parse(Path(adapter_checks.__file__).read_text(encoding="utf-8"))
    given = {
        node.elts[0].value
        for node in ast.walk(tree)
        if isinstance(node, ast.List)
        and len(node.elts) == 2
        and isinstance(node.elts[0], ast.Constant)
        and isinstance(node.elts[0].value, str)
    }
    known = {v for k, v in vars(Reason).items() if k.isupper()}
    assert given and given <= known, given - known
