{{/* The name of a component's objects: <release>-<component>, or the
release name alone when it already says falco-nats and the component. */}}
{{- define "falco-nats.fullname" -}}
{{- printf "%s-%s" .root.Release.Name .component | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels of every object. */}}
{{- define "falco-nats.labels" -}}
app.kubernetes.io/name: falco-nats
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* The labels a component's pods are selected by. */}}
{{- define "falco-nats.selector" -}}
app.kubernetes.io/name: falco-nats
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* The image: repository:tag, or repository@digest when a digest is set
(the one scripts/image prints). */}}
{{- define "falco-nats.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* The NATS connection of a component (.values: bridge or respond):
environment variables read by the nats CLI's flags. */}}
{{- define "falco-nats.natsEnv" -}}
- name: NATS_URL
  value: {{ .root.Values.nats.url | quote }}
- name: NATS_USER
  value: {{ .values.natsUser | quote }}
- name: NATS_INBOX_PREFIX
  value: {{ .values.natsInboxPrefix | quote }}
{{- if .values.natsPasswordSecret }}
- name: NATS_PASSWORD_FILE
  value: /etc/falco-nats/nats/password
{{- end }}
{{- if .root.Values.nats.tlsCASecret }}
- name: NATS_CA
  value: /etc/falco-nats/nats-ca/ca.crt
{{- end }}
- name: FALCO_NATS_LOG_FORMAT
  value: {{ .root.Values.logFormat | quote }}
{{- end -}}

{{- define "falco-nats.natsMounts" -}}
{{- if .values.natsPasswordSecret }}
- name: nats-user
  mountPath: /etc/falco-nats/nats
  readOnly: true
{{- end }}
{{- if .root.Values.nats.tlsCASecret }}
- name: nats-ca
  mountPath: /etc/falco-nats/nats-ca
  readOnly: true
{{- end }}
{{- end -}}

{{- define "falco-nats.natsVolumes" -}}
{{- if .values.natsPasswordSecret }}
- name: nats-user
  secret:
    secretName: {{ .values.natsPasswordSecret }}
{{- end }}
{{- if .root.Values.nats.tlsCASecret }}
- name: nats-ca
  secret:
    secretName: {{ .root.Values.nats.tlsCASecret }}
{{- end }}
{{- end -}}
