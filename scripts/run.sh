#!/usr/bin/env bash
# The run command: installs build dependencies, builds Outpost (release) and
# runs `outpost serve` with any extra flags, e.g. scripts/run.sh --quota 20GiB
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
export PATH="$HOME/.cargo/bin:$PATH"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/outpost-build}"
cargo build --release --locked
exec "$CARGO_TARGET_DIR/release/outpost" serve "$@"
