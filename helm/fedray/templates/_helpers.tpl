{{- define "fedray.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name, kept to 40 characters: it is also the RayCluster's name, to which KubeRay
appends suffixes (-head-svc, -<group>-worker-xxxxx) for names limited to 63. */}}
{{- define "fedray.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "fedray.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fedray.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "fedray.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "fedray.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "fedray.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "fedray.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "fedray.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "fedray.aggregatorHost" -}}
{{- printf "%s-aggregator.%s.svc" (include "fedray.fullname" .) .Release.Namespace }}
{{- end }}

{{- define "fedray.jobConfigMapName" -}}
{{- printf "%s-job" (include "fedray.fullname" .) }}
{{- end }}

{{/* Ray's --resources flag wants a JSON object inside double quotes: "{\"fedray_aggregator\":1}". */}}
{{- define "fedray.aggregatorResources" -}}
{{- $r := .Values.aggregation.rayResource }}
{{- printf "%q" (dict $r.name $r.amount | toJson) }}
{{- end }}

{{/*
Stop the render on values that contradict each other; the schema covers single values.
*/}}
{{- define "fedray.validate" -}}
{{- $v := .Values }}
{{- if and $v.aggregation.enabled (hasKey $v.workerGroups $v.aggregation.groupName) }}
{{- fail (printf "workerGroups.%s has the same name as the aggregation group: rename one of them (aggregation.groupName)" $v.aggregation.groupName) }}
{{- end }}
{{- if and $v.aggregation.tls.enabled (not $v.aggregation.tls.secretName) }}
{{- fail "aggregation.tls.enabled is true but aggregation.tls.secretName is empty: name a kubernetes.io/tls Secret" }}
{{- end }}
{{- if and (not $v.aggregation.tls.enabled) $v.aggregation.tls.secretName }}
{{- fail "aggregation.tls.secretName is set but aggregation.tls.enabled is false: enable TLS or drop the Secret name" }}
{{- end }}
{{- if and (eq $v.aggregation.service.type "ClusterIP") (not (kindIs "invalid" $v.aggregation.service.nodePort)) }}
{{- fail "aggregation.service.nodePort is set but aggregation.service.type is ClusterIP: use NodePort or LoadBalancer" }}
{{- end }}
{{- if and (ne $v.aggregation.service.type "LoadBalancer") $v.aggregation.service.loadBalancerSourceRanges }}
{{- fail "aggregation.service.loadBalancerSourceRanges needs aggregation.service.type LoadBalancer" }}
{{- end }}
{{- if and (eq $v.rayAuth.mode "disabled") $v.rayAuth.secretName }}
{{- fail "rayAuth.secretName is set but rayAuth.mode is disabled: use mode token or drop the Secret name" }}
{{- end }}
{{- if and $v.rayJob.enabled (not $v.rayJob.jobSpec) }}
{{- fail "rayJob.enabled is true but rayJob.jobSpec is empty: give the fedray job spec as a YAML map" }}
{{- end }}
{{- if and $v.rbac.rules (not $v.serviceAccount.create) (not $v.serviceAccount.name) }}
{{- fail "rbac.rules would be bound to the namespace's default ServiceAccount: set serviceAccount.create or serviceAccount.name" }}
{{- end }}
{{- end }}

{{/* Checks one group (head excluded): dict "name" "group". */}}
{{- define "fedray.validateGroup" -}}
{{- $n := .name }}
{{- $g := .group }}
{{- if gt (int $g.minReplicas) (int $g.maxReplicas) }}
{{- fail (printf "%s: minReplicas (%d) is above maxReplicas (%d)" $n (int $g.minReplicas) (int $g.maxReplicas)) }}
{{- end }}
{{- if or (lt (int $g.replicas) (int $g.minReplicas)) (gt (int $g.replicas) (int $g.maxReplicas)) }}
{{- fail (printf "%s: replicas (%d) must lie between minReplicas (%d) and maxReplicas (%d)" $n (int $g.replicas) (int $g.minReplicas) (int $g.maxReplicas)) }}
{{- end }}
{{- $limits := (($g.resources | default dict).limits | default dict) }}
{{- if hasKey $limits "nvidia.com/gpu" }}
{{- fail (printf "%s: set the GPU count with gpus, not resources.limits[nvidia.com/gpu]" $n) }}
{{- end }}
{{- if hasKey ($g.rayStartParams | default dict) "num-gpus" }}
{{- fail (printf "%s: rayStartParams.num-gpus is derived from gpus; set gpus instead" $n) }}
{{- end }}
{{- end }}

{{/*
The pod template shared by the head, every worker group and the aggregation group.
Arguments: dict "root" $ "role" (head|worker|aggregator) "name" groupName "group" values.
*/}}
{{- define "fedray.podTemplate" -}}
{{- $root := .root }}
{{- $v := $root.Values }}
{{- $g := .group }}
{{- $agg := eq .role "aggregator" }}
{{- $jobMount := and (eq .role "head") $v.rayJob.enabled }}
{{- $tls := $v.aggregation.tls.enabled }}
{{- $t := $v.aggregation.tls }}
metadata:
  labels:
    {{- include "fedray.labels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .role }}
    fedray.io/group: {{ .name }}
    {{- with $v.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $v.podAnnotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  serviceAccountName: {{ include "fedray.serviceAccountName" $root }}
  automountServiceAccountToken: {{ not (empty $v.rbac.rules) }}
  {{- with $v.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.podSecurityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ ternary "ray-head" "ray-worker" (eq .role "head") }}
      image: {{ include "fedray.image" $root }}
      imagePullPolicy: {{ $v.image.pullPolicy }}
      env:
        - name: RAY_AUTH_MODE
          value: {{ $v.rayAuth.mode }}
        {{- /* read by the job driver: orchestrator/cluster_env.py */}}
        {{- if $v.aggregation.enabled }}
        - name: FEDRAY_AGGREGATOR_RESOURCE
          value: {{ $v.aggregation.rayResource.name | quote }}
        - name: FEDRAY_GRPC_PORT
          value: {{ $v.aggregation.grpcPort | quote }}
        {{- with $v.aggregation.publicAddress }}
        - name: FEDRAY_PUBLIC_ADDRESS
          value: {{ . | quote }}
        {{- end }}
        {{- end }}
        {{- if $tls }}
        - name: FEDRAY_TLS_CERT
          value: {{ printf "%s/tls.crt" $t.mountPath }}
        - name: FEDRAY_TLS_KEY
          value: {{ printf "%s/tls.key" $t.mountPath }}
        - name: FEDRAY_TLS_CA
          value: {{ printf "%s/%s" $t.mountPath $t.caKey }}
        - name: FEDRAY_TLS_SERVER_NAME
          value: {{ default (include "fedray.aggregatorHost" $root) $t.serverName | quote }}
        {{- end }}
        {{- with $v.env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
        {{- with $g.env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      ports:
        {{- if eq .role "head" }}
        - {name: gcs-server, containerPort: 6379}
        - {name: dashboard, containerPort: 8265}
        - {name: client, containerPort: 10001}
        {{- end }}
        - {name: metrics, containerPort: {{ $v.metrics.port }}}
        {{- if $agg }}
        - {name: grpc, containerPort: {{ $v.aggregation.grpcPort }}}
        {{- end }}
      {{- if and $agg (not $tls) (not $v.rayJob.enabled) }}
      {{- /* grpc.health.v1 on the shard's port: Ready while a shard serves there (the Service then
      routes to it). None with TLS: the kubelet's gRPC probe speaks plaintext only. None with the
      RayJob: KubeRay submits it only once every pod is Ready, and a shard serves only once the
      job runs. */}}
      readinessProbe:
        grpc: {port: {{ $v.aggregation.grpcPort }}}
        periodSeconds: 5
        failureThreshold: 2
      {{- end }}
      resources:
        {{- $res := deepCopy ($g.resources | default dict) }}
        {{- if gt (int ($g.gpus | default 0)) 0 }}
        {{- $_ := set $res "limits" (merge (dict "nvidia.com/gpu" (int $g.gpus)) ($res.limits | default dict)) }}
        {{- end }}
        {{- toYaml $res | nindent 8 }}
      {{- if or $jobMount $tls }}
      volumeMounts:
        {{- if $jobMount }}
        - {name: fedray-job, mountPath: /etc/fedray/job.yaml, subPath: job.yaml, readOnly: true}
        {{- end }}
        {{- if $tls }}
        - {name: fedray-tls, mountPath: {{ $t.mountPath }}, readOnly: true}
        {{- end }}
      {{- end }}
  {{- if or $jobMount $tls }}
  volumes:
    {{- if $jobMount }}
    - name: fedray-job
      configMap:
        name: {{ include "fedray.jobConfigMapName" $root }}
    {{- end }}
    {{- if $tls }}
    - name: fedray-tls
      secret:
        secretName: {{ $t.secretName }}
        {{- if not $agg }}
        {{- /* the key stays on the aggregation pods; other pods get only what workers trust */}}
        items:
          - {key: {{ $t.caKey }}, path: {{ $t.caKey }}}
        {{- end }}
    {{- end }}
  {{- end }}
  {{- with $g.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $g.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $g.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}

{{/*
One entry of spec.workerGroupSpecs, for a worker group or the aggregation group.
Arguments: dict "root" $ "role" (worker|aggregator) "name" groupName "group" values.
*/}}
{{- define "fedray.workerGroup" -}}
{{- /* hasKey rather than merge/default, which would take an explicit 0 for "unset". */}}
{{- $g := deepCopy .group }}
{{- range $k, $d := dict "replicas" 1 "minReplicas" 0 "gpus" 0 "rayStartParams" dict }}
{{- if not (hasKey $g $k) }}{{ $_ := set $g $k $d }}{{ end }}
{{- end }}
{{- if not (hasKey $g "maxReplicas") }}{{ $_ := set $g "maxReplicas" (max $g.replicas 1) }}{{ end }}
{{- include "fedray.validateGroup" (dict "name" (printf "%s group %s" .role .name) "group" $g) }}
{{- $v := .root.Values }}
{{- $params := dict "metrics-export-port" ($v.metrics.port | toString) }}
{{- if gt (int $g.gpus) 0 }}
{{- $_ := set $params "num-gpus" ($g.gpus | toString) }}
{{- end }}
{{- if eq .role "aggregator" }}
{{- if hasKey $g.rayStartParams "resources" }}
{{- fail "aggregation.rayStartParams.resources would replace the aggregator resource: set aggregation.rayResource instead" }}
{{- end }}
{{- $_ := set $params "resources" (include "fedray.aggregatorResources" .root) }}
{{- if not $v.aggregation.allowWorkers }}
{{- if hasKey $g.rayStartParams "num-cpus" }}
{{- fail "aggregation.rayStartParams.num-cpus keeps simulated workers off aggregation pods only when unset: drop it or set aggregation.allowWorkers" }}
{{- end }}
{{- $_ := set $params "num-cpus" "0" }}
{{- end }}
{{- end }}
- groupName: {{ .name }}
  replicas: {{ $g.replicas }}
  minReplicas: {{ $g.minReplicas }}
  maxReplicas: {{ $g.maxReplicas }}
  rayStartParams:
    {{- range $k, $val := merge (deepCopy $g.rayStartParams) $params }}
    {{ $k }}: {{ $val | quote }}
    {{- end }}
  template:
    {{- include "fedray.podTemplate" (dict "root" .root "role" .role "name" .name "group" $g) | trim | nindent 4 }}
{{- end }}
