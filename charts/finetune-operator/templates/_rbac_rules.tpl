{{/*
The operator's permissions, rule by rule, each with the reason it is needed. Verified by
tests/delivery/test_chart_rbac.py: the operator's integration suite passes with exactly these.
No wildcards, no escalate/bind/impersonate: the worker Role the operator creates grants
only `patch finetunejobs/status`, which the operator holds itself, so the API server's
escalation check passes without `escalate` or `bind`.
*/}}

{{/* Rules for the namespaces the operator works in (ClusterRole or per-namespace Role). */}}
{{- define "finetune-operator.namespacedRules" -}}
# Watch the three kinds; never write their spec (GitOps tools own it).
- apiGroups: ["finetune.dev"]
  resources: ["finetunejobs", "adaptermerges", "adapterdeployments"]
  verbs: ["get", "list", "watch"]
# Follow-ups of a successful FineTuneJob.
- apiGroups: ["finetune.dev"]
  resources: ["adaptermerges", "adapterdeployments"]
  verbs: ["create"]
# Status is the only thing the operator writes on its own kinds.
- apiGroups: ["finetune.dev"]
  resources: ["finetunejobs/status", "adaptermerges/status", "adapterdeployments/status"]
  verbs: ["get", "patch"]
# Training and merge Jobs: created once, suspended/resumed, removed with their owner.
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["create", "get", "list", "watch", "patch", "delete"]
# A multi-node job's claims must be mountable on every node: their access modes are read.
- apiGroups: [""]
  resources: ["persistentvolumeclaims"]
  verbs: ["get"]
# Worker pods drive status; their log tail explains a failure.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
- apiGroups: [""]
  resources: ["pods/log"]
  verbs: ["get"]
# The worker's config (the plan).
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["create", "get", "list", "watch"]
# Each job's worker identity: a ServiceAccount and a Role allowing it to patch its own
# FineTuneJob's status. `list` (by label, metadata only): one request per kind tells the
# operator which of its children exist, instead of a create per child per pass.
- apiGroups: [""]
  resources: ["serviceaccounts"]
  verbs: ["create", "get", "list"]
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles", "rolebindings"]
  verbs: ["create", "get", "list"]
# Referenced Secrets are checked to exist by name: `get` only, never list or watch.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
# Events for phase changes: posted (core/v1), and listed by name after a restart so that
# those already there are not posted again (events.py).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch", "list"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
# AdapterDeployment: a vLLM Deployment and its Service.
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["create", "get", "list", "watch", "patch", "delete"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["create", "get", "list", "watch", "patch", "delete"]
{{- if and .Values.standby.enabled (not (include "finetune-operator.allNamespaces" .)) }}
# kopf peering per watched namespace: keep-alives in its KopfPeering object.
- apiGroups: ["kopf.dev"]
  resources: ["kopfpeerings"]
  verbs: ["get", "list", "watch", "patch"]
{{- end }}
{{- end }}

{{/* Cluster-scoped rules: kopf's discovery of CRDs (and namespaces), GPU node labels,
cluster peering. */}}
{{- define "finetune-operator.clusterRules" -}}
# kopf watches CRDs so a (re)installed CRD is picked up without a restart.
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["get", "list", "watch"]
# `method: auto` without a GPU product may choose fp8 only if every GPU node that could take
# the job has FP8 tensor cores: the operator lists the nodes' GPU Feature Discovery labels
# (metadata only, at most once a minute). Without it, such jobs are never planned fp8.
- apiGroups: [""]
  resources: ["nodes"]
  verbs: ["list"]
{{- if not (include "finetune-operator.allNamespaces" .) }}
# kopf lists namespaces to notice watched namespaces (or ones matching a pattern) being
# created or deleted.
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["list", "watch"]
{{- end }}
{{- if and .Values.standby.enabled (include "finetune-operator.allNamespaces" .) }}
# kopf peering (cluster mode): keep-alives in the ClusterKopfPeering object.
- apiGroups: ["kopf.dev"]
  resources: ["clusterkopfpeerings"]
  verbs: ["get", "list", "watch", "patch"]
{{- end }}
{{- end }}
