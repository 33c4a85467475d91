#!/usr/bin/env bash
# A real one-node Kubernetes on this machine, with Keyway installed, from Debian's parts:
# etcd and kube-apiserver (scripts/kube-apiserver.sh), kube-controller-manager,
# kube-scheduler, kube-proxy and kubelet from the same `kubernetes` 1.20.2 source (built
# once, cached), containerd and runc from Debian, pod networking by Debian's
# containernetworking-plugins (ptp + host-local: one /32 route per pod, a routing CNI),
# and a pause image built from the source's pause.c.
#
#   scripts/local-cluster.sh up       # prints `export KUBECONFIG=...` on its last line
#   scripts/local-cluster.sh status   # exit 0 when every component runs and the node is Ready
#   scripts/local-cluster.sh down     # removes every process, mount, interface, iptables
#                                     # chain and file it made (by name and pid)
#
# Everything lives in KEYWAY_CLUSTER_DIR (default /var/lib/keyway/local-cluster). The node
# has its own address, 172.30.0.1/32 on lo (label lo:kwc): the API server and
# the kubelet serve there, so pods reach them through the `kubernetes` Service. Pods get
# 10.88.0.0/24, Services 10.0.0.0/24. There is no cluster DNS (CoreDNS is not packaged
# here): Keyway's agents reach the control plane by the Service's ClusterIP (see
# ARCHITECTURE.md, "How agents find the control plane").
#
# Needs root. KEYWAY_CLUSTER_IMAGE_PROFILE=debug (default release) packages the debug
# binaries already built instead of a release build.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
D="${KEYWAY_CLUSTER_DIR:-/var/lib/keyway/local-cluster}"
NODE_NAME="keyway-node-1"
NODE_LABEL="lo:kwc"
NODE_IP="172.30.0.1"
POD_CIDR="10.88.0.0/24"
CLUSTER_CIDR="10.88.0.0/16"
# A second node (KEYWAY_CLUSTER_NODES=2): its own containerd, kubelet and kube-proxy in
# network namespace kwc-node2 (address 172.30.0.2, pods 10.88.1.0/24, a veth kwc-n2 to the
# host) and in a mount namespace of their own, where /run/keyway, /var/lib/keyway/agent,
# /sys/fs/bpf and /var/log/{pods,containers} are the node's own (its agent's sockets, node
# SVID and BPF pins; a kubelet deletes the pod logs of pods it does not run), with its
# pods' cgroups under /kwc-node2. The pid namespace is the host's, as on any node.
NODES="${KEYWAY_CLUSTER_NODES:-1}"
N2="$D/node2"
NODE2_NAME="keyway-node-2"
NODE2_IP="172.30.0.2"
NODE2_NETNS="kwc-node2"
NODE2_VETH="kwc-n2"
POD2_CIDR="10.88.1.0/24"
CGROUP2="kwc-node2"
PAUSE_IMAGE="keyway.local/pause:3.4"
WORKLOAD_IMAGE="keyway.local/workload:1"
PACKAGES=(containerd runc containernetworking-plugins buildah busybox-static iptables conntrack gcc libc6-dev jq)

log() { printf 'local-cluster: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (containerd, kubelet and the pod network need it)"
case "$D" in /*) ;; *) die "KEYWAY_CLUSTER_DIR must be an absolute path" ;; esac
case "$D" in *[!A-Za-z0-9._/-]* | */ | *//* | */./* | */../* | */. | */..) \
  die "KEYWAY_CLUSTER_DIR must be a plain absolute path (letters, digits, . _ - /)" ;; esac
# What `down` deletes wholesale must be a directory `up` made: it carries this marker.
MARKER=".keyway-local-cluster"

# shellcheck source=scripts/lib.sh
. "$ROOT/scripts/lib.sh"

# --- processes: started with setsid, one pid file each, checked against their cmdline

# Is PID alive and started by us (its command line names our directory)?
ours() { # pid
  [ -n "$1" ] && [ -r "/proc/$1/cmdline" ] && grep -qF -- "$D/" <<<"$(tr '\0' ' ' < "/proc/$1/cmdline" 2>/dev/null)"
}

pid_of() { cat "$D/run/$1.pid" 2>/dev/null || true; }

start_proc() { # name, command...
  local name="$1"; shift
  mkdir -p "$D/run" "$D/log"
  setsid "$@" </dev/null >"$D/log/$name.log" 2>&1 9<&- &  # not the lock (see lock)
  echo $! > "$D/run/$name.pid"
}

stop_proc() { # name
  local pid; pid="$(pid_of "$1")"
  if ours "$pid"; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do ours "$pid" || break; sleep 0.1; done
    ours "$pid" && { kill -KILL "$pid" 2>/dev/null || true; }
    for _ in $(seq 1 50); do ours "$pid" || break; sleep 0.1; done
    log "stopped $1 (pid $pid)"
  fi
  rm -f "$D/run/$1.pid"
}

wait_for() { # what, seconds, command...
  local what="$1" secs="$2"; shift 2
  local deadline=$(( SECONDS + secs ))
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || die "$what not ready after $secs s (logs in $D/log)"
    sleep 0.5
  done
}

# kubectl of the cluster's own version, built with the node's binaries (see up).
NODE_DIR="$(bash "$ROOT/scripts/kube-apiserver.sh" node-dir 2>/dev/null || true)"
KUBECTL=("${NODE_DIR:-/nonexistent}/kubectl" --kubeconfig "$D/kubeconfig")
CTR=(ctr --address "$D/containerd/containerd.sock" -n k8s.io)

# --- images

# An OCI archive FROM scratch of the files in ROOTFS, imported into our containerd.
import_rootfs() { # name, rootfs, entrypoint-json
  local name="$1" rootfs="$2" archive="$D/images/$(tr '/:' '__' <<<"$1").oci.tar"
  local B=(buildah --root "$D/images/storage" --runroot "$D/images/run" --storage-driver vfs)
  local c; c="$("${B[@]}" from --quiet scratch)"
  "${B[@]}" copy --quiet "$c" "$rootfs/" /
  "${B[@]}" config --entrypoint "$3" --env PATH=/bin:/usr/local/bin "$c"
  "${B[@]}" commit --quiet --format oci --rm "$c" "$name" >/dev/null
  rm -f "$archive"
  "${B[@]}" push --quiet "$name" "oci-archive:$archive:$name"
  "${B[@]}" rmi --all >/dev/null 2>&1 || true
  rm -rf "$D/images/storage" "$D/images/run"
  "${CTR[@]}" images import "$archive" >/dev/null
}

build_images() {
  mkdir -p "$D/images"
  local node_dir="$1"
  # The sandbox ("pause") image, from the Kubernetes source's pause.c.
  if ! grep -qx "$PAUSE_IMAGE" <<<"$("${CTR[@]}" images ls -q)"; then
    local r="$D/images/pause-rootfs"
    rm -rf "$r"; mkdir -p "$r"
    gcc -Os -Wall -Werror -static -DVERSION=v3.4-keyway -o "$r/pause" "$node_dir/pause.c"
    import_rootfs "$PAUSE_IMAGE" "$r" '["/pause"]'
    rm -rf "$r"
    log "built $PAUSE_IMAGE"
  fi
  # Keyway itself, as `make image` builds it.
  local profile="${KEYWAY_CLUSTER_IMAGE_PROFILE:-release}" archive
  archive="$(KEYWAY_IMAGE_PROFILE="$profile" bash "$ROOT/scripts/image.sh" | tail -n1)"
  "${CTR[@]}" images import "$archive" >/dev/null
  KEYWAY_ARCHIVE="$archive"
  # Workloads: busybox-static (sh, nc) and the node agent's binary as the
  # SPIFFE client (`node-agent svid fetch` / `svid jwt`), the one in the Keyway image.
  local r="$D/images/workload-rootfs" t
  rm -rf "$r"; mkdir -p "$r/bin" "$r/usr/local/bin" "$r/tmp"
  chmod 1777 "$r/tmp"
  cp /bin/busybox "$r/bin/busybox"
  for t in sh nc sleep cat seq; do ln -s busybox "$r/bin/$t"; done
  objcopy --strip-debug "$ROOT/target/$profile/node-agent" "$r/usr/local/bin/node-agent"
  copy_shared_libraries "$r" "$ROOT/target/$profile/node-agent"
  import_rootfs "$WORKLOAD_IMAGE" "$r" '["/bin/sh"]'
  rm -rf "$r"
  log "images: $PAUSE_IMAGE, $WORKLOAD_IMAGE, $(basename "$archive")"
}

# --- up

write_configs() { # dir, node address, pod range, cgroup root
  local D="$1" NODE_IP="$2" POD_CIDR="$3" CGROUP_ROOT="$4"
  mkdir -p "$D/containerd" "$D/cni/net.d" "$D/cni/ipam" "$D/kubelet"
  cat > "$D/containerd/config.toml" <<EOF
version = 2
root = "$D/containerd/root"
state = "$D/containerd/state"
[grpc]
  address = "$D/containerd/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  disable_apparmor = true
  # Lowering oom_score_adj needs CAP_SYS_RESOURCE, which machines like this one
  # (a sandbox themselves) do not give root: the kubelet's -998 for sandboxes
  # would fail every pod. Clamp to containerd's own score instead.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$D/cni/net.d"
EOF
  cat > "$D/cni/net.d/10-keyway-local.conflist" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "keyway-local",
  "plugins": [
    {
      "type": "ptp",
      "ipMasq": false,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "$POD_CIDR"}]],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dataDir": "$D/cni/ipam"
      }
    }
  ]
}
EOF
  cat > "$D/kubelet/config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_IP
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
# Served on the node's own address only; the API server's
# exec and logs reach it there.
authentication: {anonymous: {enabled: true}, webhook: {enabled: false}}
authorization: {mode: AlwaysAllow}
cgroupDriver: cgroupfs
cgroupRoot: $CGROUP_ROOT
failSwapOn: false
resolvConf: /etc/resolv.conf
clusterDomain: cluster.local
# No eviction: this node shares its machine with the build and the other
# test tiers, and a CI run once saw the kubelet declare pressure and evict
# Keyway's pods mid-test ("cannot evict a critical pod" for the agent, the
# rest gone). "0%" is the kubelet's own way to switch a signal off
# (eviction/helpers.go parseThresholdStatement), explicit so that nobody
# mistakes it for the defaults a missing map would get.
evictionHard: {memory.available: "0%", nodefs.available: "0%", imagefs.available: "0%", nodefs.inodesFree: "0%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
fileCheckFrequency: 10s
syncFrequency: 10s
EOF
}

node_ready() {
  [ "$("${KUBECTL[@]}" get node "$NODE_NAME" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" = True ]
}

up() {
  local t0=$SECONDS
  ensure_packages "${PACKAGES[@]}"
  bash "$ROOT/scripts/kube-apiserver.sh" build
  bash "$ROOT/scripts/kube-apiserver.sh" build-node
  local node_dir
  node_dir="$(bash "$ROOT/scripts/kube-apiserver.sh" node-dir)"
  NODE_DIR="$node_dir"
  KUBECTL=("$node_dir/kubectl" --kubeconfig "$D/kubeconfig")
  local parent; parent="$(dirname "$D")"
  if [ -d "$D" ] && [ -n "$(ls -A "$D")" ] && [ ! -f "$D/$MARKER" ]; then
    die "$D exists and is not a local cluster's directory (no $MARKER): choose another KEYWAY_CLUSTER_DIR"
  fi
  local made_parent=0
  [ -e "$parent" ] || made_parent=1
  mkdir -p "$D"
  touch "$D/$MARKER"
  [ "$made_parent" = 1 ] && echo "$parent" >> "$D/host-paths"

  # The node's address, on the loopback device under a label of its own (this
  # kernel has no dummy interfaces): local to the host, routed to from pods.
  grep -q " $NODE_IP/32 " <<<"$(ip -o addr show dev lo)" || ip addr add "$NODE_IP/32" dev lo label "$NODE_LABEL"

  # etcd and the API server.
  KEYWAY_APISERVER_ADDRESS="$NODE_IP" KEYWAY_APISERVER_NODES=1 \
    bash "$ROOT/scripts/kube-apiserver.sh" start "$D/apiserver" 9<&-
  cp "$D/apiserver/kubeconfig" "$D/kubeconfig"

  write_configs "$D" "$NODE_IP" "$POD_CIDR" /
  if ! ours "$(pid_of containerd)"; then
    log "starting containerd ($D/containerd)"
    # In a mount namespace of its own (host mounts propagate in) where the pod
    # logs go under $D: the kubelet writes them to /var/log/pods, which it
    # cleans up only lazily, and `down` must leave nothing behind. The
    # kubelet joins this namespace; the pods' host paths are the host's.
    local p
    mkdir -p "$D/log/pods" "$D/log/containers"
    for p in /var/log/pods /var/log/containers; do
      if [ ! -e "$p" ]; then mkdir -p "$p"; echo "$p" >> "$D/host-paths"; fi
    done
    start_proc containerd unshare --mount --propagation slave -- \
      sh -c "mount --bind '$D/log/pods' /var/log/pods && mount --bind '$D/log/containers' /var/log/containers \
             && exec containerd --config '$D/containerd/config.toml'"
    wait_for containerd 30 "${CTR[@]}" version
  fi
  build_images "$node_dir"

  local pki="$D/apiserver/pki"
  if ! ours "$(pid_of kube-controller-manager)"; then
    start_proc kube-controller-manager "$node_dir/kube-controller-manager" --kubeconfig "$D/kubeconfig" \
      --service-account-private-key-file "$pki/sa.key" --root-ca-file "$pki/ca.crt" \
      --leader-elect=false --port=0 --secure-port=0 --use-service-account-credentials=false \
      --controllers='*,-nodeipam'
  fi
  if ! ours "$(pid_of kube-scheduler)"; then
    start_proc kube-scheduler "$node_dir/kube-scheduler" --kubeconfig "$D/kubeconfig" \
      --leader-elect=false --port=0 --secure-port=0
  fi
  if ! ours "$(pid_of kube-proxy)"; then
    start_proc kube-proxy "$node_dir/kube-proxy" --kubeconfig "$D/kubeconfig" \
      --hostname-override "$NODE_NAME" --cluster-cidr "$CLUSTER_CIDR" --proxy-mode iptables \
      --conntrack-max-per-core=0 --healthz-bind-address 127.0.0.1:10256 --metrics-bind-address 127.0.0.1:10249
    touch "$D/run/kube-proxy.started"
  fi
  if ! ours "$(pid_of kubelet)"; then
    mkdir -p "$D/kubelet/root" "$D/kubelet/pki"
    start_proc kubelet nsenter --target "$(pid_of containerd)" --mount -- \
      "$node_dir/kubelet" --config "$D/kubelet/config.yaml" --kubeconfig "$D/kubeconfig" \
      --container-runtime=remote --container-runtime-endpoint "unix://$D/containerd/containerd.sock" \
      --node-ip "$NODE_IP" --hostname-override "$NODE_NAME" --root-dir "$D/kubelet/root" \
      --cert-dir "$D/kubelet/pki" --runtime-request-timeout 5m
  fi
  wait_for "node $NODE_NAME Ready" 120 node_ready
  log "node $NODE_NAME Ready after $(( SECONDS - t0 )) s"
  case "$NODES" in
    1) ;;
    2) echo 2 > "$D/nodes"
       up_node2 "$node_dir"
       wait_for "node $NODE2_NAME Ready" 120 node2_ready
       log "node $NODE2_NAME Ready after $(( SECONDS - t0 )) s" ;;
    *) die "KEYWAY_CLUSTER_NODES must be 1 or 2, not $NODES" ;;
  esac

  install_keyway
  log "up in $(( SECONDS - t0 )) s; logs in $D/log; a kubectl of the cluster's version: $node_dir/kubectl"
  echo "export KUBECONFIG=$D/kubeconfig"
}

keyway_ready() {
  local ready
  ready="$("${KUBECTL[@]}" -n keyway-system get pods -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' 2>/dev/null)"
  [ -n "$ready" ] && ! grep -qv True <<<"$ready"
}

# Why the Keyway pods are not Ready, on stderr (CI shows only the output): their
# state, the cluster's recent events and each container's last log lines.
keyway_diagnose() {
  {
    echo "--- keyway-system pods"
    "${KUBECTL[@]}" -n keyway-system get pods -o wide 2>&1 || true
    echo "--- node conditions and taints (pressure shows here)"
    "${KUBECTL[@]}" get nodes -o 'custom-columns=NODE:.metadata.name,CONDITIONS:.status.conditions[*].type,STATUS:.status.conditions[*].status,TAINTS:.spec.taints[*].key' 2>&1 || true
    echo "--- keyway-system events (last 30)"
    "${KUBECTL[@]}" -n keyway-system get events --sort-by=.lastTimestamp 2>&1 | tail -n 30 || true
    local pod
    for pod in $("${KUBECTL[@]}" -n keyway-system get pods -o name 2>/dev/null); do
      echo "--- $pod: last 40 log lines"
      "${KUBECTL[@]}" -n keyway-system logs "$pod" --all-containers --tail=40 2>&1 || true
      echo "--- $pod: the previous container's last 20 lines (if it restarted)"
      "${KUBECTL[@]}" -n keyway-system logs "$pod" --all-containers --previous --tail=20 2>&1 || true
    done
    local f
    for f in "$D"/log/kubelet*.log; do
      [ -f "$f" ] || continue
      echo "--- $(basename "$f"): last 20 error lines"
      grep -E '^E[0-9]{4}' "$f" | tail -n 20 || true
    done
  } >&2
}

# The chart's host paths (hostPath volumes the kubelet creates, the agent's BPF pins):
# the ones that do not exist yet are recorded, and `down` removes them.
HOST_PATHS=(/run/keyway/sockets /run/keyway/admin /run/keyway /var/lib/keyway/agent /sys/fs/bpf/keyway)

install_keyway() {
  local manifests="$D/keyway.yaml" p
  for p in "${HOST_PATHS[@]}"; do
    [ -e "$p" ] || grep -qxF "$p" "$D/host-paths" 2>/dev/null || echo "$p" >> "$D/host-paths"
  done
  (cd "$ROOT" && cargo run --quiet -p keyway-tests --bin render-chart -- keyway keyway-system charts/keyway \
    > "$manifests") || die "rendering the chart failed"
  "${KUBECTL[@]}" create namespace keyway-system --dry-run=client -o yaml | "${KUBECTL[@]}" apply -f - >/dev/null
  "${KUBECTL[@]}" apply -f "$manifests" >/dev/null
  # Ready takes seconds here. Slower than 300 s is reported with why (the
  # output of a run that still passes says it); 600 s fails.
  local t0=$SECONDS slow=$(( SECONDS + 300 )) deadline=$(( SECONDS + 600 ))
  until keyway_ready; do
    if [ "$slow" -gt 0 ] && [ "$SECONDS" -ge "$slow" ]; then
      log "warning: Keyway pods not Ready after 300 s; what they are doing:"
      keyway_diagnose
      slow=0
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      keyway_diagnose
      die "Keyway pods Ready not ready after 600 s (logs in $D/log)"
    fi
    sleep 0.5
  done
  log "Keyway installed and Ready in $(( SECONDS - t0 )) s"
}

# --- the second node (KEYWAY_CLUSTER_NODES=2)

CTR2=(ctr --address "$N2/containerd/containerd.sock" -n k8s.io)

# Every cgroup v1 hierarchy (the kubelet's cgroupfs driver makes its pods' cgroups in each).
cgroup_hierarchies() {
  local h
  for h in /sys/fs/cgroup/*/; do
    h="${h%/}"
    case "$(basename "$h")" in unified) continue ;; esac
    mountpoint -q "$h" && printf '%s\n' "$h"
  done
}

node2_ready() {
  [ "$("${KUBECTL[@]}" get node "$NODE2_NAME" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" = True ]
}

up_node2() { # node binaries dir
  local node_dir="$1" p h
  # Its own network: a namespace, a veth to the host, routes both ways.
  [ -e "/run/netns/$NODE2_NETNS" ] || ip netns add "$NODE2_NETNS"
  if ! ip link show "$NODE2_VETH" >/dev/null 2>&1; then
    ip link add "$NODE2_VETH" type veth peer name eth0 netns "$NODE2_NETNS"
    ip link set "$NODE2_VETH" up
    ip -n "$NODE2_NETNS" link set lo up
    ip -n "$NODE2_NETNS" link set eth0 up
    ip -n "$NODE2_NETNS" addr add "$NODE2_IP/32" dev eth0
    ip -n "$NODE2_NETNS" route add "$NODE_IP/32" dev eth0
    ip -n "$NODE2_NETNS" route add default via "$NODE_IP" dev eth0
    ip netns exec "$NODE2_NETNS" sysctl -qw net.ipv4.ip_forward=1
    ip route add "$NODE2_IP/32" dev "$NODE2_VETH"
    ip route add "$POD2_CIDR" via "$NODE2_IP" dev "$NODE2_VETH" onlink
  fi
  # Its own host paths (bind-mounted over the host's in its mount namespace).
  mkdir -p "$N2/run-keyway" "$N2/agent-data" "$N2/log/pods" "$N2/log/containers"
  for p in /run/keyway /var/lib/keyway /var/lib/keyway/agent /var/log/pods /var/log/containers; do
    if [ ! -e "$p" ]; then mkdir -p "$p"; echo "$p" >> "$D/host-paths"; fi
  done
  while read -r h; do
    [ -d "$h/$CGROUP2" ] || mkdir "$h/$CGROUP2"
  done < <(cgroup_hierarchies)
  write_configs "$N2" "$NODE2_IP" "$POD2_CIDR" "/$CGROUP2"
  if ! ours "$(pid_of containerd-2)"; then
    log "starting node 2's containerd ($N2/containerd, netns $NODE2_NETNS)"
    # A mount namespace of its own (host mounts still propagate in), then the
    # node's network namespace; containerd's shims, and so the node's pods,
    # inherit both.
    start_proc containerd-2 unshare --mount --propagation slave -- \
      nsenter --net="/run/netns/$NODE2_NETNS" -- \
      sh -c "mount --bind '$N2/run-keyway' /run/keyway && mount --bind '$N2/agent-data' /var/lib/keyway/agent \
             && mount --bind '$N2/log/pods' /var/log/pods && mount --bind '$N2/log/containers' /var/log/containers \
             && mount -t bpf bpf /sys/fs/bpf && exec containerd --config '$N2/containerd/config.toml'"
    wait_for "node 2's containerd" 30 "${CTR2[@]}" version
  fi
  local archive
  for archive in "$D"/images/*.oci.tar "$KEYWAY_ARCHIVE"; do
    "${CTR2[@]}" images import "$archive" >/dev/null
  done
  local in2=(nsenter --target "$(pid_of containerd-2)" --mount --net --)
  if ! ours "$(pid_of kube-proxy-2)"; then
    start_proc kube-proxy-2 "${in2[@]}" "$node_dir/kube-proxy" --kubeconfig "$D/kubeconfig" \
      --hostname-override "$NODE2_NAME" --cluster-cidr "$CLUSTER_CIDR" --proxy-mode iptables \
      --conntrack-max-per-core=0 --healthz-bind-address 127.0.0.1:10256 --metrics-bind-address 127.0.0.1:10249
  fi
  if ! ours "$(pid_of kubelet-2)"; then
    mkdir -p "$N2/kubelet/root" "$N2/kubelet/pki"
    start_proc kubelet-2 "${in2[@]}" "$node_dir/kubelet" --config "$N2/kubelet/config.yaml" \
      --kubeconfig "$D/kubeconfig" --container-runtime=remote \
      --container-runtime-endpoint "unix://$N2/containerd/containerd.sock" \
      --node-ip "$NODE2_IP" --hostname-override "$NODE2_NAME" --root-dir "$N2/kubelet/root" \
      --cert-dir "$N2/kubelet/pki" --runtime-request-timeout 5m
  fi
}

# Node 2's pods' network namespaces (files under /run/netns; their mounts live
# in node 2's mount namespace), noted by name before its containerd goes.
node2_pod_netns() {
  ours "$(pid_of containerd-2)" || return 0
  local c
  for c in $("${CTR2[@]}" containers ls -q 2>/dev/null); do
    "${CTR2[@]}" containers info "$c" 2>/dev/null \
      | jq -r '.Spec.linux.namespaces[]? | select(.type == "network") | .path // empty' \
      | sed -n 's|^/var/run/netns/||p; s|^/run/netns/||p'
  done
}

down_node2() {
  local t c pid
  if ours "$(pid_of containerd-2)"; then
    for t in $("${CTR2[@]}" tasks ls -q 2>/dev/null); do "${CTR2[@]}" tasks kill -s KILL "$t" >/dev/null 2>&1 || true; done
  fi
  stop_proc kubelet-2
  stop_proc kube-proxy-2
  if ours "$(pid_of containerd-2)"; then
    for c in $("${CTR2[@]}" tasks ls -q 2>/dev/null); do "${CTR2[@]}" tasks delete -f "$c" >/dev/null 2>&1 || true; done
    for c in $("${CTR2[@]}" containers ls -q 2>/dev/null); do "${CTR2[@]}" containers delete "$c" >/dev/null 2>&1 || true; done
  fi
  stop_proc containerd-2
  for pid in $(pgrep -f -- "-address $N2/containerd/containerd.sock" || true); do ours "$pid" && kill -KILL "$pid" 2>/dev/null || true; done
  # The veth (its peer goes with it, and the routes through it), then the namespace
  # (node 2's pod interfaces and kube-proxy's chains live in it).
  ip link show "$NODE2_VETH" >/dev/null 2>&1 && ip link del "$NODE2_VETH"
  [ -e "/run/netns/$NODE2_NETNS" ] && ip netns del "$NODE2_NETNS"
  # The pods' cgroups, deepest first (empty once their processes are gone).
  local h
  while read -r h; do
    [ -d "$h/$CGROUP2" ] && find "$h/$CGROUP2" -depth -type d -exec rmdir {} + 2>/dev/null || true
  done < <(cgroup_hierarchies)
}

# --- down

down() {
  [ -e "$D" ] || { log "down: nothing at $D"; return 0; }
  [ -f "$D/$MARKER" ] || die "$D is not a local cluster's directory (no $MARKER): not removing it"
  local netns2=()
  if [ -f "$D/nodes" ]; then
    netns2=($(node2_pod_netns))
    down_node2
  fi
  # Pods first, while the kubelet and containerd can still tear down their
  # sandboxes (and the CNI plugin its interfaces). The network namespaces
  # containerd made for them (/run/netns/cni-...) are noted by name first.
  local netns=() info
  if ours "$(pid_of containerd)"; then
    local t c
    for c in $("${CTR[@]}" containers ls -q 2>/dev/null); do
      info="$("${CTR[@]}" containers info "$c" 2>/dev/null || true)"
      netns+=($(jq -r '.Spec.linux.namespaces[]? | select(.type == "network") | .path // empty' <<<"$info" \
        | sed -n 's|^/var/run/netns/||p; s|^/run/netns/||p'))
    done
    for t in $("${CTR[@]}" tasks ls -q 2>/dev/null); do "${CTR[@]}" tasks kill -s KILL "$t" >/dev/null 2>&1 || true; done
  fi
  stop_proc kubelet
  stop_proc kube-proxy
  stop_proc kube-scheduler
  stop_proc kube-controller-manager
  if ours "$(pid_of containerd)"; then
    local c
    for c in $("${CTR[@]}" tasks ls -q 2>/dev/null); do "${CTR[@]}" tasks delete -f "$c" >/dev/null 2>&1 || true; done
    for c in $("${CTR[@]}" containers ls -q 2>/dev/null); do "${CTR[@]}" containers delete "$c" >/dev/null 2>&1 || true; done
  fi
  stop_proc containerd
  # The shims our containerd started (their command line names its socket).
  local pid
  for pid in $(pgrep -f -- "-address $D/containerd/containerd.sock" || true); do ours "$pid" && kill -KILL "$pid" 2>/dev/null || true; done
  if [ -d "$D/apiserver" ]; then bash "$ROOT/scripts/kube-apiserver.sh" stop "$D/apiserver" || true; fi
  # kube-proxy's iptables chains.
  local kp="${NODE_DIR:-/nonexistent}/kube-proxy"
  if [ -x "$kp" ] && [ -f "$D/run/kube-proxy.started" ]; then "$kp" --cleanup >/dev/null 2>&1 || true; fi
  # The chains the kubelet and kube-proxy leave behind after `kube-proxy --cleanup`:
  # the jumps to them from the built-in chains, then the chains, by name.
  local tool table chain rule
  for tool in iptables ip6tables; do
    command -v "$tool" >/dev/null || continue
    for table in filter nat mangle; do
      for chain in KUBE-FIREWALL KUBE-MARK-DROP KUBE-MARK-MASQ KUBE-POSTROUTING KUBE-KUBELET-CANARY \
                   KUBE-PROXY-CANARY KUBE-SERVICES KUBE-EXTERNAL-SERVICES KUBE-NODEPORTS KUBE-FORWARD; do
        "$tool" -t "$table" -S "$chain" >/dev/null 2>&1 || continue
        { "$tool" -t "$table" -S | grep -E -- "^-A [A-Z]+ .*-j $chain( |\$)" || true; } | while read -r rule; do
          eval "$tool -t $table -D ${rule#-A }" 2>/dev/null || true
        done
        "$tool" -t "$table" -F "$chain" 2>/dev/null || true
        "$tool" -t "$table" -X "$chain" 2>/dev/null || true
      done
    done
  done
  # Pod interfaces: the host side of each address host-local gave out.
  local f ip dev
  for f in "$D"/cni/ipam/keyway-local/*; do
    [ -f "$f" ] || continue
    ip="$(basename "$f")"
    case "$ip" in *.*.*.*) ;; *) continue ;; esac
    dev="$(ip -o route show "$ip/32" 2>/dev/null | awk '{for (i=1;i<NF;i++) if ($i=="dev") print $(i+1)}')"
    [ -n "$dev" ] && ip link del "$dev" 2>/dev/null || true
  done
  local n
  for n in $(printf '%s\n' "${netns[@]}" "${netns2[@]}" | sort -u); do ip netns del "$n" 2>/dev/null || true; done
  # Mounts under our directory, deepest first.
  local m
  for m in $(awk -v d="$D/" 'index($2, d) == 1 {print $2}' /proc/mounts | sort -r); do umount -l "$m" 2>/dev/null || true; done
  grep -q " $NODE_IP/32 " <<<"$(ip -o addr show dev lo)" && ip addr del "$NODE_IP/32" dev lo label "$NODE_LABEL"
  # Host paths the chart's pods created (recorded by `up`), deepest first.
  local p
  if [ -f "$D/host-paths" ]; then
    sort -r "$D/host-paths" | while IFS= read -r p; do
      case "$p" in /*) rm -rf -- "$p" ;; esac
    done
  fi
  rm -rf "$D"
  log "down: $D removed"
}

status() {
  local name pid up=0 total=0
  local names=(containerd kube-controller-manager kube-scheduler kube-proxy kubelet)
  [ -f "$D/nodes" ] && names+=(containerd-2 kube-proxy-2 kubelet-2)
  for name in "${names[@]}"; do
    total=$(( total + 1 ))
    pid="$(pid_of "$name")"
    if ours "$pid"; then echo "$name: running (pid $pid)"; up=$(( up + 1 )); else echo "$name: stopped"; fi
  done
  bash "$ROOT/scripts/kube-apiserver.sh" status "$D/apiserver" || true
  [ "$up" -eq 0 ] && return 3
  if [ "$up" -eq "$total" ] && node_ready && { [ ! -f "$D/nodes" ] || node2_ready; }; then
    echo "node $NODE_NAME: Ready"
    [ -f "$D/nodes" ] && echo "node $NODE2_NAME: Ready"
    return 0
  fi
  return 1
}

# One up or down at a time on this machine (the node addresses, host paths and
# cgroups are one per machine): a second waits for the first. The lock is on fd 9,
# which the daemons started here do not inherit (start_proc and the API server's
# start close it), or the lock would outlive this script.
lock() {
  exec 9</run
  flock -n 9 || { log "another local-cluster up/down is running; waiting for it"; flock 9; }
}

case "${1:-}" in
  up) lock; up ;;
  down) lock; down ;;
  status) status ;;
  *) echo "usage: $0 up | status | down" >&2; exit 2 ;;
esac
