#!/usr/bin/env bash
# Soak: a bounded run of many clients that connect, query, pipeline, COPY, stream big
# results, read slowly, disconnect in the middle of a query or get killed, while a
# replica restarts and the config is reloaded. Prints the proxy's RSS at the start and
# the end, the errors well-behaved clients saw (goal 0), panics (0) and server
# connections still busy once every client is gone (0). Then, against PgBouncer in the
# same run: the RSS of many idle clients and the time to accept them, and pgbench -S at
# 64 and 512 clients.
#
#   benches/soak.sh                                # 10 minutes, 200 clients, 10,000 idle
#   SOAK_SECONDS=120 IDLE_CLIENTS=2000 benches/soak.sh
#   KEEP_WORK=1 benches/soak.sh                   # keep the logs (proxy, PgBouncer, driver)
#   PARTS='idle pgbench' benches/soak.sh          # only some of: soak idle pgbench
#   BUILD=plain benches/soak.sh                   # a plain release build (default: the
#                                                 # profile-guided one the image ships)
#   BIN=path/to/replicator benches/soak.sh        # a binary already built
#
# Needs the PostgreSQL server binaries, pgbench and psql; PgBouncer is compared when
# installed (Debian: apt-get install pgbouncer).
set -euo pipefail
cd "$(dirname "$0")/.."

SOAK_SECONDS=${SOAK_SECONDS:-600}
SOAK_CLIENTS=${SOAK_CLIENTS:-200}
IDLE_CLIENTS=${IDLE_CLIENTS:-10000}
PGBENCH_SECONDS=${PGBENCH_SECONDS:-15}
PGBENCH_ROUNDS=${PGBENCH_ROUNDS:-5}
PARTS=${PARTS:-soak idle pgbench}
PROXY_PORT=${PROXY_PORT:-17432}
BOUNCER_PORT=${BOUNCER_PORT:-17433}
WORK=$(mktemp -d /tmp/replicator-soak.XXXXXX)
chmod 755 "$WORK"
export PGPASSWORD=secret

# Each idle client is a socket in the driver and one in the proxy.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

part() { [[ " $PARTS " == *" $1 "* ]]; }

# The client driver (benches/soak.rs), for the soak and the idle clients.
DRIVER=
if part soak || part idle; then
  cargo build --release --quiet --bench soak
  DRIVER=$(find target/release/deps -maxdepth 1 -type f -executable -name 'soak-*' -printf '%T@ %p\n' | sort -n | tail -1 | cut -d' ' -f2)
fi
# shellcheck source=benches/proxy-binary.sh
source benches/proxy-binary.sh
PGBIN=$( (pg_config --bindir 2>/dev/null; ls -d /usr/lib/postgresql/*/bin 2>/dev/null) | while read -r d; do [ -x "$d/pgbench" ] && echo "$d"; done | tail -1)

cleanup() {
  for pid in "${LOAD_PID:-}" "${PROXY_PID:-}" "${SOLO_PID:-}" "${BOUNCER_PID:-}"; do
    if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; fi
  done
  if [ -n "${DEMO_PID:-}" ] && kill -INT "$DEMO_PID" 2>/dev/null; then sleep 2; fi
  if [ -n "${KEEP_WORK:-}" ]; then echo "logs kept in $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
value() { awk -v k="$1" '$1 == k {print $2}' "$2"; }
# The cluster (the demo's primary and two replicas; its own proxy is not used).
setsid "$BIN" demo --listen "127.0.0.1:$((PROXY_PORT + 10))" > "$WORK/demo.log" 2>&1 &
DEMO_PID=$!
for _ in $(seq 1 120); do grep -q "^connect:" "$WORK/demo.log" && break; sleep 0.5; done
grep -q "^connect:" "$WORK/demo.log" || { cat "$WORK/demo.log"; echo "demo did not start"; exit 1; }
PRIMARY_PORT=$(awk '/^  primary/ {split($2, a, ":"); print a[2]}' "$WORK/demo.log")
mapfile -t REPLICA_PORTS < <(awk '/^  replica/ {split($2, a, ":"); print a[2]}' "$WORK/demo.log")
CLUSTER_DIR=$(dirname "$(dirname "$(grep -o '/[^ ]*/primary/postmaster.pid' "$WORK/demo.log" | head -1)")")
SUPERUSER_URL=$(grep -o "postgresql://[^@]*@127.0.0.1:${REPLICA_PORTS[0]}" "$WORK/demo.log" | head -1)
SUPERUSER=${SUPERUSER_URL#postgresql://}
SUPERUSER=${SUPERUSER%@*}

{
  printf '[proxy]\nlisten = "127.0.0.1:%s"\nadmin_listen = "127.0.0.1:%s"\nstate_file = "%s"\n' \
    "$PROXY_PORT" "$((PROXY_PORT + 5))" "$WORK/state.json"
  printf 'max_client_conn = %s\nclient_write_timeout_ms = 5000\nidle_transaction_timeout_ms = 30000\nquery_timeout_ms = 60000\n' \
    "$((IDLE_CLIENTS + SOAK_CLIENTS + 100))"
  printf '[[users]]\nname = "app"\npassword = "secret"\nadmin = true\n'
  printf '[projects.app]\n'
  printf '[[projects.app.replicas]]\nname = "primary"\nrole = "primary"\nuri = "postgresql://127.0.0.1:%s/app"\n' "$PRIMARY_PORT"
  i=0
  for port in "${REPLICA_PORTS[@]}"; do
    i=$((i + 1))
    printf '[[projects.app.replicas]]\nname = "replica-%s"\nrole = "replica"\nuri = "postgresql://127.0.0.1:%s/app"\n' "$i" "$port"
  done
} > "$WORK/soak.toml"
setsid "$BIN" serve --config "$WORK/soak.toml" > "$WORK/proxy.log" 2>&1 &
PROXY_PID=$!
for _ in $(seq 1 50); do "$PGBIN/psql" -q -h 127.0.0.1 -p "$PROXY_PORT" -U app -d app -c 'SELECT 1' > /dev/null 2>&1 && break; sleep 0.2; done

if command -v pgbouncer > /dev/null; then
  cat > "$WORK/pgbouncer.ini" <<INI
[databases]
app = host=127.0.0.1 port=$PRIMARY_PORT dbname=app
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $BOUNCER_PORT
unix_socket_dir =
auth_type = scram-sha-256
auth_file = $WORK/userlist.txt
pool_mode = transaction
default_pool_size = 20
max_client_conn = $((IDLE_CLIENTS + 1000))
logfile = $WORK/pgbouncer.log
pidfile = $WORK/pgbouncer.pid
INI
  echo '"app" "secret"' > "$WORK/userlist.txt"
  as_user=()
  [ "$(id -u)" = 0 ] && { chown -R postgres "$WORK"; as_user=(-u postgres); }
  setsid pgbouncer -d "${as_user[@]}" "$WORK/pgbouncer.ini"
  for _ in $(seq 1 50); do [ -s "$WORK/pgbouncer.pid" ] && break; sleep 0.1; done
  [ -s "$WORK/pgbouncer.pid" ] || { cat "$WORK/pgbouncer.log"; echo "pgbouncer did not start"; exit 1; }
  BOUNCER_PID=$(cat "$WORK/pgbouncer.pid")
fi

as_postgres() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

if part soak; then
echo "soak: $SOAK_CLIENTS clients for $SOAK_SECONDS s (one in ten misbehaving)" >&2
RSS_START=$(rss_kb "$PROXY_PID")
"$DRIVER" load "127.0.0.1:$PROXY_PORT" "$SOAK_SECONDS" "$SOAK_CLIENTS" > "$WORK/load.out" &
LOAD_PID=$!
sleep $((SOAK_SECONDS / 3))
echo "soak: restarting replica 1" >&2
as_postgres "$PGBIN/pg_ctl" -D "$CLUSTER_DIR/replica1" -m fast -w restart -l "$CLUSTER_DIR/replica1.log" > /dev/null
sleep $((SOAK_SECONDS / 6))
echo "soak: reloading the config" >&2
sed -i 's/^query_timeout_ms = 60000$/query_timeout_ms = 60001/' "$WORK/soak.toml"
wait "$LOAD_PID"
LOAD_PID=
# Connections left busy by the misbehaving clients are recovered in the background.
sleep 12
RSS_END=$(rss_kb "$PROXY_PID")
PANICS=$(grep -c 'panicked' "$WORK/proxy.log" || true)
BUSY=$("$PGBIN/psql" -At -h 127.0.0.1 -p "$PROXY_PORT" -U app -d replicator -c 'SHOW POOLS' \
  | awk -F'|' '{busy += $4} END {print busy + 0}')
STUCK=0
for port in "$PRIMARY_PORT" "${REPLICA_PORTS[@]}"; do
  n=$(PGPASSWORD=${SUPERUSER#*:} "$PGBIN/psql" -At -h 127.0.0.1 -p "$port" -U "${SUPERUSER%%:*}" -d app \
    -c "SELECT count(*) FROM pg_stat_activity WHERE usename = 'app' AND (state LIKE 'idle in transaction%' OR (state = 'active' AND now() - query_start > interval '5 seconds'))")
  STUCK=$((STUCK + n))
done
fi

# A second proxy, fresh, whose project is the primary alone with PgBouncer's pool size:
# idle clients are measured on it (the soak proxy's heap holds what the soak freed), and
# pgbench compares it with PgBouncer doing the same work.
SOLO_PORT=$((PROXY_PORT + 2))
start_solo() {
  [ -n "${SOLO_PID:-}" ] && return
  {
    printf '[proxy]\nlisten = "127.0.0.1:%s"\nadmin_listen = "127.0.0.1:%s"\nstate_file = "%s"\n' \
      "$SOLO_PORT" "$((PROXY_PORT + 3))" "$WORK/state-solo.json"
    printf 'max_client_conn = %s\n' "$((IDLE_CLIENTS + 1000))"
    printf '[[users]]\nname = "app"\npassword = "secret"\n'
    printf '[projects.app]\npool_size = 20\n'
    printf '[[projects.app.replicas]]\nname = "primary"\nrole = "primary"\nuri = "postgresql://127.0.0.1:%s/app"\n' "$PRIMARY_PORT"
  } > "$WORK/solo.toml"
  setsid "$BIN" serve --config "$WORK/solo.toml" > "$WORK/solo.log" 2>&1 &
  SOLO_PID=$!
  for _ in $(seq 1 50); do "$PGBIN/psql" -q -h 127.0.0.1 -p "$SOLO_PORT" -U app -d app -c 'SELECT 1' > /dev/null 2>&1 && break; sleep 0.2; done
}

idle_run() { # name port pid
  "$DRIVER" idle "127.0.0.1:$2" "$IDLE_CLIENTS" "$3" > "$WORK/idle-$1.out"
}
if part idle; then
  echo "idle: $IDLE_CLIENTS clients" >&2
  start_solo
  idle_run replicator "$SOLO_PORT" "$SOLO_PID"
  if [ -n "${BOUNCER_PID:-}" ]; then idle_run pgbouncer "$BOUNCER_PORT" "$BOUNCER_PID"; fi
fi

if part pgbench; then
  echo "pgbench -S at 64 and 512 clients" >&2
  "$PGBIN/pgbench" -h 127.0.0.1 -p "$PRIMARY_PORT" -U app -i -q -s 10 app > "$WORK/init.log" 2>&1
  sleep 2
  start_solo
  TPS_TARGETS=("replicator-primary-only:$SOLO_PORT" "replicator:$PROXY_PORT")
  if [ -n "${BOUNCER_PID:-}" ]; then TPS_TARGETS+=("pgbouncer:$BOUNCER_PORT"); fi
  : > "$WORK/tps.tsv"
  for round in $(seq 1 "$PGBENCH_ROUNDS"); do
    # Every other round takes the targets in reverse order: none always runs first.
    ORDER=("${TPS_TARGETS[@]}")
    if [ $((round % 2)) = 0 ]; then
      ORDER=()
      for ((i = ${#TPS_TARGETS[@]} - 1; i >= 0; i--)); do ORDER+=("${TPS_TARGETS[i]}"); done
    fi
    for clients in 64 512; do
      for target in "${ORDER[@]}"; do
        tps=$("$PGBIN/pgbench" -h 127.0.0.1 -p "${target#*:}" -U app -n -S -M simple -c "$clients" -j 2 \
          -T "$PGBENCH_SECONDS" app 2>>"$WORK/pgbench.err" | awk '/^tps = / {print $3}')
        printf '%s\t%s\t%s\t%s\n' "$round" "$clients" "${target%%:*}" "${tps:-0}" >> "$WORK/tps.tsv"
      done
    done
  done
fi

if part soak; then
echo
echo "## soak ($SOAK_CLIENTS clients, $SOAK_SECONDS s, a replica restarted, one reload)"
echo
echo "| figure | value |"
echo "|---|---|"
echo "| proxy RSS at start | $((RSS_START / 1024)) MB |"
echo "| proxy RSS at end | $((RSS_END / 1024)) MB |"
echo "| well-behaved sessions completed | $(value load_sessions_ok "$WORK/load.out") |"
echo "| errors seen by well-behaved clients | $(value load_errors "$WORK/load.out") |"
echo "| misbehaving sessions | $(value load_misbehaving_sessions "$WORK/load.out") |"
echo "| panics in the proxy log | $PANICS |"
echo "| pool connections still busy after the run | $BUSY |"
echo "| server sessions of app left in a transaction or running for 5 s after the run | $STUCK |"
grep '^load_error_example' "$WORK/load.out" | sed 's/^load_error_example/  error:/' || true
fi
if part idle; then
echo
echo "## $IDLE_CLIENTS idle clients"
echo
echo "| target | accepted | seconds to accept | RSS before MB | RSS after MB | kB per client |"
echo "|---|---|---|---|---|---|"
for name in replicator pgbouncer; do
  f="$WORK/idle-$name.out"
  [ -f "$f" ] || continue
  echo "| $name | $(value idle_clients "$f") | $(value idle_seconds "$f") | $(( $(value idle_rss_before_kb "$f") / 1024 )) | $(( $(value idle_rss_after_kb "$f") / 1024 )) | $(value idle_kb_per_client "$f") |"
done
fi
if part pgbench; then
echo
echo "## pgbench -S (simple protocol), $PGBENCH_ROUNDS interleaved rounds of $PGBENCH_SECONDS s ($BUILD build)"
echo
echo "replicator-primary-only: a project of the primary alone, pool_size 20, as PgBouncer's;"
echo "replicator: the soak proxy, whose reads go to the two replicas on the same cores."
echo "Ratio: primary-only TPS over PgBouncer's in the same round (minutes apart at most, which"
echo "cancels the machine's slow drifts): geometric mean, [95% interval], (lowest-highest)."
echo
python3 - "$WORK/tps.tsv" <<'PY'
import sys, statistics
sys.path.insert(0, "benches")
from paired import summary
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
tps = {(r, c, t): float(v) for r, c, t, v in rows}
rounds = sorted({r for r, _, _, _ in rows}, key=int)
def median(clients, target):
    vals = [tps[k] for k in tps if k[1] == clients and k[2] == target]
    return f"{statistics.median(vals):.0f}" if vals else "-"
print("| clients | replicator-primary-only tps | replicator tps | pgbouncer tps | primary-only / pgbouncer |")
print("|---|---|---|---|---|")
for clients in ("64", "512"):
    ratios = [tps[(r, clients, "replicator-primary-only")] / tps[(r, clients, "pgbouncer")]
              for r in rounds
              if tps.get((r, clients, "pgbouncer"), 0) > 0
              and tps.get((r, clients, "replicator-primary-only"), 0) > 0]
    ratio = summary(ratios)
    print(f"| {clients} | {median(clients, 'replicator-primary-only')} | "
          f"{median(clients, 'replicator')} | {median(clients, 'pgbouncer')} | {ratio} |")
PY
fi
