#!/usr/bin/env bash
# A driver's own test suite through the proxy: asyncpg's (from its PyPI source
# distribution, run with pytest) against the primary directly, then through replicator
# in session mode and in transaction mode. Prints the tests that fail only through the
# proxy, per mode; the README lists them with their reasons.
#
#   benches/driver-suite.sh                    # asyncpg 0.32.0, all tests
#   ASYNCPG=0.32.0 TESTS='tests/test_prepare.py' benches/driver-suite.sh
#   BIN=path/to/replicator benches/driver-suite.sh   # that binary, build nothing
#   KEEP=1 benches/driver-suite.sh             # keep the logs and pytest's reports
#
# Needs the PostgreSQL server binaries, Python 3 with venv and pip, and PyPI. The suite
# runs as the cluster's superuser (it creates extensions, types and roles), against
# projects (app, and postgres, which some tests name) whose only node is the primary:
# this measures pooling, not read routing. It
# takes a few minutes per target. Not part of `cargo test` (it needs PyPI and minutes).
set -euo pipefail
cd "$(dirname "$0")/.."

ASYNCPG=${ASYNCPG:-0.32.0}
TESTS=${TESTS:-tests}   # pytest's arguments: files, or nodes such as tests/test_copy.py::TestCopyTo
read -r -a TEST_ARGS <<< "$TESTS"
PROXY_PORT=${PROXY_PORT:-17432}
WORK=$(mktemp -d /tmp/replicator-drivers.XXXXXX)
chmod 755 "$WORK"
CACHE=target/driver-suite
mkdir -p "$CACHE"

if [ -z "${BIN:-}" ]; then
  cargo build --release --quiet
  BIN=target/release/replicator
fi

cleanup() {
  for pid in "${SESSION_PID:-}" "${TX_PID:-}"; do
    if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; fi
  done
  if [ -n "${DEMO_PID:-}" ] && kill -INT "$DEMO_PID" 2>/dev/null; then sleep 2; fi
  if [ -n "${KEEP:-}" ]; then echo "outputs kept in $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

# asyncpg, pytest, and the tests from the source distribution (the wheel has none).
VENV="$CACHE/venv-asyncpg-$ASYNCPG"
if ! "$VENV/bin/python" -c 'import asyncpg, pytest, distro' 2>/dev/null; then
  python3 -m venv "$VENV"
  # distro: test_connect imports it (asyncpg's test extras).
  "$VENV/bin/pip" install --quiet "asyncpg==$ASYNCPG" pytest distro
fi
SRC="$CACHE/asyncpg-$ASYNCPG"
if [ ! -d "$SRC/tests" ]; then
  index=https://pypi.org/pypi/asyncpg/json
  url=$(curl -fsSL "$index" | python3 -c '
import json, sys, urllib.parse
release = json.load(sys.stdin)["releases"][sys.argv[2]]
print(urllib.parse.urljoin(sys.argv[1], [u["url"] for u in release if u["packagetype"] == "sdist"][0]))
' "$index" "$ASYNCPG")
  curl -fsSL "$url" | tar xz -C "$CACHE"
fi
# Run from a folder holding only the tests, so that the installed asyncpg is imported.
cp -r "$SRC/tests" "$WORK/tests"

setsid "$BIN" demo --listen "127.0.0.1:$PROXY_PORT" --admin-listen "127.0.0.1:$((PROXY_PORT + 1))" > "$WORK/demo.log" 2>&1 &
DEMO_PID=$!
for _ in $(seq 1 120); do grep -q "^connect:" "$WORK/demo.log" && break; sleep 0.5; done
grep -q "^connect:" "$WORK/demo.log" || { cat "$WORK/demo.log"; echo "demo did not start"; exit 1; }
PRIMARY_PORT=$(awk '/^  primary/ {split($2, a, ":"); print a[2]}' "$WORK/demo.log")

proxy() { # name port mode
  cat > "$WORK/$1.toml" <<TOML
[proxy]
listen = "127.0.0.1:$2"
admin_listen = "127.0.0.1:$(($2 + 1))"
state_file = "$WORK/$1-state.json"
pool_mode = "$3"
[[users]]
name = "postgres"
password = "postgres"
TOML
  for db in app postgres; do
    printf '[projects.%s]\npool_size = 90\n[[projects.%s.replicas]]\nname = "master"\nrole = "primary"\nuri = "postgresql://127.0.0.1:%s/%s"\n' \
      "$db" "$db" "$PRIMARY_PORT" "$db" >> "$WORK/$1.toml"
  done
  setsid "$BIN" serve --config "$WORK/$1.toml" > "$WORK/$1.log" 2>&1 &
}
proxy session $((PROXY_PORT + 10)) session
SESSION_PID=$!
proxy transaction $((PROXY_PORT + 20)) transaction
TX_PID=$!
sleep 1

run_suite() { # name port
  echo "== asyncpg $ASYNCPG tests: $1" >&2
  (cd "$WORK" && PGHOST=127.0.0.1 PGPORT=$2 PGUSER=postgres PGPASSWORD=postgres PGDATABASE=app \
    timeout 1800 "$OLDPWD/$VENV/bin/pytest" -q -p no:cacheprovider --assert=plain -o junit_family=xunit1 \
    --junitxml="$WORK/$1.xml" "${TEST_ARGS[@]}" > "$WORK/$1.out" 2>&1) || true
  grep -E '(passed|failed|error).* in [0-9.]+s' "$WORK/$1.out" | tail -1 >&2
  # The failing and erroring tests, one per line.
  python3 - "$WORK/$1.xml" > "$WORK/$1.failed" <<'PY'
import sys, xml.etree.ElementTree as ET
for case in ET.parse(sys.argv[1]).iter("testcase"):
    if case.find("failure") is not None or case.find("error") is not None:
        print(f'{case.get("classname")}.{case.get("name")}')
PY
}
run_suite direct "$PRIMARY_PORT"
run_suite session $((PROXY_PORT + 10))
run_suite transaction $((PROXY_PORT + 20))

for mode in session transaction; do
  echo
  echo "== failing only through the proxy, $mode mode:"
  comm -13 <(sort "$WORK/direct.failed") <(sort "$WORK/$mode.failed") | while read -r test; do
    echo "$test"
    # The first line of the failure's message, to say why.
    python3 - "$WORK/$mode.xml" "$test" <<'PY'
import sys, xml.etree.ElementTree as ET
for case in ET.parse(sys.argv[1]).iter("testcase"):
    if f'{case.get("classname")}.{case.get("name")}' == sys.argv[2]:
        node = case.find("failure")
        if node is None:
            node = case.find("error")
        print("    " + (node.get("message") or "").splitlines()[0][:200] if node.get("message") else "")
PY
  done
done
