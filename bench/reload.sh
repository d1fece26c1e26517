#!/usr/bin/env bash
# What a config reload costs: throughput and p99 under load with and without a reload every 100 ms,
# and the time from SIGHUP to the new config serving for 10, 1,000 and 10,000 routes.
#
#   bench/reload.sh
#
# Keel runs alone on CPU 1 with one worker (release build); the backend (nginx serving 1 KiB) and
# wrk share CPU 0. "SIGHUP to serving" is measured from outside: the script sends SIGHUP and polls
# a route whose response header changes with each config until the new value is seen (curl on
# CPU 0), and Keel's own figure (trigger to every worker committed) is read from
# keel_config_last_reload_duration_milliseconds. Results go to bench/results/reload-<time>.md.
#
# Environment: DURATION seconds per load run (10), CONNS wrk connections (32), ROUNDS (3),
# PARTS which measures to run ("load sighup").
# Needs: nginx, wrk, curl, taskset, python3.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DURATION=${DURATION:-10}
CONNS=${CONNS:-32}
ROUNDS=${ROUNDS:-3}
PARTS=${PARTS:-load sighup}
BACKEND=18200 PORT=18201 ADMIN=18209

for tool in nginx wrk curl taskset python3; do
  command -v "$tool" >/dev/null || { echo "reload.sh: $tool is required" >&2; exit 1; }
done

WORK=$(mktemp -d /tmp/keel-reload.XXXXXX)
chmod 755 "$WORK"
KEEL_PID=
cleanup() {
  [ -n "$KEEL_PID" ] && kill "$KEEL_PID" 2>/dev/null || true
  [ -f "$WORK/backend.pid" ] && kill "$(cat "$WORK/backend.pid")" 2>/dev/null || true
  sleep 0.2
  rm -rf "$WORK"
}
trap cleanup EXIT

cargo build --release -q --bin keel
KEEL_BIN=$ROOT/target/release/keel

mkdir -p "$WORK/www" "$WORK/tmp"
head -c 1024 /dev/urandom > "$WORK/www/1k"
chmod -R a+rX "$WORK/www"
cat > "$WORK/backend.conf" <<CONF
worker_processes 1;
pid $WORK/backend.pid;
error_log $WORK/backend.err;
events { worker_connections 8192; }
http {
  access_log off; keepalive_requests 1000000;
  client_body_temp_path $WORK/tmp; proxy_temp_path $WORK/tmp; fastcgi_temp_path $WORK/tmp;
  uwsgi_temp_path $WORK/tmp; scgi_temp_path $WORK/tmp;
  server { listen 127.0.0.1:$BACKEND; root $WORK/www; }
}
CONF
taskset -c 0 nginx -c "$WORK/backend.conf" -e "$WORK/backend.err"

# config ROUTES GENERATION: a VirtualService with ROUTES routes (ROUTES-1 exact-path matches that
# are never hit, then the catch-all the load uses), whose catch-all sets x-gen: GENERATION.
config() {
  python3 - "$1" "$2" "$PORT" "$BACKEND" "$ADMIN" <<'PY'
import sys
n, gen, port, backend, admin = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
out = [f"""apiVersion: keel.dev/v1alpha1
kind: Proxy
metadata: {{ name: bench, namespace: default }}
spec:
  workers: 1
  admin: {{ address: 127.0.0.1:{admin} }}
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{ name: default }}
spec:
  egress:
  - port: {{ number: {port}, protocol: HTTP }}
    bind: 127.0.0.1
    hosts: ["./*"]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{ name: app }}
spec:
  hosts: [app]
  ports: [{{ number: {port}, name: http, protocol: HTTP }}]
  resolution: STATIC
  endpoints: [{{ address: 127.0.0.1, ports: {{ http: {backend} }} }}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{ name: app }}
spec:
  hosts: [app]
  http:
"""]
for i in range(n - 1):
    out.append(f"  - match: [{{ uri: {{ exact: /r{i} }} }}]\n    route: [{{ destination: {{ host: app }} }}]\n")
out.append(f"  - route: [{{ destination: {{ host: app }} }}]\n    headers: {{ response: {{ set: {{ x-gen: \"{gen}\" }} }} }}\n")
sys.stdout.write("".join(out))
PY
}

start_keel() {
  taskset -c 1 "$KEEL_BIN" run -c "$WORK/keel.yaml" --no-watch --log-level warn 2>>"$WORK/keel.log" &
  KEEL_PID=$!
  for _ in $(seq 1 200); do
    curl -fs "http://127.0.0.1:$ADMIN/ready" >/dev/null 2>&1 && return 0
    sleep 0.05
  done
  echo "keel did not start:" >&2; cat "$WORK/keel.log" >&2; exit 1
}
stop_keel() { kill "$KEEL_PID" 2>/dev/null || true; wait "$KEEL_PID" 2>/dev/null || true; KEEL_PID=; }

gen_of() { curl -s -o /dev/null -D - -H 'Host: app' "http://127.0.0.1:$PORT/1k" | tr -d '\r' | awk -F': ' 'tolower($1)=="x-gen"{print $2}'; }

cpu_ticks() { awk '{print $14 + $15}' "/proc/$KEEL_PID/stat"; }

# wrk_run: prints "req/s p99_ms keel_cpu_us_per_request errors"
wrk_run() {
  local t0 t1
  t0=$(cpu_ticks)
  taskset -c 0 wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency -H 'Host: app' "http://127.0.0.1:$PORT/1k" >"$WORK/wrk.out" 2>&1
  local rps p99 errors
  t1=$(cpu_ticks)
  local total cpu
  total=$(awk '/requests in/{print $1}' "$WORK/wrk.out")
  cpu=$(awk -v a="$t0" -v b="$t1" -v n="$total" -v hz="$(getconf CLK_TCK)" 'BEGIN{printf "%.1f", (b-a)/hz*1e6/n}')
  rps=$(awk '/Requests\/sec/{print $2}' "$WORK/wrk.out")
  p99=$(awk '$1=="99%"{v=$2; if (v ~ /us$/) {sub(/us/,"",v); v=v/1000} else if (v ~ /ms$/) {sub(/ms/,"",v)} else if (v ~ /s$/) {sub(/s/,"",v); v=v*1000}; print v}' "$WORK/wrk.out")
  errors=$(awk '/Non-2xx|Socket errors/{s=s $0 "; "} END{print (s==""?"none":s)}' "$WORK/wrk.out")
  echo "$rps $p99 $cpu $errors"
}

STAMP=$(date -u +%Y%m%dT%H%M%S)
OUT=bench/results/reload-$STAMP.md
mkdir -p bench/results
{
  echo "# reload bench $STAMP"
  echo
  echo "$(nproc) CPUs, kernel $(uname -r); keel $(git rev-parse --short HEAD 2>/dev/null || echo '?'), 1 worker on CPU 1; wrk -c$CONNS on CPU 0, ${DURATION}s runs, $ROUNDS rounds (interleaved)."
  echo
} >"$OUT"

if [[ " $PARTS " == *" load "* ]]; then
{
  echo "## Load with and without a reload every 100 ms (100 routes)"
  echo
  echo "Three runs per round: *steady* (nothing else), *loop only* (the same file-swapping loop on CPU 0,"
  echo "sending signal 0 instead of SIGHUP: what the loop itself costs the load generator and backend),"
  echo "*reloading* (SIGHUP every 100 ms). Keel's reload cost is *reloading* against *loop only*."
  echo
  echo "| round | steady req/s | steady p99 ms | steady keel CPU µs/req | loop-only req/s | loop-only p99 ms | reloading req/s | reloading p99 ms | reloading keel CPU µs/req | reloads done | errors |"
  echo "|---|---|---|---|---|---|---|---|---|---|---|"
} >>"$OUT"
config 100 0 >"$WORK/keel.yaml"
start_keel
# swap_loop SIGNAL: swaps the two prepared configs in every 100 ms, sending SIGNAL (HUP, or 0 for
# nothing) after each swap; pinned to CPU 0, so it costs the proxy nothing.
swap_loop() {
  taskset -pc 0 $BASHPID >/dev/null
  local end=$((SECONDS + DURATION + 1))
  while [ $SECONDS -lt $end ]; do
    for v in a b; do
      cp "$WORK/$v.yaml" "$WORK/keel.yaml.tmp"; mv "$WORK/keel.yaml.tmp" "$WORK/keel.yaml"
      kill -"$1" "$KEEL_PID"; sleep 0.1
    done
  done
}
reloads() { curl -s "http://127.0.0.1:$ADMIN/stats" | python3 -c 'import json,sys; print(json.load(sys.stdin)["config_reloads"]["success"])'; }
for r in $(seq 1 "$ROUNDS"); do
  read -r s_rps s_p99 s_cpu s_err < <(wrk_run)
  config 100 "$r-a" >"$WORK/a.yaml"; config 100 "$r-b" >"$WORK/b.yaml"
  swap_loop 0 & HUPPER=$!
  read -r n_rps n_p99 n_cpu n_err < <(wrk_run)
  wait "$HUPPER" 2>/dev/null || true
  before=$(reloads)
  swap_loop HUP & HUPPER=$!
  read -r l_rps l_p99 l_cpu l_err < <(wrk_run)
  wait "$HUPPER" 2>/dev/null || true
  after=$(reloads)
  echo "| $r | $s_rps | $s_p99 | $s_cpu | $n_rps | $n_p99 | $l_rps | $l_p99 | $l_cpu | $((after - before)) | steady: $s_err; loop only: $n_err; reloading: $l_err |" >>"$OUT"
done
stop_keel
fi

if [[ " $PARTS " == *" sighup "* ]]; then
{
  echo
  echo "## SIGHUP to the new config serving"
  echo
  echo "| routes | config size | SIGHUP → new route seen (median of 5, ms) | keel's own: trigger → all workers committed (ms) |"
  echo "|---|---|---|---|"
} >>"$OUT"
for routes in 10 1000 10000; do
  config "$routes" 0 >"$WORK/keel.yaml"
  start_keel
  size=$(stat -c %s "$WORK/keel.yaml")
  times=()
  own=()
  for i in 1 2 3 4 5; do
    config "$routes" "$i" >"$WORK/keel.yaml.tmp"; mv "$WORK/keel.yaml.tmp" "$WORK/keel.yaml"
    t0=$(date +%s%N)
    kill -HUP "$KEEL_PID"
    until [ "$(gen_of)" = "$i" ]; do :; done
    t1=$(date +%s%N)
    times+=($(( (t1 - t0) / 1000000 )))
    own+=("$(curl -s "http://127.0.0.1:$ADMIN/stats/prometheus" | awk '/^keel_config_last_reload_duration_milliseconds/{print $2}')")
  done
  med=$(printf '%s\n' "${times[@]}" | sort -n | sed -n 3p)
  omed=$(printf '%s\n' "${own[@]}" | sort -n | sed -n 3p)
  echo "| $routes | $((size / 1024)) KiB | $med (${times[*]}) | $omed (${own[*]}) |" >>"$OUT"
  stop_keel
done
fi

cat "$OUT"
echo
echo "written to $OUT"
