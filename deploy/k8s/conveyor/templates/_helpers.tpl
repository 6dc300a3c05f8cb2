{{/* Names ------------------------------------------------------------------------------------ */}}

{{/* Chart name (app.kubernetes.io/name). */}}
{{- define "conveyor.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-qualified name prefix of every object (63 characters at most: DNS label). */}}
{{- define "conveyor.fullname" -}}
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

{{/* Name of one component's objects. Call with (dict "root" $ "component" "inference"). */}}
{{- define "conveyor.componentName" -}}
{{- printf "%s-%s" (include "conveyor.fullname" .root) .component | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "conveyor.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The Kafka stage services, in pipeline order. */}}
{{- define "conveyor.stages" -}}
{{- list "preprocess" "inference" "moderation" "writeback" "notify" | toJson }}
{{- end }}

{{/* Labels --------------------------------------------------------------------------------------- */}}

{{- define "conveyor.selectorLabels" -}}
app.kubernetes.io/name: {{ include "conveyor.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "conveyor.labels" -}}
helm.sh/chart: {{ include "conveyor.chart" . }}
{{ include "conveyor.selectorLabels" . }}
app.kubernetes.io/version: {{ include "conveyor.imageTag" . | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: conveyor
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Call with (dict "root" $ "component" "inference"). */}}
{{- define "conveyor.componentSelectorLabels" -}}
{{ include "conveyor.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "conveyor.componentLabels" -}}
{{ include "conveyor.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Image and service account ------------------------------------------------------------------ */}}

{{- define "conveyor.imageTag" -}}
{{- .Values.image.tag | default .Chart.AppVersion | toString }}
{{- end }}

{{/* <registry>/<repository>:<tag>, or @<digest> when a digest pins the image. */}}
{{- define "conveyor.image" -}}
{{- $i := .Values.image }}
{{- $name := $i.repository }}
{{- if $i.registry }}{{ $name = printf "%s/%s" $i.registry $i.repository }}{{ end }}
{{- if $i.digest }}
{{- printf "%s@%s" $name $i.digest }}
{{- else }}
{{- printf "%s:%s" $name (include "conveyor.imageTag" .) }}
{{- end }}
{{- end }}

{{- define "conveyor.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "conveyor.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Kafka topics and consumer groups ----------------------------------------------------------- */}}

{{/* Consumer group of a stage: <prefix>conveyor.<stage> (StageSettings.group). */}}
{{- define "conveyor.consumerGroup" -}}
{{- printf "%sconveyor.%s" .root.Values.kafka.topicPrefix .component }}
{{- end }}

{{/* A stage's main input topics (JSON list, prefixed): what its lag is measured on. */}}
{{- define "conveyor.inputTopics" -}}
{{- $inputs := dict
      "preprocess" (list "conveyor.task.submitted")
      "inference" (list "conveyor.task.preprocessed.high" "conveyor.task.preprocessed.normal" "conveyor.task.preprocessed.low")
      "moderation" (list "conveyor.task.inferred")
      "writeback" (list "conveyor.task.moderated")
      "notify" (list "conveyor.task.stored") }}
{{- $out := list }}
{{- range (get $inputs .component) }}
{{- $out = append $out (printf "%s%s" $.root.Values.kafka.topicPrefix .) }}
{{- end }}
{{- toJson $out }}
{{- end }}

{{/* Configuration ------------------------------------------------------------------------------ */}}

{{/* Where the image keeps state and caches (CONVEYOR_HOME): an emptyDir in the pod. */}}
{{- define "conveyor.homeDir" -}}/var/lib/conveyor{{- end }}
{{- define "conveyor.kafkaCaDir" -}}/etc/conveyor/kafka-ca{{- end }}

{{/*
Non-secret settings shared by every service and the topic Job, as a YAML map of strings. The
ConfigMap renders it as data; the hook Job (which runs before the ConfigMap exists on first
install) renders the same map as env.
*/}}
{{- define "conveyor.configData" -}}
{{- $k := .Values.kafka -}}
CONVEYOR_KAFKA_BOOTSTRAP: {{ $k.bootstrap | quote }}
CONVEYOR_KAFKA_SECURITY_PROTOCOL: {{ $k.securityProtocol | quote }}
CONVEYOR_TOPIC_PREFIX: {{ $k.topicPrefix | quote }}
{{- if $k.sasl.mechanism }}
CONVEYOR_KAFKA_SASL_MECHANISM: {{ $k.sasl.mechanism | quote }}
CONVEYOR_KAFKA_SASL_USERNAME: {{ $k.sasl.username | quote }}
{{- end }}
{{- if $k.tls.existingSecret }}
CONVEYOR_KAFKA_SSL_CA_LOCATION: {{ printf "%s/%s" (include "conveyor.kafkaCaDir" .) $k.tls.caKey | quote }}
{{- end }}
{{- if $k.extra }}
CONVEYOR_KAFKA_EXTRA: {{ toJson $k.extra | quote }}
{{- end }}
CONVEYOR_RETRY_DELAYS: {{ toJson .Values.config.retryDelays | quote }}
CONVEYOR_EXACTLY_ONCE: {{ .Values.config.exactlyOnce | toString | quote }}
CONVEYOR_LOG_FORMAT: {{ .Values.config.logFormat | quote }}
CONVEYOR_LOG_LEVEL: {{ .Values.config.logLevel | quote }}
{{- if .Values.config.webhookAllow }}
{{- /* notify lets webhooks reach these internal networks/hosts; the gateway refuses a literal
internal callback_url unless it is listed here too, so both read the same list. */}}
CONVEYOR_WEBHOOK_ALLOW: {{ toJson .Values.config.webhookAllow | quote }}
{{- end }}
CONVEYOR_METRICS_HOST: "0.0.0.0"
CONVEYOR_METRICS_PORT: {{ .Values.metrics.port | toString | quote }}
CONVEYOR_HOME: {{ include "conveyor.homeDir" . | quote }}
HOME: {{ include "conveyor.homeDir" . | quote }}
{{- with .Values.otel }}
{{- if .endpoint }}
OTEL_EXPORTER_OTLP_ENDPOINT: {{ .endpoint | quote }}
OTEL_EXPORTER_OTLP_PROTOCOL: {{ .protocol | quote }}
{{- end }}
OTEL_TRACES_SAMPLER: {{ .sampler | quote }}
OTEL_TRACES_SAMPLER_ARG: {{ .samplerArg | toString | quote }}
{{- if .resourceAttributes }}
{{- $attrs := list }}
{{- range $key, $value := .resourceAttributes }}
{{- $attrs = append $attrs (printf "%s=%s" $key (toString $value)) }}
{{- end }}
OTEL_RESOURCE_ATTRIBUTES: {{ join "," $attrs | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* Secret env: the SASL password from its existing Secret (nothing when SASL is off). */}}
{{- define "conveyor.kafkaSecretEnv" -}}
{{- $sasl := .Values.kafka.sasl -}}
{{- if $sasl.mechanism }}
- name: CONVEYOR_KAFKA_SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ required "kafka.sasl.existingSecret is required when kafka.sasl.mechanism is set" $sasl.existingSecret }}
      key: {{ $sasl.passwordKey }}
{{- end }}
{{- end }}

{{- define "conveyor.kafkaCaVolume" -}}
{{- if .Values.kafka.tls.existingSecret }}
- name: kafka-ca
  secret:
    secretName: {{ .Values.kafka.tls.existingSecret }}
    items:
      - key: {{ .Values.kafka.tls.caKey }}
        path: {{ .Values.kafka.tls.caKey }}
{{- end }}
{{- end }}

{{- define "conveyor.kafkaCaVolumeMount" -}}
{{- if .Values.kafka.tls.existingSecret }}
- name: kafka-ca
  mountPath: {{ include "conveyor.kafkaCaDir" . }}
  readOnly: true
{{- end }}
{{- end }}

{{/* Store, secrets and their checks ---------------------------------------------------------- */}}

{{/* The services that use the result store, in the embedded pod's container order. */}}
{{- define "conveyor.storeServices" -}}
{{- list "writeback" "notify" "gateway" | toJson }}
{{- end }}

{{/* Whether a service runs in the single embedded pod rather than in its own Deployment. */}}
{{- define "conveyor.inEmbeddedPod" -}}
{{- if and .root.Values.store.embedded.enabled (has .component (include "conveyor.storeServices" .root | fromJsonArray)) }}true{{- end }}
{{- end }}

{{/* Where the embedded pod keeps its SQLite file. */}}
{{- define "conveyor.embeddedStoreDir" -}}/var/lib/conveyor/store{{- end }}

{{/* Name of the Secret holding the store URL, gateway tokens and webhook secrets. */}}
{{- define "conveyor.appSecretName" -}}
{{- .Values.secrets.existingSecret | default (include "conveyor.fullname" .) }}
{{- end }}

{{/* Whether the chart creates the app Secret itself (no existingSecret named). */}}
{{- define "conveyor.createAppSecret" -}}
{{- if not .Values.secrets.existingSecret }}true{{- end }}
{{- end }}

{{/*
Refuse combinations that would deploy a pipeline that cannot work, with a message saying what to
set. Included by the ConfigMap, which every render contains.
*/}}
{{- define "conveyor.validate" -}}
{{- $s := .Values.secrets }}
{{- $embedded := .Values.store.embedded.enabled }}
{{- if and (not $embedded) (not $s.existingSecret) (not $s.values.storeUrl) }}
{{- fail "\n\nConveyor needs a PostgreSQL result store shared by writeback, notify and the gateway:\n  set secrets.existingSecret (a Secret with the key secrets.storeUrl.key, \"store-url\" by default)\n  or secrets.values.storeUrl=postgresql://user:password@host:5432/conveyor,\n  or choose the single-pod SQLite mode explicitly with store.embedded.enabled=true." }}
{{- end }}
{{- if and $embedded $s.values.storeUrl }}
{{- fail "\n\nstore.embedded.enabled=true uses SQLite in one pod; secrets.values.storeUrl is set as well. Choose one: unset the URL, or turn embedded mode off." }}
{{- end }}
{{- if and $embedded .Values.config.reuse.enabled }}
{{- fail "\n\nconfig.reuse.enabled=true needs the shared PostgreSQL store (inference runs in its own pod and cannot reach the embedded SQLite file): turn reuse off or store.embedded off." }}
{{- end }}
{{- if and .Values.config.modelsFile (not .Values.config.models) }}
{{- fail "\n\nconfig.modelsFile=true mounts config.models as a file, and config.models is empty: list the models (docs/variants.md) or turn modelsFile off." }}
{{- end }}
{{- if and .Values.gateway.enabled (not $s.existingSecret) (not $s.values.gatewayTokens) }}
{{- fail "\n\nThe gateway needs bearer tokens or it answers 401 to every call: set secrets.values.gatewayTokens ({\"<token>\": \"<tenant>\"}) or secrets.existingSecret (a Secret with the key secrets.gatewayTokens.key, \"gateway-tokens\" by default)." }}
{{- end }}
{{- end }}

{{/* One secretKeyRef env entry. Call with (dict "root" $ "item" .Values.secrets.storeUrl). */}}
{{- define "conveyor.secretEnvEntry" -}}
- name: {{ .item.env }}
  valueFrom:
    secretKeyRef:
      name: {{ include "conveyor.appSecretName" .root }}
      key: {{ .item.key }}
{{- end }}

{{/*
The app Secret's env for one service, all through secretKeyRef: the store URL (writeback, notify,
gateway, and inference when reuse is on; a local SQLite path in the embedded pod instead), the gateway tokens (gateway) and the
webhook secrets (notify). Call with (dict "root" $ "component" "notify").
*/}}
{{- define "conveyor.appSecretEnv" -}}
{{- $root := .root }}
{{- $s := $root.Values.secrets }}
{{- $reuse := and (eq .component "inference") $root.Values.config.reuse.enabled }}
{{- if or $reuse (has .component (include "conveyor.storeServices" $root | fromJsonArray)) }}
{{- if $root.Values.store.embedded.enabled }}
# Single-pod embedded mode: the three containers share this SQLite file.
- name: {{ $s.storeUrl.env }}
  value: {{ printf "sqlite:///%s/conveyor.db" (include "conveyor.embeddedStoreDir" $root) | quote }}
{{- else }}
{{ include "conveyor.secretEnvEntry" (dict "root" $root "item" $s.storeUrl) }}
{{- end }}
{{- end }}
{{- if eq .component "gateway" }}
{{ include "conveyor.secretEnvEntry" (dict "root" $root "item" $s.gatewayTokens) }}
{{- end }}
{{- if eq .component "notify" }}
{{ include "conveyor.secretEnvEntry" (dict "root" $root "item" $s.webhookSecrets) }}
{{- end }}
{{- end }}

{{/* Scheduling ------------------------------------------------------------------------------- */}}

{{/*
A service's topologySpreadConstraints (its own, else the chart-wide ones), each given the
service's pod labels as labelSelector when it has none. Call with
(dict "root" $ "component" "inference" "constraints" $list).
*/}}
{{- define "conveyor.topologySpread" -}}
{{- $out := list }}
{{- range .constraints }}
{{- $c := deepCopy . }}
{{- if not (hasKey $c "labelSelector") }}
{{- $_ := set $c "labelSelector" (dict "matchLabels" (include "conveyor.componentSelectorLabels" (dict "root" $.root "component" $.component) | fromYaml)) }}
{{- end }}
{{- $out = append $out $c }}
{{- end }}
{{- if $out }}{{ toYaml $out }}{{ end }}
{{- end }}

{{/* Replicas: who sets them. "keda", "hpa" or "" (the Deployment's own). */}}
{{- define "conveyor.scaler" -}}
{{- $stages := include "conveyor.stages" .root | fromJsonArray }}
{{- $svc := index .root.Values .component }}
{{- if include "conveyor.inEmbeddedPod" . }}
{{- else if and (has .component $stages) .root.Values.keda.enabled $svc.keda.enabled }}keda
{{- else if .root.Values.hpa.enabled }}hpa
{{- end }}
{{- end }}

{{/* KEDA: the kafka scaler's SASL mode for a librdkafka mechanism. */}}
{{- define "conveyor.kedaSaslMode" -}}
{{- $modes := dict "PLAIN" "plaintext" "SCRAM-SHA-256" "scram_sha256" "SCRAM-SHA-512" "scram_sha512" }}
{{- get $modes .Values.kafka.sasl.mechanism }}
{{- end }}

{{/* Whether the KEDA kafka trigger needs a TriggerAuthentication (SASL or TLS). */}}
{{- define "conveyor.kedaNeedsAuth" -}}
{{- if or .Values.kafka.sasl.mechanism (hasSuffix "SSL" .Values.kafka.securityProtocol) }}true{{- end }}
{{- end }}

{{/* Metrics port names the pods serve (JSON list): "metrics", plus the embedded pod's own. */}}
{{- define "conveyor.metricsPortNames" -}}
{{- $names := list "metrics" }}
{{- if .Values.store.embedded.enabled }}
{{- range $component := list "notify" "gateway" }}
{{- if (index $.Values $component).enabled }}
{{- $names = append $names (include "conveyor.metricsPortName" (dict "root" $ "component" $component "embedded" true)) }}
{{- end }}
{{- end }}
{{- end }}
{{- toJson $names }}
{{- end }}

{{/* The Service port of a metrics port name. Call with (dict "root" $ "name" "metrics-notify"). */}}
{{- define "conveyor.metricsServicePort" -}}
{{- if eq .name "metrics" }}{{ .root.Values.metrics.port }}{{ else }}{{ index .root.Values.store.embedded.metricsPorts (trimPrefix "metrics-" .name) }}{{ end }}
{{- end }}

{{/* The services that read the model list: preprocess (variant routing, tokenizers), inference
and the gateway (it refuses unknown model names). */}}
{{- define "conveyor.modelServices" -}}
{{- list "preprocess" "inference" "gateway" | toJson }}
{{- end }}

{{/* Where the models file is mounted when config.modelsFile is on. */}}
{{- define "conveyor.modelsDir" -}}/etc/conveyor/models{{- end }}
