{{/*
The pod template of a Conveyor Deployment. Call with
(dict "root" $ "component" <pod component> "svc" <values block for scheduling and volumes>
      "containers" <list of service names>): one container per service (several only in the
embedded store pod).
*/}}
{{- define "conveyor.podTemplate" -}}
{{- $root := .root }}
{{- $svc := .svc }}
{{- $ctx := dict "root" $root "component" .component }}
{{- $gpu := and (eq .component "inference") $svc.gpu.enabled }}
{{- $embedded := eq .component "embedded" }}
{{- /* Scheduling: the service's own settings, else the chart-wide ones; GPU ones merged on top. */}}
{{- $nodeSelector := deepCopy ($svc.nodeSelector | default $root.Values.nodeSelector | default dict) }}
{{- $tolerations := $svc.tolerations | default $root.Values.tolerations | default list }}
{{- $affinity := $svc.affinity | default $root.Values.affinity }}
{{- $spread := $svc.topologySpreadConstraints | default $root.Values.topologySpreadConstraints }}
{{- $priorityClass := $svc.priorityClassName | default $root.Values.priorityClassName }}
{{- $runtimeClass := $svc.runtimeClassName }}
{{- if $gpu }}
{{- $nodeSelector = merge $nodeSelector $svc.gpu.nodeSelector }}
{{- $tolerations = concat $tolerations $svc.gpu.tolerations }}
{{- $runtimeClass = $svc.gpu.runtimeClassName | default $runtimeClass }}
{{- end }}
{{- if $embedded }}
{{- /* The embedded pod schedules by the chart-wide settings only. */}}
{{- $nodeSelector = $root.Values.nodeSelector }}
{{- $tolerations = $root.Values.tolerations }}
{{- $affinity = $root.Values.affinity }}
{{- $spread = list }}
{{- $priorityClass = $root.Values.priorityClassName }}
{{- $runtimeClass = "" }}
{{- end }}
metadata:
  labels:
    {{- include "conveyor.componentSelectorLabels" $ctx | nindent 4 }}
    app.kubernetes.io/part-of: conveyor
    {{- with $root.Values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    # Roll the pods when their configuration changes (env from a ConfigMap/Secret does not).
    checksum/config: {{ include (print $root.Template.BasePath "/configmap.yaml") $root | sha256sum }}
    {{- if include "conveyor.createAppSecret" $root }}
    checksum/secret: {{ include (print $root.Template.BasePath "/secret.yaml") $root | sha256sum }}
    {{- end }}
    {{- with (merge (deepCopy ($svc.podAnnotations | default dict)) ($root.Values.podAnnotations | default dict)) }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "conveyor.serviceAccountName" $root }}
  automountServiceAccountToken: false
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $priorityClass }}
  priorityClassName: {{ . }}
  {{- end }}
  {{- with $runtimeClass }}
  runtimeClassName: {{ . }}
  {{- end }}
  securityContext:
    {{- toYaml $root.Values.podSecurityContext | nindent 4 }}
  # SIGTERM drains: stop polling, finish and emit in-flight work, commit, close.
  terminationGracePeriodSeconds: {{ $root.Values.terminationGracePeriodSeconds }}
  containers:
    {{- range .containers }}
    {{- include "conveyor.container" (dict "root" $root "component" . "embedded" $embedded) | nindent 4 }}
    {{- end }}
  volumes:
    # Bounded emptyDirs: a runaway temp file or cache evicts this pod, not its node's neighbours.
    - name: tmp
      emptyDir:
        sizeLimit: {{ $svc.volumes.tmpSizeLimit }}
    # CONVEYOR_HOME and HOME: converted model cache, library caches, local state.
    - name: home
      emptyDir:
        sizeLimit: {{ $svc.volumes.homeSizeLimit }}
    {{- if and (eq .component "inference") $svc.modelCache.enabled }}
    - name: model-cache
      persistentVolumeClaim:
        claimName: {{ $svc.modelCache.existingClaim | default (include "conveyor.componentName" (dict "root" $root "component" "model-cache")) }}
    {{- end }}
    {{- if $embedded }}
    {{- $p := $root.Values.store.embedded.persistence }}
    - name: store
      {{- if $p.enabled }}
      persistentVolumeClaim:
        claimName: {{ $p.existingClaim | default (include "conveyor.componentName" (dict "root" $root "component" "store")) }}
      {{- else }}
      emptyDir:
        sizeLimit: {{ $root.Values.store.embedded.sizeLimit }}
      {{- end }}
    {{- end }}
    {{- if and $root.Values.config.modelsFile $root.Values.config.models (or $embedded (has .component (include "conveyor.modelServices" $root | fromJsonArray))) }}
    # The model list as a file, outside checksum/config: the kubelet refreshes it in place and
    # the services reload it (CONVEYOR_MODELS_FILE), so a weight change restarts nothing.
    - name: models
      configMap:
        name: {{ include "conveyor.componentName" (dict "root" $root "component" "models") }}
    {{- end }}
    {{- with include "conveyor.kafkaCaVolume" $root | trim }}{{ . | nindent 4 }}{{ end }}
  {{- with $nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with include "conveyor.topologySpread" (dict "root" $root "component" .component "constraints" $spread) }}
  topologySpreadConstraints:
    {{- . | nindent 4 }}
  {{- end }}
{{- end }}

{{/* Metrics port of a service's container: its own in the embedded pod (one network namespace). */}}
{{- define "conveyor.metricsPort" -}}
{{- if .embedded }}{{ index .root.Values.store.embedded.metricsPorts .component }}{{ else }}{{ .root.Values.metrics.port }}{{ end }}
{{- end }}

{{/* Its port name (15 characters at most): "metrics", or "metrics-<service>" in the embedded pod. */}}
{{- define "conveyor.metricsPortName" -}}
{{- if and .embedded (ne .component "writeback") }}{{ printf "metrics-%s" .component }}{{ else }}metrics{{ end }}
{{- end }}

{{/* One service's container. Call with (dict "root" $ "component" "notify" "embedded" false). */}}
{{- define "conveyor.container" -}}
{{- $root := .root }}
{{- $component := .component }}
{{- $svc := index $root.Values $component }}
{{- $isStage := has $component (include "conveyor.stages" $root | fromJsonArray) }}
{{- $gpu := and (eq $component "inference") $svc.gpu.enabled }}
{{- $metricsPort := include "conveyor.metricsPort" . }}
{{- $metricsPortName := include "conveyor.metricsPortName" . }}
{{- $resources := deepCopy ($svc.resources | default dict) }}
{{- if $gpu }}
{{- $limits := get $resources "limits" | default dict }}
{{- $_ := set $limits $svc.gpu.resourceName $svc.gpu.count }}
{{- $_ := set $resources "limits" $limits }}
{{- end }}
- name: {{ $component }}
  image: {{ include "conveyor.image" $root | quote }}
  imagePullPolicy: {{ $root.Values.image.pullPolicy }}
  {{- if $isStage }}
  command: ["python", "-m", "conveyor.services.{{ $component }}"]
  {{- else }}
  command: ["conveyor", "run", "gateway"]
  {{- end }}
  ports:
    - name: {{ $metricsPortName }}
      containerPort: {{ $metricsPort }}
      protocol: TCP
    {{- if eq $component "gateway" }}
    - name: http
      containerPort: {{ $svc.port }}
      protocol: TCP
    {{- end }}
  envFrom:
    - configMapRef:
        name: {{ include "conveyor.fullname" $root }}
  env:
    - name: OTEL_SERVICE_NAME
      value: conveyor-{{ $component }}
    {{- if .embedded }}
    - name: CONVEYOR_METRICS_PORT
      value: {{ $metricsPort | quote }}
    {{- end }}
    {{- if $isStage }}
    # The pod name is the stage instance's slot: a restarted container keeps it, so an
    # exactly-once stage fences its own unfinished transaction at once.
    - name: CONVEYOR_INSTANCE_SLOT
      valueFrom:
        fieldRef:
          fieldPath: metadata.name
    - name: CONVEYOR_BATCH_MAX
      value: {{ $svc.batchMax | quote }}
    - name: CONVEYOR_BATCH_WAIT_MS
      value: {{ $svc.batchWaitMs | quote }}
    {{- end }}
    {{- /* The gateway checks model names at the edge (422 for an unknown one), so it needs the list too. */}}
    {{- if and (has $component (include "conveyor.modelServices" $root | fromJsonArray)) $root.Values.config.models }}
    {{- if $root.Values.config.modelsFile }}
    - name: CONVEYOR_MODELS_FILE
      value: {{ printf "%s/models.json" (include "conveyor.modelsDir" $root) | quote }}
    {{- else }}
    - name: CONVEYOR_MODELS
      value: {{ toJson $root.Values.config.models | quote }}
    {{- end }}
    {{- end }}
    {{- if and (eq $component "inference") $root.Values.config.reuse.enabled }}
    - name: CONVEYOR_REUSE
      value: "true"
    - name: CONVEYOR_REUSE_TTL_S
      value: {{ $root.Values.config.reuse.ttlSeconds | quote }}
    - name: CONVEYOR_REUSE_LEASE_S
      value: {{ $root.Values.config.reuse.leaseSeconds | quote }}
    {{- end }}
    {{- if eq $component "gateway" }}
    - name: CONVEYOR_GATEWAY_HOST
      value: "0.0.0.0"
    - name: CONVEYOR_GATEWAY_PORT
      value: {{ $svc.port | quote }}
    {{- end }}
    {{- with include "conveyor.kafkaSecretEnv" $root | trim }}{{ . | nindent 4 }}{{ end }}
    {{- with include "conveyor.appSecretEnv" (dict "root" $root "component" $component) | trim }}{{ . | nindent 4 }}{{ end }}
    {{- range $name, $value := $svc.env }}
    - name: {{ $name }}
      value: {{ $value | toString | quote }}
    {{- end }}
    {{- with $svc.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- $probePort := $svc.probePort | default $metricsPortName }}
  {{- if eq $probePort "metrics" }}{{ $probePort = $metricsPortName }}{{ end }}
  # Startup allows for model loading (/readyz answers 200 once the stage is set up and
  # consuming); after it, liveness restarts a stalled or broken loop (/healthz answers
  # 503) and readiness takes the pod out of Services meanwhile.
  startupProbe:
    httpGet:
      path: /readyz
      port: {{ $probePort }}
    periodSeconds: 5
    timeoutSeconds: 3
    failureThreshold: {{ max 1 (div (add (int $svc.startupTimeoutSeconds) 4) 5) }}
  livenessProbe:
    httpGet:
      path: /healthz
      port: {{ $probePort }}
    periodSeconds: 10
    timeoutSeconds: 3
    failureThreshold: 3
  readinessProbe:
    httpGet:
      path: /readyz
      port: {{ $probePort }}
    periodSeconds: 5
    timeoutSeconds: 3
    failureThreshold: 2
  {{- with $resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml $root.Values.securityContext | nindent 4 }}
  volumeMounts:
    - name: tmp
      mountPath: /tmp
    - name: home
      mountPath: {{ include "conveyor.homeDir" $root }}
    {{- if and (eq $component "inference") $svc.modelCache.enabled }}
    # Converted models (CONVEYOR_HOME/.cache) outlive the pod.
    - name: model-cache
      mountPath: {{ include "conveyor.homeDir" $root }}/.cache
    {{- end }}
    {{- if .embedded }}
    - name: store
      mountPath: {{ include "conveyor.embeddedStoreDir" $root }}
    {{- end }}
    {{- if and $root.Values.config.modelsFile $root.Values.config.models (has $component (include "conveyor.modelServices" $root | fromJsonArray)) }}
    - name: models
      mountPath: {{ include "conveyor.modelsDir" $root }}
      readOnly: true
    {{- end }}
    {{- with include "conveyor.kafkaCaVolumeMount" $root | trim }}{{ . | nindent 4 }}{{ end }}
{{- end }}
