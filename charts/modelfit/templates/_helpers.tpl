{{/*
Chart name, truncated to 63 characters (DNS label limit).
*/}}
{{- define "modelfit.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name: the release name, with the chart name unless the
release name already contains it.
*/}}
{{- define "modelfit.fullname" -}}
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

{{- define "modelfit.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Standard labels.
*/}}
{{- define "modelfit.labels" -}}
helm.sh/chart: {{ include "modelfit.chart" . }}
{{ include "modelfit.selectorLabels" . }}
app.kubernetes.io/version: {{ include "modelfit.imageTag" . | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: modelfit
{{- end }}

{{/*
Selector labels (immutable on the Deployment: keep them minimal).
*/}}
{{- define "modelfit.selectorLabels" -}}
app.kubernetes.io/name: {{ include "modelfit.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "modelfit.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "modelfit.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "modelfit.imageTag" -}}
{{- default .Chart.AppVersion .Values.image.tag }}
{{- end }}

{{- define "modelfit.image" -}}
{{- printf "%s:%s" .Values.image.repository (include "modelfit.imageTag" .) }}
{{- end }}

{{/*
Permissions the operator needs cluster-wide, whatever it watches: node facts
(nodes, and the pods already requesting resources on them), namespaces and
CRDs (kopf's scanning).
*/}}
{{- define "modelfit.clusterRules" -}}
- apiGroups: [""]
  resources: ["nodes"]
  verbs: ["get", "list", "watch"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["list", "watch"]
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["get", "list", "watch"]
{{- end }}

{{/*
Get (never list or watch) the Secrets a ModelDeployment names: the token of
spec.model.tokenSecretRef for its GGUF header read, the API key of
spec.apiKeySecretRef (a rotated key rolls the pods), a missing Secret or key
reported as a condition. Granted only where the operator watches
(watchNamespaces) or where secretAccess.namespaces says, never cluster-wide.
*/}}
{{- define "modelfit.secretRules" -}}
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
{{- end }}

{{/*
Permissions the operator needs where ModelDeployments live: post events,
manage the children, read/patch the ModelDeployments themselves.
*/}}
{{- define "modelfit.namespacedRules" -}}
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "update", "patch", "delete"]
- apiGroups: [""]
  resources: ["services", "persistentvolumeclaims", "configmaps"]
  verbs: ["get", "list", "watch", "create", "update", "patch", "delete"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "list", "watch", "create", "update", "patch", "delete"]
- apiGroups: ["autoscaling"]
  resources: ["horizontalpodautoscalers"]
  verbs: ["get", "create", "patch", "delete"]
- apiGroups: ["monitoring.coreos.com"]
  resources: ["podmonitors"]
  verbs: ["get", "create", "patch", "delete"]
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["serviceaccounts"]
  verbs: ["get", "create", "patch", "delete"]
# spec.routing InferencePool: the pool, and the picker's Role (what it reads: the operator must hold it to grant it)
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles", "rolebindings"]
  verbs: ["get", "create", "patch", "delete"]
- apiGroups: ["inference.networking.k8s.io"]
  resources: ["inferencepools"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["inference.networking.x-k8s.io"]
  resources: ["inferenceobjectives", "inferencemodelrewrites"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["modelfit.io"]
  resources: ["modeldeployments"]
  verbs: ["get", "list", "watch", "patch", "update"]
- apiGroups: ["modelfit.io"]
  resources: ["modeldeployments/status", "modeldeployments/scale"]
  verbs: ["get", "patch", "update"]
{{- end }}

{{/*
The restricted (Pod Security Standards) container security context.
*/}}
{{- define "modelfit.containerSecurityContext" -}}
allowPrivilegeEscalation: false
privileged: false
readOnlyRootFilesystem: true
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/*
The shared gateway's labels: component gateway, part-of modelfit (the models' NetworkPolicies admit these pods of
the release's namespace; modelfit.routing.GATEWAY_LABELS says the same).
*/}}
{{- define "modelfit.gatewaySelectorLabels" -}}
app.kubernetes.io/name: {{ include "modelfit.name" . }}-gateway
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "modelfit.gatewayLabels" -}}
helm.sh/chart: {{ include "modelfit.chart" . }}
{{ include "modelfit.gatewaySelectorLabels" . }}
app.kubernetes.io/version: {{ include "modelfit.imageTag" . | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: gateway
app.kubernetes.io/part-of: modelfit
{{- end }}

{{/*
What the gateway reads: the ModelDeployments and their Services' EndpointSlices. No Secret: a model with its own
key checks it itself.
*/}}
{{- define "modelfit.gatewayRules" -}}
- apiGroups: ["modelfit.io"]
  resources: ["modeldeployments"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["discovery.k8s.io"]
  resources: ["endpointslices"]
  verbs: ["get", "list", "watch"]
{{- end }}

{{- define "modelfit.gatewayContainerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
{{- end }}
