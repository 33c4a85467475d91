{{/*
The chart name for labels: the chart's own, unless nameOverride.
*/}}
{{- define "keyway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The prefix of every object name: the release name, unless fullnameOverride.
*/}}
{{- define "keyway.fullname" -}}
{{- default .Release.Name .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "keyway.controlPlane.fullname" -}}
{{- printf "%s-control-plane" (include "keyway.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "keyway.agent.fullname" -}}
{{- printf "%s-node-agent" (include "keyway.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The Lease the control-plane replicas elect a leader with (store=kubernetes).
*/}}
{{- define "keyway.leaseName" -}}
{{- include "keyway.controlPlane.fullname" . }}
{{- end }}

{{/*
Labels on every object. The component label is added by each template.
*/}}
{{- define "keyway.labels" -}}
app.kubernetes.io/name: {{ include "keyway.name" . | quote }}
app.kubernetes.io/instance: {{ .Release.Name | quote }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service | quote }}
{{- end }}

{{/*
The labels selectors match on (a subset of keyway.labels that never changes
on upgrade).
*/}}
{{- define "keyway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "keyway.name" . | quote }}
app.kubernetes.io/instance: {{ .Release.Name | quote }}
{{- end }}

{{- define "keyway.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/*
Refuses values that cannot work, before anything is installed.
*/}}
{{- define "keyway.validate" -}}
{{- if not (or (eq .Values.store "kubernetes") (eq .Values.store "sled")) }}
{{- fail (printf "store=%v: the control plane's store is either kubernetes or sled" .Values.store) }}
{{- end }}
{{- if and (eq .Values.store "sled") (gt (int .Values.controlPlane.replicas) 1) }}
{{- fail (printf "controlPlane.replicas=%d with store=sled: each replica would keep its own CA in its own embedded database; use store=kubernetes for more than one replica, or controlPlane.replicas=1" (int .Values.controlPlane.replicas)) }}
{{- end }}
{{- end }}
