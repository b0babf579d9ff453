#!/bin/sh
# Prints the config of the hub's stream FALCO_ALL, which sources the stream
# FALCO of every node's leaf nats-server (deploy/components/leaf), as JSON
# for the nats CLI, logged in as the NATS user admin:
#
#   deploy/components/leaf/hub-stream.sh > falco-all.json
#   nats stream add FALCO_ALL --config falco-all.json       # the first time
#   nats stream edit FALCO_ALL --config falco-all.json -f   # as nodes come and go
#
# Node names are the arguments, or else every node kubectl lists. Each
# node's JetStream domain is its name with dots made dashes, as the leaf's
# container sets it. FALCO_ALL_REPLICAS (default 1) sets the replicas: 3 on
# a clustered hub.
set -eu

replicas=${FALCO_ALL_REPLICAS:-1}
case $replicas in
    1 | 3 | 5) ;;
    *) echo "FALCO_ALL_REPLICAS must be 1, 3 or 5, not $replicas" >&2; exit 2 ;;
esac
if [ $# -eq 0 ]; then
    # shellcheck disable=SC2046 # one word per node name
    set -- $(kubectl get nodes -o jsonpath='{.items[*].metadata.name}')
fi
if [ $# -eq 0 ]; then
    echo "no nodes" >&2
    exit 2
fi

for node in "$@"; do
    # A Kubernetes node name: lower-case letters, digits, '-' and '.'.
    case $node in
        '' | *[!a-z0-9.-]*) echo "not a node name: $node" >&2; exit 2 ;;
    esac
done

# 7 days, and the duplicate window the bridge's stream has, in nanoseconds.
printf '{"name":"FALCO_ALL","storage":"file","num_replicas":%s,' "$replicas"
printf '"max_age":604800000000000,"duplicate_window":120000000000,"sources":['
sep=
for node in "$@"; do
    domain=$(printf '%s' "$node" | tr . -)
    printf '%s{"name":"FALCO","external":{"api":"$JS.%s.API"}}' "$sep" "$domain"
    sep=,
done
printf ']}\n'
