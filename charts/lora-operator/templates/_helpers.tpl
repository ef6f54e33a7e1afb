{{/*
The chart name, or nameOverride. Truncated to 63 characters (DNS label limit).
*/}}
{{- define "lora-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The full name of the release's objects: fullnameOverride, or "<release>-<chart>"
(just "<release>" when it already contains the chart name). Truncated to 63 characters.
*/}}
{{- define "lora-operator.fullname" -}}
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
"<chart>-<version>", for the helm.sh/chart label.
*/}}
{{- define "lora-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels that select the operator pods. Never change them: Deployment selectors are immutable.
*/}}
{{- define "lora-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lora-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Labels on every object of the chart.
*/}}
{{- define "lora-operator.labels" -}}
helm.sh/chart: {{ include "lora-operator.chart" . }}
{{ include "lora-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: lora-operator
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
The ServiceAccount the operator runs as.
*/}}
{{- define "lora-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "lora-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The operator image reference: repository, then @digest or :tag (default: appVersion).
*/}}
{{- define "lora-operator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
The default trainer image reference (tag default: appVersion).
*/}}
{{- define "lora-operator.trainerImage" -}}
{{- printf "%s:%s" .Values.trainerImage.repository (default .Chart.AppVersion .Values.trainerImage.tag) }}
{{- end }}

{{/*
"true" when the operator pods use Kopf peering: asked for, or more than one replica.
*/}}
{{- define "lora-operator.peering" -}}
{{- if or .Values.peering.enabled (gt (int .Values.replicaCount) 1) }}true{{ else }}false{{ end }}
{{- end }}

{{/*
The RBAC rules the operator needs in every namespace it serves (peering rules are added by
rbac.yaml, since their resource depends on the scope). Keep in step with the README table and
tests/integration/test_chart.py.
*/}}
{{- define "lora-operator.rbacRules" -}}
- apiGroups: ["lora-operator.dev"]
  resources: ["loratrainingjobs"]
  verbs: ["get", "list", "watch", "patch", "update", "delete"]  # delete: spec.ttlSecondsAfterFinished
- apiGroups: ["lora-operator.dev"]
  resources: ["loratrainingjobs/status"]
  verbs: ["get", "patch", "update"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["create", "delete", "get", "list", "watch", "patch"]
- apiGroups: ["jobset.x-k8s.io"]
  resources: ["jobsets"]
  verbs: ["create", "delete", "get"]  # spec.nodes > 1: one JobSet per attempt
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
  {{- with .Values.rbac.secretNames }}
  resourceNames:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}

{{/*
Node readiness, for pods stuck Terminating on a lost node (rbac.readNodes).
*/}}
{{- define "lora-operator.nodeRules" -}}
- apiGroups: [""]
  resources: ["nodes"]
  verbs: ["get"]
{{- end }}
