{{/* Names and labels. */}}
{{- define "pidserve.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "pidserve.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "pidserve.labels" -}}
{{ include "pidserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* The serving units: one per GPU class, plus the CPU one when enabled. Each is a dict with
     name, gpu (bool) and the class's settings, defaults filled in. */}}
{{- define "pidserve.units" -}}
{{- $units := list -}}
{{- range .Values.gpuClasses -}}
{{- $defaults := dict "backend" "tensorrt" "precision" "bf16" "imageSize" "2048x2048" "maxBatch" 4 "replicas" 1 "buildMinutes" 60 "startupMinutes" 15 "calibrationLatents" "" "attentionBackend" "auto" "resources" (dict "limits" (dict "nvidia.com/gpu" 1)) "nodeSelector" (dict) "tolerations" (list (dict "key" "nvidia.com/gpu" "operator" "Exists" "effect" "NoSchedule")) -}}
{{- $units = append $units (merge (dict "gpu" true) (deepCopy .) $defaults) -}}
{{- end -}}
{{- if .Values.cpu.enabled -}}
{{- $units = append $units (merge (dict "name" "cpu" "gpu" false "backend" "torch" "precision" "fp32" "buildMinutes" 0 "maxBatch" 4 "attentionBackend" "auto") (deepCopy .Values.cpu)) -}}
{{- end -}}
{{- toJson (dict "units" $units) -}}
{{- end -}}

{{/* Where a unit's TensorRT engines live on the cache volume. */}}
{{- define "pidserve.engineDir" -}}
{{- printf "/engines/%s-%s-%s-b%d" .name .precision .imageSize (int .maxBatch) -}}
{{- end -}}


{{/* The serving container's environment (the Deployment's and KServe's ServingRuntime's): called with
     (dict "root" $ "unit" $unit). */}}
{{- define "pidserve.serveEnv" -}}
{{- $root := .root -}}
{{- $unit := .unit -}}
{{- $tensorrt := eq $unit.backend "tensorrt" -}}
{{- $engineDir := include "pidserve.engineDir" $unit -}}
{{- $checkpoint := $root.Values.model.checkpoint }}
- {name: PIDSERVE_HOST, value: "0.0.0.0"}
- {name: PIDSERVE_PORT, value: {{ $root.Values.server.port | quote }}}
- {name: PIDSERVE_METRICS_PORT, value: {{ $root.Values.server.metricsPort | quote }}}
- {name: PIDSERVE_CHECKPOINT, value: {{ $checkpoint | quote }}}
{{- with $root.Values.model.variant }}
- {name: PIDSERVE_VARIANT, value: {{ . | quote }}}
{{- end }}
{{- with $root.Values.model.name }}
- {name: PIDSERVE_MODEL_NAME, value: {{ . | quote }}}
{{- end }}
{{- with $root.Values.model.textEncoder }}
- {name: PIDSERVE_TEXT_ENCODER, value: {{ . | quote }}}
{{- end }}
- {name: PIDSERVE_BACKEND, value: {{ $unit.backend | quote }}}
- {name: PIDSERVE_DEVICE, value: {{ ternary "cuda" "cpu" $unit.gpu | quote }}}
- {name: PIDSERVE_PRECISION, value: {{ $unit.precision | quote }}}
{{- if not $tensorrt }}
- {name: PIDSERVE_ATTENTION_BACKEND, value: {{ $unit.attentionBackend | quote }}}
{{- end }}
- {name: PIDSERVE_MAX_BATCH, value: {{ $unit.maxBatch | quote }}}
{{- if $tensorrt }}
- {name: PIDSERVE_ENGINE_DIR, value: {{ $engineDir | quote }}}
{{- else if $unit.imageSize }}
- {name: PIDSERVE_IMAGE_SIZES, value: {{ list $unit.imageSize | toJson | quote }}}
{{- end }}
- {name: PIDSERVE_MAX_QUEUE_DELAY_MS, value: {{ $root.Values.server.maxQueueDelayMs | quote }}}
- {name: PIDSERVE_MAX_QUEUE_SIZE, value: {{ $root.Values.server.maxQueueSize | quote }}}
- {name: PIDSERVE_REQUEST_TIMEOUT_S, value: {{ $root.Values.server.requestTimeoutS | quote }}}
- {name: PIDSERVE_ENCODE_WORKERS, value: {{ $root.Values.server.encodeWorkers | quote }}}
- {name: PIDSERVE_PNG_ENCODER, value: {{ $root.Values.server.pngEncoder | quote }}}
- {name: PIDSERVE_GRACEFUL_SHUTDOWN_S, value: {{ $root.Values.server.gracefulShutdownS | quote }}}
- {name: PIDSERVE_LOG_LEVEL, value: {{ $root.Values.server.logLevel | quote }}}
{{- if $root.Values.apiKey.existingSecret }}
- {name: PIDSERVE_API_KEY_FILE, value: "/var/run/secrets/pidserve/{{ $root.Values.apiKey.secretKey }}"}
{{- end }}
- {name: HOME, value: /tmp}
{{- with $root.Values.server.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}
