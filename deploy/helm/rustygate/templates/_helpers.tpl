{{/* Names and labels. */}}
{{- define "rustygate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "rustygate.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "rustygate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "rustygate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "rustygate.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "rustygate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "rustygate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "rustygate.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "rustygate.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end -}}

{{/* The ConfigMap the config repo is read from (configMap source). */}}
{{- define "rustygate.configMapName" -}}
{{- default (printf "%s-config" (include "rustygate.fullname" .)) .Values.config.configMap.existing -}}
{{- end -}}

{{/* A ConfigMap key for a repo-relative path: keys may not hold `/`. */}}
{{- define "rustygate.configKey" -}}
{{- . | replace "/" "__" -}}
{{- end -}}

{{/*
Settings that are each valid alone but wrong together: refused at render time with a message
that says what to change. (values.schema.json checks each value on its own.)
*/}}
{{- define "rustygate.validate" -}}
{{- $v := .Values -}}
{{- if eq $v.config.source "git" -}}
  {{- if not $v.config.git.url -}}
    {{- fail "config.git.url is required when config.source is git (or set config.source=configMap)" -}}
  {{- end -}}
  {{- $c := $v.config.git.credentials -}}
  {{- if and (or $c.tokenKey $c.sshPrivateKeyKey $c.knownHostsKey) (not $c.existingSecret) -}}
    {{- fail "config.git.credentials names Secret keys but no config.git.credentials.existingSecret" -}}
  {{- end -}}
  {{- if and $c.sshPrivateKeyKey (not $c.knownHostsKey) -}}
    {{- fail "config.git.credentials.knownHostsKey is required with sshPrivateKeyKey: the gateway refuses SSH hosts it does not know" -}}
  {{- end -}}
{{- else -}}
  {{- if and $v.config.configMap.existing (not $v.config.configMap.items) -}}
    {{- fail "config.configMap.items must map the keys of config.configMap.existing to repo paths (e.g. {key: routes_api.toml, path: routes/api.toml})" -}}
  {{- end -}}
  {{- if and (not $v.config.configMap.existing) (not $v.config.configMap.files) -}}
    {{- fail "config.source is configMap: set config.configMap.files, or config.configMap.existing and items" -}}
  {{- end -}}
  {{- if and $v.config.configMap.existing $v.config.configMap.files -}}
    {{- fail "set config.configMap.files or config.configMap.existing, not both" -}}
  {{- end -}}
{{- end -}}
{{- if le (int $v.terminationGracePeriodSeconds) (add (int $v.preStopSleepSeconds) (int $v.shutdownGraceSeconds)) -}}
  {{- fail (printf "terminationGracePeriodSeconds (%d) must exceed preStopSleepSeconds + shutdownGraceSeconds (%d): the kubelet would kill requests still in their grace period" (int $v.terminationGracePeriodSeconds) (add (int $v.preStopSleepSeconds) (int $v.shutdownGraceSeconds))) -}}
{{- end -}}
{{- end -}}
