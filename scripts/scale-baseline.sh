#!/usr/bin/env bash
# Builds the baseline `make bench-scale` compares against: the control plane
# as it was before per-object state (commit below: pods copied into one
# ConfigMap, every watch event recomputing the whole cluster, every Sync
# stream recomputing its whole view). Built once, from `git archive` of that
# commit into target/scale/, in a target directory of its own (removed once
# the binary is kept); prints the binary's path.
#
# Not this tree's target directory: Cargo names a workspace member's build
# output by its path within the workspace, so the baseline's `proto` and this
# tree's share one generated-code directory, and whichever built last was
# taken as fresh by the other (the baseline failed to build against this
# tree's generated API).
set -euo pipefail
cd "$(dirname "$0")/.."
REV=4b68ddf3e56054cf4a78f8770240576cb686f4e8
out="$PWD/target/scale/control-plane-baseline-${REV:0:12}"
if [ -x "$out" ]; then
  echo "$out"
  exit 0
fi
git cat-file -e "$REV^{commit}" 2>/dev/null || {
  echo "scale-baseline.sh: commit $REV is not in this clone (a shallow clone?); fetch the history" >&2
  exit 1
}
src="$PWD/target/scale/baseline-src"
rm -rf "$src"
mkdir -p "$src"
git archive "$REV" | tar -x -C "$src"
echo "scale-baseline.sh: building the control plane at ${REV:0:12} (once)" >&2
target="$PWD/target/scale/target"
( cd "$src" && "${CARGO:-cargo}" build --release --locked -p control-plane --bin control-plane \
    --target-dir "$target" >&2 )
cp "$target/release/control-plane" "$out.tmp"
mv "$out.tmp" "$out"
rm -rf "$src" "$target"
echo "$out"
