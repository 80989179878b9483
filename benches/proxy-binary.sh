# Sourced by the benchmark scripts: which replicator binary they measure. Sets BIN and
# BUILD from the environment:
#   BUILD=pgo (default)  the profile-guided build of scripts/pgo-build.sh, what the
#                        Docker image ships
#   BUILD=plain          a plain release build
#   BIN=path             a binary already built (BUILD is then "given")
# shellcheck shell=bash
BUILD=${BUILD:-pgo}
if [ -n "${BIN:-}" ]; then
  BUILD=given
  [ -x "$BIN" ] || { echo "BIN=$BIN is not an executable" >&2; exit 1; }
else
  case "$BUILD" in
    pgo) BIN=$(scripts/pgo-build.sh | tail -1) ;;
    plain) BIN=target/release/replicator; cargo build --release --quiet ;;
    *) echo "BUILD must be pgo or plain" >&2; exit 1 ;;
  esac
fi
echo "measuring $BIN ($BUILD build)" >&2
