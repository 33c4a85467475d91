#!/usr/bin/env bash
# Runs a command against a fresh, real kube-apiserver (scripts/kube-apiserver.sh):
# builds it if it is not cached yet, starts it with state in target/kube-apiserver,
# exports KEYWAY_KUBE_ENV for the tests, and stops it afterwards, also when the command
# fails or is interrupted. If the apiserver cannot be built or started, this fails:
# the Kubernetes tier never passes by skipping.
#
#   scripts/with-kube-apiserver.sh cargo test -p keyway-tests --test k8s_sources
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${KEYWAY_KUBE_DIR:-$PWD/target/kube-apiserver}"
bash scripts/kube-apiserver.sh build
trap 'bash scripts/kube-apiserver.sh stop "$dir" || true' EXIT INT TERM
bash scripts/kube-apiserver.sh start "$dir"
export KEYWAY_KUBE_ENV="$dir/env"
"$@"
