{{/* Names ------------------------------------------------------------------ */}}

{{- define "kvmesh.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* RELEASE-kvmesh, short enough for a component suffix ("-prefill") and pod hashes. */}}
{{- define "kvmesh.fullname" -}}
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

{{/* Name of one component's resources. Call with (dict "root" $ "component" "router"). */}}
{{- define "kvmesh.componentName" -}}
{{- printf "%s-%s" (include "kvmesh.fullname" .root) .component }}
{{- end }}

{{/* Fully qualified address HOST:PORT of a component's Service. */}}
{{- define "kvmesh.serviceAddress" -}}
{{- printf "%s.%s.svc.%s:%v" (include "kvmesh.componentName" .) .root.Release.Namespace .root.Values.clusterDomain .port }}
{{- end }}

{{/* HOST:PORT of the pod's own IP ($(POD_IP), from status.podIP), for peers to reach it.
     An IPv6 host goes in brackets: where kvmesh binds an IPv6 address (listenHost "::")
     the pod IPs are IPv6. Call with (dict "root" $ "port" N). */}}
{{- define "kvmesh.podAddress" -}}
{{- if contains ":" (toString .root.Values.listenHost) }}
{{- printf "[$(POD_IP)]:%v" .port }}
{{- else }}
{{- printf "$(POD_IP):%v" .port }}
{{- end }}
{{- end }}

{{- define "kvmesh.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kvmesh.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Labels ----------------------------------------------------------------- */}}

{{/* Selector labels of a component. Call with (dict "root" $ "component" "router"). */}}
{{- define "kvmesh.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kvmesh.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* All labels of a component's resources. */}}
{{- define "kvmesh.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "kvmesh.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: kvmesh
{{- end }}

{{/* Images ----------------------------------------------------------------- */}}

{{/* The kvmesh image of a component: its own repository/tag over the global ones.
     Call with (dict "root" $ "image" .Values.router.image). */}}
{{- define "kvmesh.image" -}}
{{- $repository := .image.repository | default .root.Values.image.repository }}
{{- $tag := .image.tag | default .root.Values.image.tag | default .root.Chart.AppVersion }}
{{- printf "%s:%s" $repository $tag }}
{{- end }}

{{/* Settings --------------------------------------------------------------- */}}

{{/* URL of the block index, or nothing when there is none. */}}
{{- define "kvmesh.indexUrl" -}}
{{- if .Values.redis.enabled }}
{{- if .Values.redis.externalUrl }}
{{- fail "redis: set either redis.enabled=true or redis.externalUrl, not both" }}
{{- end }}
{{- printf "redis://%s/%v" (include "kvmesh.serviceAddress" (dict "root" . "component" "redis" "port" .Values.redis.port)) .Values.redis.database }}
{{- else }}
{{- .Values.redis.externalUrl }}
{{- end }}
{{- end }}

{{/* Name of the Secret holding the router's API token. */}}
{{- define "kvmesh.apiTokenSecret" -}}
{{- if .Values.router.apiToken.existingSecret }}
{{- .Values.router.apiToken.existingSecret }}
{{- else if .Values.router.apiToken.value }}
{{- include "kvmesh.componentName" (dict "root" . "component" "api-token") }}
{{- else }}
{{- fail "router.apiToken.enabled needs router.apiToken.existingSecret (or, for tests, router.apiToken.value)" }}
{{- end }}
{{- end }}

{{/* Name of the Secret holding the cluster secret. */}}
{{- define "kvmesh.clusterSecretName" -}}
{{- .Values.clusterSecret.existingSecret | default (include "kvmesh.componentName" (dict "root" . "component" "cluster-secret")) }}
{{- end }}

{{/* Where every kvmesh container finds the cluster secret (--cluster-secret-file). */}}
{{- define "kvmesh.clusterSecretFile" -}}
/etc/kvmesh/secret/cluster-secret
{{- end }}

{{/* Pod pieces ------------------------------------------------------------- */}}

{{/* A Deployment's strategy or a DaemonSet's updateStrategy from its values: the
     rollingUpdate settings only with type RollingUpdate. Values given at install merge
     into the defaults, so type=Recreate still finds the default rollingUpdate, and
     Kubernetes refuses a Recreate Deployment that has one. Call with the values
     (.Values.prefill.strategy). */}}
{{- define "kvmesh.updateStrategy" -}}
{{- $type := .type | default "RollingUpdate" -}}
type: {{ $type }}
{{- if and (eq $type "RollingUpdate") .rollingUpdate }}
rollingUpdate:
  {{- toYaml .rollingUpdate | nindent 2 }}
{{- end }}
{{- end }}

{{/* Annotations every kvmesh pod template carries: a checksum of the ConfigMap, so
     that a configuration change rolls the pods. */}}
{{- define "kvmesh.configChecksum" -}}
checksum/config: {{ include (print .Template.BasePath "/configmap.yaml") . | sha256sum }}
{{- end }}

{{/* Prometheus scrape annotations. Call with (dict "root" $ "port" N). */}}
{{- define "kvmesh.scrapeAnnotations" -}}
{{- if .root.Values.metrics.podAnnotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .port | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- end }}

{{/* nodeSelector, tolerations and affinity of a component; GPU nodes for the workers
     and the store when gpu.enabled. Call with (dict "root" $ "values" .Values.store "gpu" true). */}}
{{- define "kvmesh.placement" -}}
{{- $gpu := and .gpu .root.Values.gpu.enabled }}
{{- $nodeSelector := deepCopy .values.nodeSelector }}
{{- $tolerations := .values.tolerations }}
{{- if $gpu }}
{{- $nodeSelector = merge $nodeSelector .root.Values.gpu.nodeSelector }}
{{- $tolerations = concat .root.Values.gpu.tolerations .values.tolerations }}
{{- end }}
{{- with $nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- end }}

{{/* Pod-level settings shared by the kvmesh pods (router, workers, store). */}}
{{- define "kvmesh.podCommon" -}}
serviceAccountName: {{ include "kvmesh.serviceAccountName" . }}
automountServiceAccountToken: false
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- end }}

{{/* Environment of every kvmesh container: the release's ConfigMap. */}}
{{- define "kvmesh.envFrom" -}}
envFrom:
  - configMapRef:
      name: {{ include "kvmesh.componentName" (dict "root" . "component" "config") }}
{{- end }}

{{/* Writable directories of a kvmesh container (its root filesystem is read-only). */}}
{{- define "kvmesh.scratchMounts" -}}
- name: tmp
  mountPath: /tmp
- name: home
  mountPath: /home/kvmesh
{{- end }}

{{- define "kvmesh.scratchVolumes" -}}
- name: tmp
  emptyDir: {}
- name: home
  emptyDir: {}
{{- end }}

{{/* The cluster secret, a read-only file of the Secret's one key, readable by the pod's
     group (fsGroup) only. */}}
{{- define "kvmesh.clusterSecretMount" -}}
- name: cluster-secret
  mountPath: {{ include "kvmesh.clusterSecretFile" . | dir }}
  readOnly: true
{{- end }}

{{- define "kvmesh.clusterSecretVolume" -}}
- name: cluster-secret
  secret:
    secretName: {{ include "kvmesh.clusterSecretName" . }}
    # 0440
    defaultMode: 288
    items:
      - key: {{ .Values.clusterSecret.secretKey }}
        path: {{ include "kvmesh.clusterSecretFile" . | base }}
{{- end }}

{{/* The model: volume, read-only mount and, for source=generate, the init container
     that writes the test model. */}}
{{- define "kvmesh.modelVolume" -}}
- name: model
{{- if eq .Values.model.source "pvc" }}
  persistentVolumeClaim:
    claimName: {{ .Values.model.pvc.claimName }}
    readOnly: true
{{- else if eq .Values.model.source "hostPath" }}
  hostPath:
    path: {{ .Values.model.hostPath.path }}
    type: Directory
{{- else if eq .Values.model.source "generate" }}
  emptyDir: {}
{{- else }}
{{- fail (printf "model.source must be pvc, hostPath or generate, not %q" .Values.model.source) }}
{{- end }}
{{- end }}

{{- define "kvmesh.modelMount" -}}
- name: model
  mountPath: {{ .Values.model.mountPath }}
  readOnly: true
{{- end }}

{{/* Call with (dict "root" $ "image" .Values.router.image). */}}
{{- define "kvmesh.modelInitContainers" -}}
{{- $root := .root }}
{{- if eq $root.Values.model.source "generate" }}
{{- if not (hasPrefix (printf "%s/" (trimSuffix "/" $root.Values.model.mountPath)) $root.Values.model.path) }}
{{- fail "model.path must lie under model.mountPath" }}
{{- end }}
initContainers:
  - name: generate-model
    image: {{ include "kvmesh.image" . }}
    imagePullPolicy: {{ $root.Values.image.pullPolicy }}
    command: [kvmesh]
    args:
      - model
      - make
      - {{ $root.Values.model.path | quote }}
      - --size={{ $root.Values.model.generate.size }}
      - --seed=0
    {{- include "kvmesh.envFrom" $root | nindent 4 }}
    securityContext:
      {{- toYaml $root.Values.containerSecurityContext | nindent 6 }}
    resources:
      requests:
        cpu: 500m
        memory: 1Gi
      limits:
        memory: 2Gi
    volumeMounts:
      - name: model
        mountPath: {{ $root.Values.model.mountPath }}
      {{- include "kvmesh.scratchMounts" $root | nindent 6 }}
{{- end }}
{{- end }}

{{/* A prefill or decode worker Deployment. Call with (dict "root" $ "role" "prefill"). */}}
{{- define "kvmesh.worker" -}}
{{- $root := .root }}
{{- $role := .role }}
{{- $v := index $root.Values $role }}
{{- $ctx := dict "root" $root "component" $role }}
{{- $gpus := mul $v.tensorParallelSize $v.pipelineParallelSize }}
{{- if lt (int $gpus) 1 }}
{{- fail (printf "%s: tensorParallelSize and pipelineParallelSize must be at least 1" $role) }}
{{- end }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "kvmesh.componentName" $ctx }}
  labels:
    {{- include "kvmesh.labels" $ctx | nindent 4 }}
spec:
  replicas: {{ $v.replicas }}
  strategy:
    {{- include "kvmesh.updateStrategy" $v.strategy | nindent 4 }}
  selector:
    matchLabels:
      {{- include "kvmesh.selectorLabels" $ctx | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "kvmesh.selectorLabels" $ctx | nindent 8 }}
        {{- with $v.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      annotations:
        {{- include "kvmesh.configChecksum" $root | nindent 8 }}
        {{- with $v.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      {{- include "kvmesh.podCommon" $root | nindent 6 }}
      terminationGracePeriodSeconds: {{ $v.terminationGracePeriodSeconds }}
      {{- with include "kvmesh.placement" (dict "root" $root "values" $v "gpu" true) | trim }}
      {{- . | nindent 6 }}
      {{- end }}
      {{- with include "kvmesh.modelInitContainers" (dict "root" $root "image" $v.image) | trim }}
      {{- . | nindent 6 }}
      {{- end }}
      containers:
        - name: {{ $role }}
          image: {{ include "kvmesh.image" (dict "root" $root "image" $v.image) }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          command: [kvmesh]
          args:
            - {{ $role }}
            - --model=$(KVMESH_MODEL)
            - --host=$(KVMESH_LISTEN_HOST)
            - --port={{ $v.port }}
            - --store=$(KVMESH_STORE_ADDRESS)
            - --block-size=$(KVMESH_BLOCK_SIZE)
            - --kv-cache-gib={{ $v.kvCacheGib }}
            {{- with $root.Values.model.id }}
            - --model-id={{ . }}
            {{- end }}
            {{- with $root.Values.model.maxModelLen }}
            - --max-model-len={{ . }}
            {{- end }}
            - --tensor-parallel-size={{ $v.tensorParallelSize }}
            - --pipeline-parallel-size={{ $v.pipelineParallelSize }}
            - --cluster-secret-file={{ include "kvmesh.clusterSecretFile" $root }}
            {{- range $name, $value := $v.engine }}
            {{- if kindIs "bool" $value }}
            - --{{ if not $value }}no-{{ end }}{{ $name | replace "_" "-" }}
            {{- else if or (kindIs "map" $value) (kindIs "slice" $value) }}
            - --{{ $name | replace "_" "-" }}={{ toJson $value }}
            {{- else }}
            - --{{ $name | replace "_" "-" }}={{ $value }}
            {{- end }}
            {{- end }}
            {{- with $v.extraArgs }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          {{- include "kvmesh.envFrom" $root | nindent 10 }}
          {{- with $v.extraEnv }}
          env:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          ports:
            - name: grpc
              containerPort: {{ $v.port }}
              protocol: TCP
          # The gRPC port opens once the engine has loaded the model, so a TCP probe
          # means "engine up" (the Health RPC, kvmesh.worker.v1.Worker/Health, is not
          # the standard gRPC health service that Kubernetes' grpc probe calls).
          startupProbe:
            tcpSocket:
              port: grpc
            periodSeconds: 10
            failureThreshold: {{ div $v.startupTimeoutSeconds 10 | max 1 }}
          readinessProbe:
            tcpSocket:
              port: grpc
            periodSeconds: 10
            failureThreshold: 3
          livenessProbe:
            tcpSocket:
              port: grpc
            periodSeconds: 20
            timeoutSeconds: 5
            failureThreshold: 3
          resources:
            {{- $resources := deepCopy $v.resources }}
            {{- if $root.Values.gpu.enabled }}
            {{- $requests := $resources.requests | default dict }}
            {{- $limits := $resources.limits | default dict }}
            {{- $_ := set $requests $root.Values.gpu.resourceName $gpus }}
            {{- $_ := set $limits $root.Values.gpu.resourceName $gpus }}
            {{- $_ := set $resources "requests" $requests }}
            {{- $_ := set $resources "limits" $limits }}
            {{- end }}
            {{- toYaml $resources | nindent 12 }}
          securityContext:
            {{- toYaml $root.Values.containerSecurityContext | nindent 12 }}
          volumeMounts:
            {{- include "kvmesh.modelMount" $root | nindent 12 }}
            {{- include "kvmesh.scratchMounts" $root | nindent 12 }}
            {{- include "kvmesh.clusterSecretMount" $root | nindent 12 }}
            - name: shm
              mountPath: /dev/shm
      volumes:
        {{- include "kvmesh.modelVolume" $root | nindent 8 }}
        {{- include "kvmesh.scratchVolumes" $root | nindent 8 }}
        {{- include "kvmesh.clusterSecretVolume" $root | nindent 8 }}
        - name: shm
          emptyDir:
            medium: Memory
            sizeLimit: {{ $v.shmSize }}
{{- end }}

{{/* The Service of a prefill or decode worker role. Call with (dict "root" $ "role" "prefill"). */}}
{{- define "kvmesh.workerService" -}}
{{- $v := index .root.Values .role }}
{{- $ctx := dict "root" .root "component" .role }}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "kvmesh.componentName" $ctx }}
  labels:
    {{- include "kvmesh.labels" $ctx | nindent 4 }}
spec:
  type: ClusterIP
  selector:
    {{- include "kvmesh.selectorLabels" $ctx | nindent 4 }}
  ports:
    - name: grpc
      port: {{ $v.port }}
      targetPort: grpc
      protocol: TCP
{{- end }}
