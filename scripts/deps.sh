#!/usr/bin/env bash
# Installs what building Outpost needs on a fresh Debian/Ubuntu machine and is
# a no-op when it is already there:
#   - libclang (RocksDB's bindgen step loads it at build time): the two small
#     packages libclang1-14 + libclang-common-14-dev, or any libclang-dev;
#   - a C++ compiler (RocksDB is built from source by the rocksdb crate);
#   - a Rust toolchain (rustup) if cargo is missing.
set -euo pipefail

have_libclang() {
  ldconfig -p 2>/dev/null | grep -q 'libclang[-.0-9]*\.so' && \
    ls /usr/lib/llvm-*/lib/clang/*/include/stdbool.h >/dev/null 2>&1
}

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    echo "deps.sh: need root (or sudo) to run: $*" >&2; exit 1; fi
}

missing=()
have_libclang || missing+=(libclang1-14 libclang-common-14-dev)
command -v g++ >/dev/null || missing+=(g++)
if [ ${#missing[@]} -gt 0 ]; then
  echo "deps.sh: installing ${missing[*]} (apt)" >&2
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null; then
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    echo "deps.sh: cargo is in ~/.cargo/bin; add it to PATH" >&2
  else
    echo "deps.sh: installing Rust with rustup" >&2
    curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal -c clippy,rustfmt
  fi
fi
