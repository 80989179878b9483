#!/usr/bin/env bash
# Profile-guided release build of the proxy: the binary the benchmarks measure and the
# Docker image ships.
#
#   scripts/pgo-build.sh          # prints the path of the optimised binary on its last line
#
# 1. builds an instrumented binary (rustc -Cprofile-generate);
# 2. runs it as `replicator demo` (a local primary, two streaming replicas, the proxy in
#    front) under pgbench: select-only and TPC-B in every protocol mode, 8 clients and 1,
#    and select-only with 128 clients on its 20 pooled connections (checkouts that wait);
# 3. merges the profile with the llvm-profdata of this rustc (rustup's llvm-tools
#    component, added when missing) and builds again with -Cprofile-use.
#
# The proxy's per-transaction work is a few microseconds spread over the session loop,
# the decision cache, the pool and tokio's scheduler; what PGO changes is where that code
# sits (hot paths together, cold branches out of line) and what gets inlined. On the
# 2-core test machine it takes the proxy's user CPU per transaction down by about a
# third; see README, Performance.
#
# Needs the PostgreSQL server binaries and pgbench (as the test bed does). Both builds
# use their own target directories (target/pgo/...), so the ordinary target/release is
# left alone. Takes about as long as two clean release builds plus a minute of training.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${PGO_TARGET_DIR:-$PWD/target/pgo}
PROFILES="$OUT/profiles"
TRAIN_SECONDS=${PGO_TRAIN_SECONDS:-5}
PROXY_PORT=${PGO_PROXY_PORT:-16540}
ADMIN_PORT=$((PROXY_PORT + 1))

SYSROOT=$(rustc --print sysroot)
HOST=$(rustc -vV | awk '/^host:/ {print $2}')
PROFDATA="$SYSROOT/lib/rustlib/$HOST/bin/llvm-profdata"
if [ ! -x "$PROFDATA" ]; then
  if ! command -v rustup > /dev/null; then
    echo "llvm-profdata matching this rustc is not at $PROFDATA and rustup is not here to add it;" >&2
    echo "install rustup's llvm-tools component, or build without PGO (cargo build --release)" >&2
    exit 1
  fi
  echo "adding rustup's llvm-tools component for llvm-profdata" >&2
  rustup component add llvm-tools >&2
fi

PGBIN=$( (pg_config --bindir 2>/dev/null; ls -d /usr/lib/postgresql/*/bin 2>/dev/null) | while read -r d; do [ -x "$d/pgbench" ] && echo "$d"; done | tail -1)
if [ -z "$PGBIN" ]; then
  echo "pgbench not found: install the PostgreSQL server binaries" >&2
  exit 1
fi

rm -rf "$PROFILES"
mkdir -p "$PROFILES"
chmod 755 "$OUT" "$PROFILES"

echo "== instrumented build" >&2
RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-generate=$PROFILES" \
  cargo build --release --locked --bin replicator --target-dir "$OUT/generate" >&2

echo "== training run" >&2
LOG=$(mktemp /tmp/replicator-pgo.XXXXXX)
setsid "$OUT/generate/release/replicator" demo \
  --listen "127.0.0.1:$PROXY_PORT" --admin-listen "127.0.0.1:$ADMIN_PORT" > "$LOG" 2>&1 &
DEMO_PID=$!
stop_demo() {
  if kill -INT "$DEMO_PID" 2>/dev/null; then wait "$DEMO_PID" || true; fi
}
trap 'stop_demo; rm -f "$LOG"' EXIT
for _ in $(seq 1 120); do grep -q "^connect:" "$LOG" && break; sleep 0.5; done
grep -q "^connect:" "$LOG" || { cat "$LOG" >&2; echo "demo did not start" >&2; exit 1; }
PRIMARY_PORT=$(awk '/^  primary/ {split($2, a, ":"); print a[2]}' "$LOG")

export PGPASSWORD=secret
"$PGBIN/pgbench" -h 127.0.0.1 -p "$PRIMARY_PORT" -U app -i -q -s 10 app > /dev/null 2>&1
sleep 2 # the replicas replay the initial load
for args in "-S -M simple -c 8 -j 2" "-S -M extended -c 8 -j 2" "-S -M prepared -c 8 -j 2" \
            "-M simple -c 8 -j 2" "-M extended -c 8 -j 2" "-M prepared -c 8 -j 2" \
            "-S -M simple -c 1" "-S -M simple -c 128 -j 2"; do
  # shellcheck disable=SC2086
  "$PGBIN/pgbench" -h 127.0.0.1 -p "$PROXY_PORT" -U app -n -T "$TRAIN_SECONDS" $args app 2>&1 \
    | awk -v a="$args" '/^tps = / {print "  pgbench " a ": " $3 " tps"}' >&2
done
# The profile is written when the process exits.
stop_demo
trap 'rm -f "$LOG"' EXIT
ls "$PROFILES"/*.profraw > /dev/null

echo "== optimised build" >&2
"$PROFDATA" merge -o "$PROFILES/merged.profdata" "$PROFILES"
# Fat LTO in one codegen unit: tokio's and the bytes crate's hot paths are inlined into
# the session's, which the profile alone cannot do across crates (callgrind, pgbench -S
# at 512 clients: about a sixth fewer instructions per transaction, half the
# instruction-cache misses). It makes this build a few minutes longer, so the plain
# development build keeps the default profile.
CARGO_PROFILE_RELEASE_LTO=fat CARGO_PROFILE_RELEASE_CODEGEN_UNITS=1 \
RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-use=$PROFILES/merged.profdata" \
  cargo build --release --locked --bin replicator --target-dir "$OUT/use" >&2
echo "$OUT/use/release/replicator"
