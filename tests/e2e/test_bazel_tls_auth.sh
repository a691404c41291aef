#!/usr/bin/env bash
# Bazel 4.2.3 over grpcs:// against an Outpost with TLS (a private CA made with
# the openssl CLI) and bearer tokens, credentials required on loopback too:
#  (a) a build without a token fails, naming UNAUTHENTICATED;
#  (b) the CI token (execute --write-ac) builds with --remote_cache and its
#      action results are stored;
#  (c) after `bazel clean`, the reader token (read) gets remote cache hits;
#      after a source change its uploads are refused (a warning), the build
#      still succeeds, and the store gains nothing.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

# Debian's Bazel 4.2.3 carries Debian's netty, whose JDK TLS provider cannot
# do ALPN ("JDK provider does not support ALPN protocol": Bazel crashes on any
# grpcs:// remote). Its OpenSSL provider works with libnetty-tcnative-jni, once
# the library is where netty looks for it, under the name it accepts.
TCNATIVE=/usr/lib/x86_64-linux-gnu/jni/libnetty-tcnative.so
BAZEL_INSTALL_BASE=${BAZEL_INSTALL_BASE:-/usr/share/bazel}   # Debian's bazel-bootstrap
need=()
command -v openssl >/dev/null || need+=(openssl)
[ -f "$TCNATIVE" ] || need+=(libnetty-tcnative-jni)
if [ ${#need[@]} -gt 0 ]; then
  if [ "${OUTPOST_E2E_INSTALL:-0}" = 1 ]; then
    # A fresh machine may have no package lists yet: update once if needed.
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need[@]}" >/dev/null 2>&1 \
      || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
             apt-get install -y --no-install-recommends "${need[@]}" >/dev/null; }
  else
    echo "e2e: SKIP: missing ${need[*]} (OUTPOST_E2E_INSTALL=1 installs them)"; exit 0
  fi
fi

dir=$E2E_TMP/files   # certificates, tokens, config, workspace (start_outpost owns $E2E_TMP/tls)
mkdir -p "$dir"
port=$(free_port)
mport=$(free_port)

# A private CA, and a server certificate it signs for localhost and 127.0.0.1.
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=Outpost e2e CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -keyout "$dir/ca.key" -out "$dir/ca.pem" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
  -keyout "$dir/server.key" -out "$dir/server.csr" 2>/dev/null
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' >"$dir/server.ext"
openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" -CAcreateserial \
  -days 2 -extfile "$dir/server.ext" -out "$dir/server.pem" 2>/dev/null

# Tokens (the CLI prints each new token as its last line of stdout).
reader=$("$OUTPOST_BIN" token add reader --role read --tokens-file "$dir/tokens" | tail -n 1)
ci=$("$OUTPOST_BIN" token add ci --role execute --write-ac --tokens-file "$dir/tokens" | tail -n 1)
if [ -z "$reader" ] || [ -z "$ci" ] || [ "$reader" = "$ci" ]; then
  echo "outpost token add did not print two distinct tokens"; exit 1
fi
if grep -qF -e "$reader" -e "$ci" "$dir/tokens"; then
  echo "the tokens file holds a token in plaintext"; exit 1
fi

cat >"$dir/outpost.toml" <<EOF
[server]
tls_cert = "$dir/server.pem"
tls_key = "$dir/server.key"
[auth]
tokens_file = "$dir/tokens"
# Everything here is loopback: make it ask for credentials anyway.
require_on_loopback = true
[metrics]
listen = "127.0.0.1:$mport"
EOF
start_outpost tls "$port" --config "$dir/outpost.toml"
log=$E2E_TMP/tls/outpost.log
grep -q "serving REAPI on grpcs://127.0.0.1:$port (TLS)" "$log" || {
  echo "no grpcs:// line in the log:"; cat "$log"; exit 1; }

# metric NAME: its value on the HTTPS metrics port, the test CA trusted.
metric() {
  python3 - "$mport" "$dir/ca.pem" "$1" <<'PY'
import ssl, sys, urllib.request
ctx = ssl.create_default_context(cafile=sys.argv[2])
url = f"https://localhost:{sys.argv[1]}/metrics"
text = urllib.request.urlopen(url, timeout=10, context=ctx).read().decode()
for line in text.splitlines():
    if line.split(" ")[0] == sys.argv[3]:
        print(int(float(line.split(" ")[1])))
        break
else:
    sys.exit(f"no metric {sys.argv[3]} at {url}")
PY
}

# A copy of the lab workspace (and the stubs it names as ../stubs): step (c)
# changes a source.
cp -r "$LAB/ws" "$LAB/stubs" "$dir/"
ws=$dir/ws
mkdir -p "$LAB_TMP/bazel-root" "$dir/jni"
cp "$TCNATIVE" "$dir/jni/libnetty_tcnative.so"   # a copy: the library checks its own file name
ob=$dir/output-base
STARTUP=(--output_user_root="$LAB_TMP/bazel-root" --output_base="$ob"
         --host_jvm_args=-Djava.library.path="$dir/jni:$BAZEL_INSTALL_BASE/")
cleanup() {
  (cd "$ws" && timeout 60 "$BAZEL" "${STARTUP[@]}" shutdown >/dev/null 2>&1) || true
  cleanup_e2e
}
trap cleanup EXIT

# bazel_build LABEL [flags...]: builds //... with the remote cache over grpcs://;
# output in $dir/LABEL.log; returns Bazel's exit status.
bazel_build() {
  local label=$1; shift
  (cd "$ws" && timeout 900 "$BAZEL" "${STARTUP[@]}" build --jobs=8 --remote_timeout=60 \
    --remote_cache="grpcs://127.0.0.1:$port" --tls_certificate="$dir/ca.pem" \
    --experimental_convenience_symlinks=ignore "$@" //...) >"$dir/$label.log" 2>&1
}
# processes LABEL KIND: Bazel's count of KIND in its "N processes: ..." line.
processes() {
  grep -E '^INFO: [0-9]+ processes' "$dir/$1.log" | tail -n 1 \
    | grep -oE "[0-9]+ $2(,|\.)" | grep -oE '^[0-9]+' || echo 0
}
show() { echo "---- $1 ----"; grep -vE '^(Loading|Analyzing|\[)' "$dir/$1.log" | tail -n 25; }

# (a) No token: refused, and Bazel says why.
if bazel_build no-token; then
  show no-token; echo "(a) a build without a token succeeded"; exit 1
fi
grep -q UNAUTHENTICATED "$dir/no-token.log" || {
  show no-token; echo "(a) the failed build does not name UNAUTHENTICATED"; exit 1; }
echo "(a) no token: refused with UNAUTHENTICATED"
grep -m 1 UNAUTHENTICATED "$dir/no-token.log"

# (b) The CI token builds and writes action results.
bazel_build ci --remote_header="authorization=Bearer $ci" || {
  show ci; echo "(b) the CI build failed"; exit 1; }
built=$(processes ci linux-sandbox)
results=$(metric outpost_store_action_results)
blobs=$(metric outpost_store_blobs)
echo "(b) CI token: $built actions ran locally; the store holds $results action results, $blobs blobs"
if [ "$built" -lt 1 ] || [ "$results" -lt "$built" ]; then
  show ci; echo "(b) expected at least $built action results stored, got $results"; exit 1
fi

# (c) The reader token: remote cache hits after clean...
(cd "$ws" && timeout 120 "$BAZEL" "${STARTUP[@]}" clean >/dev/null 2>&1)
bazel_build reader --remote_header="authorization=Bearer $reader" || {
  show reader; echo "(c) the reader's build failed"; exit 1; }
hits=$(processes reader "remote cache hit")
echo "(c) reader token after clean: $hits of $built actions were remote cache hits"
if [ "$hits" != "$built" ]; then
  show reader; echo "(c) expected $built remote cache hits"; exit 1
fi
# ...and its uploads of a changed action are refused without failing the build.
printf '\nint e2e_reader_change() { return 42; }\n' >>"$ws/small/mathlib.cc"
bazel_build reader-change --remote_header="authorization=Bearer $reader" || {
  show reader-change; echo "(c) the reader's build of a changed source failed"; exit 1; }
ran=$(processes reader-change linux-sandbox)
grep -q "Writing to Remote Cache" "$dir/reader-change.log" || {
  show reader-change; echo "(c) Bazel did not report a refused upload"; exit 1; }
grep -A 2 -m 1 "Writing to Remote Cache" "$dir/reader-change.log"
after_results=$(metric outpost_store_action_results)
after_blobs=$(metric outpost_store_blobs)
echo "(c) reader token, changed source: $ran actions ran locally; store: $after_results action results, $after_blobs blobs"
if [ "$ran" -lt 1 ] || [ "$after_results" != "$results" ] || [ "$after_blobs" != "$blobs" ]; then
  echo "(c) the reader's uploads must be refused: the store went from $results to $after_results action results, $blobs to $after_blobs blobs"
  exit 1
fi
if grep -qF -e "$reader" -e "$ci" "$log"; then
  echo "a token appears in Outpost's log"; exit 1
fi
stop_outpost tls
echo "TLS + tokens: no token refused, CI token wrote, reader got hits and could not write"
