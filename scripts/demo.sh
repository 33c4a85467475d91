#!/usr/bin/env bash
# `make demo`: the main job on the embedded default (sled, standalone mode).
# Starts a control plane, registers workloads, runs a node agent that attests
# with a join token, fetches an SVID from its Workload API, mints X509- and
# JWT-SVIDs and verifies them with openssl, then rotates the CA. Cleans up after itself.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=target/debug
CP="$BIN/control-plane"
AGENT="$BIN/node-agent"
TD=demo.keyway.local
WORK="$(mktemp -d /tmp/keyway-demo.XXXXXX)"
chmod 755 "$WORK"   # the Workload API socket lives here and serves every local uid
PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
export KEYWAY_ADMIN_SOCKET="$WORK/cp/admin.sock"

cleanup() {
  [ -n "${AGENT_PID:-}" ] && kill "$AGENT_PID" 2>/dev/null && wait "$AGENT_PID" 2>/dev/null || true
  [ -n "${CP_PID:-}" ] && kill "$CP_PID" 2>/dev/null && wait "$CP_PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "start the control plane (trust domain $TD, embedded store in $WORK/cp)"
RUST_LOG=warn "$CP" serve --trust-domain "$TD" --data-dir "$WORK/cp" --listen "127.0.0.1:$PORT" &
CP_PID=$!
for _ in $(seq 1 300); do
  [ -S "$KEYWAY_ADMIN_SOCKET" ] && "$CP" ca status >/dev/null 2>&1 && break
  kill -0 "$CP_PID" 2>/dev/null || { echo "control plane exited" >&2; exit 1; }
  sleep 0.1
done
"$CP" ca status

step "register workloads (standalone Workload documents)"
cat > "$WORK/workloads.yaml" <<YAML
apiVersion: keyway.dev/v1alpha1
kind: Workload
metadata: { name: frontend, namespace: default, labels: { app: frontend } }
spec:
  serviceAccount: frontend
  node: node-a
  ips: ["10.244.1.10"]
  selectors: ["netns:frontend", "unix:uid:$(id -u)"]
---
apiVersion: keyway.dev/v1alpha1
kind: Workload
metadata: { name: api, namespace: default, labels: { app: api } }
spec:
  serviceAccount: api
  node: node-b
  ips: ["10.244.2.10"]
  selectors: ["netns:api"]
YAML
"$CP" apply -f "$WORK/workloads.yaml"
"$CP" identity list

step "run the node agent on node-a (attests with a single-use join token)"
"$CP" bundle show > "$WORK/bundle.pem"
TOKEN="$("$CP" token create --node node-a)"
RUST_LOG=warn KEYWAY_JOIN_TOKEN="$TOKEN" "$AGENT" run --server "127.0.0.1:$PORT" --trust-domain "$TD" \
  --node-name node-a --trust-bundle "$WORK/bundle.pem" --data-dir "$WORK/agent" --socket "$WORK/agent.sock" \
  --admin-socket "$WORK/agent-admin.sock" --auth-port 0 &
AGENT_PID=$!
for _ in $(seq 1 300); do
  "$AGENT" healthcheck --socket "$WORK/agent.sock" >/dev/null 2>&1 && break
  kill -0 "$AGENT_PID" 2>/dev/null || { echo "node agent exited" >&2; exit 1; }
  sleep 0.1
done
echo "the same token again is refused:"
KEYWAY_JOIN_TOKEN="$TOKEN" "$AGENT" attest --server "127.0.0.1:$PORT" --trust-domain "$TD" \
  --node-name node-a --trust-bundle "$WORK/bundle.pem" 2>&1 | tail -n1 || true

step "this shell matches frontend's unix:uid selector: fetch its SVID from the Workload API"
for _ in $(seq 1 100); do
  "$AGENT" svid fetch --socket "$WORK/agent.sock" --write "$WORK/frontend" 2>/dev/null && break
  sleep 0.1
done
openssl verify -CAfile "$WORK/frontend/bundle.pem" "$WORK/frontend/svid.pem"
echo "api runs on node-b, so node-a cannot get its SVID; a caller matching nothing is told why:"
SPIFFE_ENDPOINT_SOCKET="unix://$WORK/agent.sock" setpriv --reuid 4242 "$AGENT" svid fetch 2>&1 | tail -n1 || true

step "mint an X509-SVID (the key is generated locally; only a CSR travels)"
"$CP" x509 mint --spiffe-id "spiffe://$TD/ns/default/sa/frontend" --ttl 1h --out "$WORK/svid"
openssl x509 -in "$WORK/svid/svid.pem" -noout -subject -issuer -dates -ext subjectAltName,keyUsage,extendedKeyUsage,basicConstraints
openssl verify -CAfile "$WORK/svid/bundle.pem" "$WORK/svid/svid.pem"

step "an invalid SPIFFE ID is refused with the rule it breaks"
"$CP" x509 mint --spiffe-id "spiffe://$TD/ns//sa/x" --out "$WORK/bad" 2>&1 || true

step "mint a JWT-SVID and show its claims"
JWT="$("$CP" jwt mint --spiffe-id "spiffe://$TD/ns/default/sa/frontend" --audience api)"
python3 -c 'import sys,base64,json; p=sys.argv[1].split(".")[1]; print(json.dumps(json.loads(base64.urlsafe_b64decode(p+"="*(-len(p)%4))),indent=2))' "$JWT"

step "rotate the CA in two phases; the old SVID still verifies against the new bundle"
"$CP" ca prepare
"$CP" ca activate
"$CP" bundle show > "$WORK/bundle2.pem"
openssl verify -CAfile "$WORK/bundle2.pem" "$WORK/svid/svid.pem"

step "done"
cat <<TXT
Try next:
  make test      # every test tier (unit, in-process integration, lint)
  make bench     # issuance and agent benchmarks, results in bench-results/
  control-plane --help, node-agent --help
  SPIFFE_ENDPOINT_SOCKET=unix:///run/keyway/sockets/agent.sock node-agent svid fetch -o json
TXT
