#!/usr/bin/env bash
# TLS end to end: pgbench -S against a primary directly over TLS, through replicator
# (TLS from pgbench to the proxy and from the proxy to the server) and through
# PgBouncer set up the same way (transaction pooling), interleaved round by round so
# that machine noise hits all three alike; then the connection rate, a new TLS
# connection and SCRAM login per transaction (pgbench -C). Prints medians and each
# target's ratio to direct TLS in the same run.
#
#   benches/pgbench-tls.sh                       # 6 rounds of 4 s per cell
#   ROUNDS=10 DURATION=5 benches/pgbench-tls.sh
#   BIN=target/release/replicator benches/pgbench-tls.sh   # measure that binary
#
# Needs the PostgreSQL server binaries, pgbench, openssl and PgBouncer (Debian:
# apt-get install pgbouncer). The servers run as `postgres` when started as root.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-6}
DURATION=${DURATION:-4}
CLIENTS=${CLIENTS:-8}
SCALE=${SCALE:-10}
PG_PORT=${PG_PORT:-17432}
PROXY_PORT=${PROXY_PORT:-17433}
BOUNCER_PORT=${BOUNCER_PORT:-17434}
WORK=$(mktemp -d /tmp/replicator-tls-bench.XXXXXX)
chmod 755 "$WORK"
export PGPASSWORD=secret

if [ -z "${BIN:-}" ]; then
  cargo build --release --quiet --bin replicator
  BIN=target/release/replicator
fi
BIN=$(realpath "$BIN")
PGBIN=$( (pg_config --bindir 2>/dev/null; ls -d /usr/lib/postgresql/*/bin 2>/dev/null) | while read -r d; do [ -x "$d/pgbench" ] && echo "$d"; done | tail -1)
command -v pgbouncer >/dev/null || { echo "pgbouncer is not installed" >&2; exit 1; }
AS=()
if [ "$(id -u)" = 0 ]; then AS=(runuser -u postgres --); fi

cleanup() {
  for pid in "${PROXY_PID:-}" "${BOUNCER_PID:-}"; do
    if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; fi
  done
  "${AS[@]}" "$PGBIN/pg_ctl" -D "$WORK/pg" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# A certificate for 127.0.0.1, used by the server, the proxy and PgBouncer alike.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -subj /CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1 \
  -keyout "$WORK/server.key" -out "$WORK/server.crt" 2>/dev/null
chmod 600 "$WORK/server.key"
echo secret >"$WORK/pwfile"
if [ "$(id -u)" = 0 ]; then chown postgres "$WORK" "$WORK/server.key" "$WORK/server.crt" "$WORK/pwfile"; fi

"${AS[@]}" "$PGBIN/initdb" -D "$WORK/pg" -U postgres --pwfile "$WORK/pwfile" \
  --auth-local=trust --auth-host=scram-sha-256 --no-sync >/dev/null
cat >>"$WORK/pg/postgresql.conf" <<EOF
port = $PG_PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$WORK'
max_connections = 200
shared_buffers = '128MB'
fsync = off
synchronous_commit = off
ssl = on
ssl_cert_file = '$WORK/server.crt'
ssl_key_file = '$WORK/server.key'
EOF
# TCP logins only over TLS.
sed -i 's/^host /hostssl /' "$WORK/pg/pg_hba.conf"
"${AS[@]}" "$PGBIN/pg_ctl" -D "$WORK/pg" -l "$WORK/pg.log" -w start >/dev/null
"${AS[@]}" "$PGBIN/psql" -q -h "$WORK" -p "$PG_PORT" -U postgres -d postgres \
  -c "CREATE ROLE app LOGIN PASSWORD 'secret'" -c "CREATE DATABASE app OWNER app"
DIRECT="host=127.0.0.1 port=$PG_PORT user=app dbname=app sslmode=require"
"$PGBIN/pgbench" -i -q -s "$SCALE" "$DIRECT" >/dev/null 2>&1

cat >"$WORK/proxy.toml" <<EOF
[proxy]
listen = "127.0.0.1:$PROXY_PORT"
admin_listen = ""
state_file = "$WORK/state.json"
tls_cert_file = "$WORK/server.crt"
tls_key_file = "$WORK/server.key"
client_tls = "require"

[[users]]
name = "app"
password = "secret"

[projects.app]
pool_size = 20

[[projects.app.replicas]]
name = "master"
role = "primary"
uri = "postgresql://127.0.0.1:$PG_PORT/app?sslmode=require"
EOF
RUST_LOG=warn setsid "$BIN" serve --config "$WORK/proxy.toml" >"$WORK/proxy.log" 2>&1 &
PROXY_PID=$!

printf '"app" "secret"\n' >"$WORK/userlist.txt"
cat >"$WORK/pgbouncer.ini" <<EOF
[databases]
app = host=127.0.0.1 port=$PG_PORT dbname=app
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $BOUNCER_PORT
unix_socket_dir =
auth_type = scram-sha-256
auth_file = $WORK/userlist.txt
pool_mode = transaction
max_client_conn = 400
default_pool_size = 20
client_tls_sslmode = require
client_tls_cert_file = $WORK/server.crt
client_tls_key_file = $WORK/server.key
server_tls_sslmode = require
logfile = $WORK/pgbouncer.log
EOF
if [ "$(id -u)" = 0 ]; then chown postgres "$WORK/userlist.txt" "$WORK/pgbouncer.ini"; fi
"${AS[@]}" setsid pgbouncer "$WORK/pgbouncer.ini" >/dev/null 2>&1 &
BOUNCER_PID=$!
sleep 1

declare -A TARGET=(
  [direct]="$DIRECT"
  [replicator]="host=127.0.0.1 port=$PROXY_PORT user=app dbname=app sslmode=require"
  [pgbouncer]="host=127.0.0.1 port=$BOUNCER_PORT user=app dbname=app sslmode=require"
)
for t in direct replicator pgbouncer; do
  "$PGBIN/psql" "${TARGET[$t]}" -X -A -t -c 'SELECT 1' >/dev/null \
    || { echo "$t does not answer over TLS" >&2; exit 1; }
done

RESULTS="$WORK/results.tsv"
for round in $(seq "$ROUNDS"); do
  for workload in select-only connect-per-transaction; do
    extra=()
    [ "$workload" = connect-per-transaction ] && extra=(-C)
    for t in direct replicator pgbouncer; do
      tps=$("$PGBIN/pgbench" -n -S "${extra[@]}" -c "$CLIENTS" -j 2 -T "$DURATION" "${TARGET[$t]}" 2>/dev/null \
        | awk '/^tps/ {print $3; exit}')
      printf '%s\t%s\t%s\t%s\n' "$round" "$workload" "$t" "${tps:-0}" >>"$RESULTS"
    done
  done
  echo "round $round done" >&2
done

python3 - "$RESULTS" <<'EOF'
import collections, statistics, sys
cells = collections.defaultdict(list)
rounds = collections.defaultdict(dict)
for line in open(sys.argv[1]):
    r, workload, target, tps = line.split("\t")
    cells[(workload, target)].append(float(tps))
    rounds[(workload, r)][target] = float(tps)
print(f"{'workload':<26}{'target':<12}{'median tps':>12}{'ratio to direct (median of rounds)':>38}")
for workload in ["select-only", "connect-per-transaction"]:
    for target in ["direct", "replicator", "pgbouncer"]:
        ratios = [v[target] / v["direct"] for (w, _), v in rounds.items()
                  if w == workload and v.get("direct")]
        print(f"{workload:<26}{target:<12}{statistics.median(cells[(workload, target)]):>12.0f}"
              f"{statistics.median(ratios):>38.2f}")
    pairs = [v["replicator"] / v["pgbouncer"] for (w, _), v in rounds.items()
             if w == workload and v.get("pgbouncer")]
    print(f"{workload:<26}replicator / pgbouncer, median of rounds: {statistics.median(pairs):.2f} "
          f"(min {min(pairs):.2f}, max {max(pairs):.2f})")
EOF
