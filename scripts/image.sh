#!/usr/bin/env bash
# Builds the Keyway image: one OCI image with both binaries, `control-plane` and
# `node-agent`, FROM scratch, without a Docker daemon or a registry.
#
#   scripts/image.sh                    # release binaries (cargo build --release)
#   KEYWAY_IMAGE_PROFILE=debug scripts/image.sh   # package target/debug as built
#                                       # (what the test tiers use: no second build)
#
# Writes target/image/keyway-<version>.oci.tar, an OCI archive whose image is named
# docker.io/library/keyway:<version>, the name the chart's default `keyway:<version>`
# resolves to in containerd and CRI. Load it with
#   ctr -n k8s.io images import target/image/keyway-<version>.oci.tar
# (or `kind load image-archive`, or `skopeo copy oci-archive:... docker://REGISTRY/keyway:TAG`).
#
# What is in it: the two binaries (debug info stripped), the shared libraries they load
# (glibc, libm, libgcc_s and the dynamic loader, copied from this machine as `ldd`
# lists them), /etc/passwd and /etc/group with root and keyway (65532), and
# /etc/nsswitch.conf. The default user is keyway (65532): the control plane runs as
# that; the node agent's DaemonSet runs as root with BPF, NET_ADMIN and PERFMON.
#
# buildah (Debian's, installed here if missing) runs as root with the vfs driver and a
# storage directory of its own under target/image, removed afterwards.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PROFILE="${KEYWAY_IMAGE_PROFILE:-release}"
OUT_DIR="$ROOT/target/image"
CARGO="${CARGO:-cargo}"

log() { printf 'image: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

case "$PROFILE" in release | debug) ;; *) die "KEYWAY_IMAGE_PROFILE must be release or debug, not $PROFILE" ;; esac

# shellcheck source=scripts/lib.sh
. "$ROOT/scripts/lib.sh"

ensure_packages buildah binutils

VERSION="$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' "$ROOT/Cargo.toml")"
[ -n "$VERSION" ] || die "no version in [workspace.package] of Cargo.toml"
REVISION="$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)"
if [ "$REVISION" != unknown ] && [ -n "$(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null)" ]; then
  REVISION="$REVISION-dirty"
fi
# Reproducible timestamps: the commit's time (SOURCE_DATE_EPOCH wins if set).
CREATED="${SOURCE_DATE_EPOCH:-$(git -C "$ROOT" log -1 --format=%ct 2>/dev/null || echo 0)}"
NAME="docker.io/library/keyway:$VERSION"
ARCHIVE="$OUT_DIR/keyway-$VERSION.oci.tar"

if [ "$PROFILE" = release ]; then
  log "building release binaries"
  (cd "$ROOT" && "$CARGO" build --release --bins --quiet)
fi
BIN_DIR="$ROOT/target/$PROFILE"
for b in control-plane node-agent; do
  [ -x "$BIN_DIR/$b" ] || die "$BIN_DIR/$b is missing: run cargo build$([ "$PROFILE" = release ] && echo " --release") --bins"
done

ROOTFS="$OUT_DIR/rootfs"
STORAGE="$OUT_DIR/storage"
rm -rf "$ROOTFS" "$STORAGE"
mkdir -p "$ROOTFS/usr/local/bin" "$ROOTFS/etc" "$ROOTFS/tmp"
chmod 1777 "$ROOTFS/tmp"
for b in control-plane node-agent; do
  objcopy --strip-debug "$BIN_DIR/$b" "$ROOTFS/usr/local/bin/$b"
done

# The shared objects the binaries load, at the paths the loader looks for them.
copy_shared_libraries "$ROOTFS" "$BIN_DIR/control-plane" "$BIN_DIR/node-agent"

cat > "$ROOTFS/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/sbin/nologin
keyway:x:65532:65532:keyway:/nonexistent:/sbin/nologin
EOF
cat > "$ROOTFS/etc/group" <<'EOF'
root:x:0:
keyway:x:65532:
EOF
echo 'hosts: files dns' > "$ROOTFS/etc/nsswitch.conf"
find "$ROOTFS" -exec touch -h -d "@$CREATED" {} +

B=(buildah --root "$STORAGE/root" --runroot "$STORAGE/run" --storage-driver vfs)
cleanup() { "${B[@]}" rm --all >/dev/null 2>&1 || true; rm -rf "$STORAGE" "$ROOTFS"; }
trap cleanup EXIT

log "assembling $NAME ($PROFILE binaries, revision $REVISION)"
ctr="$("${B[@]}" from --quiet scratch)"
"${B[@]}" copy --quiet "$ctr" "$ROOTFS/" /
"${B[@]}" config \
  --user 65532:65532 \
  --env PATH=/usr/local/bin \
  --workingdir / \
  --cmd '["/usr/local/bin/node-agent", "--help"]' \
  --label "org.opencontainers.image.title=keyway" \
  --label "org.opencontainers.image.description=Keyway: SPIFFE workload identity and mutual authentication for Kubernetes (control-plane and node-agent)" \
  --label "org.opencontainers.image.version=$VERSION" \
  --label "org.opencontainers.image.revision=$REVISION" \
  --label "org.opencontainers.image.source=${KEYWAY_IMAGE_SOURCE:-https://github.com/keyway-dev/keyway}" \
  --label "org.opencontainers.image.licenses=Apache-2.0" \
  --label "org.opencontainers.image.created=$(date -u -d "@$CREATED" +%Y-%m-%dT%H:%M:%SZ)" \
  "$ctr"
"${B[@]}" commit --quiet --format oci --timestamp "$CREATED" --rm "$ctr" "$NAME" >/dev/null
mkdir -p "$OUT_DIR"
rm -f "$ARCHIVE"
"${B[@]}" push --quiet "$NAME" "oci-archive:$ARCHIVE:$NAME"

size="$(du -m "$ARCHIVE" | cut -f1)"
log "wrote $ARCHIVE ($size MB); load it with: ctr -n k8s.io images import $ARCHIVE"
echo "$ARCHIVE"
