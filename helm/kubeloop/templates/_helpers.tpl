{{/* The chart's name, and the fullname every object's name starts with (the release name when it says kubeloop). */}}
{{- define "kubeloop.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kubeloop.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}
{{- .Release.Name | trunc 54 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 54 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "kubeloop.operatorName" -}}
{{- printf "%s-operator" (include "kubeloop.fullname" .) }}
{{- end }}

{{- define "kubeloop.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object: the standard app.kubernetes.io/* set. */}}
{{- define "kubeloop.labels" -}}
helm.sh/chart: {{ include "kubeloop.chart" . }}
{{ include "kubeloop.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: kubeloop
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "kubeloop.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubeloop.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "kubeloop.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kubeloop.operatorName" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository:tag of an image, the tag defaulting to the chart's appVersion. */}}
{{- define "kubeloop.image" -}}
{{- $tag := .image.tag | default .context.Chart.AppVersion -}}
{{- printf "%s:%s" .image.repository $tag }}
{{- end }}

{{- define "kubeloop.webhookCertSecret" -}}
{{- printf "%s-webhook-tls" (include "kubeloop.fullname" .) }}
{{- end }}
