{{- define "modeldeployment.name" -}}
{{- default .Release.Name .Values.name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "modeldeployment.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "modeldeployment.labels" -}}
helm.sh/chart: {{ include "modeldeployment.chart" . }}
app.kubernetes.io/name: {{ include "modeldeployment.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: modelfit
{{- end }}

{{/*
spec.model: the one source that is set (url, huggingFace, pvc), else catalog + quant.
*/}}
{{- define "modeldeployment.model" -}}
{{- $m := .Values.model }}
{{- $n := 0 }}
{{- if $m.url }}{{ $n = add1 $n }}{{- end }}
{{- if $m.huggingFace }}{{ $n = add1 $n }}{{- end }}
{{- if $m.pvc }}{{ $n = add1 $n }}{{- end }}
{{- if gt $n 1 }}
{{- fail "model: set only one of url, huggingFace and pvc" }}
{{- end }}
{{- if $m.url }}
url: {{ $m.url | quote }}
{{- else if $m.huggingFace }}
huggingFace:
  {{- toYaml $m.huggingFace | nindent 2 }}
{{- else if $m.pvc }}
pvc:
  {{- toYaml $m.pvc | nindent 2 }}
{{- else }}
catalog: {{ required "model.catalog (or model.url, model.huggingFace, model.pvc) is required" $m.catalog | quote }}
quant: {{ required "model.quant is required with model.catalog" $m.quant | upper | replace "-" "_" | quote }}
{{- end }}
{{- with $m.sha256 }}
sha256: {{ . | lower | quote }}
{{- end }}
{{- end }}
