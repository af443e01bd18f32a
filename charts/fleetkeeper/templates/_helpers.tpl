{{/* Labels of every object; pods also carry app.kubernetes.io/component. The
     monitoring scrape job keeps pods with app.kubernetes.io/name=fleetkeeper and
     scrapes their port named "metrics". */}}
{{- define "fk.labels" -}}
app.kubernetes.io/name: fleetkeeper
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{/* Pod labels: the selector plus the release's version labels (no key twice). */}}
{{- define "fk.podLabels" -}}
{{ include "fk.selector" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version }}
{{- end }}

{{- define "fk.selector" -}}
app.kubernetes.io/name: fleetkeeper
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "fk.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{- define "fk.validatorImage" -}}
{{ .Values.preflight.validatorImage.repository }}:{{ .Values.preflight.validatorImage.tag | default .Chart.AppVersion }}
{{- end }}

{{/* cert-manager or the chart's own Secret */}}
{{- define "fk.certManager" -}}
{{- $s := .Values.webhooks.certificate.source -}}
{{- if or (eq $s "cert-manager") (and (eq $s "auto") (.Capabilities.APIVersions.Has "cert-manager.io/v1")) -}}
true
{{- end -}}
{{- end }}

{{- define "fk.webhooksWanted" -}}
{{- if or (and .Values.preflight.enabled .Values.preflight.webhook.enabled) (and .Values.teams.enabled .Values.teams.webhook.enabled) .Values.capacity.enabled -}}
true
{{- end -}}
{{- end }}

{{/* The DNS names of every webhook Service: one certificate for all of them. */}}
{{- define "fk.webhookHosts" -}}
{{- $ns := .Release.Namespace -}}
{{- range $svc := list "fleetkeeper-preflight-webhook" "fleetkeeper-teams-webhook" "fleetkeeper-capacity-webhook" }}
- {{ $svc }}.{{ $ns }}.svc
- {{ $svc }}.{{ $ns }}.svc.cluster.local
{{- end }}
{{- end }}

{{/* A ServiceAccount (token mounted only where the component talks to the API server). */}}
{{- define "fk.serviceAccount" -}}
apiVersion: v1
kind: ServiceAccount
metadata:
  name: fleetkeeper-{{ .component }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "fk.labels" .root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
{{- if .noToken }}
automountServiceAccountToken: false
{{- end }}
{{- end }}

{{/* Role/ClusterRole + binding to fleetkeeper-<component>. */}}
{{- define "fk.role" -}}
apiVersion: rbac.authorization.k8s.io/v1
kind: {{ .kind }}
metadata:
  name: {{ .name | default (printf "fleetkeeper-%s" .component) }}
  {{- if eq .kind "Role" }}
  namespace: {{ .namespace | default .root.Release.Namespace }}
  {{- end }}
  labels:
    {{- include "fk.labels" .root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
rules:
{{- .rules | nindent 0 }}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: {{ .kind }}Binding
metadata:
  name: {{ .name | default (printf "fleetkeeper-%s" .component) }}
  {{- if eq .kind "Role" }}
  namespace: {{ .namespace | default .root.Release.Namespace }}
  {{- end }}
  labels:
    {{- include "fk.labels" .root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: {{ .kind }}, name: {{ .name | default (printf "fleetkeeper-%s" .component) }}}
subjects:
- {kind: ServiceAccount, name: fleetkeeper-{{ .component }}, namespace: {{ .root.Release.Namespace }}}
{{- end }}

{{- define "fk.webhookMeta" -}}
labels:
  {{- include "fk.labels" .root | nindent 2 }}
  app.kubernetes.io/component: {{ .component }}
  {{ .root.Values.domain }}/managed-by: fleetkeeper-{{ .component }}
{{- if include "fk.certManager" .root }}
annotations:
  cert-manager.io/inject-ca-from: {{ .root.Release.Namespace }}/{{ .root.Values.webhooks.certificate.secretName }}
{{- end }}
{{- end }}

{{- define "fk.clientConfig" -}}
clientConfig:
  service: {name: {{ .service }}, namespace: {{ .root.Release.Namespace }}, path: /{{ .path }}, port: {{ .port }}}
  {{- if .caBundle }}
  caBundle: {{ .caBundle }}
  {{- end }}
{{- end }}


