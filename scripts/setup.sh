#!/usr/bin/env bash
# Installs what building and testing Keyway needs, idempotently: a second run on a
# machine that already has everything returns in about a second.
#
#   scripts/setup.sh            # everything: apt packages, rust-src, bpf-linker, clients
#   scripts/setup.sh apt        # just one part (apt | rust-src | bpf-linker | clients)
#   scripts/setup.sh clients    # the third-party gRPC clients the integration tier runs
#                               # (tests/tests/third_party_clients.rs): py-spiffe, grpcio
#                               # and grpcio-tools in target/clients/venv, @grpc/grpc-js
#                               # and @grpc/proto-loader in tests/clients/node
#
# Needs root for apt-get (CI and the development machines run as root).
set -euo pipefail

APT_PACKAGES=(protobuf-compiler libprotobuf-dev openssl iproute2 iputils-ping iperf3 bpftool iptables curl jq)
NIGHTLY="${KEYWAY_NIGHTLY:-nightly}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# The newest releases at install time: nothing is pinned (a client that breaks
# against our servers is a bug to fix on our side, not a version to hold back).
PY_CLIENTS=(spiffe grpcio-tools)

log() { printf 'setup: %s\n' "$*" >&2; }

apt_part() {
  local missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" -ne 0 ]; then
    log "missing apt packages: ${missing[*]}; run this script as root to install them"; exit 1
  fi
  log "installing apt packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

rust_src_part() {
  local sysroot; sysroot="$(rustc +"$NIGHTLY" --print sysroot)"
  [ -d "$sysroot/lib/rustlib/src/rust/library/core" ] && return 0
  log "adding rust-src to the $NIGHTLY toolchain"
  rustup component add rust-src --toolchain "$NIGHTLY"
}

bpf_linker_part() {
  # bpf-linker has to link against the very LLVM the nightly compiler uses, and no
  # prebuilt binary can be downloaded here: build it from crates.io against the
  # nightly's own libLLVM (see ARCHITECTURE.md, "Toolchain").
  local sysroot major llvm_so prefix
  sysroot="$(rustc +"$NIGHTLY" --print sysroot)"
  major="$(rustc +"$NIGHTLY" -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')"
  local stamp="${CARGO_HOME:-$HOME/.cargo}/bin/.bpf-linker-llvm"
  if command -v bpf-linker >/dev/null && [ "$(cat "$stamp" 2>/dev/null)" = "$sysroot:$major" ]; then
    return 0
  fi
  # The real shared object (libLLVM-NN-rust-*.so beside it is a linker script).
  llvm_so="$(ls "$sysroot"/lib/libLLVM.so.* 2>/dev/null | head -n1)"
  [ -n "$llvm_so" ] || { log "no libLLVM in $sysroot/lib; is the nightly toolchain complete?"; exit 1; }
  prefix="${KEYWAY_LLVM_PREFIX:-/var/cache/keyway/llvm-$major}"
  mkdir -p "$prefix/lib"
  ln -sfn "$llvm_so" "$prefix/lib/libLLVM.so"
  log "building bpf-linker against $(basename "$llvm_so") (LLVM $major, about 2 minutes)"
  LLVM_PREFIX="$prefix" cargo +"$NIGHTLY" install --locked --quiet bpf-linker \
    --no-default-features --features "llvm-$major"
  echo "$sysroot:$major" > "$stamp"
}

clients_part() {
  # A stamp per tool records what was installed, so a second run costs a file
  # read. Delete target/clients (or tests/clients/node/node_modules) to
  # install again, e.g. to pick up new releases.
  local venv="$ROOT/target/clients/venv" stamp want
  stamp="$venv/.keyway-clients-stamp"
  want="$(command -v python3) ${PY_CLIENTS[*]}"
  if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    log "installing ${PY_CLIENTS[*]} (newest) into target/clients/venv"
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${PY_CLIENTS[@]}"
    echo "$want" > "$stamp"
  fi

  local node_dir="$ROOT/tests/clients/node" lock_sum
  command -v npm >/dev/null || { log "npm is missing: install Node.js 18 or newer"; exit 1; }
  lock_sum="$(sha256sum "$node_dir/package.json" "$node_dir/package-lock.json" 2>/dev/null | sha256sum)"
  stamp="$node_dir/node_modules/.keyway-clients-stamp"
  if [ "$(cat "$stamp" 2>/dev/null)" != "$lock_sum" ]; then
    if [ -f "$node_dir/package-lock.json" ]; then
      log "installing @grpc/grpc-js and @grpc/proto-loader (npm ci, from package-lock.json)"
      (cd "$node_dir" && npm ci --no-audit --no-fund --loglevel=error)
    else
      log "installing @grpc/grpc-js and @grpc/proto-loader (npm install, writes package-lock.json)"
      (cd "$node_dir" && npm install --no-audit --no-fund --loglevel=error)
    fi
    sha256sum "$node_dir/package.json" "$node_dir/package-lock.json" | sha256sum > "$stamp"
  fi
}

case "${1:-all}" in
  apt) apt_part ;;
  rust-src) rust_src_part ;;
  bpf-linker) bpf_linker_part ;;
  clients) clients_part ;;
  all) apt_part; rust_src_part; bpf_linker_part; clients_part ;;
  *) echo "usage: $0 [all|apt|rust-src|bpf-linker|clients]" >&2; exit 2 ;;
esac
