"""The `finetune.dev/v1alpha1` API: pydantic models that are the single source of truth.

The CRDs in `crds/` are generated from these models (`finetune-operator crds`); the
operator and the worker both read and write through them.
"""

from .adapter_manifest import AdapterManifest, ArtifactFile, describe_files
from .adapterdeployment import AdapterDeployment, AdapterDeploymentSpec, AdapterDeploymentStatus
from .adaptermerge import AdapterMerge, AdapterMergeSpec, AdapterMergeStatus
from .common import (
    API_VERSION,
    GROUP,
    VERSION,
    Artifact,
    Condition,
    ObjectReference,
    SecretKeySelector,
    format_bytes,
    now,
    parse_quantity,
    to_k8s,
    uri_scheme,
)
from .constants import ConditionType, Phase, Reason
from .exit_codes import WorkerExitCode
from .finetunejob import (
    FineTuneJob,
    FineTuneJobSpec,
    FineTuneJobStatus,
    MemoryBreakdown,
    Progress,
    TrainingMetrics,
    TrainingPlan,
)
from .spec_hash import spec_hash
from .worker_config import WorkerConfig, WorkerConfigError, load_worker_config
from .worker_report import ReportedAdapter, WorkerReport

__all__ = [
    "API_VERSION",
    "GROUP",
    "VERSION",
    "AdapterDeployment",
    "AdapterDeploymentSpec",
    "AdapterDeploymentStatus",
    "AdapterManifest",
    "AdapterMerge",
    "AdapterMergeSpec",
    "AdapterMergeStatus",
    "Artifact",
    "ArtifactFile",
    "Condition",
    "ConditionType",
    "FineTuneJob",
    "FineTuneJobSpec",
    "FineTuneJobStatus",
    "MemoryBreakdown",
    "ObjectReference",
    "Phase",
    "Progress",
    "Reason",
    "ReportedAdapter",
    "SecretKeySelector",
    "TrainingMetrics",
    "TrainingPlan",
    "WorkerConfig",
    "WorkerConfigError",
    "WorkerExitCode",
    "WorkerReport",
    "describe_files",
    "format_bytes",
    "load_worker_config",
    "now",
    "parse_quantity",
    "spec_hash",
    "to_k8s",
    "uri_scheme",
]
