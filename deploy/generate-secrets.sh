#!/usr/bin/env bash
# Writes the two Secrets the manifests mount, as YAML on stdout, made fresh each run:
#
#   lockstep-join-token  key join-token: 32 random bytes, hex
#   lockstep-tls         kubernetes.io/tls: tls.crt and tls.key (the coordinator's server
#                        certificate for the Service's DNS names) and ca.crt (the CA that
#                        signed it, which is all the workers get)
#
#   deploy/generate-secrets.sh [--namespace lockstep] [--service lockstep-coordinator] \
#       [--cluster-domain cluster.local] | kubectl apply -f -
#
# Nothing is written to disk but a temporary directory, removed on exit; the CA's key is
# thrown away with it, so the next certificate comes with a new CA (run it again, apply, and
# start a new job: the programs read their certificates once, at start). Needs openssl.
set -euo pipefail

namespace=lockstep
service=lockstep-coordinator
cluster_domain=cluster.local
ca_days=3650
server_days=365

usage() {
    sed -n '2,14s/^# \{0,1\}//p' "$0"
}

while [ $# -gt 0 ]; do
    case $1 in
        --namespace) namespace=${2:?--namespace needs a value}; shift 2 ;;
        --namespace=*) namespace=${1#*=}; shift ;;
        --service) service=${2:?--service needs a value}; shift 2 ;;
        --service=*) service=${1#*=}; shift ;;
        --cluster-domain) cluster_domain=${2:?--cluster-domain needs a value}; shift 2 ;;
        --cluster-domain=*) cluster_domain=${1#*=}; shift ;;
        -h | --help) usage; exit 0 ;;
        *) echo "generate-secrets.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
    esac
done

# DNS-1123 labels: what a namespace and a Service may be called, and so safe to put in YAML
# and in an openssl configuration unquoted.
label='^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$'
for value in "$namespace" "$service"; do
    if ! [[ $value =~ $label ]]; then
        echo "generate-secrets.sh: '$value' is not a valid namespace or Service name" >&2
        exit 2
    fi
done
if ! [[ $cluster_domain =~ ^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$ ]]; then
    echo "generate-secrets.sh: '$cluster_domain' is not a valid cluster domain" >&2
    exit 2
fi
if ! command -v openssl >/dev/null; then
    echo "generate-secrets.sh: openssl is needed (apt-get install openssl)" >&2
    exit 1
fi

umask 077
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT

# The names workers may dial: the short name (the manifests use it, and the workers'
# LOCKSTEP_TLS_DOMAIN), then the longer forms from other namespaces.
names=(
    "$service"
    "$service.$namespace"
    "$service.$namespace.svc"
    "$service.$namespace.svc.$cluster_domain"
)
san=$(printf 'DNS:%s,' "${names[@]}")
san=${san%,}

cat >"$dir/ca.ext" <<EOF
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
EOF
cat >"$dir/server.ext" <<EOF
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = $san
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
EOF

quiet() {
    if ! "$@" >"$dir/openssl.log" 2>&1; then
        cat "$dir/openssl.log" >&2
        echo "generate-secrets.sh: failed: $*" >&2
        exit 1
    fi
}

# ECDSA P-256 keys (PKCS#8 PEM), which rustls accepts.
quiet openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$dir/ca.key"
quiet openssl req -new -key "$dir/ca.key" -subj "/CN=lockstep CA ($namespace)" -out "$dir/ca.csr"
quiet openssl x509 -req -in "$dir/ca.csr" -signkey "$dir/ca.key" -days "$ca_days" -sha256 \
    -extfile "$dir/ca.ext" -out "$dir/ca.crt"

quiet openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$dir/tls.key"
quiet openssl req -new -key "$dir/tls.key" -subj "/CN=$service.$namespace.svc" -out "$dir/tls.csr"
quiet openssl x509 -req -in "$dir/tls.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" \
    -set_serial "0x$(openssl rand -hex 16)" -days "$server_days" -sha256 \
    -extfile "$dir/server.ext" -out "$dir/tls.crt"
for name in "${names[@]}"; do
    quiet openssl verify -CAfile "$dir/ca.crt" -purpose sslserver -verify_hostname "$name" \
        "$dir/tls.crt"
done

# No trailing newline; the programs would strip one anyway.
printf '%s' "$(openssl rand -hex 32)" >"$dir/join-token"

b64() { openssl base64 -A -in "$1"; }

labels="    app.kubernetes.io/name: lockstep
    app.kubernetes.io/instance: lockstep
    app.kubernetes.io/part-of: lockstep
    app.kubernetes.io/managed-by: generate-secrets.sh"

cat <<EOF
# Made by deploy/generate-secrets.sh; holds secrets: apply it, never commit it.
apiVersion: v1
kind: Secret
metadata:
  name: lockstep-join-token
  namespace: $namespace
  labels:
$labels
type: Opaque
data:
  join-token: $(b64 "$dir/join-token")
---
apiVersion: v1
kind: Secret
metadata:
  name: lockstep-tls
  namespace: $namespace
  labels:
$labels
type: kubernetes.io/tls
data:
  tls.crt: $(b64 "$dir/tls.crt")
  tls.key: $(b64 "$dir/tls.key")
  ca.crt: $(b64 "$dir/ca.crt")
EOF

echo "generate-secrets.sh: secrets for $service in namespace $namespace (server certificate" \
    "for ${names[*]}, valid $server_days days)" >&2
