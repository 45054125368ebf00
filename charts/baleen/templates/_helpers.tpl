{{/*
Chart name, possibly overridden.
*/}}
{{- define "baleen.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: `<release>-<chart>`, or the release name alone when it already contains the chart name.
*/}}
{{- define "baleen.fullname" -}}
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

{{/*
Name of the operator's objects (Deployment, Service, ServiceAccount, RBAC).
*/}}
{{- define "baleen.operator.fullname" -}}
{{- printf "%s-operator" (include "baleen.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
`helm.sh/chart` label value.
*/}}
{{- define "baleen.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels on every object of the chart.
*/}}
{{- define "baleen.labels" -}}
helm.sh/chart: {{ include "baleen.chart" . }}
app.kubernetes.io/part-of: baleen
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Selector labels of the operator's pods.
*/}}
{{- define "baleen.operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "baleen.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/*
Labels of the operator's objects.
*/}}
{{- define "baleen.operator.labels" -}}
{{ include "baleen.labels" . }}
{{ include "baleen.operator.selectorLabels" . }}
{{- end }}

{{/*
ServiceAccount of the operator.
*/}}
{{- define "baleen.operator.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (include "baleen.operator.fullname" .) .Values.operator.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Operator image reference.
*/}}
{{- define "baleen.operator.image" -}}
{{- printf "%s:%s" .Values.operator.image.repository (default .Chart.AppVersion .Values.operator.image.tag) }}
{{- end }}

{{/*
Default runtime image of ModelDeployments (`--runtime-image`).
*/}}
{{- define "baleen.runtimeImage" -}}
{{- default (printf "ghcr.io/baleen-dev/baleen-runtime:%s" .Chart.AppVersion) .Values.operator.runtimeImage }}
{{- end }}

{{/*
Name of the gateway's objects (Deployment, Service, ServiceAccount, RBAC, Ingress).
*/}}
{{- define "baleen.gateway.fullname" -}}
{{- printf "%s-gateway" (include "baleen.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Selector labels of the gateway's pods.
*/}}
{{- define "baleen.gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "baleen.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: gateway
{{- end }}

{{/*
Labels of the gateway's objects.
*/}}
{{- define "baleen.gateway.labels" -}}
{{ include "baleen.labels" . }}
{{ include "baleen.gateway.selectorLabels" . }}
{{- end }}

{{/*
ServiceAccount of the gateway.
*/}}
{{- define "baleen.gateway.serviceAccountName" -}}
{{- if .Values.gateway.serviceAccount.create }}
{{- default (include "baleen.gateway.fullname" .) .Values.gateway.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.gateway.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Gateway image reference.
*/}}
{{- define "baleen.gateway.image" -}}
{{- printf "%s:%s" .Values.gateway.image.repository (default .Chart.AppVersion .Values.gateway.image.tag) }}
{{- end }}

{{/*
Where the gateway's API keys file is mounted (`gateway.apiKeys.secretName`, key `keys.yaml`).
*/}}
{{- define "baleen.gateway.apiKeysDir" -}}
/etc/baleen-gateway
{{- end }}
