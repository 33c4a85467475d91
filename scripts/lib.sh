# Shell helpers shared by scripts/image.sh and scripts/local-cluster.sh (sourced;
# the caller defines `log` and `die`).

# Installs the Debian packages among "$@" that are missing; nothing when all are there.
ensure_packages() {
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$(id -u)" -eq 0 ] || die "missing Debian packages: ${missing[*]}; run as root to install them"
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# Copies the shared objects the executables "${@:2}" load (as `ldd` lists them: glibc,
# libgcc_s, the dynamic loader) into the root filesystem $1, at the paths the loader
# looks for them.
copy_shared_libraries() { # rootfs, executable...
  local rootfs="$1" libs lib; shift
  libs="$(ldd "$@" | awk '/=> \//{print $3} /^\t\/[^ ]*ld-linux/{print $1}' | sort -u)"
  [ -n "$libs" ] || die "ldd listed no libraries for $*"
  for lib in $libs; do
    mkdir -p "$rootfs$(dirname "$lib")"
    cp -L "$lib" "$rootfs$lib"
  done
}
