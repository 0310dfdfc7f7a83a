"""Pure builders for a FineTuneJob's children: worker config, RBAC and the batch Job.

Every function takes the parsed FineTuneJob (and the plan) and returns plain dicts; no
I/O, so each is unit-tested without a cluster. Names are deterministic (`<job>-train`,
`<job>-worker`, ...) which is what makes re-running a reconcile, or an operator restart
in the middle of one, create nothing twice.
"""

from __future__ import annotations

import yaml

from finetune_api.common import API_VERSION, GROUP, parse_quantity
from finetune_api.constants import (
    ANNOTATION_SPEC_HASH,
    FP8_MIN_COMPUTE_CAPABILITY,
    LABEL_COMPONENT,
    LABEL_FINETUNEJOB,
    MANAGED_BY,
    RENDEZVOUS_PORT,
    TERMINATION_LOG_ENV,
    TERMINATION_LOG_PATH,
    WORKER_CONFIG_FILENAME,
)
from finetune_api.exit_codes import WorkerExitCode
from finetune_api.finetunejob import FineTuneJob, TrainingPlan

from ..constants import (
    DEFAULT_WORKER_IMAGE,
    GPU_COMPUTE_MAJOR_LABEL,
    GPU_COMPUTE_MINOR_LABEL,
    GPU_MEMORY_LABEL,
    GPU_PRODUCT_LABEL,
    HF_TOKEN_DIR,
    HF_TOKEN_PATH,
    HF_TOKEN_VOLUME,
    STORAGE_CREDENTIALS_DIR,
    STORAGE_CREDENTIALS_VOLUME,
    WORKER_CONTAINER,
)
from ..planner.gpus import min_gpu_memory_mib
from .storage import VolumePlan, locate

CONFIG_DIR = "/etc/finetune"
SCRATCH_DIR = "/scratch"
WORKER_UID = 65532  # the worker image's USER, the uid its run-time environment is checked with

# Exit codes that no retry can fix: fail the Job at once instead of burning backoffLimit
# on the same bad config, data, plan or learning rate. Storage errors stay retryable.
PERMANENT_EXIT_CODES = sorted(
    int(c) for c in WorkerExitCode if c is not WorkerExitCode.SUCCESS and not c.retryable
)


def names(job_name: str) -> dict[str, str]:
    return {
        "job": f"{job_name}-train",
        "config": f"{job_name}-worker-config",
        "service_account": f"{job_name}-worker",
        "role": f"{job_name}-worker",
        "role_binding": f"{job_name}-worker",
        "rendezvous": f"{job_name}-workers",
    }


def labels(job_name: str, component: str) -> dict[str, str]:
    return {**MANAGED_BY, LABEL_FINETUNEJOB: job_name, LABEL_COMPONENT: component}


def _meta(ftj: FineTuneJob, name: str, component: str) -> dict:
    return {
        "name": name,
        "namespace": ftj.metadata.namespace,
        "labels": labels(ftj.metadata.name, component),
    }


def claim_fields(ftj: FineTuneJob) -> dict[str, tuple[str, bool]]:
    """Each PVC the spec names -> (the first spec field naming it, whether the worker writes)."""
    spec = ftj.spec
    found: dict[str, tuple[str, bool]] = {}
    for field_name, uri, write in (
        ("spec.output.uri", spec.output.uri, True),
        ("spec.model.uri", spec.model.uri, False),
        ("spec.dataset.uri", spec.dataset.uri, False),
    ):
        claim = locate(uri).claim if uri else None
        if claim is not None:
            first, writes = found.get(claim, (field_name, False))
            found[claim] = (first, writes or write)
    return found


def _claims(ftj: FineTuneJob) -> VolumePlan:
    """Every PVC the spec names, writable where the worker writes."""
    return VolumePlan(writable={claim: writes for claim, (_, writes) in claim_fields(ftj).items()})


def worker_paths(ftj: FineTuneJob) -> dict:
    """Paths inside the pod, as the worker config states them."""
    output = locate(ftj.spec.output.uri)
    out_dir = output.local_path or f"{SCRATCH_DIR}/output"
    return {
        "outputDir": out_dir,
        "claimMounts": _claims(ftj).mount_paths(),
        # Checkpoints sit next to the adapter on the same volume, so a new pod (after
        # preemption or a retry) finds them.
        "checkpointDir": f"{out_dir}/checkpoints",
        "hfTokenFile": HF_TOKEN_PATH if ftj.spec.hf_token_secret_ref else None,
        "storageCredentialsDir": STORAGE_CREDENTIALS_DIR if ftj.spec.storage_secret_ref else None,
    }


def worker_config(
    ftj: FineTuneJob, plan: TrainingPlan, spec_hash: str, *, report_interval_seconds: int = 10
) -> dict:
    """The WorkerConfig document the worker parses with the same API models."""
    from finetune_api.worker_config import WorkerConfig

    doc = {
        "apiVersion": API_VERSION,
        "kind": "WorkerConfig",
        "job": {
            "namespace": ftj.metadata.namespace,
            "name": ftj.metadata.name,
            "uid": ftj.metadata.uid,
        },
        "spec": ftj.spec.model_dump(mode="json", by_alias=True, exclude_none=True),
        "plan": plan.model_dump(mode="json", by_alias=True, exclude_none=True),
        "paths": {k: v for k, v in worker_paths(ftj).items() if v is not None},
        "report": {"statusPatch": True, "minIntervalSeconds": report_interval_seconds},
        "specHash": spec_hash,
    }
    # Round-trip through the model: the operator never mounts a config the worker would
    # reject.
    return WorkerConfig.model_validate(doc).model_dump(
        mode="json", by_alias=True, exclude_none=True
    )


# libyaml's dumper where PyYAML has it (its wheels do): the same safe subset; the pure-Python
# dumper took a fifth of the operator's CPU in a 300-job burst (py-spy, bench/scale.py).
SAFE_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def config_map_stub(ftj: FineTuneJob) -> dict:
    """The worker ConfigMap without its data: enough to ask whether it exists."""
    n = names(ftj.metadata.name)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(ftj, n["config"], "worker-config"),
    }


def build_config_map(ftj: FineTuneJob, plan: TrainingPlan, spec_hash: str) -> dict:
    return {
        **config_map_stub(ftj),
        "data": {
            WORKER_CONFIG_FILENAME: yaml.dump(
                worker_config(ftj, plan, spec_hash), Dumper=SAFE_DUMPER, sort_keys=True
            )
        },
    }


def build_rbac(ftj: FineTuneJob) -> list[dict]:
    """A ServiceAccount allowed exactly one thing: patching this job's status."""
    n = names(ftj.metadata.name)
    return [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": _meta(ftj, n["service_account"], "worker"),
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": _meta(ftj, n["role"], "worker"),
            "rules": [
                {
                    "apiGroups": [GROUP],
                    "resources": ["finetunejobs/status"],
                    "verbs": ["patch"],
                    "resourceNames": [ftj.metadata.name],
                }
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": _meta(ftj, n["role_binding"], "worker"),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": n["role"]},
            "subjects": [
                {
                    "kind": "ServiceAccount",
                    "name": n["service_account"],
                    "namespace": ftj.metadata.namespace,
                }
            ],
        },
    ]


def gpu_node_affinity(memory_bytes: int, product: str | None, *, fp8: bool = False) -> dict:
    """Require nodes whose GPUs have at least the budget, by GPU Feature Discovery labels,
    and with `fp8` (the plan's method) FP8 tensor cores as well.

    `nvidia.com/gpu.memory` is in MiB. `Gt` is strict, so compare with one MiB less.
    """
    mib = min_gpu_memory_mib(memory_bytes)
    exprs = [{"key": GPU_MEMORY_LABEL, "operator": "Gt", "values": [str(mib - 1)]}]
    if product:
        exprs.append({"key": GPU_PRODUCT_LABEL, "operator": "In", "values": [product]})
    terms = fp8_node_terms(exprs) if fp8 else [{"matchExpressions": exprs}]
    return {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": terms}
        }
    }


def fp8_node_terms(exprs: list[dict]) -> list[dict]:
    """Node selector terms (ORed) for nodes that match `exprs` and whose GPUs have FP8 tensor
    cores: compute capability 8.9 or newer by GFD's `nvidia.com/gpu.compute.major`/`.minor`
    labels, i.e. major above 8, or major 8 and minor above 8.

    An fp8 plan holds only where its pods land on such a GPU (elsewhere the worker refuses
    to start), whether the spec named fp8 or auto chose it from the product or the nodes
    that were there when it was planned. Labels compare as integers under Gt; a node without
    them is not chosen."""
    major, minor = FP8_MIN_COMPUTE_CAPABILITY
    return [
        {
            "matchExpressions": [
                *exprs,
                {"key": GPU_COMPUTE_MAJOR_LABEL, "operator": "Gt", "values": [str(major)]},
            ]
        },
        {
            "matchExpressions": [
                *exprs,
                {"key": GPU_COMPUTE_MAJOR_LABEL, "operator": "In", "values": [str(major)]},
                {"key": GPU_COMPUTE_MINOR_LABEL, "operator": "Gt", "values": [str(minor - 1)]},
            ]
        },
    ]


RESTRICTED_CONTAINER_SECURITY = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


def secret_volumes(hf_token_ref, storage_ref) -> tuple[list[dict], list[dict]]:
    """Secrets only as files, never environment variables: they do not leak into
    `kubectl describe`, crash dumps or child processes' environments."""
    volumes, mounts = [], []
    if hf_token_ref:
        volumes.append(
            {
                "name": HF_TOKEN_VOLUME,
                "secret": {
                    "secretName": hf_token_ref.name,
                    "items": [{"key": hf_token_ref.key, "path": "token"}],
                    "defaultMode": 0o440,
                },
            }
        )
        mounts.append({"name": HF_TOKEN_VOLUME, "mountPath": HF_TOKEN_DIR, "readOnly": True})
    if storage_ref:
        volumes.append(
            {
                "name": STORAGE_CREDENTIALS_VOLUME,
                "secret": {"secretName": storage_ref.name, "defaultMode": 0o440},
            }
        )
        mounts.append(
            {
                "name": STORAGE_CREDENTIALS_VOLUME,
                "mountPath": STORAGE_CREDENTIALS_DIR,
                "readOnly": True,
            }
        )
    return volumes, mounts


def worker_volumes(
    config_map: str,
    pvcs: VolumePlan,
    *,
    shm_limit: str = "16Gi",
    hf_token_ref=None,
    storage_ref=None,
) -> tuple[list[dict], list[dict]]:
    """Volumes every worker pod has: its config, shared memory, scratch, PVCs, secrets."""
    sv, sm = secret_volumes(hf_token_ref, storage_ref)
    volumes = [
        {"name": "worker-config", "configMap": {"name": config_map}},
        # DataLoader workers exchange batches through /dev/shm; the container default
        # (64 MiB) is far too small.
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm_limit}},
        {"name": "scratch", "emptyDir": {}},
        *pvcs.volumes(),
        *sv,
    ]
    mounts = [
        {"name": "worker-config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "scratch", "mountPath": SCRATCH_DIR},
        *pvcs.mounts(),
        *sm,
    ]
    return volumes, mounts


def scratch_environment(scratch_dir: str = SCRATCH_DIR) -> list[dict]:
    """Every cache and home directory on the scratch emptyDir: the root filesystem is read-only
    and uid 65532 has no passwd entry, so "~" and the image's /tmp defaults are not writable.
    Triton writes its compiled launcher and kernels under TRITON_CACHE_DIR at the first launch."""
    return [
        {"name": name, "value": f"{scratch_dir}{suffix}"}
        for name, suffix in (
            ("HOME", "/home"),
            ("TMPDIR", ""),
            ("HF_HOME", "/hf-home"),
            ("XDG_CACHE_HOME", "/cache"),
            ("TRITON_HOME", ""),
            ("TRITON_CACHE_DIR", "/triton"),
            ("TORCHINDUCTOR_CACHE_DIR", "/torchinductor"),
        )
    ]


def worker_container(
    image: str,
    command: list[str],
    mounts: list[dict],
    resources: dict[str, str],
    *,
    scratch_dir: str = SCRATCH_DIR,
) -> dict:
    return {
        "name": WORKER_CONTAINER,
        "image": image,
        "command": command,
        "env": [
            *scratch_environment(scratch_dir),
            {"name": "PYTHONUNBUFFERED", "value": "1"},
            {"name": TERMINATION_LOG_ENV, "value": TERMINATION_LOG_PATH},
            # Batches of varying shape fragment the caching allocator; the planner's memory
            # model was calibrated with expandable segments on.
            {"name": "PYTORCH_CUDA_ALLOC_CONF", "value": "expandable_segments:True"},
        ],
        # GPUs are requested as limits (extended resources must have request == limit).
        "resources": {"requests": dict(resources), "limits": dict(resources)},
        "volumeMounts": mounts,
        "terminationMessagePath": TERMINATION_LOG_PATH,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": RESTRICTED_CONTAINER_SECURITY,
    }


def worker_pod_spec(
    service_account: str | None, container: dict, volumes: list[dict], affinity: dict | None
) -> dict:
    spec = {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": 180,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": WORKER_UID,
            "runAsGroup": WORKER_UID,
            "fsGroup": WORKER_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    }
    if service_account:
        spec["serviceAccountName"] = service_account
        spec["automountServiceAccountToken"] = True
    else:
        spec["automountServiceAccountToken"] = False
    if affinity:
        spec["affinity"] = affinity
    return spec


def failure_policy() -> dict:
    return {
        "rules": [
            # Preemption and node drains are not the job's fault: retry without counting.
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
            {
                "action": "FailJob",
                "onExitCodes": {
                    "containerName": WORKER_CONTAINER,
                    "operator": "In",
                    "values": PERMANENT_EXIT_CODES,
                },
            },
        ]
    }


def worker_command(ftj: FineTuneJob, plan: TrainingPlan) -> list[str]:
    """The worker's command: `finetune-worker train`, under torchrun past one process.

    One pod: torchrun's standalone rendezvous on localhost. Several pods (an Indexed Job):
    a static rendezvous at pod 0, reached through the headless Service, with each pod's node
    rank its completion index (the launcher reads JOB_COMPLETION_INDEX), so global rank 0,
    which writes the adapter, the status and the termination message, is always pod 0.
    """
    train = ["train", "--config", f"{CONFIG_DIR}/{WORKER_CONFIG_FILENAME}"]
    if plan.world_size == 1:
        return ["finetune-worker", *train]
    launch = [
        "finetune-worker",
        "launch",
        "--nnodes",
        str(plan.nodes),
        "--nproc-per-node",
        str(plan.processes_per_node),
    ]
    if plan.nodes > 1:
        n = names(ftj.metadata.name)
        launch += [
            "--master-addr",
            f"{n['job']}-0.{n['rendezvous']}",
            "--master-port",
            str(RENDEZVOUS_PORT),
        ]
    return [*launch, "--", *train]


def build_rendezvous_service(ftj: FineTuneJob, plan: TrainingPlan) -> dict | None:
    """A headless Service giving each worker pod of a multi-node job a DNS name
    (`<job>-train-<index>.<job>-workers`); None for a single pod.

    Not-ready addresses are published because the worker pods have no readiness probe to
    pass before pod 0 must be reachable for the rendezvous.
    """
    if plan.nodes == 1:
        return None
    n = names(ftj.metadata.name)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(ftj, n["rendezvous"], "rendezvous"),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {"batch.kubernetes.io/job-name": n["job"]},
            "ports": [
                {"name": "rendezvous", "port": RENDEZVOUS_PORT, "targetPort": RENDEZVOUS_PORT}
            ],
        },
    }


def build_training_job(
    ftj: FineTuneJob,
    plan: TrainingPlan,
    spec_hash: str,
    *,
    default_image: str = DEFAULT_WORKER_IMAGE,
    default_tolerations: list[dict] | None = None,
) -> dict:
    spec = ftj.spec
    n = names(ftj.metadata.name)
    gpu = spec.resources.gpu
    shm_limit = "16Gi"
    if spec.resources.memory:
        # Shared memory counts against the container's memory limit; keep it a quarter.
        shm_limit = str(max(parse_quantity(spec.resources.memory) // 4, 64 * 2**20))
    volumes, mounts = worker_volumes(
        n["config"],
        _claims(ftj),
        shm_limit=shm_limit,
        hf_token_ref=spec.hf_token_secret_ref,
        storage_ref=spec.storage_secret_ref,
    )
    requests: dict[str, str] = {gpu.resource_name: str(gpu.count)}
    if spec.resources.cpu:
        requests["cpu"] = str(spec.resources.cpu)
    if spec.resources.memory:
        requests["memory"] = str(spec.resources.memory)
    container = worker_container(
        spec.image or default_image, worker_command(ftj, plan), mounts, requests
    )
    if plan.nodes > 1:
        container["ports"] = [{"name": "rendezvous", "containerPort": RENDEZVOUS_PORT}]
    pod_spec = worker_pod_spec(
        n["service_account"],
        container,
        volumes,
        gpu_node_affinity(parse_quantity(gpu.memory), gpu.product, fp8=plan.method == "fp8"),
    )
    if spec.resources.node_selector:
        pod_spec["nodeSelector"] = dict(spec.resources.node_selector)
    tolerations = [
        *(default_tolerations or []),
        *(t.model_dump(by_alias=True, exclude_none=True) for t in spec.resources.tolerations or []),
    ]
    if tolerations:
        pod_spec["tolerations"] = tolerations
    if spec.resources.priority_class_name:
        pod_spec["priorityClassName"] = spec.resources.priority_class_name
    job_labels = labels(ftj.metadata.name, "trainer")
    queued = spec.resources.queue_name is not None
    if queued:
        job_labels["kueue.x-k8s.io/queue-name"] = spec.resources.queue_name
    job_spec = {
        # A lost pod of a multi-node group makes its peers fail too (their collectives time
        # out), so one restart of the group costs up to `nodes` retries.
        "backoffLimit": spec.backoff_limit * plan.nodes,
        "completions": plan.nodes,
        "parallelism": plan.nodes,
        # Kueue admits a queued Job by un-suspending it; a user's suspend wins either way.
        "suspend": bool(spec.suspend or queued),
        "podFailurePolicy": failure_policy(),
        "template": {
            "metadata": {
                "labels": labels(ftj.metadata.name, "trainer"),
                "annotations": {ANNOTATION_SPEC_HASH: spec_hash},
            },
            "spec": pod_spec,
        },
    }
    if plan.nodes > 1:
        # Indexed: each pod knows its node rank (JOB_COMPLETION_INDEX) and gets the stable
        # hostname <job>-<index>, resolvable through the rendezvous Service (subdomain).
        job_spec["completionMode"] = "Indexed"
        pod_spec["subdomain"] = n["rendezvous"]
    if spec.active_deadline_seconds:
        job_spec["activeDeadlineSeconds"] = spec.active_deadline_seconds
    if spec.ttl_seconds_after_finished is not None:
        job_spec["ttlSecondsAfterFinished"] = spec.ttl_seconds_after_finished
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            **_meta(ftj, n["job"], "trainer"),
            "labels": job_labels,
            "annotations": {ANNOTATION_SPEC_HASH: spec_hash},
        },
        "spec": job_spec,
    }
