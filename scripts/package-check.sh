#!/usr/bin/env bash
# CI: the Debian package end to end, as root on a box with dpkg (systemd
# need not run): build it (scripts/package.sh), install it, run the
# installed binary as the package's `outpost` user on a temporary data dir
# and a free port, check it with the installed `outpost doctor`, then remove
# and purge the package and check nothing is left behind.
#   scripts/package-check.sh [--debug] [--force]
# --debug: see scripts/package.sh. It purges the package at the end (which
# removes /var/lib/outpost and /etc/outpost/outpost.toml), so on a box where
# outpost is installed already it refuses unless given --force.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "package-check.sh: run as root (it installs the package with dpkg)" >&2
  exit 1
fi
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/outpost-build}"
force=
package_args=()
for arg in "$@"; do
  if [ "$arg" = --force ]; then force=1; else package_args+=("$arg"); fi
done
if dpkg -s outpost >/dev/null 2>&1; then
  if [ -z "$force" ]; then
    echo "package-check.sh: outpost is installed here; this check would purge it" \
      "(its store in /var/lib/outpost and /etc/outpost/outpost.toml). Use a" \
      "scratch machine, or pass --force." >&2
    exit 1
  fi
  echo "== package: purging the outpost package already installed (--force)"
  dpkg --purge outpost >/dev/null
fi

deb=$(scripts/package.sh "${package_args[@]}" | tail -n 1)
echo "== package: built $deb"

tmp=$(mktemp -d)
server=
cleanup() {
  status=$?
  if [ -n "$server" ] && kill -0 "$server" 2>/dev/null; then kill -KILL "$server" || true; fi
  if [ "$status" != 0 ]; then
    echo "== package: FAILED; the server's log:" >&2
    cat "$tmp/log" >&2 2>/dev/null || true
    dpkg --purge outpost >/dev/null 2>&1 || true
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT

echo "== package: dpkg -i"
dpkg -i "$deb"
version=$(/usr/bin/outpost --version)
expected="outpost $(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)"
[ "$version" = "$expected" ] || { echo "outpost --version: $version, not $expected" >&2; exit 1; }
echo "== package: $version"
for path in /lib/systemd/system/outpost.service /usr/lib/sysusers.d/outpost.conf \
    /etc/outpost/outpost.toml /usr/share/man/man1/outpost.1.gz \
    /usr/share/man/man1/outpost-serve.1.gz /usr/share/bash-completion/completions/outpost \
    /usr/share/zsh/vendor-completions/_outpost /usr/share/fish/vendor_completions.d/outpost.fish \
    /usr/share/doc/outpost/config.example.toml; do
  [ -f "$path" ] || { echo "not installed: $path" >&2; exit 1; }
done
grep -q '^ExecStart=/usr/bin/outpost serve' /lib/systemd/system/outpost.service
if command -v systemd-analyze >/dev/null; then
  # The unit's syntax and paths (works without a running systemd).
  systemd-analyze verify --man=no /lib/systemd/system/outpost.service
fi
getent passwd outpost >/dev/null || { echo "no user outpost" >&2; exit 1; }
[ "$(stat -c %U:%a /etc/outpost)" = outpost:700 ] || { echo "/etc/outpost: $(stat -c %U:%a /etc/outpost)" >&2; exit 1; }
echo "== package: files, user outpost and /etc/outpost in place"

# The installed binary, as the service would run it: user outpost.
chmod 0755 "$tmp"
install -d -o outpost -g outpost -m 0700 "$tmp/data" "$tmp/run"
setpriv --reuid=outpost --regid=outpost --init-groups -- /usr/bin/outpost serve \
  --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 --data-dir "$tmp/data" \
  --ready-file "$tmp/run/ready" >"$tmp/log" 2>&1 &
server=$!
for _ in $(seq 300); do
  [ -f "$tmp/run/ready" ] && break
  kill -0 "$server" 2>/dev/null || { echo "outpost serve exited" >&2; exit 1; }
  sleep 0.1
done
addr=$(sed -n 's/^grpc=//p' "$tmp/run/ready")
[ -n "$addr" ] || { echo "outpost serve did not become ready in 30 s" >&2; exit 1; }
echo "== package: /usr/bin/outpost serve answers on $addr (as user outpost)"

echo "== package: outpost doctor"
setpriv --reuid=outpost --regid=outpost --init-groups -- /usr/bin/outpost doctor \
  --listen "$addr" --data-dir "$tmp/data"

kill -TERM "$server"
wait "$server" || { echo "outpost serve did not stop cleanly" >&2; exit 1; }
server=
echo "== package: stopped"

echo "== package: dpkg -r"
dpkg -r outpost
[ ! -e /usr/bin/outpost ] || { echo "/usr/bin/outpost is still there" >&2; exit 1; }
[ -f /etc/outpost/outpost.toml ] || { echo "dpkg -r removed the conffile" >&2; exit 1; }
echo "== package: dpkg --purge"
dpkg --purge outpost
for path in /etc/outpost /lib/systemd/system/outpost.service /usr/share/man/man1/outpost.1.gz; do
  [ ! -e "$path" ] || { echo "still there after purge: $path" >&2; exit 1; }
done
echo "== package: installed, ran, removed and purged cleanly"
