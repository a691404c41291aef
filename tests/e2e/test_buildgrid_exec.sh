#!/usr/bin/env bash
# Remote execution through Outpost. BuildGrid 0.9.1 with two labbot workers
# (../shared/reapi-lab/upstream.sh) is the upstream; Outpost runs with
# --upstream pointing at it, and Bazel 4.2.3 builds the lab workspace with
# --remote_executor pointing at Outpost:
#   (a) a fresh build runs every action remotely (none locally); after
#       `bazel clean` the rebuild is all remote-cache hits;
#   (b) with --remote_download_minimal a fresh build still succeeds: once
#       served from the action cache, once executed again
#       (--noremote_accept_cached), so every action's inputs are outputs of
#       earlier remote actions that Bazel never downloaded; with
#       --remote_download_toplevel, executed again, the top-level outputs
#       (the calc binary, which must run) are on disk and the intermediate
#       ones (mathlib's object file) are not;
#   (c) `bazel test //...` passes: the tests (run remotely) check the
#       binaries, the genrule outputs and the directory output built before.
# DIRECT=1 runs the same steps with Bazel pointed straight at BuildGrid (no
# Outpost): that is how the expected numbers below were measured.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

# Expected process counts for //... of the lab workspace, measured with
# DIRECT=1 (Bazel 4.2.3 -> BuildGrid 0.9.1, 2 labbot workers): Bazel reports
# "30 processes: 19 internal, 11 remote" for the first build, "11 remote cache
# hit, 19 internal" after clean; with --remote_download_minimal "25 processes:
# 11 remote cache hit, 14 internal", and with --noremote_accept_cached too
# "25 processes: 14 internal, 11 remote"; `bazel test` then reports "33
# processes: 11 remote cache hit, 16 internal, 6 remote" (3 tests, each with
# its test.xml action). Internal processes are Bazel's own (symlinks,
# manifests) and never go remote.
EXPECT_ACTIONS=${EXPECT_ACTIONS:-11}
EXPECT_TEST_ACTIONS=${EXPECT_TEST_ACTIONS:-6}

if [ ! -x "$BGD" ]; then
  echo "BuildGrid is not installed ($BGD); run $LAB/setup.sh"; exit 1
fi
direct=${DIRECT:-0}
if [ "$direct" != 1 ] && ! "$OUTPOST_BIN" serve --help 2>&1 | grep -q -- '--upstream'; then
  echo "outpost serve has no --upstream flag: the upstream proxy is not built yet"; exit 1
fi

bg_port=$(free_port)
stop_buildgrid() {
  "$LAB/upstream_stop.sh" "$bg_port" >/dev/null 2>&1 || true
  "$LAB/pg.sh" dropdb "bgd_$bg_port" >/dev/null 2>&1 || true
  rm -rf "$LAB_TMP/upstream-$bg_port"
}
trap 'stop_buildgrid; cleanup_e2e' EXIT
t_start=$(date +%s.%N)
"$LAB/upstream.sh" "$bg_port" 2
t_up=$(date +%s.%N)
upstream="grpc://127.0.0.1:$bg_port"

if [ "$direct" = 1 ]; then
  endpoint=$upstream
  what="BuildGrid directly"
else
  port=$(free_port)
  start_outpost exec "$port" --upstream "$upstream"
  endpoint="grpc://127.0.0.1:$port"
  what="Outpost -> BuildGrid"
fi

show_logs() {
  if [ "$direct" != 1 ]; then echo "---- outpost log"; tail -40 "$E2E_TMP/exec/outpost.log"; fi
  echo "---- BuildGrid log"; tail -20 "$LAB_TMP/upstream-$bg_port/logs/server.log"
}
# build LABEL [ENV=VALUE...]: bazel_build.sh against $endpoint with MODE=exec
# and the given settings; prints its summary; sets OUT.
build() {
  local label=$1; shift
  OUT=$(env MODE=exec "$@" "$LAB/bazel_build.sh" "$endpoint" 2>&1) && return 0
  echo "$OUT"
  if echo "$OUT" | grep -qiE 'does not support remote execution|remote execution is not supported|exec_enabled'; then
    echo "FAIL ($label): Bazel says $endpoint does not offer remote execution: Outpost's Capabilities do not" \
         "report execution_capabilities.exec_enabled (execution passthrough is not implemented yet?)"
  else
    echo "FAIL ($label): bazel build via $what failed"
  fi
  show_logs
  exit 1
}
# check LABEL LINE REMOTE CACHE_HITS: Bazel's summary in RESULT line LINE
# counts REMOTE actions executed remotely, CACHE_HITS remote-cache hits and
# none run locally.
check() {
  local label=$1 line=$2 remote hits locals
  remote=$(result_field "$line" remote)
  hits=$(result_field "$line" remote_cache_hit)
  locals=$(( $(result_field "$line" linux-sandbox) + $(result_field "$line" local) \
             + $(result_field "$line" processwrapper-sandbox) ))
  if [ "$remote" != "$3" ] || [ "$hits" != "$4" ] || [ "$locals" != 0 ]; then
    echo "FAIL ($label): expected $3 remote, $4 remote cache hits and none local via $what;" \
         "got remote=$remote, remote cache hits=$hits, local=$locals"
    echo "$line"; show_logs
    exit 1
  fi
  echo "ok ($label): $remote remote, $hits remote cache hits, none local"
}

# downloaded LABEL: from the output base that build kept (KEEP_OB=1), what
# the calc binary prints (calc_says) and how many object files Bazel
# downloaded (objects); the output base is then removed.
downloaded() {
  local ob bin
  ob=$(echo "$OUT" | sed -n 's/^output base kept: \([^ ]*\) .*/\1/p')
  bin=$(echo "$ob"/execroot/*/bazel-out/k8-fastbuild/bin/small)
  if [ -z "$ob" ] || [ ! -d "$bin" ]; then
    echo "FAIL ($1): no output base with bazel-bin/small was kept"; show_logs; exit 1
  fi
  calc_says=$("$bin/calc" 2>&1 || true)
  objects=$(find "$bin" -name '*.o' | wc -l)
  rm -rf "$ob" "$ob.log"
}

# (a) Fresh build: all remote; after clean: all remote-cache hits, and every
# output downloaded (the object files too: the toplevel check below relies
# on finding them when they are there).
build exec-and-clean CLEAN_REBUILD=1 KEEP_OB=1
downloaded exec-and-clean
if [ "$calc_says" != "2+3=5 4*5=20" ] || [ "$objects" = 0 ]; then
  echo "FAIL (exec-and-clean): expected calc to run and its object files downloaded;" \
       "calc said '$calc_says', $objects object files"
  show_logs; exit 1
fi
t_a=$(date +%s.%N)
echo "$OUT" | grep -E '^\[|^RESULT'
check first "$(echo "$OUT" | grep '^RESULT label=first')" "$EXPECT_ACTIONS" 0
check after-clean "$(echo "$OUT" | grep '^RESULT label=after-clean')" 0 "$EXPECT_ACTIONS"

# (b) Builds without the bytes, fresh output base.
build minimal DOWNLOAD=minimal
echo "$OUT" | grep -E '^\[|^RESULT'
check minimal "$(echo "$OUT" | grep '^RESULT')" 0 "$EXPECT_ACTIONS"
build minimal-exec DOWNLOAD=minimal ACCEPT_CACHED=0
t_b=$(date +%s.%N)
echo "$OUT" | grep -E '^\[|^RESULT'
check minimal-exec "$(echo "$OUT" | grep '^RESULT')" "$EXPECT_ACTIONS" 0
build toplevel-exec DOWNLOAD=toplevel ACCEPT_CACHED=0 KEEP_OB=1
echo "$OUT" | grep -E '^\[|^RESULT'
check toplevel-exec "$(echo "$OUT" | grep '^RESULT')" "$EXPECT_ACTIONS" 0
downloaded toplevel-exec
if [ "$calc_says" != "2+3=5 4*5=20" ] || [ "$objects" != 0 ]; then
  echo "FAIL (toplevel-exec): expected the top-level calc binary to run and no object files;" \
       "calc said '$calc_says', $objects object files downloaded"
  show_logs
  exit 1
fi
echo "ok (toplevel-exec): the top-level binary runs, no intermediate outputs downloaded"

# (c) The tests pass, run remotely on what was built and cached before.
build test CMD=test
t_c=$(date +%s.%N)
echo "$OUT" | grep -E '^\[|^RESULT|PASSED|FAILED'
check test "$(echo "$OUT" | grep '^RESULT')" "$EXPECT_TEST_ACTIONS" "$EXPECT_ACTIONS"

if [ "$direct" != 1 ]; then
  "$OUTPOST_BIN" stats --server "$endpoint"
  stop_outpost exec
fi
printf 'timing: BuildGrid + 2 workers up in %.1fs, (a) %.1fs, (b) %.1fs, (c) %.1fs, total %.1fs\n' \
  "$(echo "$t_up - $t_start" | bc)" "$(echo "$t_a - $t_up" | bc)" "$(echo "$t_b - $t_a" | bc)" \
  "$(echo "$t_c - $t_b" | bc)" "$(echo "$(date +%s.%N) - $t_start" | bc)"
echo "remote execution via $what: all $EXPECT_ACTIONS actions remote, remote-cache hits after clean," \
     "minimal downloads fine, tests pass"
