#!/usr/bin/env bash
# Every end-to-end figure the README quotes, in one run on this machine:
#   1. pgbench against the primary directly, through PgBouncer and through replicator
#      (reads split, primary only, read-your-writes on), with ratios to direct;
#   2. failover: time from killing the primary to the first acknowledged write;
#   3. CDC: rows per second from source commit to target acknowledgement;
#   4. TLS: pgbench -S and the connection rate over TLS, direct / PgBouncer / replicator
#      (when PgBouncer is installed).
#
#   benches/run.sh                                  # defaults (about 35 minutes)
#   ROUNDS=5 DURATION=20 FAILOVER_ROUNDS=5 benches/run.sh
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== machine"
echo "$(nproc) cores, $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo), $(awk '/MemTotal/ {printf "%.1f GB RAM", $2 / 1048576}' /proc/meminfo)"
PGBIN=$( (pg_config --bindir 2>/dev/null; ls -d /usr/lib/postgresql/*/bin 2>/dev/null) | while read -r d; do [ -x "$d/postgres" ] && echo "$d"; done | tail -1)
"$PGBIN/postgres" --version
if command -v pgbouncer >/dev/null 2>&1; then pgbouncer --version | head -1; fi
echo

echo "== 1. throughput: direct vs PgBouncer vs replicator (benches/pgbench.sh)"
benches/pgbench.sh
echo

echo "== 2. failover resume time (cargo bench --bench failover)"
cargo bench --quiet --bench failover 2>/dev/null
echo

echo "== 3. CDC throughput (cargo bench --bench cdc_throughput)"
cargo bench --quiet --bench cdc_throughput 2>/dev/null
echo

if command -v pgbouncer >/dev/null 2>&1; then
  echo "== 4. TLS: direct vs PgBouncer vs replicator (benches/pgbench-tls.sh)"
  benches/pgbench-tls.sh
fi
