#!/usr/bin/env bash
# BuildStream 2.8.1 keeps its artifact and source caches in Outpost (Remote
# Asset Fetch/Push plus CAS; bst's own buildbox-casd is the client Outpost
# sees). The fixture project (fixtures/bst_project) has three elements: a
# busybox sysroot (import, local source), a tarball from an HTTP origin this
# test runs (import, tar source) and a manual element that runs sh on both.
#   1. `bst build --deps all` with an empty local cache, `artifacts:` and
#      `source-caches:` at Outpost with push: true: all three are built, and
#      their artifacts and sources pushed.
#   2. Outpost restarted (the entries persist), origin stopped, new empty
#      local cache: the same build pulls every artifact and builds nothing;
#      its checkout (--deps all) is identical to the first one. (`--deps
#      all`: without it bst pulls only the target, as its build-only
#      dependencies are not needed.)
#   3. Origin stopped, new empty local cache: `bst source fetch` of the tarball
#      element is served by the source cache in Outpost.
#   4. A second Outpost with an empty store and the first as its upstream
#      (a branch office): an empty local cache pulls every artifact through
#      it, answered by the upstream's Fetch; the checkout is identical.
# bst exits 0 even when a remote cache is unusable (only a WARNING), so every
# step checks bst's log and what it pulled or pushed, not just its exit code.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

BST=$BST_VENV/bin/bst
if [ ! -x "$BST" ]; then
  echo "FAIL: BuildStream is not installed ($BST); run WITH_BST=1 $LAB/setup.sh"; exit 1
fi
if [ ! -x /bin/busybox ]; then
  echo "FAIL: /bin/busybox is not installed (busybox-static); run WITH_BST=1 $LAB/setup.sh"; exit 1
fi
fixture="$(dirname "$0")/fixtures"
t_start=$(date +%s.%N)

# The origin serves the tarball of fixtures/bst_origin/data-1.0.
www="$E2E_TMP/origin/www"
mkdir -p "$www"
tar -C "$fixture/bst_origin" -czf "$www/data-1.0.tar.gz" data-1.0
start_origin origin "$www"

port=$(free_port)
metrics_port=$(free_port)
start_outpost bst "$port" --metrics-listen "127.0.0.1:$metrics_port"

# The project, with the origin's address, the tarball's sha256 and a sysroot
# of static busybox plus the applets the elements use.
project="$E2E_TMP/project"
cp -r "$fixture/bst_project" "$project"
sed "s|@ORIGIN@|http://127.0.0.1:$ORIGIN_PORT|" "$project/project.conf.in" >"$project/project.conf"
rm "$project/project.conf.in"
sed -i "s|@DATA_SHA256@|$(sha256sum "$www/data-1.0.tar.gz" | cut -d' ' -f1)|" "$project/elements/data.bst"
mkdir -p "$project/sysroot/bin"
cp /bin/busybox "$project/sysroot/bin/busybox"
for applet in sh mkdir cat ls sort tr echo sed wc rm true; do
  ln -s busybox "$project/sysroot/bin/$applet"
done

# bst_config NAME [PORT]: a user config with its own (empty) cache, log and
# source dirs, and both caches at the Outpost on PORT (default $port).
bst_config() {
  local dir="$E2E_TMP/bst-$1" port=${2:-$port}
  mkdir -p "$dir"
  cat >"$dir/bst.conf" <<EOF
cachedir: $dir/cache
logdir: $dir/logs
sourcedir: $dir/sources
artifacts:
  servers:
  - url: http://127.0.0.1:$port
    push: true
    type: all
source-caches:
  servers:
  - url: http://127.0.0.1:$port
    push: true
    type: all
EOF
}
# bst_run NAME ARGS...: bst with config NAME in the project; output in
# $E2E_TMP/bst-NAME/ARGS[0].log; sets LOG.
bst_run() {
  local name=$1; shift
  LOG="$E2E_TMP/bst-$name/$1.log"
  timeout 300 "$BST" --no-interactive --no-colors --config "$E2E_TMP/bst-$name/bst.conf" \
    -C "$project" "$@" >"$LOG" 2>&1
}
fail() {
  echo "FAIL: $*"
  [ -n "${LOG:-}" ] && { echo "---- bst output ($LOG), without staging lines"; grep -vE 'Staging|Integrating|^\s*$' "$LOG" | tail -40; }
  local o
  for o in bst edge; do
    [ -f "$E2E_TMP/$o/outpost.log" ] && { echo "---- outpost $o log (last 30 lines)"; tail -30 "$E2E_TMP/$o/outpost.log"; }
  done
  exit 1
}
# task_elements QUEUE [MESSAGE]: the elements (sorted, space-separated) for
# which $LOG has a task line `[time][key][ QUEUE:element.bst ] MESSAGE`;
# MESSAGE (an extended regex) defaults to a completed task, `SUCCESS <its
# log file>`.
task_elements() {
  local msg=${2:-'SUCCESS [^ ]+\.log'}
  sed -nE "s#^\[[^]]*\]\[[^]]*\]\[ *$1:([^ ]+\.bst) *\] $msg\$#\1#p" "$LOG" | sort -u | tr '\n' ' '
}
remote="http://127.0.0.1:$port"
no_remote_warnings() {
  if grep -E 'WARNING|FAILURE' "$LOG" | grep -v 'Read-only file system'; then
    fail "$1: bst warned or failed (above): the remote caches at Outpost are not usable"
  fi
}
checkout() {  # checkout NAME: every artifact of report.bst and its deps into $E2E_TMP/co-NAME
  bst_run "$1" artifact checkout --deps all --directory "$E2E_TMP/co-$1" report.bst \
    || fail "bst artifact checkout ($1) failed"
}
all="data.bst report.bst sysroot.bst "

# 1. Empty local cache: build everything, push every artifact.
bst_config first
bst_run first build --deps all report.bst || fail "first build failed"
t_1=$(date +%s.%N)
no_remote_warnings "first build"
grep -A6 '^Pipeline Summary' "$LOG"
built=$(task_elements build)
pushed=$(task_elements push "INFO +Pushed artifact [0-9a-f]+ -> $remote")
sources_pushed=$(task_elements src-push "INFO +Pushed source [0-9a-f]+ -> $remote")
echo "first build: built [$built], pushed artifacts [$pushed], pushed sources [$sources_pushed]"
[ "$built" = "$all" ] || fail "first build: expected to build [$all], built [$built]"
[ "$pushed" = "$all" ] || fail "first build: expected to push the artifacts of [$all] to Outpost, pushed [$pushed]"
[ "$sources_pushed" = "$all" ] || fail "first build: expected to push the sources of [$all] to Outpost, pushed [$sources_pushed]"
checkout first
pushes=$(metric_sum "$metrics_port" outpost_asset_pushes_total)
echo "outpost asset pushes recorded: $pushes"
[ "$pushes" -ge 3 ] || fail "Outpost recorded $pushes asset pushes, expected at least 3 (one per artifact)"

# 2. Outpost restarted (its asset index must survive), origin stopped, empty
# local cache: pull everything, build nothing.
stop_outpost bst || fail "outpost did not stop cleanly"
restart_outpost bst "$port" --metrics-listen "127.0.0.1:$metrics_port"
stop_origin origin
bst_config second
bst_run second build --deps all report.bst || fail "second build failed"
t_2=$(date +%s.%N)
no_remote_warnings "second build"
grep -A6 '^Pipeline Summary' "$LOG"
built=$(task_elements build); fetched=$(task_elements fetch)
pulled=$(task_elements pull "INFO +Pulled artifact [0-9a-f]+ <- $remote")
echo "second build: pulled [$pulled], built [$built], fetched [$fetched]"
[ "$pulled" = "$all" ] || fail "second build: expected to pull [$all] from Outpost, pulled [$pulled]"
[ -z "$built" ] || fail "second build: expected to build nothing, built [$built]"
[ -z "$fetched" ] || fail "second build: expected to fetch no sources, fetched [$fetched]"
hits=$(metric_sum "$metrics_port" outpost_asset_fetch_hits_total)
echo "outpost asset fetches answered locally in the second build: $hits"
[ "$hits" -ge 3 ] || fail "expected at least 3 asset fetch hits (one per artifact) in the second build, Outpost counted $hits"
checkout second
diff -r "$E2E_TMP/co-first" "$E2E_TMP/co-second" || fail "the checkouts of the built and the pulled artifacts differ"
grep -qx "$(cat "$fixture/bst_origin/data-1.0/message.txt")" "$E2E_TMP/co-second/share/report/report.txt" \
  && [ "$(cat "$E2E_TMP/co-second/share/report/count.txt")" = 4 ] \
  || fail "share/report/{report,count}.txt in the checkout are not what report.bst's commands write"
echo "checkouts identical: $(find "$E2E_TMP/co-second" -type f | wc -l) files"

# 3. Origin stopped, empty local cache: the tarball comes from the source cache.
bst_config sources
bst_run sources source fetch data.bst || fail "bst source fetch with the origin stopped failed (source cache miss?)"
t_3=$(date +%s.%N)
no_remote_warnings "source fetch"
pulled=$(task_elements fetch "INFO +Pulled source [0-9a-f]+ <- $remote")
echo "source fetch: pulled the sources of [$pulled]"
[ "$pulled" = "data.bst " ] || fail "source fetch: expected the source of data.bst pulled from Outpost, got [$pulled]"
"$OUTPOST_BIN" stats --server "grpc://127.0.0.1:$port"

# 4. A branch office: a second Outpost with an empty store, the first one as
# its upstream. An empty local cache pulls every artifact through it.
edge_port=$(free_port)
edge_metrics_port=$(free_port)
start_outpost edge "$edge_port" --metrics-listen "127.0.0.1:$edge_metrics_port" \
  --upstream "grpc://127.0.0.1:$port"
remote="http://127.0.0.1:$edge_port"
bst_config edge "$edge_port"
bst_run edge build --deps all report.bst || fail "build through the edge Outpost failed"
t_4=$(date +%s.%N)
no_remote_warnings "build through the edge Outpost"
built=$(task_elements build)
pulled=$(task_elements pull "INFO +Pulled artifact [0-9a-f]+ <- $remote")
echo "build through the edge Outpost: pulled [$pulled], built [$built]"
[ "$pulled" = "$all" ] || fail "edge: expected to pull [$all] through the edge Outpost, pulled [$pulled]"
[ -z "$built" ] || fail "edge: expected to build nothing, built [$built]"
upstream_hits=$(metric_sum "$edge_metrics_port" outpost_asset_fetch_upstream_hits_total)
echo "edge Outpost: $upstream_hits asset fetches answered by its upstream"
[ "$upstream_hits" -ge 3 ] || fail "edge: expected at least 3 asset fetches answered by the upstream, counted $upstream_hits"
checkout edge
diff -r "$E2E_TMP/co-first" "$E2E_TMP/co-edge" || fail "the checkout through the edge Outpost differs"
"$OUTPOST_BIN" stats --server "grpc://127.0.0.1:$edge_port"
stop_outpost edge
stop_outpost bst

printf 'timing: first build %.1fs, pull build %.1fs, source fetch %.1fs, through an edge %.1fs, total %.1fs\n' \
  "$(echo "$t_1 - $t_start" | bc)" "$(echo "$t_2 - $t_1" | bc)" "$(echo "$t_3 - $t_2" | bc)" \
  "$(echo "$t_4 - $t_3" | bc)" "$(echo "$(date +%s.%N) - $t_start" | bc)"
echo "PASS: BuildStream 2.8.1 pushed its artifacts and sources to Outpost; empty caches pulled every" \
     "artifact (nothing built, identical checkouts) from it after a restart and through a second Outpost" \
     "in front of it, and the source from its source cache"
