#!/usr/bin/env bash
# Bazel 4.2.3 builds the lab workspace with --remote_cache pointing at
# Outpost; after `bazel clean` the rebuild must be all remote-cache hits.
# The store keeps compressible blobs zstd-compressed at rest (the default);
# Bazel 4.2.3 knows nothing of compression and reads them plain.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

port=$(free_port)
metrics_port=$(free_port)
start_outpost cache "$port" --metrics-listen "127.0.0.1:$metrics_port"
out=$(MODE=cache CLEAN_REBUILD=1 "$LAB/bazel_build.sh" "grpc://127.0.0.1:$port" 2>&1) || {
  echo "$out"; echo "bazel build failed"; exit 1; }
echo "$out" | grep -E '^\[|^RESULT'
first=$(echo "$out" | grep '^RESULT label=first')
again=$(echo "$out" | grep '^RESULT label=after-clean')
actions=$(result_field "$first" linux-sandbox)
hits=$(result_field "$again" remote_cache_hit)
local_again=$(( $(result_field "$again" linux-sandbox) + $(result_field "$again" local) + $(result_field "$again" processwrapper-sandbox) ))
"$OUTPOST_BIN" stats --server "grpc://127.0.0.1:$port"
compressed=$(metric_sum "$metrics_port" outpost_store_compressed_blobs_total)
stop_outpost cache
if [ "${compressed%.*}" -lt 1 ]; then
  echo "expected Bazel's outputs to be stored compressed at rest; none were"
  exit 1
fi
echo "$compressed blobs were stored compressed at rest and read back plain by Bazel"
if [ "$actions" -lt 1 ] || [ "$hits" != "$actions" ] || [ "$local_again" != 0 ]; then
  echo "expected all $actions actions to be remote cache hits after clean; got $hits hits, $local_again local"
  exit 1
fi
echo "all $hits actions were remote cache hits after bazel clean"
