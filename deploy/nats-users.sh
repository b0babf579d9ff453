#!/bin/sh
# Prints the Secrets that hold the NATS users' passwords (deploy/base/nats.yaml),
# each a new random one:   deploy/nats-users.sh | kubectl apply -f -
# Run it once before the first `kubectl apply -k`; running it again rotates
# the passwords (restart NATS and the falco-nats pods afterwards).
set -eu

# 48 hex digits after a letter: nats.conf reads a $VARIABLE's value as a
# value of its own syntax, where a bare `9e3...` or `12k...` is a number and
# fails to parse; a leading letter keeps every password a plain string.
password() {
    printf 'p%s' "$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')"
}

secret() { # name namespace value [key, default password]
    cat <<YAML
---
apiVersion: v1
kind: Secret
metadata:
  name: $1
  namespace: $2
  labels:
    app.kubernetes.io/part-of: falco-nats
type: Opaque
stringData:
  ${4:-password}: "$3"
YAML
}

bridge=$(password)
# NATS reads every password; the bridge runs beside Falco, in its namespace.
secret nats-user-bridge falco-nats "$bridge"
secret nats-user-bridge falco "$bridge"
secret nats-user-respond falco-nats "$(password)"
secret nats-user-reader falco-nats "$(password)"
secret nats-user-admin falco-nats "$(password)"
# The ui's page token (deploy/components/ui), under `token`.
secret falco-nats-ui-token falco-nats "$(password)" token
# The responders' seal on their shared records (--kv-key-file): records
# written by anyone else, with the responder's NATS password say, are not
# believed.
secret falco-nats-kv-key falco-nats "$(password)" key
leaf=$(password)
# The leaf layout (deploy/components/leaf): leaf nats-servers beside Falco.
secret nats-user-leaf falco-nats "$leaf"
secret nats-user-leaf falco "$leaf"
# falco-nats sources, which keeps the hub stream FALCO_ALL's sources equal
# to the nodes.
secret nats-user-sources falco-nats "$(password)"
