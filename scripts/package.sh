#!/usr/bin/env bash
# Builds the Debian package with cargo-deb (installed when missing): the
# release binary in the same target dir as scripts/test.sh (RocksDB's C++ is
# not compiled again), its man pages and shell completions (`outpost
# generate`), then `cargo deb --no-build`. Prints the .deb's path last.
#   scripts/package.sh           # release
#   scripts/package.sh --debug   # the dev-profile binary: tries the packaging
#                                # in a target dir without a release build
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
export PATH="$HOME/.cargo/bin:$PATH"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/outpost-build}"

profile=release profile_dir=release
case "${1:-}" in
  "") ;;
  --debug) profile=dev profile_dir=debug ;;
  *) echo "usage: scripts/package.sh [--debug]" >&2; exit 2 ;;
esac

if ! cargo deb --version >/dev/null 2>&1; then
  # The version this packaging was checked with; built in a temporary
  # target dir, not among Outpost's build outputs.
  echo "== package: installing cargo-deb" >&2
  env -u CARGO_TARGET_DIR cargo install cargo-deb --locked --version 3.8.0
fi

echo "== package: cargo build --profile $profile" >&2
cargo build --locked --profile "$profile" --bin outpost
out="$CARGO_TARGET_DIR/$profile_dir"

echo "== package: man pages and completions" >&2
rm -rf "$out/man" "$out/completions"
"$out/outpost" generate --man "$out/man" --completions "$out/completions"
gzip -9n "$out"/man/*.1

echo "== package: cargo deb" >&2
# Cargo.toml's `target/release/...` assets resolve to "$out" (with --debug,
# cargo-deb warns that a dev profile is unusual: it is only for trying this).
cargo deb --no-build --profile "$profile" --output "$CARGO_TARGET_DIR/debian"
