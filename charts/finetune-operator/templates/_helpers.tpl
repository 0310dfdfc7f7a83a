{{/*
Names, labels and image references shared by every template.
*/}}

{{- define "finetune-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "finetune-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "finetune-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "finetune-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "finetune-operator.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "finetune-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: finetune-operator
{{- end }}

{{- define "finetune-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "finetune-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
An image reference from {repository, tag, digest}: the digest pins it when set.
Usage: include "finetune-operator.imageRef" (dict "image" .Values.worker.image "default" "")
*/}}
{{- define "finetune-operator.imageRef" -}}
{{- $tag := default .default .image.tag }}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository (required (printf "%s needs a tag or a digest" .image.repository) $tag) }}
{{- end }}
{{- end }}

{{/*
Watched namespaces, validated once here: "" when the operator serves every namespace,
else the comma-separated names (or, in cluster mode, kopf glob patterns like `team-*`).
*/}}
{{- define "finetune-operator.watchedNamespaces" -}}
{{- if eq .Values.watch.mode "namespaces" }}
{{- if not .Values.watch.namespaces }}
{{- fail "watch.mode is \"namespaces\" but watch.namespaces is empty: list the namespaces the operator should watch, or set watch.mode=cluster" }}
{{- end }}
{{- range .Values.watch.namespaces }}
{{- if regexMatch "[*?\\[]" . }}
{{- fail (printf "watch.namespaces: %q is a pattern, but watch.mode \"namespaces\" creates a Role in each namespace and needs exact names; use watch.mode=cluster for patterns" .) }}
{{- end }}
{{- end }}
{{- end }}
{{- join "," .Values.watch.namespaces }}
{{- end }}

{{/* RBAC scope: a ClusterRole (cluster mode) or a Role per namespace. */}}
{{- define "finetune-operator.clusterWide" -}}
{{- if eq .Values.watch.mode "cluster" }}true{{ end }}
{{- end }}

{{/* kopf serves every namespace (`--all-namespaces`): cluster mode without a list. */}}
{{- define "finetune-operator.allNamespaces" -}}
{{- if and (eq .Values.watch.mode "cluster") (not .Values.watch.namespaces) }}true{{ end }}
{{- end }}
