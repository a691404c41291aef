#!/usr/bin/env bash
# The test command: installs build dependencies, then checks formatting,
# lints, and runs every unit and integration test (release profile only, so
# RocksDB's C++ is compiled once; the first build takes ~10-15 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
export PATH="$HOME/.cargo/bin:$PATH"
# Keep build output outside the clone so fresh clones on one machine share it.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/outpost-build}"
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --release --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --release --locked
