# Helpers for e2e tests (sourced). Starts and stops `outpost serve`.
. "$LAB/env.sh"

# free_port: prints a TCP port nothing listens on.
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# start_outpost NAME PORT [flags...]: runs outpost in the background with a
# fresh data dir $E2E_TMP/NAME; sets OUTPOST_PID_<NAME>.
start_outpost() {
  rm -rf "${E2E_TMP:?}/$1"; mkdir -p "$E2E_TMP/$1"
  restart_outpost "$@"
}

# restart_outpost NAME PORT [flags...]: runs outpost NAME on its existing
# data dir (after stop_outpost: the store must survive), appending to its log.
restart_outpost() {
  local name=$1 port=$2; shift 2
  local dir="$E2E_TMP/$name"
  "$OUTPOST_BIN" serve --listen "127.0.0.1:$port" --data-dir "$dir/data" --no-unix-socket "$@" \
    >>"$dir/outpost.log" 2>&1 &
  echo $! >"$dir/pid"
  wait_port "$port" 30 || { echo "outpost $name did not start:"; cat "$dir/outpost.log"; return 1; }
}

# stop_outpost NAME: SIGTERM, expect a clean exit within 30 s.
stop_outpost() {
  local dir="$E2E_TMP/$1" pid
  pid=$(cat "$dir/pid")
  kill -TERM "$pid"
  # up to 60 s: a graceful stop may upload the write-back queue for 30 s
  for _ in $(seq 600); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then
    echo "outpost $1 ignored SIGTERM"; kill -KILL "$pid"; return 1
  fi
  rm -f "$dir/pid"
  wait "$pid" 2>/dev/null || { echo "outpost $1 exited with an error:"; tail -20 "$dir/outpost.log"; return 1; }
}

# start_origin NAME DIR: serves DIR over HTTP on a free 127.0.0.1 port
# (fixtures/origin_server.py, one log line per request in $E2E_TMP/NAME/log);
# sets ORIGIN_PORT.
start_origin() {
  local dir="$E2E_TMP/$1"
  mkdir -p "$dir"
  python3 "$(dirname "${BASH_SOURCE[0]}")/fixtures/origin_server.py" "$2" "$dir/port" >"$dir/log" 2>&1 &
  echo $! >"$dir/pid"
  for _ in $(seq 100); do [ -s "$dir/port" ] && break; sleep 0.1; done
  ORIGIN_PORT=$(cat "$dir/port" 2>/dev/null) || { echo "origin $1 did not start:"; cat "$dir/log"; return 1; }
}

# stop_origin NAME: stops the HTTP origin; its port then refuses connections.
stop_origin() {
  local dir="$E2E_TMP/$1"
  kill -TERM "$(cat "$dir/pid")" 2>/dev/null || true
  wait "$(cat "$dir/pid")" 2>/dev/null || true
  rm -f "$dir/pid"
}

# metric_sum METRICS_PORT NAME: sum of every sample of metric NAME (any
# labels) at http://127.0.0.1:METRICS_PORT/metrics; 0 if absent.
metric_sum() {
  python3 - "$1" "$2" <<'PY'
import sys, urllib.request
text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=10).read().decode()
total = 0.0
for line in text.splitlines():
    name = line.split("{")[0].split(" ")[0]
    if name == sys.argv[2]:
        total += float(line.rsplit(" ", 1)[1])
print(int(total))
PY
}

# result_field LINE KEY: value of KEY=... in a bazel_build.sh RESULT line.
result_field() { echo "$1" | tr ' ' '\n' | sed -n "s/^$2=//p"; }

E2E_TMP=$(mktemp -d /tmp/outpost-e2e.XXXXXX)
cleanup_e2e() {
  local p
  for p in "$E2E_TMP"/*/pid; do
    [ -f "$p" ] && kill -KILL "$(cat "$p")" 2>/dev/null || true
  done
  rm -rf "$E2E_TMP"
}
trap cleanup_e2e EXIT
