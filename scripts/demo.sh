#!/usr/bin/env bash
# `make demo`: Keyway's mutual authentication, on one machine, as root.
#
# A control plane (embedded store) and two "nodes" (network namespaces, each
# with its own `node-agent run --datapath`), pods in namespaces behind veths:
# frontend and intruder on node-a, api on node-b, and the policy of
# DESIGN.md section 4 (api takes TCP 8080 only from frontend, mutually
# authenticated). It shows, with `node-agent observe` flow lines:
#   - frontend -> api works at the first attempt (pre-authenticated),
#   - intruder -> api is dropped by policy,
#   - the same over IPv6: the pods are dual-stack, one identity each,
#   - frontend's Workload deleted and re-added under a new identity: dropped
#     with AUTH_REQUIRED until the agents have authenticated the new pair.
# Everything it makes (namespaces, processes, pin dirs, temp dir) is removed
# on exit, also on Ctrl-C or failure.
set -eEuo pipefail
cd "$(dirname "$0")/.."
. scripts/demo-lib.sh

BIN=$PWD/target/debug
CP=$BIN/control-plane
AGENT=$BIN/node-agent
TD=demo.keyway.local
CP_ADDR=10.202.0.1:8081
API_IP=10.201.2.10
API_IP6=fd00::a:c9:2:a # v6 $API_IP (scripts/demo-lib.sh)
T_START=$(date +%s%3N)
LOG_LEVEL=${KEYWAY_DEMO_LOG:-warn}

[ "$(id -u)" = 0 ] || { echo "make demo needs root (network namespaces, veths, BPF programs)" >&2; exit 1; }
for b in "$CP" "$AGENT"; do
  [ -x "$b" ] || { echo "$b is missing: run \`make demo\` (it builds first)" >&2; exit 1; }
done
for t in ip nsenter python3 openssl flock; do
  command -v "$t" >/dev/null || { echo "make demo needs $t" >&2; exit 1; }
done
# The interpreter itself, not a version-manager shim: it starts faster in the pods.
PY=$(python3 -c 'import sys; print(sys.executable)')

# One demo at a time. $STATE names the running demo (its shell's pid), its
# temp dir and the processes it started, so whatever a run killed with -9
# left (processes, namespaces, pin dirs, temp dir) is removed by the next.
STATE=/run/keyway-demo.state
exec 9>/run/keyway-demo.lock
flock 9
owner=$(awk '$1 == "main" { print $2 }' "$STATE" 2>/dev/null || true)
if [ -n "$owner" ] && alive "$owner" && [[ $({ tr '\0' ' ' <"/proc/$owner/cmdline"; } 2>/dev/null) == *demo.sh* ]]; then
  echo "another make demo is running (pid $owner)" >&2
  exit 1
fi
if [ -s "$STATE" ] || [ -n "$(leftovers)" ]; then
  echo "removing what an earlier, interrupted demo left: $(leftovers | tr '\n' ' ')"
  remove_leftovers "$STATE"
fi
WORK=$(mktemp -d /tmp/keyway-demo.XXXXXX)
chmod 755 "$WORK" # the Workload API sockets live here
printf 'main %s\ndir %s\n' "$$" "$WORK" >"$STATE"
exec 9>&- # the lock only guards the check above; nothing started below holds it
export KEYWAY_ADMIN_SOCKET=$WORK/cp/admin.sock
LOGS=(control-plane="$WORK/control-plane.log" node-a="$WORK/node-a.log" node-b="$WORK/node-b.log" api-server="$WORK/api-server.log")
PIDS=()

cleanup() {
  local rc=$? i
  trap - EXIT INT TERM ERR
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do stop "${PIDS[i]}"; done
  remove_topology
  rm -rf "$WORK" "$STATE"
  if [ -n "$(leftovers)" ]; then
    echo "cleanup left: $(leftovers | tr '\n' ' ')" >&2
    rc=1
  fi
  printf '%s(cleaned up: namespaces, agents, control plane, pin dirs, %s)%s\n' "$DIM" "$WORK" "$RESET"
  exit "$rc"
}
trap cleanup EXIT
trap 'echo; echo "interrupted" >&2; exit 130' INT TERM
trap 'die "\`$BASH_COMMAND\` failed (${BASH_SOURCE[0]##*/} line $LINENO)"' ERR
# On failure: what the agents saw, besides their logs.
diagnose() {
  local n
  for n in node-a node-b; do
    [ -S "$WORK/$n-admin.sock" ] || continue
    echo "--- $n: node-agent auth list; observe (last 8 flows) ---"
    "$AGENT" auth list --admin-socket "$WORK/$n-admin.sock" 2>&1 | tail -n 8
    "$AGENT" observe --admin-socket "$WORK/$n-admin.sock" 2>&1 | tail -n 8
  done
  echo "(the processes log at RUST_LOG=$LOG_LEVEL; \`KEYWAY_DEMO_LOG=debug make demo\` logs more)"
}

# started PID: a process to stop on exit (and, after kill -9, on the next run).
started() { PIDS+=("$1"); echo "pid $1" >>"$STATE"; }
observe_b() { "$AGENT" observe --admin-socket "$WORK/node-b-admin.sock" "$@"; }
auth_b() { "$AGENT" auth list --admin-socket "$WORK/node-b-admin.sock" "$@"; }
# since T: an --since value covering everything from epoch-ms T on.
since() { echo "$(($(date +%s%3N) - $1 + 20))ms"; }
# api's agent holds an authenticated entry for (api, frontend's service account $1).
api_paired_with() {
  local out
  out=$(auth_b -o json) || return 1
  [[ $out == *"\"local_spiffe_id\":\"spiffe://$TD/ns/default/sa/api\""*"\"remote_spiffe_id\":\"spiffe://$TD/ns/default/sa/$1\""* ]] ||
    [[ $out == *"\"remote_spiffe_id\":\"spiffe://$TD/ns/default/sa/$1\""*"\"local_spiffe_id\":\"spiffe://$TD/ns/default/sa/api\""* ]]
}
auth_port_open() { [ -n "$(ip netns exec "$PREFIX-$1" ss -Hltn 'sport = :4250')" ]; }
api_not_paired_with() { ! api_paired_with "$1"; }
api_listening() { [ -n "$(ip netns exec "$PREFIX-api" ss -Hltn 'sport = :8080')" ]; }
# lines_match N PATTERN CMD...: CMD prints at least N lines matching PATTERN.
lines_match() {
  local n=$1 pat=$2 out; shift 2
  out=$("$@") || return 1
  [ "$(grep -c -- "$pat" <<<"$out")" -ge "$n" ]
}

# A TCP client for the pods: up to ATTEMPTS connections to api, one after
# the other, each given TIMEOUT seconds (a new connection, so a new flow, each
# time), then an HTTP GET on the first that connects. A run of failed attempts
# is printed as one line. Exit 0 once api answered.
cat >"$WORK/client.py" <<'PY'
import socket, sys, time
dst, port, attempts, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
t0 = time.monotonic()
ms = lambda t: f"+{(t - t0) * 1000:.0f} ms"
ready = sys.argv[5] if len(sys.argv) > 5 else None  # touched after the first attempt
run = None  # [first attempt, first time, last attempt, last time, what]
def flush():
    if run:
        a, ta, b, tb, what = run
        which = f"attempt {a}" if a == b else f"attempts {a}-{b}"
        when = ms(ta) if a == b else f"{ms(ta)} .. {ms(tb)}"
        print(f"{which} ({when}): {what}", flush=True)
for i in range(1, attempts + 1):
    start = time.monotonic()
    try:
        s = socket.create_connection((dst, port), timeout=timeout)
    except OSError as e:
        what = f"no answer within {timeout * 1000:.0f} ms" if isinstance(e, socket.timeout) else e.strerror
        if run and run[4] == what:
            run[2:4] = [i, start]
        else:
            flush()
            run = [i, start, i, start, what]
        if i == 1 and ready:
            open(ready, "w").close()
        continue
    if i == 1 and ready:
        open(ready, "w").close()
    took = (time.monotonic() - start) * 1000
    flush()
    s.settimeout(3)
    s.sendall(b"GET / HTTP/1.0\r\nHost: api\r\n\r\n")
    data = b""
    while chunk := s.recv(4096):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = head.split(b"\r\n")[0].decode()
    print(f"attempt {i} ({ms(start)}): connected in {took:.1f} ms, {status}: {body.decode().strip()}", flush=True)
    sys.exit(0)
flush()
sys.exit(1)
PY
# api's server: answers any request with one line (no name lookups, unlike
# http.server, whose start-up waits for a reverse DNS lookup nobody answers).
cat >"$WORK/server.py" <<'PY'
import socket, sys
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
srv = socket.create_server((sys.argv[1], int(sys.argv[2])), family=family)
while True:
    conn, peer = srv.accept()
    with conn:
        conn.settimeout(3)
        try:
            conn.recv(4096)
            conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nhello from api\n")
            print(f"{peer[0]}:{peer[1]} served", flush=True)
        except OSError as e:
            print(f"{peer[0]}:{peer[1]} {e}", flush=True)
PY
client() { local pod=$1; shift; ip netns exec "$PREFIX-$pod" "$PY" "$WORK/client.py" "$API_IP" 8080 "$@"; }
client6() { local pod=$1; shift; ip netns exec "$PREFIX-$pod" "$PY" "$WORK/client.py" "$API_IP6" 8080 "$@"; }

workload() { # NAME SERVICE-ACCOUNT NODE IP (and its v6: the pods are dual-stack)
  cat <<YAML
apiVersion: keyway.dev/v1alpha1
kind: Workload
metadata: { name: $1, namespace: default, labels: { app: $1 } }
spec:
  serviceAccount: $2
  node: $3
  ips: ["$4", "$(v6 "$4")"]
  selectors: ["netns:$PREFIX-$1"]
YAML
}
workload frontend frontend node-a 10.201.1.10 >"$WORK/frontend.yaml"
workload frontend frontend-v2 node-a 10.201.1.10 >"$WORK/frontend-v2.yaml"
{
  cat "$WORK/frontend.yaml"
  echo ---
  workload intruder other node-a 10.201.1.20
  echo ---
  workload api api node-b "$API_IP"
  echo ---
  cat <<'YAML'
apiVersion: keyway.dev/v1alpha1
kind: KeywayNetworkPolicy
metadata: { name: api-mtls, namespace: default }
spec:
  endpointSelector: { matchLabels: { app: api } }
  ingress:
    - authentication: { mode: required }   # required | disabled
      fromEndpoints:
        - matchLabels: { app: frontend }
      toPorts:
        - ports: [{ port: "8080", protocol: TCP }]
YAML
} >"$WORK/cluster.yaml"

# ---------------------------------------------------------------------------
step "Two nodes on one machine: network namespaces on a bridge, pods behind veths"
make_topology
say "node-a  10.202.0.1   pods 10.201.1.0/24:  frontend 10.201.1.10 (sa frontend), intruder 10.201.1.20 (sa other)"
say "node-b  10.202.0.2   pods 10.201.2.0/24:  api 10.201.2.10 (sa api)"
say "dual-stack: every pod also has an IPv6 address ($(v6 10.201.1.10), $(v6 10.201.1.20), $API_IP6), one identity for both"

step "The control plane on node-a ($CP_ADDR, embedded store), the workloads and the policy"
RUST_LOG=$LOG_LEVEL nsenter --net="/run/netns/$PREFIX-node-a" -- "$CP" serve --trust-domain "$TD" \
  --data-dir "$WORK/cp" --listen "$CP_ADDR" </dev/null >"$WORK/control-plane.log" 2>&1 &
started $!
WAIT_PID=$! wait_for 30 "control plane answering on its admin socket" "$CP" ca status
"$CP" apply -f "$WORK/cluster.yaml" | indent
say "the policy (DESIGN.md section 4): api takes TCP 8080 only from app=frontend, mutually authenticated"
sed -n '/kind: KeywayNetworkPolicy/,$p' "$WORK/cluster.yaml" | sed -n '/^spec:/,$p' | indent
"$CP" identity list | indent

step "A node agent per node, in its namespace, with the eBPF datapath (join token, single use)"
"$CP" bundle show >"$WORK/bundle.pem"
for n in node-a node-b; do
  token=$("$CP" token create --node "$n")
  RUST_LOG=$LOG_LEVEL nsenter --net="/run/netns/$PREFIX-$n" -- "$AGENT" run --server "$CP_ADDR" \
    --trust-domain "$TD" --node-name "$n" --trust-bundle "$WORK/bundle.pem" \
    --data-dir "$WORK/$n" --socket "$WORK/$n.sock" --admin-socket "$WORK/$n-admin.sock" \
    --join-token "$token" --datapath --bpf-pin-dir "$PIN_ROOT/$PIN_PREFIX$n" \
    </dev/null >"$WORK/$n.log" 2>&1 &
  started $!
done
for i in 1 2; do
  n=node-$([ $i = 1 ] && echo a || echo b)
  WAIT_PID=${PIDS[i]} wait_for 30 "$n's agent serving its Workload API" "$AGENT" healthcheck --socket "$WORK/$n.sock"
  WAIT_PID=${PIDS[i]} wait_for 30 "$n's auth port" auth_port_open "$n"
  WAIT_PID=${PIDS[i]} wait_for 30 "$n's datapath pins" test -d "$PIN_ROOT/$PIN_PREFIX$n"
  ok "$n: attested, Workload API on $WORK/$n.sock, auth port 10.202.0.$i:4250, programs pinned in $PIN_ROOT/$PIN_PREFIX$n"
done

step "frontend fetches its SVID from the Workload API (the agent knows the caller by its network namespace)"
fetch_frontend() { ip netns exec "$PREFIX-frontend" "$AGENT" svid fetch --socket "$WORK/node-a.sock" --write "$WORK/frontend-svid"; }
WAIT_PID=${PIDS[1]} wait_for 30 "SVID for frontend" fetch_frontend
fetch_frontend 2>/dev/null | indent
openssl x509 -in "$WORK/frontend-svid/svid.pem" -noout -ext subjectAltName | sed -n 's/^ *//; /URI/p' | indent
openssl verify -CAfile "$WORK/frontend-svid/bundle.pem" "$WORK/frontend-svid/svid.pem" | indent
say "the intruder, in its own namespace, gets its own identity, not frontend's:"
WAIT_PID=${PIDS[1]} wait_for 30 "SVID for intruder" ip netns exec "$PREFIX-intruder" "$AGENT" svid fetch --socket "$WORK/node-a.sock"
ip netns exec "$PREFIX-intruder" "$AGENT" svid fetch --socket "$WORK/node-a.sock" | indent
JWT=$("$CP" jwt mint --spiffe-id "spiffe://$TD/ns/default/sa/frontend" --audience api)
say "and a JWT-SVID (minted by the control plane): $(python3 -c 'import sys,base64,json; p=sys.argv[1].split(".")[1]; c=json.loads(base64.urlsafe_b64decode(p+"="*(-len(p)%4))); print("sub", c["sub"], "aud", ",".join(c["aud"] if isinstance(c["aud"], list) else [c["aud"]]), "valid", c["exp"]-c["iat"], "s")' "$JWT")"

step "Pre-authentication: the agents authenticate (api, frontend) before any packet"
WAIT_PID=${PIDS[2]} wait_for 30 "authenticated (api, frontend) pair on node-b" api_paired_with frontend
say "node-agent auth list  (on node-b, api's node)"
auth_b | indent
ok "mutual TLS 1.3 between the agents: each side presented its workload's SVID and checked the other's"

step "frontend -> api:8080, the very first connection"
ip netns exec "$PREFIX-api" "$PY" "$WORK/server.py" "$API_IP" 8080 </dev/null >"$WORK/api-server.log" 2>&1 &
started $!
WAIT_PID=$! wait_for 10 "api's server listening" api_listening
T0=$(date +%s%3N)
before=$(tcp_retransmits frontend)
client frontend 1 2 | indent || die "frontend's first connection to api failed"
after=$(tcp_retransmits frontend)
[ "$before" = "$after" ] || die "frontend retransmitted $((after - before)) TCP segments"
wait_for 5 "the flow on node-b" lines_match 1 "default/frontend (frontend) -> .*FORWARDED" observe_b --port 8080
out=$(observe_b --port 8080 --verdict DROPPED --since "$(since "$T0")")
[ -z "$out" ] || die "node-b dropped frontend's packets: $out"
ok "first attempt, no TCP segment retransmitted (frontend's RetransSegs: $before -> $after), no drop on node-b"
say "node-agent observe --port 8080  (on node-b: api's agent judges api's ingress)"
observe_b --port 8080 --since "$(since "$T0")" | indent

step "intruder -> api:8080 (service account 'other', label app=intruder: not in the policy's fromEndpoints)"
T0=$(date +%s%3N)
if client intruder 1 1 | indent; then die "the intruder got through"; fi
wait_for 5 "a policy-denied flow" lines_match 1 "default/intruder (other) -> .*policy-denied" observe_b --port 8080
say "node-agent observe --port 8080  (on node-b)"
observe_b --port 8080 --since "$(since "$T0")" | indent
ok "dropped in the kernel by policy; no authentication would help"

step "The same over IPv6: frontend and intruder -> [$API_IP6]:8080"
ip netns exec "$PREFIX-api" "$PY" "$WORK/server.py" "$API_IP6" 8080 </dev/null >"$WORK/api-server6.log" 2>&1 &
started $!
api_listening6() { [ -n "$(ip netns exec "$PREFIX-api" ss -Hltn6 'sport = :8080')" ]; }
WAIT_PID=$! wait_for 10 "api's IPv6 server listening" api_listening6
T0=$(date +%s%3N)
say "frontend (one identity for both its addresses; the (api, frontend) pair is authenticated already):"
client6 frontend 1 2 | indent || die "frontend's IPv6 connection to api failed"
say "intruder:"
if client6 intruder 1 1 | indent; then die "the intruder got through over IPv6"; fi
wait_for 5 "an IPv6 policy-denied flow" lines_match 1 "default/intruder (other) -> .*policy-denied" observe_b --port 8080 --since "$(since "$T0")"
say "node-agent observe --port 8080  (on node-b)"
observe_b --port 8080 --since "$(since "$T0")" | indent
out=$(observe_b --port 8080 --since "$(since "$T0")" -o json)
[[ $out == *"\"ip\":\"$API_IP6\""* ]] || die "no IPv6 flow record on node-b: $out"
ok "IPv6 judged like IPv4: the same identities, the same policy, the same authenticated pair"

step "Revocation: frontend's Workload is deleted, then re-added under a new identity (sa frontend-v2)"
"$CP" delete -f "$WORK/frontend.yaml" | indent
WAIT_PID=${PIDS[2]} wait_for 10 "node-b to flush (api, frontend)" api_not_paired_with frontend
say "node-b flushed the (api, frontend) entry at once: what justified it is gone"
say "frontend keeps calling api, a new connection every 10 ms, while its Workload is re-applied:"
T0=$(date +%s%3N)
ip netns exec "$PREFIX-frontend" "$PY" "$WORK/client.py" "$API_IP" 8080 1500 0.01 "$WORK/loop-started" >"$WORK/revoke.out" 2>&1 &
LOOP_PID=$!
started $LOOP_PID
WAIT_PID=$LOOP_PID wait_for 5 "frontend's first attempt" test -e "$WORK/loop-started"
"$CP" apply -f "$WORK/frontend-v2.yaml" | indent
wait "$LOOP_PID" || { cat "$WORK/revoke.out" | indent; die "frontend never got through after the re-add"; }
indent <"$WORK/revoke.out"
wait_for 5 "the forwarded flow on node-b" lines_match 1 "frontend-v2.*FORWARDED" observe_b --port 8080 --since "$(since "$T0")"
say "node-agent observe --port 8080 --since <the first attempt>  (on node-b; runs of alike lines folded)"
observe_b --port 8080 --since "$(since "$T0")" | fold_repeats | indent
out=$(observe_b --port 8080 --since "$(since "$T0")")
if grep -q "frontend-v2.*auth-required" <<<"$out"; then
  ok "no identity: policy-denied; the new identity: AUTH_REQUIRED until the agents authenticated (api, frontend-v2); then forwarded"
else
  say "(this time the agents authenticated (api, frontend-v2) before frontend's next attempt: no AUTH_REQUIRED drop to show)"
fi
say "node-agent auth list  (on node-b)"
auth_b | indent
frontend_is_v2() { [[ $(fetch_frontend 2>/dev/null) == *sa/frontend-v2* ]]; }
WAIT_PID=${PIDS[1]} wait_for 10 "frontend-v2's SVID in frontend's pod" frontend_is_v2
say "and frontend's pod now gets the new identity from the Workload API:"
fetch_frontend 2>/dev/null | indent

step "Done"
ms=$(($(date +%s%3N) - T_START))
say "(the demo took $((ms / 1000)).$((ms % 1000 / 100)) s)"
cat <<TXT
   Try next:
     KEYWAY_DEMO_KEEP=1 make demo   the same, then keeps the two nodes running for you to poke at
                                    (prints the commands, with their sockets; Enter or Ctrl-C ends it)
     KEYWAY_DEMO_LOG=debug make demo   the agents' and control plane's logs at debug, shown on failure
     make test     every test tier; tests/tests/mutual_auth_kernel.rs runs this topology with SVID
                   and CA rotations and a kill -9 of an agent under steady traffic
     make bench    datapath cost per packet, pod-to-pod throughput, issuance and agent budgets
     README.md     Workload and KeywayNetworkPolicy documents, every flag of both binaries
TXT
if [ -n "${KEYWAY_DEMO_KEEP:-}" ]; then
  A="$AGENT"; C="$CP"
  cat <<TXT

   The cluster is up. In another shell, as root:
     $A observe --follow --admin-socket $WORK/node-b-admin.sock
     $A auth list --admin-socket $WORK/node-b-admin.sock
     ip netns exec $PREFIX-frontend curl -s --max-time 2 http://$API_IP:8080/    (and $PREFIX-intruder)
     ip netns exec $PREFIX-frontend $A svid fetch --socket $WORK/node-a.sock
     KEYWAY_ADMIN_SOCKET=$KEYWAY_ADMIN_SOCKET $C identity list
     KEYWAY_ADMIN_SOCKET=$KEYWAY_ADMIN_SOCKET $C apply -f $WORK/frontend.yaml   (documents in $WORK)
   Press Enter (or Ctrl-C) to clean up.
TXT
  read -r _ || true
fi
