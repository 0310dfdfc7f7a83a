"""Pure builders and status logic of the operator: no cluster needed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from finetune_api.constants import Phase, Reason
from finetune_api.exit_codes import WorkerExitCode
from finetune_api.finetunejob import FineTuneJob, TrainingPlan
from finetune_api.worker_config import WorkerConfig
from finetune_operator.builders import followups, training
from finetune_operator.conditions import set_condition
from finetune_operator.constants import HF_TOKEN_PATH, WORKER_CONTAINER
from finetune_operator.status import Outcome, apply_outcome, observe_training

ROOT = Path(__file__).resolve().parents[2]


def load_example(name: str, namespace: str = "team-a") -> FineTuneJob:
    doc = yaml.safe_load((ROOT / "examples" / name).read_text())
    doc["metadata"].update(namespace=namespace, uid="1234-uid", generation=1)
    return FineTuneJob.model_validate(doc)


PLAN = TrainingPlan.model_validate(
    {
        "method": "qlora",
        "reason": "test",
        "estimatedPeakBytes": 20 * 2**30,
        "microBatchSize": 4,
        "gradientAccumulation": 4,
        "gradientCheckpointing": True,
        "trainableParams": 41943040,
    }
)


@pytest.fixture
def llama() -> FineTuneJob:
    return load_example("finetunejob-llama3-8b.yaml")


def test_training_job_requests_gpus_and_selects_nodes_by_gpu_memory(llama):
    job = training.build_training_job(llama, PLAN, "hash1")
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    gpu = llama.spec.resources.gpu
    assert container["resources"]["limits"][gpu.resource_name] == str(gpu.count)
    exprs = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ][0]["matchExpressions"]
    mem = next(e for e in exprs if e["key"] == "nvidia.com/gpu.memory")
    budget_mib = int(gpu.memory.removesuffix("Gi")) * 1024
    assert mem == {
        "key": "nvidia.com/gpu.memory",
        "operator": "Gt",
        "values": [str(budget_mib - 1)],
    }
    assert job["metadata"]["name"] == f"{llama.metadata.name}-train"
    assert pod["restartPolicy"] == "Never"
    assert pod["serviceAccountName"] == f"{llama.metadata.name}-worker"


def _selects(terms: list[dict], labels: dict[str, str]) -> bool:
    """Whether required node affinity `terms` select a node with `labels`, as the scheduler
    reads them: terms ORed, expressions ANDed, Gt comparing integers."""

    def holds(e: dict) -> bool:
        value = labels.get(e["key"])
        if value is None:
            return False
        if e["operator"] == "In":
            return value in e["values"]
        assert e["operator"] == "Gt", e
        return value.isdigit() and int(value) > int(e["values"][0])

    return any(all(holds(e) for e in t["matchExpressions"]) for t in terms)


def _node(memory_mib: int, compute: tuple[int, int] | None, product: str = "P") -> dict:
    labels = {"nvidia.com/gpu.memory": str(memory_mib), "nvidia.com/gpu.product": product}
    if compute:
        labels["nvidia.com/gpu.compute.major"] = str(compute[0])
        labels["nvidia.com/gpu.compute.minor"] = str(compute[1])
    return labels


def test_fp8_plans_require_gpus_with_fp8_tensor_cores_by_gfd_compute_labels():
    budget = 24 * 2**30
    memory = {"key": "nvidia.com/gpu.memory", "operator": "Gt", "values": ["24575"]}
    product = {"key": "nvidia.com/gpu.product", "operator": "In", "values": ["NVIDIA-H200"]}
    major_above_8 = {"key": "nvidia.com/gpu.compute.major", "operator": "Gt", "values": ["8"]}
    major_8 = {"key": "nvidia.com/gpu.compute.major", "operator": "In", "values": ["8"]}
    minor_above_8 = {"key": "nvidia.com/gpu.compute.minor", "operator": "Gt", "values": ["8"]}

    def terms(affinity: dict) -> list[dict]:
        return affinity["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
            "nodeSelectorTerms"
        ]

    # Two terms, ORed, each keeping the memory (and product) expressions.
    assert terms(training.gpu_node_affinity(budget, "NVIDIA-H200", fp8=True)) == [
        {"matchExpressions": [memory, product, major_above_8]},
        {"matchExpressions": [memory, product, major_8, minor_above_8]},
    ]
    assert training.fp8_node_terms([memory]) == [
        {"matchExpressions": [memory, major_above_8]},
        {"matchExpressions": [memory, major_8, minor_above_8]},
    ]
    assert terms(training.gpu_node_affinity(budget, None)) == [{"matchExpressions": [memory]}]
    # What they select: compute capability 8.9 or newer with the memory; nothing unlabelled.
    fp8_terms = terms(training.gpu_node_affinity(budget, None, fp8=True))
    for compute, selected in (
        ((8, 9), True),  # L4, L40S, RTX 4090
        ((9, 0), True),  # H100, H200
        ((10, 0), True),  # B200
        ((12, 0), True),  # RTX 5090
        ((8, 6), False),  # A10G, A40
        ((8, 0), False),  # A100
        ((7, 5), False),  # T4
        (None, False),  # no compute labels: not chosen
    ):
        assert _selects(fp8_terms, _node(81559, compute)) is selected, compute
    assert not _selects(fp8_terms, _node(24575, (9, 0)))  # a MiB short of the budget: not
    assert _selects(terms(training.gpu_node_affinity(budget, None)), _node(81559, (8, 0)))


def test_the_training_job_of_an_fp8_plan_requires_fp8_nodes_and_no_other_does(llama):
    def terms(plan: TrainingPlan) -> list[dict]:
        pod = training.build_training_job(llama, plan, "h")["spec"]["template"]["spec"]
        return pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
            "nodeSelectorTerms"
        ]

    fp8 = terms(PLAN.model_copy(update={"method": "fp8"}))
    assert len(fp8) == 2
    assert not _selects(fp8, _node(81920, (8, 0)))
    assert _selects(fp8, _node(81559, (9, 0)))
    for method in ("lora", "qlora"):
        (only,) = terms(PLAN.model_copy(update={"method": method}))
        assert all("compute" not in e["key"] for e in only["matchExpressions"])


def test_training_job_failure_policy_fails_fast_on_permanent_exit_codes(llama):
    rules = training.build_training_job(llama, PLAN, "h")["spec"]["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}
    codes = set(rules[1]["onExitCodes"]["values"])
    assert rules[1]["action"] == "FailJob"
    assert {
        WorkerExitCode.INVALID_CONFIG,
        WorkerExitCode.DATA_ERROR,
        WorkerExitCode.NON_FINITE_LOSS,
        WorkerExitCode.CUDA_OOM,
    } <= codes
    assert WorkerExitCode.STORAGE_ERROR not in codes  # may be transient: retried


def test_secrets_are_mounted_as_files_never_env(llama):
    assert llama.spec.hf_token_secret_ref is not None
    job = training.build_training_job(llama, PLAN, "h")
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    secret_vols = [v for v in pod["volumes"] if "secret" in v]
    assert [v["secret"]["secretName"] for v in secret_vols] == [llama.spec.hf_token_secret_ref.name]
    assert all("valueFrom" not in e for e in container["env"])
    assert "envFrom" not in container
    cfg = yaml.safe_load(training.build_config_map(llama, PLAN, "h")["data"]["worker-config.yaml"])
    assert cfg["paths"]["hfTokenFile"] == HF_TOKEN_PATH


def test_restricted_security_context_and_shm(llama):
    pod = training.build_training_job(llama, PLAN, "h")["spec"]["template"]["spec"]
    sc = pod["containers"][0]["securityContext"]
    assert sc["runAsNonRoot"] and not sc["allowPrivilegeEscalation"]
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"


def test_worker_config_round_trips_through_the_worker_model(llama):
    cm = training.build_config_map(llama, PLAN, "abc")
    cfg = WorkerConfig.model_validate(yaml.safe_load(cm["data"]["worker-config.yaml"]))
    assert cfg.spec == llama.spec
    assert cfg.plan.micro_batch_size == 4
    assert cfg.job.name == llama.metadata.name and cfg.spec_hash == "abc"


def test_pvc_output_and_model_are_mounted_once_each():
    ftj = load_example("finetunejob-demo.yaml")
    job = training.build_training_job(ftj, PLAN, "h")
    pod = job["spec"]["template"]["spec"]
    claims = {
        v["persistentVolumeClaim"]["claimName"]: v["persistentVolumeClaim"]["readOnly"]
        for v in pod["volumes"]
        if "persistentVolumeClaim" in v
    }
    out_claim = ftj.spec.output.uri.split("://")[1].split("/")[0]
    assert claims[out_claim] is False  # the worker writes the adapter there
    assert len(claims) == len(set(claims))
    cfg = yaml.safe_load(training.build_config_map(ftj, PLAN, "h")["data"]["worker-config.yaml"])
    assert cfg["paths"]["outputDir"].startswith(f"/mnt/{out_claim}")
    assert set(cfg["paths"]["claimMounts"]) == set(claims)


def test_kueue_queue_creates_the_job_suspended_with_the_queue_label(llama):
    doc = llama.model_dump(mode="json", by_alias=True, exclude_none=True)
    doc["spec"]["resources"]["queueName"] = "gpu-queue"
    ftj = FineTuneJob.model_validate(doc)
    job = training.build_training_job(ftj, PLAN, "h")
    assert job["spec"]["suspend"] is True
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"


def test_worker_role_allows_only_patching_its_own_status(llama):
    sa, role, binding = training.build_rbac(llama)
    assert role["rules"] == [
        {
            "apiGroups": ["finetune.dev"],
            "resources": ["finetunejobs/status"],
            "verbs": ["patch"],
            "resourceNames": [llama.metadata.name],
        }
    ]
    assert binding["subjects"][0]["name"] == sa["metadata"]["name"]


def test_followups_only_when_enabled():
    demo = load_example("finetunejob-demo.yaml")
    merge = followups.build_adapter_merge(demo, {})
    deploy = followups.build_adapter_deployment(demo, {})
    enabled = demo.spec.follow_up
    assert (merge is not None) == bool(enabled and enabled.merge and enabled.merge.enabled)
    assert (deploy is not None) == bool(enabled and enabled.deploy and enabled.deploy.enabled)
    if merge:
        assert merge["spec"]["fineTuneJobRef"] == {"name": demo.metadata.name}
    if deploy:
        assert deploy["spec"]["adapters"][0]["fineTuneJobRef"] == {"name": demo.metadata.name}


# --- status: the Job and its pods -> phase and reason ---------------------------------------


def _job(conditions=(), suspend=False, **spec):
    return {
        "metadata": {"name": "j-train"},
        "spec": {"suspend": suspend, **spec},
        "status": {
            "conditions": [{"type": t, "status": "True", "reason": r} for t, r in conditions]
        },
    }


def _pod(
    phase,
    *,
    exit_code=None,
    reason=None,
    message=None,
    created="2026-01-01T00:00:00Z",
    disrupted=False,
    scheduled=None,
):
    status = {"phase": phase, "conditions": []}
    if exit_code is not None or reason:
        term = {"exitCode": exit_code, "reason": reason or "Error"}
        if message:
            term["message"] = message
        status["containerStatuses"] = [{"name": "worker", "state": {"terminated": term}}]
    if disrupted:
        status["conditions"].append({"type": "DisruptionTarget", "status": "True"})
    if scheduled is not None:
        status["conditions"].append(
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": scheduled,
            }
        )
    return {
        "metadata": {"name": f"p-{phase}-{created}", "creationTimestamp": created},
        "status": status,
    }


@pytest.mark.parametrize("code", [c for c in WorkerExitCode if c != WorkerExitCode.SUCCESS])
def test_worker_exit_codes_map_to_reasons(code):
    summary = json.dumps({"result": "Failed", "exitCode": int(code), "message": "details here"})
    out = observe_training(
        _job([("Failed", "PodFailurePolicy")]),
        [_pod("Failed", exit_code=int(code), message=summary)],
        user_suspended=False,
        queued=False,
    )
    assert out.phase == Phase.FAILED
    assert out.reason == code.reason
    assert "details here" in out.message


def test_host_oom_kill_is_not_reported_as_cuda_oom():
    out = observe_training(
        _job([("Failed", "BackoffLimitExceeded")]),
        [_pod("Failed", exit_code=137, reason="OOMKilled")],
        user_suspended=False,
        queued=False,
    )
    assert out.reason == "HostOutOfMemory"
    assert "spec.resources.memory" in out.message


def test_deadline_and_backoff_reasons():
    dl = observe_training(
        _job([("Failed", "DeadlineExceeded")], activeDeadlineSeconds=60),
        [],
        user_suspended=False,
        queued=False,
    )
    assert dl.reason == Reason.DEADLINE_EXCEEDED and "60s" in dl.message
    bo = observe_training(
        _job([("Failed", "BackoffLimitExceeded")], backoffLimit=2),
        [_pod("Failed", exit_code=1)],
        user_suspended=False,
        queued=False,
    )
    assert bo.reason == Reason.BACKOFF_LIMIT_EXCEEDED


def test_evicted_then_running_is_reported_as_resumed():
    pods = [
        _pod("Failed", disrupted=True, created="2026-01-01T00:00:00Z"),
        _pod("Running", created="2026-01-01T00:05:00Z"),
    ]
    out = observe_training(_job(), pods, user_suspended=False, queued=False)
    assert out.phase == Phase.RUNNING and out.reason == "EvictedAndResumed"


def test_queued_suspended_unschedulable_and_complete():
    assert (
        observe_training(_job(suspend=True), [], user_suspended=False, queued=True).phase
        == Phase.QUEUED
    )
    sus = observe_training(_job(suspend=True), [], user_suspended=True, queued=False)
    assert sus.phase == Phase.SUSPENDED and sus.reason == Reason.SUSPENDED_BY_USER
    pend = observe_training(
        _job(),
        [_pod("Pending", scheduled="0/3 nodes: Insufficient gpu")],
        user_suspended=False,
        queued=False,
    )
    assert pend.phase == Phase.QUEUED and "Insufficient gpu" in pend.message
    done = observe_training(
        _job([("Complete", "")]),
        [
            _pod(
                "Succeeded",
                exit_code=0,
                message=json.dumps(
                    {"result": "Succeeded", "exitCode": 0, "metrics": {"tokensPerSecond": 5.0}}
                ),
            )
        ],
        user_suspended=False,
        queued=False,
    )
    assert done.phase == Phase.SUCCEEDED
    assert done.termination["metrics"]["tokensPerSecond"] == 5.0


def test_a_retry_whose_new_pod_has_not_started_says_so():
    pods = [
        _pod(
            "Failed",
            exit_code=14,
            created="2026-01-01T00:00:00Z",
            message=json.dumps({"result": "Failed", "exitCode": 14, "message": "disk full"}),
        ),
        _pod("Pending", created="2026-01-01T00:05:00Z"),
    ]
    out = observe_training(_job(), pods, user_suspended=False, queued=False)
    assert (out.phase, out.reason) == (Phase.PENDING, Reason.RETRYING_AFTER_FAILURE)
    assert "StorageError" in out.message and "disk full" in out.message
    status = apply_outcome({"jobName": "j-train"}, out, 1)
    running = next(c for c in status["conditions"] if c["type"] == "Running")
    assert (running["status"], running["reason"]) == ("False", Reason.RETRYING_AFTER_FAILURE)


def test_a_failed_pod_that_will_not_be_retried_is_a_failure_not_a_retry():
    permanent = observe_training(
        _job(backoffLimit=2), [_pod("Failed", exit_code=11)], user_suspended=False, queued=False
    )
    assert (permanent.phase, permanent.reason) == (Phase.FAILED, "DataError")
    pods = [_pod("Failed", exit_code=14, created=f"2026-01-01T00:0{i}:00Z") for i in range(3)]
    exhausted = observe_training(_job(backoffLimit=2), pods, user_suspended=False, queued=False)
    assert (exhausted.phase, exhausted.reason) == (Phase.FAILED, Reason.BACKOFF_LIMIT_EXCEEDED)


def test_conditions_of_a_job_that_never_got_a_job_do_not_claim_it_was_admitted_or_ran():
    failed = apply_outcome({}, Outcome(Phase.FAILED, "InsufficientGPUMemory", "too small"), 1)
    reasons = {c["type"]: c["reason"] for c in failed["conditions"]}
    assert reasons["Queued"] == Reason.NOT_QUEUED
    assert reasons["Running"] == Reason.NOT_STARTED
    # Admitted only after having been queued; a Running reason only once a Job exists.
    queued = apply_outcome({"jobName": "j"}, Outcome(Phase.QUEUED, "WaitingForQuota", "q"), 1)
    ran = apply_outcome(queued, Outcome(Phase.RUNNING, Reason.TRAINING, "t"), 1)
    done = apply_outcome(ran, Outcome(Phase.FAILED, "DataError", "bad rows"), 1)
    reasons = {c["type"]: c["reason"] for c in done["conditions"]}
    assert reasons["Queued"] == Reason.ADMITTED and reasons["Running"] == "Failed"


def test_condition_transition_time_moves_only_when_status_flips():
    conds = set_condition([], "Running", True, "Training", "a", 1)
    first = conds[0]["lastTransitionTime"]
    conds2 = set_condition(conds, "Running", True, "Training", "b", 2)
    assert conds2[0]["lastTransitionTime"] == first and conds2[0]["message"] == "b"
    conds3 = set_condition(
        [{**conds2[0], "lastTransitionTime": "2000-01-01T00:00:00Z"}],
        "Running",
        False,
        "Done",
        "",
        3,
    )
    assert conds3[0]["lastTransitionTime"] != "2000-01-01T00:00:00Z"


def test_operator_wide_gpu_tolerations_come_before_the_jobs_own(llama):
    default = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    doc = llama.model_dump(mode="json", by_alias=True, exclude_none=True)
    doc["spec"]["resources"]["tolerations"] = [
        {"key": "team", "operator": "Equal", "value": "a", "effect": "NoSchedule"}
    ]
    job = training.build_training_job(
        FineTuneJob.model_validate(doc), PLAN, "h", default_tolerations=default
    )
    tolerations = job["spec"]["template"]["spec"]["tolerations"]
    assert tolerations[0] == default[0]
    assert tolerations[1]["key"] == "team"


def test_a_finished_pod_before_the_job_completes_is_still_running_not_pending():
    out = observe_training(
        _job(), [_pod("Succeeded", exit_code=0)], user_suspended=False, queued=False
    )
    assert out.phase == Phase.RUNNING


def test_merge_job_asks_for_host_memory_by_model_size():
    from finetune_api.adaptermerge import AdapterMerge
    from finetune_operator.builders import merge

    # Llama-3-8B: the bf16 base twice (loaded + merged copy) plus 1 GiB headroom.
    assert merge.merge_memory_request(8_030_261_248) == "31Gi"
    assert merge.merge_memory_request(None) == "32Gi"  # unknown size: enough for 8B
    doc = yaml.safe_load_all((ROOT / "examples" / "adaptermerge.yaml").read_text())
    am = AdapterMerge.model_validate(
        {**next(iter(doc)), "metadata": {"name": "m", "namespace": "ns", "uid": "u"}}
    )
    base = load_example("finetunejob-demo.yaml").spec.model
    job = merge.build_merge_job(am, "pvc://adapters/x", base, total_params=10 * 2**20)
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][:2] == ["finetune-worker", "merge"]
    if not (am.spec.resources and am.spec.resources.memory):
        assert container["resources"]["requests"]["memory"] == "2Gi"
    cfg = yaml.safe_load(
        merge.build_config_map(am, "pvc://adapters/x", base)["data"][merge.MERGE_CONFIG_FILENAME]
    )
    assert cfg["adapterDir"] == "/mnt/adapters/x"


@pytest.mark.parametrize(
    "example", sorted(p.name for p in (ROOT / "examples").glob("finetunejob-*.yaml"))
)
def test_every_example_finetunejob_builds_a_complete_training_job(example):
    ftj = load_example(example)
    plan = PLAN.model_copy(update={"method": "lora"})
    job = training.build_training_job(ftj, plan, "h")
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    gpu = ftj.spec.resources.gpu
    assert container["resources"]["limits"][gpu.resource_name] == str(gpu.count)
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    keys = {e["key"] for e in terms["nodeSelectorTerms"][0]["matchExpressions"]}
    assert "nvidia.com/gpu.memory" in keys
    assert ("nvidia.com/gpu.product" in keys) == bool(gpu.product)
    assert job["spec"]["podFailurePolicy"]["rules"][1]["action"] == "FailJob"
    mounted = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/etc/finetune", "/dev/shm", "/scratch"} <= mounted
    for uri in (ftj.spec.output.uri, ftj.spec.dataset.uri, ftj.spec.model.uri or ""):
        if uri.startswith("pvc://"):
            assert f"/mnt/{uri[6:].split('/')[0]}" in mounted
    cfg = yaml.safe_load(training.build_config_map(ftj, plan, "h")["data"]["worker-config.yaml"])
    assert cfg["plan"]["method"] == "lora"


def test_the_operator_package_never_imports_torch_or_transformers():
    """Its image stays small: model configs are read as JSON."""
    import subprocess
    import sys

    code = (
        "import sys, finetune_operator.main, finetune_operator.planning; "
        "bad = [m for m in ('torch', 'transformers', 'peft', 'trl') if m in sys.modules]; "
        "print(','.join(bad))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == ""


# --- several GPUs, several nodes -----------------------------------------------------------


def _distributed(llama: FineTuneJob, gpus: int, nodes: int) -> tuple[FineTuneJob, TrainingPlan]:
    doc = llama.model_dump(mode="json", by_alias=True, exclude_none=True)
    doc["spec"]["resources"]["gpu"].update(count=gpus, nodes=nodes)
    plan = PLAN.model_copy(
        update={
            "strategy": "ddp",
            "nodes": nodes,
            "processes_per_node": gpus,
            "world_size": gpus * nodes,
        }
    )
    return FineTuneJob.model_validate(doc), plan


def test_one_gpu_runs_the_worker_directly_without_a_launcher(llama):
    job = training.build_training_job(llama, PLAN, "h")
    command = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:2] == ["finetune-worker", "train"]
    assert "completionMode" not in job["spec"]
    assert training.build_rendezvous_service(llama, PLAN) is None


def test_several_gpus_on_one_node_run_torchrun_standalone_in_one_pod(llama):
    ftj, plan = _distributed(llama, gpus=4, nodes=1)
    job = training.build_training_job(ftj, plan, "h")
    spec = job["spec"]
    container = spec["template"]["spec"]["containers"][0]
    assert container["command"] == [
        "finetune-worker",
        "launch",
        "--nnodes",
        "1",
        "--nproc-per-node",
        "4",
        "--",
        "train",
        "--config",
        "/etc/finetune/worker-config.yaml",
    ]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert (spec["completions"], spec["parallelism"]) == (1, 1)
    assert "completionMode" not in spec and "subdomain" not in spec["template"]["spec"]
    assert training.build_rendezvous_service(ftj, plan) is None


def test_several_nodes_are_an_indexed_job_rendezvousing_at_pod_0_through_a_headless_service(llama):
    ftj, plan = _distributed(llama, gpus=8, nodes=2)
    job = training.build_training_job(ftj, plan, "h")
    service = training.build_rendezvous_service(ftj, plan)
    name = ftj.metadata.name
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert spec["completionMode"] == "Indexed"
    assert (spec["completions"], spec["parallelism"]) == (2, 2)
    assert spec["backoffLimit"] == ftj.spec.backoff_limit * 2
    assert pod["subdomain"] == service["metadata"]["name"] == f"{name}-workers"
    container = pod["containers"][0]
    command = container["command"]
    assert command[:6] == ["finetune-worker", "launch", "--nnodes", "2", "--nproc-per-node", "8"]
    master = command[command.index("--master-addr") + 1]
    # pod 0's hostname in an Indexed Job is <job>-0; the Service is its DNS subdomain
    assert master == f"{job['metadata']['name']}-0.{service['metadata']['name']}"
    assert command[command.index("--master-port") + 1] == "29500"
    assert container["ports"] == [{"name": "rendezvous", "containerPort": 29500}]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": job["metadata"]["name"]}
    assert service["spec"]["ports"][0]["port"] == 29500
    # the same failure policy as one pod: worker exit codes fail the Job at once
    assert spec["podFailurePolicy"] == training.failure_policy()


def test_the_worker_config_carries_the_world_the_worker_must_find(llama):
    ftj, plan = _distributed(llama, gpus=4, nodes=2)
    config = WorkerConfig.model_validate(training.worker_config(ftj, plan, "h"))
    assert (
        config.plan.strategy,
        config.plan.nodes,
        config.plan.processes_per_node,
        config.plan.world_size,
    ) == ("ddp", 2, 4, 8)


def test_a_multi_node_success_reads_the_summary_of_the_pod_that_wrote_one():
    job = {"spec": {}, "status": {"conditions": [{"type": "Complete", "status": "True"}]}}
    summary = {"result": "Succeeded", "exitCode": 0, "message": "trained 10 steps"}

    def pod(name, created, message=None):
        term = {"exitCode": 0, **({"message": json.dumps(message)} if message else {})}
        return {
            "metadata": {"name": name, "creationTimestamp": created},
            "status": {
                "phase": "Succeeded",
                "containerStatuses": [{"name": WORKER_CONTAINER, "state": {"terminated": term}}],
            },
        }

    # pod 1 is newer but only pod 0 (global rank 0) wrote the summary
    pods = [
        pod("j-train-0-a", "2026-01-01T00:00:00Z", summary),
        pod("j-train-1-b", "2026-01-01T00:00:05Z"),
    ]
    outcome = observe_training(job, pods, user_suspended=False, queued=False)
    assert outcome.phase == Phase.SUCCEEDED and outcome.termination == summary


def test_a_multi_node_failure_names_the_pod_whose_worker_gave_a_verdict():
    job = {
        "spec": {"backoffLimit": 0},
        "status": {
            "conditions": [{"type": "Failed", "status": "True", "reason": "PodFailurePolicy"}]
        },
    }

    def pod(name, created, code, message):
        term = {
            "exitCode": code,
            "message": json.dumps({"result": "Failed", "exitCode": code, "message": message}),
        }
        return {
            "metadata": {"name": name, "creationTimestamp": created},
            "status": {
                "phase": "Failed",
                "containerStatuses": [{"name": WORKER_CONTAINER, "state": {"terminated": term}}],
            },
        }

    pods = [
        pod("j-train-0", "2026-01-01T00:00:00Z", 11, "row 7 has no 'output'"),
        pod("j-train-1", "2026-01-01T00:00:09Z", 1, "rank 3 lost its peers"),
    ]
    outcome = observe_training(job, pods, user_suspended=False, queued=False)
    assert outcome.reason == Reason.DATA_ERROR and "row 7" in outcome.message
