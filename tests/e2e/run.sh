#!/usr/bin/env bash
# End-to-end suite: real REAPI clients and servers from ../shared/reapi-lab
# against a real `outpost serve`. Each test is a script beside this one.
#   OUTPOST_E2E_INSTALL=1  install the lab (Bazel 4.2.3, BuildStream 2.8.1 etc.) when
#                          missing (CI does; WITH_BST=1 setup.sh, about a minute more)
# Without the lab and without OUTPOST_E2E_INSTALL=1, tests skip with a message.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
export LAB=${LAB:-$root/../shared/reapi-lab}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/outpost-build}"
export OUTPOST_BIN="$CARGO_TARGET_DIR/release/outpost"

if [ ! -d "$LAB" ]; then
  echo "e2e: SKIP: reapi-lab not found at $LAB" >&2; exit 0
fi
. "$LAB/env.sh"
if [ ! -x /usr/bin/bazel ] || [ ! -x "$BST_VENV/bin/bst" ]; then
  if [ "${OUTPOST_E2E_INSTALL:-0}" = 1 ]; then
    echo "e2e: installing the REAPI lab (Bazel 4.2.3, BuildGrid, buildbox-casd, BuildStream 2.8.1)" >&2
    WITH_BST=1 "$LAB/setup.sh"
  elif [ ! -x /usr/bin/bazel ]; then
    echo "e2e: SKIP: Bazel 4.2.3 is not installed (run $LAB/setup.sh or set OUTPOST_E2E_INSTALL=1)" >&2
    exit 0
  fi
fi
(cd "$root" && cargo build --release --locked --bin outpost)

failed=0
for t in "$here"/test_*.sh; do
  name=$(basename "$t" .sh)
  echo "== e2e $name"
  if "$t"; then echo "== e2e $name: PASS"; else echo "== e2e $name: FAIL"; failed=1; fi
done
exit $failed
