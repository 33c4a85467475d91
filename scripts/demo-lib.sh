# Helpers for scripts/demo.sh (sourced, not run): output, waits with
# deadlines, and the two-node topology in network namespaces, made and
# removed by name. Mirrors tests/support/netns.rs (`Cluster`).

# Every name the demo makes starts with this, so cleanup (and the clean-up of
# a run that was killed with -9) can find it.
PREFIX=kdemo
HUB=$PREFIX-hub
PIN_ROOT=/sys/fs/bpf
PIN_PREFIX=keyway-demo-

BOLD=$'\033[1m'; DIM=$'\033[2m'; RED=$'\033[31m'; GREEN=$'\033[32m'; RESET=$'\033[0m'
if [ ! -t 1 ]; then BOLD=; DIM=; RED=; GREEN=; RESET=; fi

STEP=0
step() { STEP=$((STEP + 1)); printf '\n%s%d. %s%s\n' "$BOLD" "$STEP" "$*" "$RESET"; }
say() { printf '   %s\n' "$*"; }
ok() { printf '   %s✔ %s%s\n' "$GREEN" "$*" "$RESET"; }
# Indents a command's output under its step.
indent() { sed 's/^/   /'; }

# Logs whose tails are worth showing when something fails (name=path).
LOGS=()
# A failure: the message, what `diagnose` (if the script defines it) shows,
# and the tails of the logs; then exit (the script's EXIT trap cleans up).
die() {
  trap - ERR
  printf '\n%sdemo failed in step %d: %s%s\n' "$RED" "$STEP" "$*" "$RESET" >&2
  if declare -F diagnose >/dev/null; then diagnose >&2 || true; fi
  for entry in "${LOGS[@]}"; do
    local f="${entry#*=}"
    [ -s "$f" ] || continue
    printf '%s--- last lines of %s (%s) ---%s\n' "$DIM" "${entry%%=*}" "$f" "$RESET" >&2
    tail -n 15 "$f" >&2
  done
  exit 1
}

# wait_for SECONDS WHAT CMD...: runs CMD every 100 ms until it succeeds; dies
# after SECONDS. Optional: WAIT_PID, a process that must stay alive meanwhile.
wait_for() {
  local secs=$1 what=$2; shift 2
  local i
  for ((i = 0; i < secs * 10; i++)); do
    "$@" >/dev/null 2>&1 && return 0
    if [ -n "${WAIT_PID:-}" ] && ! kill -0 "$WAIT_PID" 2>/dev/null; then
      die "the process this step waits on exited while waiting for $what"
    fi
    sleep 0.1
  done
  die "no $what after ${secs}s"
}

# A namespace with IPv6 on and duplicate address detection off (addresses
# are usable at once; nothing here can collide).
netns_add() {
  ip netns add "$1"
  ip netns exec "$1" sysctl -qw net.ipv6.conf.all.disable_ipv6=0 net.ipv6.conf.default.disable_ipv6=0 \
    net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0
  ip -n "$1" link set lo up
}

# v6 A.B.C.D: the IPv6 address of dual-stack A.B.C.D, fd00::a:b:c:d in hex
# (so an IPv4 /24 is an IPv6 /112). Mirrors tests/support/netns.rs (`v6_of`).
v6() {
  local IFS=.
  set -- $1
  printf 'fd00::%x:%x:%x:%x' "$1" "$2" "$3" "$4"
}

mac_of() { ip -n "$1" -o link show "$2" | sed -n 's/.*link\/ether \([0-9a-f:]*\).*/\1/p'; }

# add_node NAME N: namespace $PREFIX-NAME on the underlay bridge as 10.202.0.N
# and its v6, forwarding on; its pods get 10.201.N.0/24 and its v6 /112.
add_node() {
  local ns=$PREFIX-$1 n=$2 up=kd-up-$2
  netns_add "$ns"
  ip netns exec "$ns" sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1
  ip -n "$HUB" link add "$up" type veth peer name eth0 netns "$ns"
  ip -n "$HUB" link set "$up" master br0 up
  ip -n "$ns" addr add "10.202.0.$n/24" dev eth0
  ip -n "$ns" addr add "$(v6 "10.202.0.$n")/112" dev eth0
  ip -n "$ns" link set eth0 up
}

# add_pod NODE POD IP: namespace $PREFIX-POD behind veth kd-POD of the node,
# routed the way a Calico-style CNI leaves it (/32 on eth0, default route to
# 169.254.1.1 on the link; the node routes the /32 to the host-side veth).
# Dual-stack: also the /128 of `v6 IP`, a default route to fe80::1 (the
# host-side veth's), neighbours found by neighbour discovery.
add_pod() {
  local node=$PREFIX-$1 ns=$PREFIX-$2 hostif=kd-$2 ip=$3
  netns_add "$ns"
  ip -n "$node" link add "$hostif" type veth peer name eth0 netns "$ns"
  ip -n "$node" link set "$hostif" up
  ip -n "$ns" addr add "$ip/32" dev eth0
  ip -n "$ns" link set eth0 up
  ip -n "$ns" route add 169.254.1.1 dev eth0 scope link
  ip -n "$ns" route add default via 169.254.1.1 dev eth0
  ip -n "$ns" neigh replace 169.254.1.1 lladdr "$(mac_of "$node" "$hostif")" dev eth0 nud permanent
  ip -n "$node" route add "$ip/32" dev "$hostif"
  ip -n "$node" neigh replace "$ip" lladdr "$(mac_of "$ns" eth0)" dev "$hostif" nud permanent
  ip -n "$node" addr add fe80::1/64 dev "$hostif"
  ip -n "$ns" addr add "$(v6 "$ip")/128" dev eth0
  ip -n "$ns" -6 route add default via fe80::1 dev eth0
  ip -n "$node" -6 route add "$(v6 "$ip")/128" dev "$hostif"
}

make_topology() {
  netns_add "$HUB"
  ip -n "$HUB" link add br0 type bridge
  ip -n "$HUB" link set br0 up
  add_node node-a 1
  add_node node-b 2
  ip -n "$PREFIX-node-a" route add 10.201.2.0/24 via 10.202.0.2
  ip -n "$PREFIX-node-b" route add 10.201.1.0/24 via 10.202.0.1
  ip -n "$PREFIX-node-a" -6 route add "$(v6 10.201.2.0)/112" via "$(v6 10.202.0.2)"
  ip -n "$PREFIX-node-b" -6 route add "$(v6 10.201.1.0)/112" via "$(v6 10.202.0.1)"
  add_pod node-a frontend 10.201.1.10
  add_pod node-a intruder 10.201.1.20
  add_pod node-b api 10.201.2.10
}

# Every namespace and pin directory the demo makes, by name (also what a
# previous run killed with -9 left behind). Pods first, nodes, the hub last;
# the veths go with their namespaces, and removing the pins detaches the
# programs.
remove_topology() {
  local ns
  for ns in frontend intruder api node-a node-b hub; do
    if [ -e "/run/netns/$PREFIX-$ns" ]; then ip netns del "$PREFIX-$ns" 2>/dev/null || true; fi
  done
  rm -rf "$PIN_ROOT/${PIN_PREFIX}node-a" "$PIN_ROOT/${PIN_PREFIX}node-b"
  return 0
}

# remove_leftovers STATE: what a run killed with -9 left. STATE names its
# temp dir and the processes it started; a process is stopped only if its
# command line still names that temp dir (every one of them does), so a
# reused pid is left alone.
remove_leftovers() {
  local state=$1 dir="" kind value
  if [ -s "$state" ]; then
    while read -r kind value; do
      case $kind in
        dir) dir=$value ;;
        pid) [ -n "$dir" ] && [[ $({ tr '\0' ' ' <"/proc/$value/cmdline"; } 2>/dev/null) == *"$dir/"* ]] && stop "$value" ;;
      esac
    done <"$state"
    [[ $dir == /tmp/keyway-demo.* ]] && rm -rf "$dir"
  fi
  rm -f "$state"
  remove_topology
}

leftovers() {
  ls /run/netns 2>/dev/null | grep "^$PREFIX-" || true
  ls "$PIN_ROOT" 2>/dev/null | grep "^$PIN_PREFIX" || true
}

# alive PID: running (a zombie, such as an orphan nobody reaps, is not).
alive() {
  local stat
  stat=$({ cat "/proc/$1/stat"; } 2>/dev/null) || return 1
  stat=${stat##*) }
  [ "${stat:0:1}" != Z ]
}

# stop PID: SIGTERM, up to 3 s to exit, then SIGKILL.
stop() {
  local pid=$1 i
  [ -n "$pid" ] || return 0
  kill -TERM "$pid" 2>/dev/null || return 0
  for ((i = 0; i < 30; i++)); do
    alive "$pid" || break
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

# TCP segments a pod's stack has retransmitted so far.
tcp_retransmits() {
  ip netns exec "$PREFIX-$1" awk '/^Tcp:/ { if (!h) { for (i = 1; i <= NF; i++) if ($i == "RetransSegs") c = i; h = 1 } else print $c }' /proc/net/snmp
}

# Folds runs of flow lines that differ only in time and source port: the
# first and last of a run are printed, with how many were in between.
fold_repeats() {
  awk '
    function key(l) { sub(/^[A-Z][a-z][a-z] [0-9]+ [0-9:.]+ /, "", l); gsub(/:[0-9]+ /, " ", l); return l }
    function end_run() {
      if (n > 2) printf "  ... %d more like these ...\n", n - 2
      if (n > 1) print last
    }
    { k = key($0); if (k == prev) { n++; last = $0; next } end_run(); print; prev = k; n = 1 }
    END { end_run() }'
}
