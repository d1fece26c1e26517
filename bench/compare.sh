#!/usr/bin/env bash
# Side-by-side load test: Keel against nginx and HAProxy, by the project's method.
#
#   bench/compare.sh [workload ...]        workloads: l4-1mib h1-small h1-close tls-h1 tls-handshake
#                                          h2c-small h2c-h2 idle-mem h1-security h1-telemetry (default: all)
#
# The proxy under test runs alone on CPU 1 with one worker; the backend (nginx serving fixed bodies)
# and the load generator (wrk) share CPU 0. Contenders are interleaved (A B C, A B C, ...) over
# ROUNDS rounds and the median is reported. On two cores the load generator limits req/s, so the
# figure that compares proxies is the proxy's CPU time (utime+stime of all its processes, from
# /proc/PID/stat) per request, or per MiB for bulk transfer. Steal time from /proc/stat is reported
# so that noisy rounds show.
#
# Environment: ROUNDS (3), DURATION seconds per run (10), CONNS wrk connections (8),
#              KEEL_ARGS extra `keel run` arguments (e.g. "--io-driver epoll"),
#              NGINX_TLS_EXTRA directives for nginx's TLS server (see below),
#              PEER_DEFER_ACCEPT=1 to give nginx and HAProxy TCP_DEFER_ACCEPT as Keel has it,
#              KEEL_ACCESS_LOG a file for Keel's access log (off by default),
#              KEEL_TRACING a sampling percentage to turn tracing on (off by default).
# tls-handshake: one request per connection (Connection: close), each a full TLS 1.3 handshake, from
# bench/handshake_load.rs (16 connections; wrk resumes sessions, so it is not used there).
# h2c-small: h2load, 8 connections × 16 streams, 1 KiB responses, HTTP/2 with prior knowledge to
# each proxy and HTTP/1.1 from each proxy to the backend (Keel's upstream is HTTP/1.1 for now; nginx
# proxies over HTTP/1.1 only; HAProxy is given the same to compare like with like).
# h2c-h2: the same load, with HTTP/2 from each proxy to the backend too (nginx serving h2c): Keel
# by an ingress port declared HTTP2, HAProxy with `proto h2`, nginx with grpc_pass (its only
# HTTP/2 upstream).
# h1-security: h1-small through two Keels, one plain and one with a 20-rule AuthorizationPolicy and
# JWT validation (ES256, a RequestAuthentication with inline keys) on its inbound port; both get
# the same requests, each with the same valid token. Compared with each other, not with the peers.
# h1-telemetry: h1-small through two Keels, one with metrics only (always on) and one with full
# telemetry: the access log to a file and tracing at TELEMETRY_SAMPLING percent (default 100) with
# every span exported to a collector that takes them (the backend nginx answers 202). Compared
# with each other, not with the peers.
# h1-small, h1-close and tls-h1 also have a `floor` row: bench/floor_proxy.rs moves the bytes with one
# recv and one send per message and nothing else (h1-close: backend connections reused, the request's
# `Connection: close` line dropped, the client closed after Content-Length bytes) — the least CPU a
# proxy using the socket API can spend per request there (not a contender: no parsing or routing).
# tls-h1's floor row, `floor-tls`, is the same with TLS terminated by rustls: what it adds is the
# least a rustls-based proxy adds. h2c-small's, `floor-h2c`, takes HTTP/2 frames and makes one
# HTTP/1.1 exchange per stream on kept-alive backend connections, responses gathered per client
# connection and sent once per event-loop pass; it does not decode HPACK (it sends the one path).
# Needs: nginx with the stream module (Debian: nginx-light libnginx-mod-stream), haproxy, wrk,
# h2load (nghttp2-client), taskset.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
CONNS=${CONNS:-8}
KEEL_ARGS=${KEEL_ARGS:-}
# NGINX_TLS_EXTRA: directives added to nginx's TLS server, e.g. to give it Keel's suite
# ("ssl_conf_command Ciphersuites TLS_AES_128_GCM_SHA256;": nginx follows the client's order).
NGINX_TLS_EXTRA=${NGINX_TLS_EXTRA:-}
# PEER_DEFER_ACCEPT=1: nginx `deferred` and HAProxy `defer-accept` on their HTTP and TLS listeners,
# the TCP_DEFER_ACCEPT Keel sets on such listeners by default (the peers' stock settings leave it off).
NGINX_DEFER="" HAPROXY_DEFER=""
[ "${PEER_DEFER_ACCEPT:-}" = 1 ] && NGINX_DEFER=" deferred" && HAPROXY_DEFER=" defer-accept"
# KEEL_ACCESS_LOG=PATH turns Keel's access log on (Istio's text format) to measure its cost.
ACCESS_LOG_YAML=""
[ -n "${KEEL_ACCESS_LOG:-}" ] && ACCESS_LOG_YAML="  telemetry: { accessLog: { path: $KEEL_ACCESS_LOG } }"
# KEEL_TRACING=PERCENT turns tracing on at that sampling rate, with the access log if asked for too
# (spans go to a collector address nothing listens on: the export is attempted and counted).
if [ -n "${KEEL_TRACING:-}" ]; then
  TRACING_YAML="tracing: { zipkin: { address: 127.0.0.1:9 }, sampling: $KEEL_TRACING }"
  if [ -n "${KEEL_ACCESS_LOG:-}" ]; then
    ACCESS_LOG_YAML="  telemetry: { accessLog: { path: $KEEL_ACCESS_LOG }, $TRACING_YAML }"
  else
    ACCESS_LOG_YAML="  telemetry: { $TRACING_YAML }"
  fi
fi
BACKEND=18000 KEEL_PORT=18001 NGINX_PORT=18002 HAPROXY_PORT=18003 ADMIN=18009
KEEL_HTTP=18011 NGINX_HTTP=18012 HAPROXY_HTTP=18013 KEEL_SEC_HTTP=18014 KEEL_SEC_ADMIN=18010
KEEL_TEL_HTTP=18015 KEEL_TEL_ADMIN=18016 COLLECTOR=18017
KEEL_TLS=18021 NGINX_TLS=18022 HAPROXY_TLS=18023
NGINX_H2C=18032 HAPROXY_H2C=18033
BACKEND_H2C=18004 FLOOR_HTTP=18005 FLOOR_CLOSE_HTTP=18006 FLOOR_TLS=18007 FLOOR_H2C=18008 KEEL_H2H2=18041 NGINX_H2H2=18042 HAPROXY_H2H2=18043
IDLE_CONNS=${IDLE_CONNS:-5000}
STREAM_MODULE=/usr/lib/nginx/modules/ngx_stream_module.so

for tool in nginx haproxy wrk taskset; do
  command -v "$tool" >/dev/null || { echo "compare.sh: $tool is required (apt-get install nginx-light libnginx-mod-stream haproxy wrk util-linux)" >&2; exit 1; }
done
[ -f "$STREAM_MODULE" ] || { echo "compare.sh: nginx stream module missing (apt-get install libnginx-mod-stream)" >&2; exit 1; }
[ "$(nproc)" -ge 2 ] || { echo "compare.sh: needs 2 CPUs" >&2; exit 1; }

WORK=$(mktemp -d /tmp/keel-bench.XXXXXX)
chmod 755 "$WORK"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for f in "$WORK"/*.pid; do [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null || true; done
  sleep 0.2
  rm -rf "$WORK"
}
trap cleanup EXIT

cargo build --release -q --bin keel
cargo build --release -q -p keel-bench --bin floor-proxy --bin handshake-load
KEEL_BIN=$ROOT/target/release/keel

mkdir -p "$WORK/www"
head -c 1048576 /dev/urandom > "$WORK/www/1m"
head -c 1024 /dev/urandom > "$WORK/www/1k"
chmod -R a+rX "$WORK/www"

# ---- backend: nginx on CPU 0 serving fixed bodies
cat > "$WORK/backend.conf" <<CONF
worker_processes 1;
pid $WORK/backend.pid;
error_log $WORK/backend.err;
events { worker_connections 8192; }
http {
  access_log off;
  sendfile on; tcp_nopush on; tcp_nodelay on;
  keepalive_requests 1000000;
  client_body_temp_path $WORK/tmp; proxy_temp_path $WORK/tmp; fastcgi_temp_path $WORK/tmp;
  uwsgi_temp_path $WORK/tmp; scgi_temp_path $WORK/tmp;
  server { listen 127.0.0.1:$BACKEND reuseport; root $WORK/www; }
  server { listen 127.0.0.1:$BACKEND_H2C http2; http2_max_concurrent_streams 1024; root $WORK/www; }
  # A trace collector that takes every batch (h1-telemetry).
  server { listen 127.0.0.1:$COLLECTOR; client_max_body_size 64m; client_body_buffer_size 4m; location / { return 202; } }
}
CONF
mkdir -p "$WORK/tmp"
# ---- one ECDSA P-256 server certificate for every contender's TLS 1.3 listener
openssl ecparam -name prime256v1 -genkey -noout -out "$WORK/tls-key.pem" 2>/dev/null
openssl req -x509 -new -key "$WORK/tls-key.pem" -sha256 -days 30 -subj "/CN=localhost" \
  -addext "subjectAltName=DNS:localhost" -out "$WORK/tls.pem" 2>/dev/null
cat "$WORK/tls.pem" "$WORK/tls-key.pem" > "$WORK/tls-combined.pem"
taskset -c 0 nginx -c "$WORK/backend.conf" -e "$WORK/backend.err"

# ---- contenders on CPU 1, one worker each
cat > "$WORK/nginx-proxy.conf" <<CONF
load_module $STREAM_MODULE;
worker_processes 1;
pid $WORK/nginx-proxy.pid;
error_log $WORK/nginx-proxy.err;
events { worker_connections 8192; }
stream { server { listen 127.0.0.1:$NGINX_PORT; proxy_pass 127.0.0.1:$BACKEND; } }
http {
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path $WORK/tmp; proxy_temp_path $WORK/tmp; fastcgi_temp_path $WORK/tmp;
  uwsgi_temp_path $WORK/tmp; scgi_temp_path $WORK/tmp;
  upstream backend { server 127.0.0.1:$BACKEND; keepalive 256; }
  server {
    listen 127.0.0.1:$NGINX_HTTP$NGINX_DEFER;
    location / { proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
  server {
    listen 127.0.0.1:$NGINX_H2C http2;
    location / { proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
  server {
    listen 127.0.0.1:$NGINX_H2H2 http2;
    location / { grpc_pass grpc://127.0.0.1:$BACKEND_H2C; }
  }
  server {
    listen 127.0.0.1:$NGINX_TLS ssl$NGINX_DEFER;
    ssl_certificate $WORK/tls.pem; ssl_certificate_key $WORK/tls-key.pem; ssl_protocols TLSv1.3;
    $NGINX_TLS_EXTRA
    location / { proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
CONF
taskset -c 1 nginx -c "$WORK/nginx-proxy.conf" -e "$WORK/nginx-proxy.err"

cat > "$WORK/haproxy.cfg" <<CONF
global
  nbthread 1
  maxconn 8000
defaults
  mode tcp
  timeout connect 5s
  timeout client 60s
  timeout server 60s
listen l4
  bind 127.0.0.1:$HAPROXY_PORT
  server backend 127.0.0.1:$BACKEND
listen h1
  mode http
  bind 127.0.0.1:$HAPROXY_HTTP$HAPROXY_DEFER
  server backend 127.0.0.1:$BACKEND
listen h2c
  mode http
  bind 127.0.0.1:$HAPROXY_H2C proto h2
  server backend 127.0.0.1:$BACKEND
listen h2h2
  mode http
  bind 127.0.0.1:$HAPROXY_H2H2 proto h2
  server backend 127.0.0.1:$BACKEND_H2C proto h2
listen tls
  mode http
  bind 127.0.0.1:$HAPROXY_TLS ssl crt $WORK/tls-combined.pem ssl-min-ver TLSv1.3$HAPROXY_DEFER
  server backend 127.0.0.1:$BACKEND
CONF
taskset -c 1 haproxy -db -f "$WORK/haproxy.cfg" >"$WORK/haproxy.log" 2>&1 &
PIDS+=($!)
HAPROXY_PID=$!

cat > "$WORK/keel.yaml" <<CONF
apiVersion: keel.dev/v1alpha1
kind: Proxy
metadata: { name: bench }
spec:
  workers: 1
  admin: { address: 127.0.0.1:$ADMIN }
$ACCESS_LOG_YAML
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: { name: default }
spec:
  ingress:
  - port: { number: $KEEL_PORT, protocol: TCP }
    bind: 127.0.0.1
    defaultEndpoint: 127.0.0.1:$BACKEND
  - port: { number: $KEEL_HTTP, protocol: HTTP }
    bind: 127.0.0.1
    defaultEndpoint: 127.0.0.1:$BACKEND
  - port: { number: $KEEL_H2H2, protocol: HTTP2 }
    bind: 127.0.0.1
    defaultEndpoint: 127.0.0.1:$BACKEND_H2C
  - port: { number: $KEEL_TLS, protocol: HTTP }
    bind: 127.0.0.1
    defaultEndpoint: 127.0.0.1:$BACKEND
    tls: { mode: SIMPLE, serverCertificate: $WORK/tls.pem, privateKey: $WORK/tls-key.pem, minProtocolVersion: TLSV1_3 }
CONF
# shellcheck disable=SC2086
taskset -c 1 "$KEEL_BIN" run -c "$WORK/keel.yaml" --workers 1 --log-level warn $KEEL_ARGS >"$WORK/keel.log" 2>&1 &
PIDS+=($!)
KEEL_PID=$!

# ---- the floors: bytes moved with one recv and one send per message and nothing else
taskset -c 1 "$ROOT/target/release/floor-proxy" 127.0.0.1:$FLOOR_HTTP 127.0.0.1:$BACKEND >"$WORK/floor.log" 2>&1 &
PIDS+=($!)
FLOOR_PID=$!
taskset -c 1 "$ROOT/target/release/floor-proxy" --close 127.0.0.1:$FLOOR_CLOSE_HTTP 127.0.0.1:$BACKEND >"$WORK/floor-close.log" 2>&1 &
PIDS+=($!)
FLOOR_CLOSE_PID=$!
taskset -c 1 "$ROOT/target/release/floor-proxy" --tls "$WORK/tls.pem" "$WORK/tls-key.pem" 127.0.0.1:$FLOOR_TLS 127.0.0.1:$BACKEND >"$WORK/floor-tls.log" 2>&1 &
PIDS+=($!)
FLOOR_TLS_PID=$!
taskset -c 1 "$ROOT/target/release/floor-proxy" --h2c /1k 127.0.0.1:$FLOOR_H2C 127.0.0.1:$BACKEND >"$WORK/floor-h2c.log" 2>&1 &
PIDS+=($!)
FLOOR_H2C_PID=$!

# ---- the second Keel, with security policy: an ES256 key, its JWKS and one token (PyJWT)
# Debian's python3 (python3-jwt, python3-cryptography), whatever else is first on PATH.
PYTHON3=/usr/bin/python3; [ -x "$PYTHON3" ] || PYTHON3=python3
"$PYTHON3" - "$WORK" <<'PY'
import json, sys, time
import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm
work = sys.argv[1]
key = ec.generate_private_key(ec.SECP256R1())
jwk = json.loads(ECAlgorithm.to_jwk(key.public_key())); jwk["kid"] = "bench"
open(f"{work}/jwks.json", "w").write(json.dumps({"keys": [jwk]}))
claims = {"iss": "https://issuer.bench", "sub": "wrk", "aud": "bench", "exp": int(time.time()) + 86400, "groups": ["load"]}
open(f"{work}/token", "w").write(jwt.encode(claims, key, algorithm="ES256", headers={"kid": "bench"}))
PY
TOKEN=$(cat "$WORK/token")
{
  cat <<CONF
apiVersion: keel.dev/v1alpha1
kind: Proxy
metadata: { name: bench-security }
spec:
  workers: 1
  admin: { address: 127.0.0.1:$KEEL_SEC_ADMIN }
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: { name: default }
spec:
  ingress:
  - port: { number: $KEEL_SEC_HTTP, protocol: HTTP }
    bind: 127.0.0.1
    defaultEndpoint: 127.0.0.1:$BACKEND
---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: { name: jwt }
spec:
  jwtRules:
  - issuer: https://issuer.bench
    audiences: [bench]
    # Forwarded, so that both Keels send the backend the same bytes: the difference is the policy.
    forwardOriginalToken: true
    jwks: '$(cat "$WORK/jwks.json")'
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: { name: deny }
spec:
  action: DENY
  rules:
CONF
  # Ten DENY rules that do not match, each looked at for every request.
  for i in $(seq 10); do
    echo "  - { from: [{ source: { ipBlocks: [\"10.$i.0.0/16\"] } }], to: [{ operation: { paths: [\"/admin$i/*\"] } }] }"
  done
  cat <<CONF
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: { name: allow }
spec:
  action: ALLOW
  rules:
CONF
  # Nine ALLOW rules that do not match, then the one that does (JWT principal, claim, method, path).
  for i in $(seq 9); do
    echo "  - { to: [{ operation: { methods: [\"POST\"], paths: [\"/api/v$i/*\"] } }], when: [{ key: \"request.headers[x-tenant]\", values: [\"t$i\"] }] }"
  done
  echo "  - { from: [{ source: { requestPrincipals: [\"https://issuer.bench/*\"] } }], to: [{ operation: { methods: [\"GET\"], paths: [\"/1k\", \"/1m\"] } }], when: [{ key: \"request.auth.claims[groups]\", values: [\"load\"] }] }"
} > "$WORK/keel-security.yaml"
# shellcheck disable=SC2086
taskset -c 1 "$KEEL_BIN" run -c "$WORK/keel-security.yaml" --workers 1 --log-level warn $KEEL_ARGS >"$WORK/keel-security.log" 2>&1 &
PIDS+=($!)
KEEL_SEC_PID=$!
for _ in $(seq 100); do curl -fs -o /dev/null -H "authorization: Bearer $TOKEN" "http://127.0.0.1:$KEEL_SEC_HTTP/1k" && break; sleep 0.05; done
curl -fs -o /dev/null -H "authorization: Bearer $TOKEN" "http://127.0.0.1:$KEEL_SEC_HTTP/1k" || { echo "compare.sh: the security Keel does not answer" >&2; cat "$WORK/keel-security.log" >&2; exit 1; }
[ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$KEEL_SEC_HTTP/1k")" = 403 ] || { echo "compare.sh: the security Keel lets a request without a token through" >&2; exit 1; }

# ---- the third Keel: full telemetry (access log, tracing exported to the collector)
cat > "$WORK/keel-telemetry.yaml" <<CONF
apiVersion: keel.dev/v1alpha1
kind: Proxy
metadata: { name: bench-telemetry }
spec:
  workers: 1
  admin: { address: 127.0.0.1:$KEEL_TEL_ADMIN }
  telemetry:
    accessLog: { path: $WORK/telemetry-access.log }
    tracing: { zipkin: { address: 127.0.0.1:$COLLECTOR }, sampling: ${TELEMETRY_SAMPLING:-100} }
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: { name: default }
spec:
  ingress:
  - port: { number: $KEEL_TEL_HTTP, protocol: HTTP }
    bind: 127.0.0.1
    defaultEndpoint: 127.0.0.1:$BACKEND
CONF
# shellcheck disable=SC2086
taskset -c 1 "$KEEL_BIN" run -c "$WORK/keel-telemetry.yaml" --workers 1 --log-level warn $KEEL_ARGS >"$WORK/keel-telemetry.log" 2>&1 &
PIDS+=($!)
KEEL_TEL_PID=$!

for port in $BACKEND $KEEL_PORT $NGINX_PORT $HAPROXY_PORT $KEEL_HTTP $NGINX_HTTP $HAPROXY_HTTP $KEEL_TEL_HTTP $FLOOR_HTTP $FLOOR_CLOSE_HTTP; do
  for _ in $(seq 100); do curl -fs -o /dev/null "http://127.0.0.1:$port/1k" && break; sleep 0.05; done
  curl -fs -o /dev/null "http://127.0.0.1:$port/1k" || { echo "compare.sh: nothing answers on port $port" >&2; cat "$WORK"/*.log "$WORK"/*.err >&2 2>/dev/null; exit 1; }
done
for port in $KEEL_TLS $NGINX_TLS $HAPROXY_TLS; do
  curl -fsk -o /dev/null "https://127.0.0.1:$port/1k" || { echo "compare.sh: no TLS on port $port" >&2; cat "$WORK"/*.log "$WORK"/*.err >&2 2>/dev/null; exit 1; }
done
KEEL_DRIVER=$(curl -fs "http://127.0.0.1:$ADMIN/stats" | sed -n 's/.*"io_driver": "\([a-z_]*\)".*/\1/p')

# The processes that make up each contender.
pids_of() {
  case $1 in
    keel) echo "$KEEL_PID" ;;
    keel-sec) echo "$KEEL_SEC_PID" ;;
    keel-tel) echo "$KEEL_TEL_PID" ;;
    haproxy) echo "$HAPROXY_PID" ;;
    floor) echo "$FLOOR_PID" ;;
    floor-close) echo "$FLOOR_CLOSE_PID" ;;
    floor-tls) echo "$FLOOR_TLS_PID" ;;
    floor-h2c) echo "$FLOOR_H2C_PID" ;;
    nginx) local m; m=$(cat "$WORK/nginx-proxy.pid"); echo "$m $(pgrep -P "$m" | tr '\n' ' ')" ;;
    direct) echo "" ;;
  esac
}
port_of() { # CONTENDER l4|http
  case $1-$2 in
    keel-l4) echo $KEEL_PORT ;; nginx-l4) echo $NGINX_PORT ;; haproxy-l4) echo $HAPROXY_PORT ;;
    floor-http) echo $FLOOR_HTTP ;; floor-close-http) echo $FLOOR_CLOSE_HTTP ;; floor-tls-tls) echo $FLOOR_TLS ;; floor-h2c-h2c) echo $FLOOR_H2C ;;
    keel-http) echo $KEEL_HTTP ;; keel-sec-http) echo $KEEL_SEC_HTTP ;; keel-tel-http) echo $KEEL_TEL_HTTP ;; nginx-http) echo $NGINX_HTTP ;; haproxy-http) echo $HAPROXY_HTTP ;;
    keel-tls) echo $KEEL_TLS ;; nginx-tls) echo $NGINX_TLS ;; haproxy-tls) echo $HAPROXY_TLS ;;
    keel-h2c) echo $KEEL_HTTP ;; nginx-h2c) echo $NGINX_H2C ;; haproxy-h2c) echo $HAPROXY_H2C ;;
    keel-h2h2) echo $KEEL_H2H2 ;; nginx-h2h2) echo $NGINX_H2H2 ;; haproxy-h2h2) echo $HAPROXY_H2H2 ;;
    direct-*) echo $BACKEND ;;
  esac
}
rss_kib() { local total=0 p; for p in "$@"; do total=$(( total + $(awk '/^VmRSS:/{print $2}' "/proc/$p/status" 2>/dev/null || echo 0) )); done; echo "$total"; }
# proc_ticks AWK_EXPR PID... -> clock ticks summed over processes; after the ")" of the command name
# utime is the 12th field, stime the 13th.
proc_ticks() {
  local expr=$1 total=0 p
  shift
  for p in "$@"; do
    [ -r "/proc/$p/stat" ] || continue
    total=$(( total + $(sed 's/.*) //' "/proc/$p/stat" | awk "{print $expr}") ))
  done
  echo "$total"
}
cpu_ticks() { proc_ticks '$12 + $13' "$@"; }   # utime + stime
user_ticks() { proc_ticks '$12' "$@"; }        # utime alone
steal_ticks() { awk '/^cpu /{print $9}' /proc/stat; }
total_ticks() { awk '/^cpu /{s=0; for (i=2;i<=NF;i++) s+=$i; print s}' /proc/stat; }
to_ms() { # wrk latency like 1.23ms, 850.00us, 1.02s
  awk -v v="$1" 'BEGIN { n=v+0; if (v ~ /us$/) n/=1000; else if (v ~ /ms$/) n=n; else if (v ~ /s$/) n*=1000; printf "%.3f", n }'
}
TICK_US=$(( 1000000 / $(getconf CLK_TCK) ))

# run_one WORKLOAD CONTENDER -> appends "contender reqs rps units_per_s cpu_per_unit p50 p99 steal%" to $WORK/rows.WORKLOAD.
# The unit is a MiB for bulk workloads and a request otherwise.
run_one() {
  local workload=$1 who=$2 port path unit_bytes conns extra=() pids c0 c1 s0 s1 t0 t1 out reqs rps p50 p99 scheme=http
  case $workload in
    l4-1mib) port=$(port_of "$who" l4); path=/1m; unit_bytes=1048576; conns=$CONNS ;;
    h1-small|h1-telemetry) port=$(port_of "$who" http); path=/1k; unit_bytes=0; conns=64 ;;
    h1-security) port=$(port_of "$who" http); path=/1k; unit_bytes=0; conns=64; extra=(-H "Authorization: Bearer $TOKEN") ;;
    h1-close) port=$(port_of "$who" http); path=/1k; unit_bytes=0; conns=64; extra=(-H "Connection: close") ;;
    # The direct row of a TLS workload is plaintext (the backend has no TLS): a load reference only.
    tls-h1) port=$(port_of "$who" tls); path=/1k; unit_bytes=0; conns=64; [ "$who" = direct ] || scheme=https ;;
    tls-handshake) port=$(port_of "$who" tls); path=/1k; unit_bytes=0; conns=16; [ "$who" = direct ] || scheme=https ;;
  esac
  if [ "$workload" = h2c-small ] || [ "$workload" = h2c-h2 ]; then
    if [ "$workload" = h2c-small ]; then port=$(port_of "$who" h2c); else port=$(port_of "$who" h2h2); fi
    pids=$(pids_of "$who")
    # shellcheck disable=SC2086
    c0=$(cpu_ticks $pids); u0=$(user_ticks $pids); s0=$(steal_ticks); t0=$(total_ticks)
    out=$(taskset -c 0 h2load -c 8 -m 16 -D "$DURATION" "http://127.0.0.1:$port/1k")
    # shellcheck disable=SC2086
    c1=$(cpu_ticks $pids); u1=$(user_ticks $pids); s1=$(steal_ticks); t1=$(total_ticks)
    reqs=$(echo "$out" | awk '/^requests:/{print $8}')
    echo "$out" | grep -q " 0 failed" || echo "  warning: $who: $(echo "$out" | grep '^requests:')" >&2
    # h2load reports the mean and max time per request, not percentiles: shown as p50 and p99.
    p50=$(to_ms "$(echo "$out" | awk '/time for request:/{print $6}')")
    p99=$(to_ms "$(echo "$out" | awk '/time for request:/{print $5}')")
    awk -v who="$who" -v reqs="$reqs" -v cpu=$(( (c1 - c0) * TICK_US )) -v p50="$p50" -v p99="$p99" \
        -v user=$(( (u1 - u0) * TICK_US )) \
        -v steal=$(( s1 - s0 )) -v tot=$(( t1 - t0 )) -v d="$DURATION" 'BEGIN {
      per = (reqs > 0) ? sprintf("%.1f", cpu / reqs) : "-"
      uper = (reqs > 0) ? sprintf("%.1f", user / reqs) : "-"
      printf "%s %d %.1f %.1f %s %.3f %.3f %.2f %s\n", who, reqs, reqs / d, reqs / d, per, p50, p99, (tot > 0 ? 100 * steal / tot : 0), uper
    }' >> "$WORK/rows.$workload"
    return
  fi
  pids=$(pids_of "$who")
  # shellcheck disable=SC2086
  c0=$(cpu_ticks $pids); u0=$(user_ticks $pids); s0=$(steal_ticks); t0=$(total_ticks)
  if [ "$workload" = tls-handshake ]; then
    # wrk would resume (it reconnects with SSL_clear, keeping the session): bench/handshake_load.rs
    # makes every handshake a full one and prints wrk's report lines.
    out=$(taskset -c 0 "$ROOT/target/release/handshake-load" -c "$conns" -d "$DURATION" "$scheme://127.0.0.1:$port$path")
  else
    out=$(taskset -c 0 wrk -t1 -c"$conns" -d"${DURATION}s" --latency "${extra[@]}" "$scheme://127.0.0.1:$port$path")
  fi
  # shellcheck disable=SC2086
  c1=$(cpu_ticks $pids); u1=$(user_ticks $pids); s1=$(steal_ticks); t1=$(total_ticks)
  reqs=$(echo "$out" | awk '/requests in/{print $1}')
  rps=$(echo "$out" | awk '/Requests\/sec/{print $2}')
  p50=$(to_ms "$(echo "$out" | awk '$1=="50%"{print $2}')")
  p99=$(to_ms "$(echo "$out" | awk '$1=="99%"{print $2}')")
  if echo "$out" | grep -q "Non-2xx\|Socket errors"; then echo "  warning: $who: $(echo "$out" | grep -E 'Non-2xx|Socket errors')" >&2; fi
  awk -v who="$who" -v reqs="$reqs" -v rps="$rps" -v ub="$unit_bytes" -v cpu=$(( (c1 - c0) * TICK_US )) \
      -v user=$(( (u1 - u0) * TICK_US )) \
      -v p50="$p50" -v p99="$p99" -v steal=$(( s1 - s0 )) -v tot=$(( t1 - t0 )) -v d="$DURATION" 'BEGIN {
    units = (ub > 0) ? reqs * ub / 1048576 : reqs
    per = (who == "direct" || units == 0) ? "-" : sprintf("%.1f", cpu / units)
    uper = (who == "direct" || units == 0) ? "-" : sprintf("%.1f", user / units)
    printf "%s %d %.1f %.1f %s %.3f %.3f %.2f %s\n", who, reqs, rps, units / d, per, p50, p99, (tot > 0 ? 100 * steal / tot : 0), uper
  }' >> "$WORK/rows.$workload"
}

# idle_one CONTENDER -> appends "contender rss_before rss_after kib_per_conn" to $WORK/rows.idle-mem:
# IDLE_CONNS keep-alive connections each make one request and then sit idle.
idle_one() {
  local who=$1 port pids before after
  port=$(port_of "$who" http)
  pids=$(pids_of "$who")
  # shellcheck disable=SC2086
  before=$(rss_kib $pids)
  python3 - "$port" "$IDLE_CONNS" "$WORK/idle.ready" <<'PY' &
import socket, sys, time, resource
port, n, ready = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, n + 1024), hard))
conns = []
# One request and response at a time, so that what stays is idle connections, not a burst's buffers.
for i in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"GET /1k HTTP/1.1\r\nHost: bench\r\n\r\n")
    got = b""
    while b"\r\n\r\n" not in got or len(got) < got.find(b"\r\n\r\n") + 4 + 1024:
        chunk = s.recv(65536)
        if not chunk:
            break
        got += chunk
    conns.append(s)
open(ready, "w").close()
time.sleep(4)
PY
  local client=$!
  for _ in $(seq 300); do [ -f "$WORK/idle.ready" ] && break; sleep 0.1; done
  sleep 1
  # shellcheck disable=SC2086
  after=$(rss_kib $pids)
  wait "$client" || true
  rm -f "$WORK/idle.ready"
  awk -v who="$who" -v b="$before" -v a="$after" -v n="$IDLE_CONNS" 'BEGIN { printf "%s %d %d %.2f\n", who, b, a, (a - b) / n }' >> "$WORK/rows.idle-mem"
  sleep 1
}

median() { sort -g | awk '{a[NR]=$1} END { if (NR==0) print "-"; else if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2 }'; }

report() {
  local workload=$1 who best unit
  unit="request"; [ "$workload" = l4-1mib ] && unit="MiB"
  echo
  if [ "$workload" = idle-mem ]; then
    echo "### $workload — $(date -u +%Y-%m-%d), one measurement per fresh process, keel io driver: $KEEL_DRIVER ${KEEL_ARGS}"
  else
    echo "### $workload — $(date -u +%Y-%m-%d), $ROUNDS rounds × ${DURATION}s, keel io driver: $KEEL_DRIVER ${KEEL_ARGS}"
  fi
  echo
  if [ "$workload" = idle-mem ]; then
    echo "| proxy | RSS before KiB | RSS with $IDLE_CONNS idle connections KiB | KiB per idle connection |"
    echo "|---|---:|---:|---:|"
    for who in keel nginx haproxy; do
      grep "^$who " "$WORK/rows.idle-mem" | head -1 | awk '{printf "| %s | %s | %s | %s |\n", $1, $2, $3, $4}'
    done
    return
  fi
  echo "| proxy | req/s | ${unit}s/s | proxy CPU µs/$unit | of which user | vs best peer | p50 ms | p99 ms | steal % |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
  local peers="nginx haproxy" rows_of="direct keel nginx haproxy floor floor-close floor-tls floor-h2c"
  # h1-security compares Keel with policy against Keel without ("vs best peer" is vs plain Keel).
  [ "$workload" = h1-security ] && peers="keel" && rows_of="direct keel keel-sec"
  # h1-telemetry compares Keel with full telemetry against Keel with metrics only.
  [ "$workload" = h1-telemetry ] && peers="keel" && rows_of="direct keel keel-tel"
  best=$(for who in $peers; do grep "^$who " "$WORK/rows.$workload" | awk '{print $5}' | median; done | sort -g | head -1)
  for who in $rows_of; do
    local rows cpu ratio
    rows=$(grep "^$who " "$WORK/rows.$workload" || true)
    [ -n "$rows" ] || continue
    cpu=$(echo "$rows" | awk '{print $5}' | median)
    ratio=$(awk -v c="$cpu" -v b="$best" 'BEGIN { if (c == "-" || b == "-" || b == 0) print "-"; else printf "%.2f×", c / b }')
    printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s |\n" "$who" \
      "$(echo "$rows" | awk '{print $3}' | median)" "$(echo "$rows" | awk '{print $4}' | median)" "$cpu" \
      "$(echo "$rows" | awk '{print $9}' | median)" "$ratio" \
      "$(echo "$rows" | awk '{print $6}' | median)" "$(echo "$rows" | awk '{print $7}' | median)" "$(echo "$rows" | awk '{print $8}' | median)"
  done
}

WORKLOADS=("$@")
[ ${#WORKLOADS[@]} -gt 0 ] || WORKLOADS=(l4-1mib h1-small h1-close tls-h1 tls-handshake h2c-small h2c-h2 idle-mem h1-security h1-telemetry)
: > "$WORK/report.md"
for workload in "${WORKLOADS[@]}"; do
  case $workload in l4-1mib|h1-small|h1-close|tls-h1|tls-handshake|h2c-small|h2c-h2|idle-mem|h1-security|h1-telemetry) ;; *) echo "compare.sh: unknown workload $workload" >&2; exit 1 ;; esac
  : > "$WORK/rows.$workload"
  # No direct row for idle memory, nor for the h2c workloads.
  case $workload in idle-mem|h2c-small|h2c-h2) ;; *) run_one "$workload" direct ;; esac
  rounds=$ROUNDS
  # Memory a process freed stays with it (allocator, buffer pools): only a fresh process's first
  # idle measurement means anything, so idle-mem runs once per contender.
  [ "$workload" = idle-mem ] && rounds=1
  for round in $(seq "$rounds"); do
    contenders="keel nginx haproxy"
    [ "$workload" = h1-security ] && contenders="keel keel-sec"
    [ "$workload" = h1-telemetry ] && contenders="keel keel-tel"
    # The floor row (bench/floor_proxy.rs): the least CPU any socket-API proxy can spend per request.
    [ "$workload" = h1-small ] && contenders="keel nginx haproxy floor"
    # tls-h1: the same with TLS terminated by rustls.
    [ "$workload" = tls-h1 ] && contenders="keel nginx haproxy floor-tls"
    [ "$workload" = h1-close ] && contenders="keel nginx haproxy floor-close"
    # h2c-small: HTTP/2 frames in, HTTP/1.1 exchanges out, no HPACK decoding.
    [ "$workload" = h2c-small ] && contenders="keel nginx haproxy floor-h2c"
    for who in $contenders; do
      echo "  $workload round $round: $who" >&2
      if [ "$workload" = idle-mem ]; then idle_one "$who"; else run_one "$workload" "$who"; fi
    done
  done
  report "$workload" | tee -a "$WORK/report.md"
done
mkdir -p "$ROOT/bench/results"
cp "$WORK/report.md" "$ROOT/bench/results/$(date -u +%Y%m%dT%H%M%S).md"
