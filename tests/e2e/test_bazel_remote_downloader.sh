#!/usr/bin/env bash
# Bazel 4.2.3's remote downloader through Outpost (Remote Asset FetchBlob).
# The fixture workspace (fixtures/bazel_downloader) has an http_archive and
# an http_file, both with sha256 (Bazel 4.2.3 refuses plain http without
# one) and both on an HTTP origin this test runs on 127.0.0.1, and a genrule
# that needs both. Outpost runs standalone with origin fetching of private
# addresses allowed.
#   1. Bazel builds with --experimental_remote_downloader and --remote_cache
#      at Outpost: the origin must see both files requested by Outpost, never
#      by Bazel. Then //:tampered, whose http_file has a sha256 the content
#      does not match, must fail to fetch (Outpost answers ABORTED inline
#      with a digest no CAS holds; Bazel 4.2.3 ignores the status and fails
#      reading that digest).
#   2. The origin is stopped. Control: Bazel without the remote downloader
#      (fresh output base, no repository cache) must fail to fetch.
#   3. Outpost restarted; Bazel with the remote downloader, fresh output
#      base, no repository cache: must succeed, with the same output, every
#      download a FetchBlob that Outpost answered from its store.
#   4. A second Outpost with an empty store and the first as its upstream (a
#      branch office): the same build through it succeeds, its FetchBlobs
#      answered by the upstream's Fetch.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

fixture="$(dirname "$0")/fixtures/bazel_downloader"
t_start=$(date +%s.%N)

# The origin: a tarball of fixtures/bazel_downloader/greeting-1.0 and a note
# with a nonce, so the output proves which run's content was built.
www="$E2E_TMP/origin/www"
mkdir -p "$www"
tar -C "$fixture" -czf "$www/greeting-1.0.tar.gz" greeting-1.0
nonce="note $(date +%s.%N) $$"
echo "$nonce" >"$www/note.txt"
start_origin origin "$www"
origin="http://127.0.0.1:$ORIGIN_PORT"

port=$(free_port)
metrics_port=$(free_port)
endpoint="grpc://127.0.0.1:$port"
config="$E2E_TMP/outpost-downloader.toml"
cat >"$config" <<'EOF'
[asset]
# The test's origin is on 127.0.0.1: a private address, refused by default.
origin_fetch_private = true
EOF
start_outpost dl "$port" --config "$config" --metrics-listen "127.0.0.1:$metrics_port"

ws="$E2E_TMP/ws"
mkdir -p "$ws"
cp "$fixture/ws/BUILD" "$fixture/ws/.bazelrc" "$ws/"
sed -e "s|@ORIGIN@|$origin|g" \
    -e "s|@ARCHIVE_SHA256@|$(sha256sum "$www/greeting-1.0.tar.gz" | cut -d' ' -f1)|g" \
    -e "s|@NOTE_SHA256@|$(sha256sum "$www/note.txt" | cut -d' ' -f1)|g" \
    "$fixture/ws/WORKSPACE.in" >"$ws/WORKSPACE"
expected="$(cat "$fixture/greeting-1.0/hello.txt" "$www/note.txt")"

# bazel_build LABEL [FLAGS...]: `bazel build $TARGET` (default //:combined)
# in a fresh output base with the repository cache disabled (so nothing but the origin or the
# remote downloader can supply the downloads); shuts the Bazel server down
# after. Sets RC and OUTPUT (combined.txt, empty if not built); log in
# $E2E_TMP/bazel-LABEL.log.
OUTPUT_BASES=()
bazel_build() {
  local label=$1; shift
  local ob="$E2E_TMP/ob-$label" log="$E2E_TMP/bazel-$label.log"
  OUTPUT_BASES+=("$ob")
  local startup=(--output_user_root="$LAB_TMP/bazel-root" --output_base="$ob")
  RC=0
  (cd "$ws" && timeout 300 "$BAZEL" "${startup[@]}" build --repository_cache= \
     --experimental_convenience_symlinks=ignore --remote_timeout=60 "$@" "${TARGET:-//:combined}") >"$log" 2>&1 || RC=$?
  (cd "$ws" && timeout 60 "$BAZEL" "${startup[@]}" shutdown) >/dev/null 2>&1 || true
  OUTPUT=$(find "$ob/execroot" -path '*/bin/combined.txt' -exec cat {} + 2>/dev/null || true)
  grep -E '^INFO: [0-9]+ processes|Elapsed time' "$log" | sed "s/^/[$label] /" || true
}
shutdown_bazels() {
  local ob
  for ob in "${OUTPUT_BASES[@]}"; do
    [ -d "$ob" ] && (cd "$ws" && timeout 60 "$BAZEL" --output_user_root="$LAB_TMP/bazel-root" \
      --output_base="$ob" shutdown) >/dev/null 2>&1
  done
  return 0
}
trap 'shutdown_bazels; cleanup_e2e' EXIT

fail() {
  echo "FAIL: $*"
  local o
  for o in dl edge; do
    [ -f "$E2E_TMP/$o/outpost.log" ] && { echo "---- outpost $o log (last 40 lines)"; tail -40 "$E2E_TMP/$o/outpost.log"; }
  done
  echo "---- origin requests"; cat "$E2E_TMP/origin/log"
  exit 1
}
show_bazel_errors() { grep -E 'ERROR|WARNING|rror:|Caused by' "$E2E_TMP/bazel-$1.log" | head -20 || true; }

downloader=(--experimental_remote_downloader="$endpoint" --remote_cache="$endpoint")

# 1. Through Outpost, origin up.
bazel_build first "${downloader[@]}"
t_1=$(date +%s.%N)
if [ "$RC" != 0 ]; then show_bazel_errors first; fail "bazel build with the remote downloader failed (exit $RC)"; fi
[ "$OUTPUT" = "$expected" ] || fail "combined.txt is '$OUTPUT', expected '$expected'"
echo "---- origin requests during the first build"; cat "$E2E_TMP/origin/log"
for f in greeting-1.0.tar.gz note.txt; do
  grep -q "^GET /$f 200 " "$E2E_TMP/origin/log" || fail "the origin never served /$f"
done
if grep -q 'user-agent=Bazel' "$E2E_TMP/origin/log"; then
  fail "Bazel downloaded from the origin itself instead of through Outpost"
fi
origin_first=$(metric_sum "$metrics_port" outpost_asset_fetch_origin_total)
echo "outpost after the first build: $origin_first fetches downloaded from the origin"
[ "$origin_first" -ge 2 ] || fail "expected Outpost to download at least 2 fetches from the origin, counted $origin_first"

# 1b. A checksum the content does not have: Outpost refuses the download and
# Bazel 4.2.3 (which ignores the inline status) must fail on the digest
# Outpost answers with, not build with an empty or unchecked file.
TARGET=//:tampered bazel_build tampered "${downloader[@]}"
t_1b=$(date +%s.%N)
[ "$RC" != 0 ] || fail "//:tampered built although its sha256 matches nothing the origin serves"
grep -qE 'Missing digest: 1{64}/1' "$E2E_TMP/bazel-tampered.log" \
  || { show_bazel_errors tampered; fail "//:tampered failed, but not on Outpost's inline-error digest (1111…/1)"; }
echo "tampered: Outpost refused the mismatching content; Bazel failed on the inline-error digest"

# 2. Origin down: without the remote downloader the build cannot fetch.
stop_origin origin
bazel_build control
t_2=$(date +%s.%N)
if [ "$RC" = 0 ]; then
  fail "control: with the origin stopped, a build without the remote downloader succeeded" \
       "(Bazel found the downloads somewhere else; the test would prove nothing)"
fi
grep -qF "Error downloading [$origin/" "$E2E_TMP/bazel-control.log" \
  || { show_bazel_errors control; fail "control: bazel failed, but not on the download"; }
echo "control: without the remote downloader the build fails on the download (exit $RC)"

# 3. Outpost restarted (its entries persist), origin down, fresh output
# base: through Outpost only.
stop_outpost dl || fail "outpost did not stop cleanly"
restart_outpost dl "$port" --config "$config" --metrics-listen "127.0.0.1:$metrics_port"
bazel_build again "${downloader[@]}"
t_3=$(date +%s.%N)
if [ "$RC" != 0 ]; then show_bazel_errors again; fail "with the origin stopped, bazel build through Outpost failed (exit $RC)"; fi
[ "$OUTPUT" = "$expected" ] || fail "second build: combined.txt is '$OUTPUT', expected '$expected'"

"$OUTPOST_BIN" stats --server "$endpoint"
hits=$(metric_sum "$metrics_port" outpost_asset_fetch_hits_total)
echo "outpost fetches answered locally in the second build: $hits"
[ "$hits" -ge 2 ] \
  || fail "expected at least 2 FetchBlob hits in the second build (archive + file), Outpost counted $hits"

# 4. A branch office: a second Outpost with an empty store and the first as
# its upstream; origin down, fresh output base.
edge_port=$(free_port)
edge_metrics_port=$(free_port)
start_outpost edge "$edge_port" --metrics-listen "127.0.0.1:$edge_metrics_port" --upstream "$endpoint"
edge="grpc://127.0.0.1:$edge_port"
bazel_build edge --experimental_remote_downloader="$edge" --remote_cache="$edge"
t_4=$(date +%s.%N)
if [ "$RC" != 0 ]; then show_bazel_errors edge; fail "bazel build through the edge Outpost failed (exit $RC)"; fi
[ "$OUTPUT" = "$expected" ] || fail "edge build: combined.txt is '$OUTPUT', expected '$expected'"
"$OUTPOST_BIN" stats --server "$edge"
upstream_hits=$(metric_sum "$edge_metrics_port" outpost_asset_fetch_upstream_hits_total)
echo "edge Outpost: $upstream_hits fetches answered by its upstream"
[ "$upstream_hits" -ge 2 ] || fail "edge: expected at least 2 FetchBlob answered by the upstream, counted $upstream_hits"
stop_outpost edge
stop_outpost dl

printf 'timing: first build %.1fs, tampered %.1fs, control %.1fs, second build %.1fs, through an edge %.1fs, total %.1fs\n' \
  "$(echo "$t_1 - $t_start" | bc)" "$(echo "$t_1b - $t_1" | bc)" "$(echo "$t_2 - $t_1b" | bc)" "$(echo "$t_3 - $t_2" | bc)" \
  "$(echo "$t_4 - $t_3" | bc)" "$(echo "$(date +%s.%N) - $t_start" | bc)"
echo "PASS: Bazel 4.2.3 fetched an http_archive and an http_file through Outpost's remote downloader," \
     "then, with the origin stopped, from Outpost alone after a restart and through a second Outpost in front of it"
