#!/usr/bin/env bash
# Make the mTLS material between KEDA and the kvscale scaler, as two Kubernetes Secrets.
#
#   deploy/tls/make-certs.sh [--namespace NS] [--out DIR] [--days N] [--apply]
#
# One private CA signs
#   * the scaler's server certificate, valid for the name KEDA dials (scalerAddress kvscale-scaler.NS.svc:9090)
#     and the other in-cluster spellings of the Service name;
#   * KEDA's client certificate (CN keda-operator, extendedKeyUsage clientAuth).
# and DIR/secrets.yaml holds
#   * Secret kvscale-scaler-tls      (tls.crt, tls.key, ca.crt): mounted by the scaler (--tls-cert/--tls-key/
#                                    --tls-client-ca);
#   * Secret kvscale-keda-client-tls (tls.crt, tls.key, ca.crt): read by KEDA through the TriggerAuthentication
#                                    kvscale-scaler-tls (caCert, tlsClientCert, tlsClientKey).
# --apply pipes secrets.yaml to `kubectl apply -f -`. Keys are ECDSA P-256; DIR keeps ca.key (keep it safe, or
# delete it and re-run the script to rotate everything). cert-manager users can issue the same two Secrets
# instead; only the names, keys and the DNS names matter.
set -euo pipefail

ns=kvscale
out=./kvscale-tls
days=365
apply=0
while [ $# -gt 0 ]; do
  case "$1" in
    --namespace|-n) ns="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --days) days="$2"; shift 2 ;;
    --apply) apply=1; shift ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "make-certs.sh: unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done
if ! [[ "$ns" =~ ^[a-z0-9]([-a-z0-9]*[a-z0-9])?$ ]]; then
  echo "make-certs.sh: not a Kubernetes namespace name: $ns" >&2; exit 2
fi
if ! [[ "$days" =~ ^[1-9][0-9]*$ ]]; then
  echo "make-certs.sh: --days must be a positive integer, got $days" >&2; exit 2
fi
command -v openssl >/dev/null || { echo "make-certs.sh: needs openssl" >&2; exit 1; }
command -v kubectl >/dev/null || { echo "make-certs.sh: needs kubectl (only to format the Secrets)" >&2; exit 1; }

umask 077
mkdir -p "$out"
cd "$out"
svc=kvscale-scaler

key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

key ca.key
openssl req -x509 -new -key ca.key -sha256 -days "$days" -subj "/CN=kvscale-ca/O=kvscale" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" -out ca.crt

cat > server.ext <<EXT
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=DNS:${svc}.${ns}.svc,DNS:${svc}.${ns}.svc.cluster.local,DNS:${svc}.${ns},DNS:${svc}
EXT
key server.key
openssl req -new -key server.key -subj "/CN=${svc}.${ns}.svc/O=kvscale" -out server.csr
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -set_serial "0x$(openssl rand -hex 16)" \
  -days "$days" -sha256 -extfile server.ext -out server.crt 2>/dev/null

cat > client.ext <<EXT
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth
EXT
key client.key
openssl req -new -key client.key -subj "/CN=keda-operator/O=kvscale" -out client.csr
openssl x509 -req -in client.csr -CA ca.crt -CAkey ca.key -set_serial "0x$(openssl rand -hex 16)" \
  -days "$days" -sha256 -extfile client.ext -out client.crt 2>/dev/null
rm -f server.csr client.csr server.ext client.ext

{
  kubectl create secret generic kvscale-scaler-tls --namespace "$ns" --dry-run=client -o yaml \
    --from-file=tls.crt=server.crt --from-file=tls.key=server.key --from-file=ca.crt=ca.crt
  echo "---"
  kubectl create secret generic kvscale-keda-client-tls --namespace "$ns" --dry-run=client -o yaml \
    --from-file=tls.crt=client.crt --from-file=tls.key=client.key --from-file=ca.crt=ca.crt
} > secrets.yaml

echo "wrote $(pwd)/secrets.yaml (Secrets kvscale-scaler-tls, kvscale-keda-client-tls in namespace $ns)"
if [ "$apply" = 1 ]; then
  kubectl apply -f secrets.yaml
fi
