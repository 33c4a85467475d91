#!/usr/bin/env bash
# Runs a command against the local one-node cluster (scripts/local-cluster.sh): brings
# it up (building what is not cached), exports KUBECONFIG, KEYWAY_KUBECTL (a kubectl
# of the cluster's version) and KEYWAY_CLUSTER_DIR, runs the command, and takes the
# cluster down afterwards, also when the command fails or is interrupted. If the
# cluster cannot be brought up, this fails: the cluster tier never passes by skipping.
#
#   scripts/with-local-cluster.sh cargo test -p keyway-tests --test cluster
#
# A cluster that is already up (`make cluster`) is refused, since the node's address
# and host paths are one per machine; KEYWAY_CLUSTER_REUSE=1 runs the command against
# it instead and leaves it up (for iterating on the tests).
set -euo pipefail
cd "$(dirname "$0")/.."
export KEYWAY_CLUSTER_DIR="${KEYWAY_CLUSTER_DIR:-/var/lib/keyway/local-cluster}"

log() { printf 'with-local-cluster: %s\n' "$*" >&2; }

state=0
bash scripts/local-cluster.sh status >/dev/null 2>&1 || state=$?
if [ "${KEYWAY_CLUSTER_REUSE:-0}" = 1 ] && [ "$state" = 0 ]; then
  log "reusing the cluster in $KEYWAY_CLUSTER_DIR (left up)"
else
  if [ "$state" = 0 ]; then
    log "a local cluster is already up in $KEYWAY_CLUSTER_DIR: take it down first (scripts/local-cluster.sh down), or set KEYWAY_CLUSTER_REUSE=1"
    exit 1
  fi
  # Whatever a killed earlier run left behind, by the names it recorded.
  if [ -e "$KEYWAY_CLUSTER_DIR" ]; then
    log "removing what an earlier run left in $KEYWAY_CLUSTER_DIR"
    bash scripts/local-cluster.sh down
  fi
  # On failure the components' logs are kept in target/local-cluster-logs (the
  # cluster directory goes with `down`).
  finish() {
    local rc=$?
    if [ "$rc" -ne 0 ] && [ -d "$KEYWAY_CLUSTER_DIR/log" ]; then
      rm -rf target/local-cluster-logs && mkdir -p target/local-cluster-logs
      cp -r "$KEYWAY_CLUSTER_DIR/log/." target/local-cluster-logs/ 2>/dev/null || true
      cp "$KEYWAY_CLUSTER_DIR"/apiserver/*.log target/local-cluster-logs/ 2>/dev/null || true
      log "failed (exit $rc): the cluster's logs are in target/local-cluster-logs"
    fi
    bash scripts/local-cluster.sh down || true
    exit "$rc"
  }
  trap finish EXIT
  trap 'exit 130' INT TERM
  bash scripts/local-cluster.sh up
fi
export KUBECONFIG="$KEYWAY_CLUSTER_DIR/kubeconfig"
KEYWAY_KUBECTL="$(bash scripts/kube-apiserver.sh node-dir)/kubectl"
export KEYWAY_KUBECTL
"$@"
