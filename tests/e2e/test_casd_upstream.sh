#!/usr/bin/env bash
# Outpost as a caching proxy in front of a real upstream, buildbox-casd 1.3.39
# (plain CAS + ActionCache). Bazel 4.2.3 builds the lab workspace through
# Outpost A (--remote_cache), which writes through to casd. Then a second
# Outpost B with an empty store, in front of the same casd, serves Bazel's
# rebuild (fresh output base) from the upstream: every action that casd
# itself would serve must be a remote-cache hit.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

if [ ! -x "$CASD_OLD" ]; then
  echo "buildbox-casd 1.3.39 is not installed ($CASD_OLD); run $LAB/setup.sh"; exit 1
fi
if ! "$OUTPOST_BIN" serve --help 2>&1 | grep -q -- '--upstream'; then
  echo "outpost serve has no --upstream flag: the upstream proxy is not built yet"; exit 1
fi

casd_port=$(free_port)
stop_casd() { "$LAB/casd_proxy_stop.sh" "$casd_port" >/dev/null 2>&1 || true; rm -rf "$LAB_TMP/casd-$casd_port"; }
trap 'stop_casd; cleanup_e2e' EXIT
"$LAB/casd_server.sh" "$casd_port"
upstream="grpc://127.0.0.1:$casd_port"

# build NAME PORT [EXTRA_FLAGS]: one Bazel build (fresh output base) through
# Outpost NAME; prints its summary; sets RESULT_LINE.
build() {
  local out
  out=$(MODE=cache EXTRA_FLAGS="${3:-}" "$LAB/bazel_build.sh" "grpc://127.0.0.1:$2" 2>&1) || {
    echo "$out"; echo "bazel build through outpost $1 failed"
    echo "---- outpost $1 log"; tail -30 "$E2E_TMP/$1/outpost.log"; exit 1; }
  echo "$out" | grep -E '^\[|^RESULT' | sed "s/^/[outpost $1] /"
  RESULT_LINE=$(echo "$out" | grep '^RESULT')
}
local_runs() {  # actions Bazel ran itself, from a RESULT line
  echo $(( $(result_field "$1" linux-sandbox) + $(result_field "$1" local) + $(result_field "$1" processwrapper-sandbox) ))
}

# 1. Populate casd through Outpost A.
port_a=$(free_port)
start_outpost a "$port_a" --upstream "$upstream"
build a "$port_a"
actions=$(result_field "$RESULT_LINE" linux-sandbox)
stats_a=$("$OUTPOST_BIN" stats --server "grpc://127.0.0.1:$port_a")
echo "$stats_a"
# Bazel's uploads were acknowledged by A and sent to casd from its write-back
# queue; the graceful stop uploads whatever is still queued, so B below sees
# every result with its outputs.
uploaded=$(echo "$stats_a" | sed -n 's/.*upload queue:.*; \([0-9]*\) uploaded.*/\1/p')
if [ "${uploaded:-0}" -lt 1 ]; then
  echo "expected Outpost A to upload Bazel's outputs from its write-back queue"; exit 1
fi
stop_outpost a

# 2. Rebuild through Outpost B: empty local store, same casd.
port_b=$(free_port)
start_outpost b "$port_b" --upstream "$upstream"
exec_log="$E2E_TMP/b/exec_log.json"
build b "$port_b" "--execution_log_json_file=$exec_log"
hits=$(result_field "$RESULT_LINE" remote_cache_hit)
local_b=$(local_runs "$RESULT_LINE")
echo "---- outpost stats of B"
"$OUTPOST_BIN" stats --server "grpc://127.0.0.1:$port_b"
stop_outpost b

# Actions that were not remote-cache hits, by mnemonic (Bazel's execution log
# is a stream of JSON objects, one per spawn).
misses=$(python3 - "$exec_log" <<'EOF'
import json, sys
text = open(sys.argv[1]).read()
dec, i, out = json.JSONDecoder(), 0, []
while True:
    while i < len(text) and text[i].isspace():
        i += 1
    if i >= len(text):
        break
    spawn, i = dec.raw_decode(text, i)
    if not spawn.get("remoteCacheHit"):
        out.append(spawn.get("mnemonic", "?"))
print(" ".join(sorted(out)))
EOF
)

# Expected: all actions but one. buildbox-casd 1.3.39 answers GetActionResult
# with NOT_FOUND when a directory output's root Directory is not in its CAS,
# and Bazel 4.2.3 uploads only the Tree message of a directory output. So the
# one action with a directory output, //small:tree (mnemonic GenTree), misses
# at casd and runs locally again: 10 of 11 hits, exactly as Bazel talking to
# casd directly (checked: MODE=cache CLEAN_REBUILD=1 bazel_build.sh against
# casd_server.sh gives 10 remote cache hits + 1 linux-sandbox, GenTree).
# Should the proxy ever make casd accept that result (e.g. by uploading the
# Tree's Directory messages as blobs), set EXPECT_HITS=11 here.
expected=${EXPECT_HITS:-$((actions - 1))}
expected_misses=${EXPECT_MISSES-GenTree}
if [ "$actions" -lt 2 ] || [ "$hits" != "$expected" ] || [ "$local_b" != $((actions - expected)) ] \
   || [ "$misses" != "$expected_misses" ]; then
  echo "expected $expected of $actions actions to be remote cache hits through a fresh Outpost in front of casd" \
       "(misses: '${expected_misses}'); got $hits hits, $local_b run locally (misses: '$misses')"
  exit 1
fi
echo "$hits of $actions actions were remote cache hits through a fresh Outpost in front of casd (local: $misses, a casd limitation)"
