#!/usr/bin/env bash
# A real kube-apiserver (v1.20.2, from Debian 12's `kubernetes` source package) on
# Debian's etcd, bound to 127.0.0.1, for the Kubernetes-mode integration tests.
# No registry reachable from CI or the development machines ships kube-apiserver,
# k3s or envtest binaries, so it is built once from source and cached.
#
#   scripts/kube-apiserver.sh build        # once ~8-11 min on 2 cores; then well under 1 s
#   scripts/kube-apiserver.sh build-node   # kubelet, controller-manager, scheduler, kube-proxy,
#                                          # kubectl (same source, one make; for local-cluster.sh)
#   scripts/kube-apiserver.sh node-dir     # prints where those are
#   scripts/kube-apiserver.sh start DIR    # etcd + kube-apiserver, state in DIR; waits for /readyz
#   scripts/kube-apiserver.sh status DIR   # exit 0 ready, 1 partly up / not ready, 3 stopped
#   scripts/kube-apiserver.sh stop DIR     # idempotent
#
# `start` writes DIR/kubeconfig (admin token, the CA the server presents) and DIR/env,
# KEY=VALUE lines meant for `set -a; . DIR/env; set +a` or for a test to parse:
#   KUBECONFIG, KEYWAY_APISERVER (https://127.0.0.1:PORT), KEYWAY_APISERVER_CA,
#   KEYWAY_APISERVER_TOKEN_FILE, KEYWAY_SA_ISSUER, KEYWAY_ETCD, KEYWAY_APISERVER_PID,
#   KEYWAY_ETCD_PID, KEYWAY_APISERVER_VERSION.
# `start` wipes the state it owns in DIR (etcd data, keys, logs): every start is a fresh,
# empty cluster. Other files in DIR are left alone.
#
# Environment (all optional):
#   KEYWAY_KUBE_CACHE          cache root (default /var/cache/keyway/kube-apiserver)
#   KEYWAY_KUBE_APISERVER      use this kube-apiserver binary instead of building one
#   KEYWAY_APISERVER_PORT      secure port       (default: a free port)
#   KEYWAY_ETCD_PORT           etcd client port  (default: a free port)
#   KEYWAY_ETCD_PEER_PORT      etcd peer port    (default: a free port)
#   KEYWAY_APISERVER_TIMEOUT   seconds to wait for /readyz (default 120)
#   KEYWAY_APISERVER_ADDRESS   address to serve and advertise (default 127.0.0.1); a
#                              cluster with pods gives its node address (local-cluster.sh)
#   KEYWAY_APISERVER_NODES=1   serve real nodes: keep the `kubernetes` Service's endpoints
#                              (lease reconciler), ServiceAccount admission on, kubelets
#                              reached at their InternalIP
#
# What a 1.20 server without controller-manager, scheduler or kubelet does NOT do: no
# default ServiceAccount per namespace, no garbage collection, namespaces never finish
# terminating, pods with nodeName never run (delete them with a grace period of 0),
# TokenReview results are cached for 10 s, tokens carry no node-name claim (1.30+), CRD CEL
# validation rules are not enforced, and streaming lists (sendInitialEvents) are rejected.
#
# Needs root for `build` when packages are missing (apt-get) and to write the cache.
set -euo pipefail

# Bump when the way the binary is built changes, so cached binaries get rebuilt.
RECIPE=1
CACHE="${KEYWAY_KUBE_CACHE:-/var/cache/keyway/kube-apiserver}"
BUILD_PACKAGES=(golang-go dpkg-dev make rsync golang-github-modern-go-reflect2-dev golang-github-json-iterator-go-dev)
RUN_PACKAGES=(etcd-server etcd-client openssl curl)
SA_ISSUER="https://kubernetes.default.svc.cluster.local"

log() { printf 'kube-apiserver.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ---------------------------------------------------------------------------------------
# build

missing_packages() {
  local p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || printf '%s\n' "$p"
  done
}

APT_UPDATED=0
apt_update() {
  [ "$APT_UPDATED" = 1 ] && return 0
  log "apt-get update"
  apt-get update -qq || die "apt-get update failed"
  APT_UPDATED=1
}

ensure_packages() {
  local missing
  mapfile -t missing < <(missing_packages "$@")
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$(id -u)" -eq 0 ] || die "missing Debian packages: ${missing[*]}; run as root to install them"
  apt_update
  log "apt-get install ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || die "apt-get install ${missing[*]} failed"
}

# Source packages come from the mirror apt already uses: add a deb-src entry beside its
# deb entry, unless one exists.
ensure_deb_src() {
  if grep -Eqs '^[[:space:]]*(Types:.*deb-src|deb-src[[:space:]])' /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; then
    return 0
  fi
  [ "$(id -u)" -eq 0 ] || die "no deb-src entry in /etc/apt; run as root to add one"
  if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    log "adding /etc/apt/sources.list.d/debian-src.sources (deb-src of the entries in debian.sources)"
    sed 's/^Types:[[:space:]]*deb[[:space:]]*$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources \
      > /etc/apt/sources.list.d/debian-src.sources
  elif grep -Eqs '^[[:space:]]*deb[[:space:]]' /etc/apt/sources.list; then
    log "adding /etc/apt/sources.list.d/debian-src.list (deb-src of the deb lines in sources.list)"
    sed -n 's/^[[:space:]]*deb[[:space:]]/deb-src /p' /etc/apt/sources.list > /etc/apt/sources.list.d/debian-src.list
  else
    die "cannot find the Debian mirror apt uses (no debian.sources, no deb line in sources.list)"
  fi
  APT_UPDATED=0
}

# The newest cached binary built with this recipe: prints its directory, or fails.
cached_dir() {
  local stamp dir best=""
  for stamp in "$CACHE"/*/stamp; do
    [ -f "$stamp" ] || continue
    dir="${stamp%/stamp}"
    if grep -qx "recipe=$RECIPE" "$stamp" && [ -x "$dir/kube-apiserver" ]; then
      best="$dir"   # glob order is lexical; normally there is exactly one
    fi
  done
  [ -n "$best" ] && printf '%s\n' "$best"
}

# Upstream version from a Debian one: 1.20.5+really1.20.2-1.1+deb12u1 -> 1.20.2
upstream_version() {
  local v="${1#*:}"
  v="${v%-*}"
  v="${v##*really}"
  printf '%s\n' "$v"
}

# Unpacks the source package (downloaded once into the cache) with the one required fix.
# Sets DEBVER, VERSION, DIR (the cache directory of this version), SRC and TREE.
prepare_source() {
  ensure_packages "${BUILD_PACKAGES[@]}" "${RUN_PACKAGES[@]}"
  ensure_deb_src
  local dsc
  dsc="$(apt-get source --print-uris -qq kubernetes 2>/dev/null | awk '$2 ~ /^kubernetes_.*\.dsc$/ {print $2}' || true)"
  if [ -z "$dsc" ]; then
    apt_update
    dsc="$(apt-get source --print-uris -qq kubernetes | awk '$2 ~ /^kubernetes_.*\.dsc$/ {print $2}' || true)"
  fi
  [ -n "$dsc" ] || die "apt-get source cannot find the kubernetes source package (is the deb-src entry right?)"
  DEBVER="${dsc#kubernetes_}"; DEBVER="${DEBVER%.dsc}"
  VERSION="$(upstream_version "$DEBVER")"
  DIR="$CACHE/$DEBVER"
  SRC="$DIR/src"
  mkdir -p "$SRC"

  # 1. The source (34 MB, dependencies vendored), kept so that a rebuild needs no network.
  if [ ! -f "$SRC/$dsc" ]; then
    log "apt-get source kubernetes ($DEBVER) into $SRC"
    # apt's _apt user cannot write here: apt warns and downloads as root, which is fine.
    (
      cd "$SRC"
      apt-get source --download-only -qq kubernetes 2>&1 | { grep -v 'unsandboxed as root' >&2 || true; }
    ) || die "apt-get source kubernetes failed"
    [ -f "$SRC/$dsc" ] || die "apt-get source kubernetes did not produce $SRC/$dsc"
  fi
  TREE="$SRC/tree"
  rm -rf "$TREE"
  log "unpacking $dsc (Debian patches applied)"
  dpkg-source --no-check -x "$SRC/$dsc" "$TREE" >/dev/null || die "dpkg-source -x $SRC/$dsc failed"

  # 2. The one required fix. Kubernetes 1.20 vendors reflect2 1.0.1 and json-iterator 1.1.10,
  # which break with Go >= 1.18 (the server dies with SIGSEGV in map iteration on the first
  # custom resource). Debian ships reflect2 1.0.2 and json-iterator 1.1.12, the versions
  # upstream Kubernetes moved to: use those.
  local p from
  for p in modern-go/reflect2 json-iterator/go; do
    from="/usr/share/gocode/src/github.com/$p"
    [ -d "$from" ] || die "$from missing (Debian package for $p not installed?)"
    log "replacing vendor/github.com/$p with Debian's copy ($from)"
    rm -rf "$TREE/vendor/github.com/$p"
    mkdir -p "$TREE/vendor/github.com/$p"
    find "$from" -maxdepth 1 -type f \( -name '*.go' -o -name '*.s' \) ! -name '*_test.go' \
      -exec cp {} "$TREE/vendor/github.com/$p/" \;
  done
  printf "KUBE_GIT_COMMIT='debian-%s'\nKUBE_GIT_TREE_STATE='clean'\nKUBE_GIT_VERSION='v%s'\nKUBE_GIT_MAJOR='%s'\nKUBE_GIT_MINOR='%s'\n" \
    "$DEBVER" "$VERSION" "${VERSION%%.*}" "$(cut -d. -f2 <<<"$VERSION")" > "$SRC/version.env"
  mkdir -p "$TREE/.go/src/k8s.io" "$SRC/home"
  ln -sfn ../../.. "$TREE/.go/src/k8s.io/kubernetes"
}

# 3. Builds the given cmd/ targets in GOPATH mode through the Makefile (a plain `go build`
# in module mode fails on this tree), with Debian's Go 1.19 first in PATH whatever else is
# installed, in one `make` sharing one Go build cache; log in LOG.
make_targets() { # log, targets...
  local log_file="$1"; shift
  local goroot; goroot="$(dirname "$(dirname "$(readlink -f /usr/bin/go)")")"
  GO_VERSION="$("$goroot/bin/go" env GOVERSION)"
  if ! ( cd "$TREE" && env PATH="$goroot/bin:$PATH" GOPATH="$TREE/.go" GOCACHE="$SRC/go-build" GO111MODULE=off \
           GOFLAGS= GOPROXY=off CGO_ENABLED=0 HOME="$SRC/home" KUBE_GIT_VERSION_FILE="$SRC/version.env" \
           make WHAT="$*" ) >"$log_file" 2>&1; then
    tail -n 30 "$log_file" >&2
    die "make WHAT=\"$*\" failed (full log: $log_file)"
  fi
}

# Checks a built binary's --version and copies it into the cache as NAME.
keep_binary() { # name, destination dir
  local out="$TREE/_output/bin/$1" got
  [ -x "$out" ] || die "the build finished but $out is missing"
  if [ "$1" = kubectl ]; then
    got="$("$out" version --client --short 2>&1)" || die "$out version failed: $got"
    [ "$got" = "Client Version: v$VERSION" ] || die "$out version says '$got', expected 'Client Version: v$VERSION'"
  else
    got="$("$out" --version 2>&1)" || die "$out --version failed: $got"
    [ "$got" = "Kubernetes v$VERSION" ] || die "$out --version says '$got', expected 'Kubernetes v$VERSION'"
  fi
  mkdir -p "$2"
  cp "$out" "$2/$1.tmp" && mv "$2/$1.tmp" "$2/$1"
}

take_lock() {
  mkdir -p "$CACHE" || die "cannot create $CACHE (run as root, or set KEYWAY_KUBE_CACHE)"
  exec 9>"$CACHE/.lock"
  if ! flock -n 9; then
    log "another build holds $CACHE/.lock; waiting for it"
    flock 9
  fi
}

build() {
  local dir
  if dir="$(cached_dir)"; then
    ensure_packages "${RUN_PACKAGES[@]}"
    log "already built: $dir/kube-apiserver ($(sed -n 's/^version=//p' "$dir/stamp"))"
    return 0
  fi
  local t0=$SECONDS
  take_lock
  if dir="$(cached_dir)"; then log "built meanwhile: $dir/kube-apiserver"; return 0; fi
  prepare_source
  log "building kube-apiserver v$VERSION (about 8-11 minutes on 2 cores, peak RSS ~1.3 GB); log: $DIR/build.log"
  make_targets "$DIR/build.log" cmd/kube-apiserver
  # Checked and cached; the stamp is written last, so a half-done build never counts.
  keep_binary kube-apiserver "$DIR"
  rm -rf "${TREE:?}" "${SRC:?}/go-build" "${SRC:?}/home"
  printf 'recipe=%s\nversion=v%s\ndebian=%s\ngo=%s\nbuilt=%s\nsha256=%s\n' "$RECIPE" "$VERSION" "$DEBVER" \
    "$GO_VERSION" "$(date -u +%FT%TZ)" "$(sha256sum "$DIR/kube-apiserver" | cut -d' ' -f1)" \
    > "$DIR/stamp.tmp" && mv "$DIR/stamp.tmp" "$DIR/stamp"
  log "built $DIR/kube-apiserver in $(( SECONDS - t0 )) s"
}

# The node's binaries, from the same source: kubelet, kube-controller-manager,
# kube-scheduler, kube-proxy and a kubectl of the same version (the machine's own
# kubectl, if any, may be far off the server's; the skew policy allows +-1), in
# DIR/node/ with their own stamp.
NODE_BINARIES=(kubelet kube-controller-manager kube-scheduler kube-proxy kubectl)
NODE_RECIPE=2

node_cached_dir() {
  local stamp dir best="" b ok
  for stamp in "$CACHE"/*/node/stamp; do
    [ -f "$stamp" ] || continue
    dir="${stamp%/stamp}"
    grep -qx "recipe=$NODE_RECIPE" "$stamp" || continue
    ok=1
    for b in "${NODE_BINARIES[@]}"; do [ -x "$dir/$b" ] || ok=0; done
    [ "$ok" = 1 ] && best="$dir"
  done
  [ -n "$best" ] && printf '%s\n' "$best"
}

build_node() {
  local dir
  if dir="$(node_cached_dir)"; then
    log "already built: ${NODE_BINARIES[*]} in $dir"
    return 0
  fi
  local t0=$SECONDS
  take_lock
  if dir="$(node_cached_dir)"; then log "built meanwhile: $dir"; return 0; fi
  prepare_source
  log "building ${NODE_BINARIES[*]} v$VERSION in one make (about 10-15 minutes on 2 cores); log: $DIR/node-build.log"
  local what=() b
  for b in "${NODE_BINARIES[@]}"; do what+=("cmd/$b"); done
  make_targets "$DIR/node-build.log" "${what[@]}"
  for b in "${NODE_BINARIES[@]}"; do keep_binary "$b" "$DIR/node"; done
  # pause.c, for the sandbox image local-cluster.sh builds.
  cp "$TREE/build/pause/linux/pause.c" "$DIR/node/pause.c"
  rm -rf "${TREE:?}" "${SRC:?}/go-build" "${SRC:?}/home"
  printf 'recipe=%s\nversion=v%s\ndebian=%s\ngo=%s\nbuilt=%s\n' "$NODE_RECIPE" "$VERSION" "$DEBVER" \
    "$GO_VERSION" "$(date -u +%FT%TZ)" > "$DIR/node/stamp.tmp" && mv "$DIR/node/stamp.tmp" "$DIR/node/stamp"
  log "built ${NODE_BINARIES[*]} in $DIR/node in $(( SECONDS - t0 )) s"
}

# ---------------------------------------------------------------------------------------
# start / status / stop

state_dir() {
  local d="${1:-}"
  [ -n "$d" ] || die "missing DIR (usage: $0 start|stop|status DIR)"
  d="$(realpath -m -- "$d")"
  case "$d" in *[[:space:]\'\"\$\\]*) die "DIR must not contain whitespace, quotes, \$ or \\: '$d'" ;; esac
  printf '%s\n' "$d"
}

# Is something listening on 127.0.0.1/0.0.0.0/:: at this TCP port? (/proc, no tools needed)
port_in_use() {
  local hex; hex="$(printf ':%04X ' "$1")"
  awk -v h="$hex" 'NR > 1 && $4 == "0A" && index($2 " ", h) { found = 1 } END { exit !found }' \
    /proc/net/tcp /proc/net/tcp6 2>/dev/null
}

# A free port below the ephemeral range (so outgoing connections do not take it meanwhile),
# not in the list of ports already chosen.
free_port() {
  local p
  for _ in $(seq 1 200); do
    p=$(( 20000 + RANDOM % 12000 ))
    case " $* " in *" $p "*) continue ;; esac
    port_in_use "$p" || { printf '%s\n' "$p"; return 0; }
  done
  die "found no free port"
}

# Is PID alive and ours: started by this script for DIR (a pid file can outlive its
# process, and the pid be reused)?
ours() { # pid, name, dir
  local pid="$1" cmd marker
  [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
  cmd="$(tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null)" || return 1
  case "$2" in
    etcd) marker="--data-dir $3/etcd " ;;
    kube-apiserver) marker="--token-auth-file=$3/pki/tokens.csv " ;;
  esac
  [[ "$cmd" == *"$marker"* ]]
}

pid_of() { cat "$1/$2.pid" 2>/dev/null || true; }

stop_one() { # dir, name
  local pid; pid="$(pid_of "$1" "$2")"
  if ours "$pid" "$2" "$1"; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do ours "$pid" "$2" "$1" || break; sleep 0.1; done
    if ours "$pid" "$2" "$1"; then
      log "$2 (pid $pid) ignored SIGTERM for 10 s; SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      for _ in $(seq 1 50); do ours "$pid" "$2" "$1" || break; sleep 0.1; done
    fi
    log "stopped $2 (pid $pid)"
  fi
  rm -f "$1/$2.pid"
}

fail_start() { # dir, reason
  log "error: $2"
  local f
  for f in etcd apiserver; do
    if [ -s "$1/$f.log" ]; then
      printf -- '----- last lines of %s -----\n' "$1/$f.log" >&2
      tail -n 25 "$1/$f.log" >&2
    fi
  done
  stop_one "$1" kube-apiserver
  stop_one "$1" etcd
  exit 1
}

# Poll URL (optionally with a bearer token) until it answers 2xx, PID exits, or the deadline.
wait_ready() { # dir, name, pid, url, deadline(SECONDS), [token]
  local auth=()
  [ -n "${6:-}" ] && auth=(-H "Authorization: Bearer $6")
  while :; do
    curl -skf --max-time 2 "${auth[@]}" "$4" >/dev/null 2>&1 && return 0
    ours "$3" "$2" "$1" || fail_start "$1" "$2 exited before it became ready"
    [ "$SECONDS" -lt "$5" ] || fail_start "$1" "$2 not ready at $4 after ${KEYWAY_APISERVER_TIMEOUT:-120} s"
    sleep 0.2
  done
}

apiserver_bin() {
  if [ -n "${KEYWAY_KUBE_APISERVER:-}" ]; then
    [ -x "$KEYWAY_KUBE_APISERVER" ] || die "KEYWAY_KUBE_APISERVER=$KEYWAY_KUBE_APISERVER is not executable"
    printf '%s\n' "$KEYWAY_KUBE_APISERVER"
    return 0
  fi
  local dir
  dir="$(cached_dir)" || die "no kube-apiserver built (run: $0 build)"
  printf '%s\n' "$dir/kube-apiserver"
}

# Certificates: a CA, the serving certificate it signs (127.0.0.1, localhost, the in-cluster
# names), the service-account signing key pair, and the admin token.
make_pki() { # pki dir
  local pki="$1"
  mkdir -p "$pki"; chmod 700 "$pki"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
    -subj "/CN=keyway-test-apiserver-ca" -keyout "$pki/ca.key" -out "$pki/ca.crt" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null \
    || die "openssl: CA"
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=kube-apiserver" \
    -keyout "$pki/apiserver.key" -out "$pki/apiserver.csr" 2>/dev/null || die "openssl: serving key"
  printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" \
    "extendedKeyUsage=serverAuth" \
    "subjectAltName=IP:127.0.0.1,IP:${KEYWAY_APISERVER_ADDRESS:-127.0.0.1},DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,IP:10.0.0.1" \
    > "$pki/apiserver.ext"
  openssl x509 -req -in "$pki/apiserver.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
    -days 3650 -extfile "$pki/apiserver.ext" -out "$pki/apiserver.crt" 2>/dev/null || die "openssl: serving certificate"
  openssl genrsa -out "$pki/sa.key" 2048 2>/dev/null || die "openssl: service-account key"
  openssl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null || die "openssl: service-account public key"
  openssl rand -hex 32 > "$pki/admin.token"
  printf '%s,keyway-admin,keyway-admin,"system:masters"\n' "$(cat "$pki/admin.token")" > "$pki/tokens.csv"
}

start() {
  local d; d="$(state_dir "${1:-}")"
  if ours "$(pid_of "$d" kube-apiserver)" kube-apiserver "$d" && ours "$(pid_of "$d" etcd)" etcd "$d" \
     && [ -f "$d/env" ]; then
    log "already running; environment in $d/env, kubeconfig $d/kubeconfig"
    return 0
  fi
  stop_one "$d" kube-apiserver
  stop_one "$d" etcd

  # Build first if needed (prints what it does; fast when cached).
  [ -n "${KEYWAY_KUBE_APISERVER:-}" ] || cached_dir >/dev/null || build
  local bin; bin="$(apiserver_bin)"
  command -v etcd >/dev/null || die "etcd is not installed (run: $0 build)"
  local version; version="$("$bin" --version | awk '{print $2}')"

  local aport eport pport
  aport="${KEYWAY_APISERVER_PORT:-$(free_port)}"
  eport="${KEYWAY_ETCD_PORT:-$(free_port "$aport")}"
  pport="${KEYWAY_ETCD_PEER_PORT:-$(free_port "$aport" "$eport")}"
  local p
  for p in "$aport" "$eport" "$pport"; do port_in_use "$p" && die "port $p on 127.0.0.1 is already in use"; done

  mkdir -p "$d"
  rm -rf "$d/etcd" "$d/pki" "$d/etcd.log" "$d/apiserver.log" "$d/kubeconfig" "$d/env"
  make_pki "$d/pki"
  local t0=$SECONDS deadline=$(( SECONDS + ${KEYWAY_APISERVER_TIMEOUT:-120} ))

  log "starting etcd on 127.0.0.1:$eport (data in $d/etcd)"
  setsid etcd --name keyway-test --data-dir "$d/etcd" \
    --listen-client-urls "http://127.0.0.1:$eport" --advertise-client-urls "http://127.0.0.1:$eport" \
    --listen-peer-urls "http://127.0.0.1:$pport" --initial-advertise-peer-urls "http://127.0.0.1:$pport" \
    --initial-cluster "keyway-test=http://127.0.0.1:$pport" </dev/null >"$d/etcd.log" 2>&1 &
  echo $! > "$d/etcd.pid"
  wait_ready "$d" etcd "$(pid_of "$d" etcd)" "http://127.0.0.1:$eport/health" "$deadline"

  local addr="${KEYWAY_APISERVER_ADDRESS:-127.0.0.1}" nodes=()
  if [ "${KEYWAY_APISERVER_NODES:-0}" = 1 ]; then
    nodes=(--endpoint-reconciler-type=lease --kubelet-preferred-address-types=InternalIP)
  else
    nodes=(--endpoint-reconciler-type=none --disable-admission-plugins=ServiceAccount)
  fi
  log "starting kube-apiserver $version on https://$addr:$aport"
  setsid "$bin" --etcd-servers="http://127.0.0.1:$eport" \
    --bind-address="$addr" --advertise-address="$addr" --secure-port="$aport" "${nodes[@]}" \
    --tls-cert-file="$d/pki/apiserver.crt" --tls-private-key-file="$d/pki/apiserver.key" \
    --token-auth-file="$d/pki/tokens.csv" --authorization-mode=RBAC \
    --service-account-issuer="$SA_ISSUER" --api-audiences="$SA_ISSUER" \
    --service-account-key-file="$d/pki/sa.pub" --service-account-signing-key-file="$d/pki/sa.key" \
    --service-cluster-ip-range=10.0.0.0/24 --allow-privileged=true \
    </dev/null >"$d/apiserver.log" 2>&1 &
  echo $! > "$d/kube-apiserver.pid"
  wait_ready "$d" kube-apiserver "$(pid_of "$d" kube-apiserver)" "https://$addr:$aport/readyz" "$deadline" \
    "$(cat "$d/pki/admin.token")"

  cat > "$d/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: keyway-test
  cluster:
    server: https://$addr:$aport
    certificate-authority-data: $(base64 -w0 < "$d/pki/ca.crt")
users:
- name: keyway-admin
  user:
    token: $(cat "$d/pki/admin.token")
contexts:
- name: keyway-test
  context: {cluster: keyway-test, user: keyway-admin, namespace: default}
current-context: keyway-test
EOF
  chmod 600 "$d/kubeconfig"
  cat > "$d/env" <<EOF
KUBECONFIG=$d/kubeconfig
KEYWAY_APISERVER=https://$addr:$aport
KEYWAY_APISERVER_CA=$d/pki/ca.crt
KEYWAY_APISERVER_TOKEN_FILE=$d/pki/admin.token
KEYWAY_APISERVER_VERSION=$version
KEYWAY_SA_ISSUER=$SA_ISSUER
KEYWAY_ETCD=http://127.0.0.1:$eport
KEYWAY_APISERVER_PID=$(pid_of "$d" kube-apiserver)
KEYWAY_ETCD_PID=$(pid_of "$d" etcd)
EOF
  log "ready in $(( SECONDS - t0 )) s: https://$addr:$aport (kube-apiserver pid $(pid_of "$d" kube-apiserver), etcd pid $(pid_of "$d" etcd))"
  log "kubeconfig: $d/kubeconfig"
  log "environment: $d/env   (set -a; . $d/env; set +a)"
  log "logs: $d/apiserver.log $d/etcd.log; stop with: $0 stop $d"
}

status() {
  local d; d="$(state_dir "${1:-}")"
  local up=0 name pid
  for name in etcd kube-apiserver; do
    pid="$(pid_of "$d" "$name")"
    if ours "$pid" "$name" "$d"; then echo "$name: running (pid $pid)"; up=$(( up + 1 )); else echo "$name: stopped"; fi
  done
  [ "$up" -eq 0 ] && return 3
  local url; url="$(sed -n 's/^KEYWAY_APISERVER=//p' "$d/env" 2>/dev/null)"
  if [ "$up" -eq 2 ] && [ -n "$url" ] && \
     curl -skf --max-time 2 -H "Authorization: Bearer $(cat "$d/pki/admin.token" 2>/dev/null)" "$url/readyz" >/dev/null 2>&1; then
    echo "ready: $url (KUBECONFIG=$d/kubeconfig)"
    return 0
  fi
  echo "not ready${url:+: $url}"
  return 1
}

stop() {
  local d; d="$(state_dir "${1:-}")"
  [ -d "$d" ] || { log "nothing to stop in $d"; return 0; }
  stop_one "$d" kube-apiserver
  stop_one "$d" etcd
  rm -f "$d/env"
}

case "${1:-}" in
  build) build ;;
  build-node) build_node ;;
  node-dir) node_cached_dir || die "no node binaries built (run: $0 build-node)" ;;
  start) start "${2:-}" ;;
  stop) stop "${2:-}" ;;
  status) status "${2:-}" ;;
  *) echo "usage: $0 build | build-node | start DIR | status DIR | stop DIR" >&2; exit 2 ;;
esac
