#!/usr/bin/env bash
# The test command: installs build dependencies, then checks formatting,
# lints, and runs every unit and integration test (release profile only, so
# RocksDB's C++ is compiled once; the first build takes ~10-15 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
# The status page's browser test (tests/suite/status_page.rs) runs Debian's
# headless chromium; only the tests need it, so it is installed here (apt, as
# deps.sh installs its packages) and the test may not skip.
if [ ! -x /usr/bin/chromium ]; then
  echo "test.sh: installing chromium (apt) for the status page browser test" >&2
  sudo=(); [ "$(id -u)" = 0 ] || sudo=(sudo)
  "${sudo[@]}" apt-get update -qq
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    chromium fonts-liberation >/dev/null
fi
export OUTPOST_REQUIRE_BROWSER=1
export PATH="$HOME/.cargo/bin:$PATH"
# Keep build output outside the clone so fresh clones on one machine share it.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/outpost-build}"
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --release --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --release --locked
# A CI artifact: the page as the browser test saw it.
echo "== status page screenshot: $CARGO_TARGET_DIR/status-page.png"
