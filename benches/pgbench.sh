#!/usr/bin/env bash
# End-to-end throughput: pgbench against the primary directly, through PgBouncer
# (transaction pooling) and through replicator, interleaved in one run so that machine
# noise hits all three alike. Prints medians and each target's ratio to direct.
#
#   benches/pgbench.sh                 # defaults: 10 rounds of 4 s per cell
#   ROUNDS=10 DURATION=10 benches/pgbench.sh
#   ONLY='c1$' benches/pgbench.sh     # only the workloads whose name matches
#   ONLY='tpc-b simple' ONLY_TARGETS='pgbouncer|primary-only' ROUNDS=30 DURATION=3 \
#     benches/pgbench.sh              # one pairing, many short rounds: a tight interval
#   BUILD=plain benches/pgbench.sh    # measure a plain `cargo build --release` binary
#   BIN=path/to/replicator benches/pgbench.sh   # measure that binary, build nothing
#   BEFORE=path/to/older/replicator benches/pgbench.sh   # also that binary, primary-only,
#                                     # as target replicator-before: a change's effect
#                                     # measured in the same run, paired by round
#
# By default the proxy measured is the profile-guided build (scripts/pgo-build.sh), the
# one the Docker image ships (it needs rustup's llvm-tools, added when missing);
# BUILD=plain measures the ordinary release build instead.
#
# Needs the PostgreSQL server binaries and pgbench; PgBouncer is used when installed
# (Debian: apt-get install pgbouncer) and skipped otherwise. Every server runs in its own
# session (setsid), so the kernel's autogroup scheduling gives each its own CPU share
# instead of lumping the proxy together with pgbench.
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-10}
DURATION=${DURATION:-4}
CLIENTS=${CLIENTS:-8}
SCALE=${SCALE:-10}
ONLY=${ONLY:-.}   # regular expression: run only the workloads whose name matches
ONLY_TARGETS=${ONLY_TARGETS:-.}   # regular expression: run only the targets whose name matches
PROXY_PORT=${PROXY_PORT:-16432}
BOUNCER_PORT=${BOUNCER_PORT:-16433}
WORK=$(mktemp -d /tmp/replicator-bench.XXXXXX)
chmod 755 "$WORK"
RESULTS="$WORK/results.tsv"
export PGPASSWORD=secret

# shellcheck source=benches/proxy-binary.sh
source benches/proxy-binary.sh
PGBIN=$( (pg_config --bindir 2>/dev/null; ls -d /usr/lib/postgresql/*/bin 2>/dev/null) | while read -r d; do [ -x "$d/pgbench" ] && echo "$d"; done | tail -1)
PGBENCH="$PGBIN/pgbench"

cleanup() {
  for pid in "${BOUNCER_PID:-}" "${SOLO_PID:-}" "${RYW_PID:-}" "${BEFORE_PID:-}"; do
    if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; fi
  done
  if [ -n "${DEMO_PID:-}" ] && kill -INT "$DEMO_PID" 2>/dev/null; then sleep 2; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

# Cluster + proxy (the demo: a primary, two streaming replicas, replicator in front).
setsid "$BIN" demo --listen "127.0.0.1:$PROXY_PORT" > "$WORK/demo.log" 2>&1 &
DEMO_PID=$!
for _ in $(seq 1 120); do grep -q "^connect:" "$WORK/demo.log" && break; sleep 0.5; done
grep -q "^connect:" "$WORK/demo.log" || { cat "$WORK/demo.log"; echo "demo did not start"; exit 1; }
PRIMARY_PORT=$(awk '/^  primary/ {split($2, a, ":"); print a[2]}' "$WORK/demo.log")

"$PGBENCH" -h 127.0.0.1 -p "$PRIMARY_PORT" -U app -i -q -s "$SCALE" app > "$WORK/init.log" 2>&1
sleep 2 # let the replicas replay the initial load

# A second replicator whose project has only the primary: the proxy's own overhead,
# without the effect of running reads on hot standbys that share these cores.
SOLO_PORT=$((PROXY_PORT + 2))
cat > "$WORK/primary-only.toml" <<TOML
[proxy]
listen = "127.0.0.1:$SOLO_PORT"
admin_listen = "127.0.0.1:$((PROXY_PORT + 3))"
state_file = "$WORK/state.json"
[[users]]
name = "app"
password = "secret"
[projects.app]
[[projects.app.replicas]]
name = "master"
role = "primary"
uri = "postgresql://127.0.0.1:$PRIMARY_PORT/app"
TOML
setsid "$BIN" serve --config "$WORK/primary-only.toml" > "$WORK/solo.log" 2>&1 &
SOLO_PID=$!

# A third one with read-your-writes on: what the guarantee costs, against the demo
# proxy (same replicas, same strategy, without it).
RYW_PORT=$((PROXY_PORT + 4))
{
  printf '[proxy]\nlisten = "127.0.0.1:%s"\nadmin_listen = "127.0.0.1:%s"\nstate_file = "%s"\n' \
    "$RYW_PORT" "$((PROXY_PORT + 5))" "$WORK/state-ryw.json"
  printf '[[users]]\nname = "app"\npassword = "secret"\n'
  printf '[projects.app]\nread_your_writes = true\n'
  printf '[[projects.app.replicas]]\nname = "master"\nrole = "primary"\nuri = "postgresql://127.0.0.1:%s/app"\n' "$PRIMARY_PORT"
  i=0
  while read -r port; do
    i=$((i + 1))
    printf '[[projects.app.replicas]]\nname = "replica-%s"\nrole = "replica"\nuri = "postgresql://127.0.0.1:%s/app"\n' "$i" "$port"
  done < <(awk '/^  replica/ {split($2, a, ":"); print a[2]}' "$WORK/demo.log")
} > "$WORK/ryw.toml"
setsid "$BIN" serve --config "$WORK/ryw.toml" > "$WORK/ryw.log" 2>&1 &
RYW_PID=$!
sleep 0.5

PROXIES="replicator:$PROXY_PORT replicator-primary-only:$SOLO_PORT replicator-ryw:$RYW_PORT"
if [ -n "${BEFORE:-}" ]; then
  # The same primary-only config, served by the older binary.
  BEFORE_PORT=$((PROXY_PORT + 6))
  sed -e "s/:$SOLO_PORT\"/:$BEFORE_PORT\"/" -e "s/:$((PROXY_PORT + 3))\"/:$((PROXY_PORT + 7))\"/" \
    -e "s|$WORK/state.json|$WORK/state-before.json|" "$WORK/primary-only.toml" > "$WORK/before.toml"
  setsid "$BEFORE" serve --config "$WORK/before.toml" > "$WORK/before.log" 2>&1 &
  BEFORE_PID=$!
  sleep 0.5
  PROXIES="$PROXIES replicator-before:$BEFORE_PORT"
fi
TARGETS="direct:$PRIMARY_PORT $PROXIES"
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
max_client_conn = 500
logfile = $WORK/pgbouncer.log
pidfile = $WORK/pgbouncer.pid
INI
  echo '"app" "secret"' > "$WORK/userlist.txt"
  as_user=()
  [ "$(id -u)" = 0 ] && { chown -R postgres "$WORK"; as_user=(-u postgres); }
  setsid pgbouncer -d "${as_user[@]}" "$WORK/pgbouncer.ini"
  for _ in $(seq 1 50); do [ -s "$WORK/pgbouncer.pid" ] && break; sleep 0.1; done
  BOUNCER_PID=$(cat "$WORK/pgbouncer.pid")
  TARGETS="direct:$PRIMARY_PORT pgbouncer:$BOUNCER_PORT $PROXIES"
fi

# workload name | pgbench arguments
WORKLOADS=(
  "select-only simple c$CLIENTS|-S -M simple -c $CLIENTS -j 2"
  "select-only extended c$CLIENTS|-S -M extended -c $CLIENTS -j 2"
  "select-only prepared c$CLIENTS|-S -M prepared -c $CLIENTS -j 2"
  "tpc-b simple c$CLIENTS|-M simple -c $CLIENTS -j 2"
  "tpc-b extended c$CLIENTS|-M extended -c $CLIENTS -j 2"
  "tpc-b prepared c$CLIENTS|-M prepared -c $CLIENTS -j 2"
  "select-only simple c1|-S -M simple -c 1"
  "write-then-read extended c$CLIENTS|-f $WORK/write-then-read.sql -D scale=$SCALE -M extended -c $CLIENTS -j 2"
)

# Each client updates an account and reads it back at once: the pattern
# read-your-writes exists for.
cat > "$WORK/write-then-read.sql" <<'SQL'
\set aid random(1, 100000 * :scale)
\set delta random(-5000, 5000)
UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
SQL

# Writing workloads leave dead row versions in the small pgbench tables and rows in
# pgbench_history, which slow every later cell until autovacuum comes by. pgbench
# itself vacuums before a run unless told not to (-n, used here so that no proxy runs
# maintenance); the same reset (plus a vacuum of pgbench_accounts, which
# write-then-read updates) runs here, on the primary directly, before every writing
# cell, so that each target starts from the same state.
PSQL="$PGBIN/psql"
reset_tables() {
  for sql in "VACUUM pgbench_branches" "VACUUM pgbench_tellers" "VACUUM pgbench_accounts" \
             "TRUNCATE pgbench_history"; do
    "$PSQL" -q -h 127.0.0.1 -p "$PRIMARY_PORT" -U app -d app -c "$sql" > /dev/null 2>&1 || true
  done
}

read -r -a ALL_TARGETS <<< "$TARGETS"
TARGET_LIST=()
for t in "${ALL_TARGETS[@]}"; do
  [[ "${t%%:*}" =~ $ONLY_TARGETS ]] && TARGET_LIST+=("$t")
done
[ ${#TARGET_LIST[@]} -gt 0 ] || { echo "ONLY_TARGETS=$ONLY_TARGETS matches none of: $TARGETS" >&2; exit 1; }
: > "$RESULTS"
for round in $(seq 1 "$ROUNDS"); do
  # Each round starts with a different target, and every other round runs in reverse,
  # so that no target always runs first, or always right after the same neighbour
  # (whose run leaves the caches, and the servers it used, in its own state). With five
  # targets, ten rounds visit every starting point in both directions.
  n=${#TARGET_LIST[@]}
  shift_by=$(( (round - 1) / 2 % n ))
  ordered=("${TARGET_LIST[@]:shift_by}" "${TARGET_LIST[@]:0:shift_by}")
  if [ $((round % 2)) = 0 ]; then
    reversed=()
    for ((i = ${#ordered[@]} - 1; i >= 0; i--)); do reversed+=("${ordered[i]}"); done
    ordered=("${reversed[@]}")
  fi
  for w in "${WORKLOADS[@]}"; do
    name=${w%%|*}; args=${w#*|}
    [[ "$name" =~ $ONLY ]] || continue
    for t in "${ordered[@]}"; do
      target=${t%%:*}; port=${t#*:}
      [[ "$args" == -S* ]] || reset_tables
      # shellcheck disable=SC2086
      out=$("$PGBENCH" -h 127.0.0.1 -p "$port" -U app -n -T "$DURATION" $args app 2>&1 || true)
      tps=$(echo "$out" | awk '/^tps = / {print $3}')
      lat=$(echo "$out" | awk '/^latency average = / {print $4}')
      failed=$(echo "$out" | awk '/number of failed transactions:/ {print $5}')
      if [ -z "$tps" ] || { [ -n "$failed" ] && [ "$failed" != "0" ]; } || echo "$out" | grep -q "aborted"; then tps=fail; lat=fail; fi
      printf '%s\t%s\t%s\t%s\t%s\n' "$round" "$name" "$target" "$tps" "$lat" >> "$RESULTS"
      echo "round $round  $name  $target  tps=$tps  latency_ms=$lat" >&2
    done
  done
done

python3 - "$RESULTS" "$ROUNDS" "$DURATION" <<'PY'
import sys, statistics, collections
sys.path.insert(0, "benches")
from paired import summary
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
cells = collections.defaultdict(list)
by_round = {}
order, targets = [], []
for rnd, w, t, tps, lat in rows:
    if w not in order: order.append(w)
    if t not in targets: targets.append(t)
    cells[(w, t)].append((tps, lat))
    by_round[(rnd, w, t)] = tps
def med(vals, i):
    nums = [float(v[i]) for v in vals if v[i] != "fail"]
    return statistics.median(nums) if len(nums) == len(vals) and nums else None
print(f"\nmedians of {sys.argv[2]} interleaved rounds of {sys.argv[3]} s each; ratio = tps / direct tps\n")
head = f"| workload | " + " | ".join(f"{t} tps | {t} lat ms | {t} ratio" for t in targets) + " |"
print(head)
print("|" + "---|" * (1 + 3 * len(targets)))
for w in order:
    direct = med(cells[(w, "direct")], 0)
    parts = []
    for t in targets:
        tps, lat = med(cells[(w, t)], 0), med(cells[(w, t)], 1)
        if tps is None:
            parts += ["fail", "-", "-"]
        else:
            ratio = f"{tps / direct:.2f}x" if direct else "-"
            parts += [f"{tps:.0f}", f"{lat:.3f}", ratio]
    print(f"| {w} | " + " | ".join(parts) + " |")

# The same comparison paired by round: each replicator target against PgBouncer (and
# against the older binary, with BEFORE) in the same round (minutes apart at most),
# which cancels the machine's slow drifts that the medians above keep.
for baseline in [b for b in ("pgbouncer", "replicator-before") if b in targets]:
    others = [t for t in targets if t.startswith("replicator") and t != baseline]
    rounds = sorted({r for r, _, _ in by_round}, key=int)
    print(f"\nper-round TPS ratio to {baseline} in the same round: geometric mean, "
          "[95% confidence interval], (lowest-highest)\n")
    print("| workload | " + " | ".join(others) + " |")
    print("|" + "---|" * (1 + len(others)))
    for w in order:
        parts = []
        for t in others:
            ratios = []
            for r in rounds:
                b, x = by_round.get((r, w, baseline)), by_round.get((r, w, t))
                if b in (None, "fail") or x in (None, "fail"):
                    ratios = None
                    break
                ratios.append(float(x) / float(b))
            parts.append(summary(ratios or []))
        print(f"| {w} | " + " | ".join(parts) + " |")
PY
