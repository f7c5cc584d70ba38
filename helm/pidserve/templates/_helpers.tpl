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
