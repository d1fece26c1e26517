#!/usr/bin/env bash
# Keel in front of a sample backend on loopback, with curls you can paste.
#
#   scripts/demo.sh           build, start the backend and Keel, curl through Keel, then run until Ctrl-C
#   scripts/demo.sh --check   the same, but exit after checking the curls (used by scripts/test.sh)
#
# Ports: backend 127.0.0.1:8080, Keel inbound 15080 and outbound 15081, admin 127.0.0.1:15000
# (examples/demo.yaml). KEEL_BIN=path skips the build and uses that binary.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"

if [ -z "${KEEL_BIN:-}" ]; then
  cargo build --release --bin keel
  KEEL_BIN=target/release/keel
fi

for port in 8080 15080 15081 15082 15000; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "demo.sh: port $port is already in use on 127.0.0.1; stop what uses it and try again" >&2
    exit 1
  fi
done

WORK=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

echo "Hello from the backend, through Keel." > "$WORK/index.html"
python3 -m http.server 8080 --bind 127.0.0.1 --directory "$WORK" >"$WORK/backend.log" 2>&1 &
pids+=($!)
"$KEEL_BIN" run -c examples/demo.yaml >"$WORK/keel.log" 2>&1 &
pids+=($!)

for _ in $(seq 100); do
  curl -fs -o /dev/null http://127.0.0.1:15000/ready && curl -fs -o /dev/null http://127.0.0.1:8080/ && break
  sleep 0.1
done
if ! curl -fs -o /dev/null http://127.0.0.1:15000/ready; then
  echo "demo.sh: keel did not start:" >&2
  cat "$WORK/keel.log" >&2
  exit 1
fi

echo "\$ curl -s http://127.0.0.1:15080/      # inbound: Keel's Sidecar ingress -> the app on :8080"
inbound=$(curl -fsS http://127.0.0.1:15080/)
echo "$inbound"
echo "\$ curl -s http://127.0.0.1:15081/      # outbound: the ServiceEntry 'backend' through Keel"
outbound=$(curl -fsS http://127.0.0.1:15081/)
echo "$outbound"
echo "\$ curl -si -H 'Host: web' http://127.0.0.1:15082/   # outbound HTTP, routed by Host; Keel adds x-served-by"
web=$(curl -fsS -i -H 'Host: web' http://127.0.0.1:15082/ | tr -d '\r')
echo "$web" | grep -iE '^(HTTP/|x-served-by|x-request-id)'
echo "$web" | tail -1
echo "\$ curl -s -H 'Host: web' http://127.0.0.1:15082/ping   # answered by Keel itself (directResponse)"
ping=$(curl -fsS -H 'Host: web' http://127.0.0.1:15082/ping)
echo "$ping"
echo "\$ curl -s http://127.0.0.1:15000/stats/prometheus | grep accepted"
curl -fsS http://127.0.0.1:15000/stats/prometheus | grep '^keel_listener_connections_accepted_total'

if [ "${1:-}" = "--check" ]; then
  expected="Hello from the backend, through Keel."
  [ "$inbound" = "$expected" ] && [ "$outbound" = "$expected" ] || { echo "demo.sh: unexpected answer" >&2; exit 1; }
  echo "$web" | grep -qi '^x-served-by: keel' && echo "$web" | tail -1 | grep -qx "$expected" || { echo "demo.sh: unexpected HTTP answer" >&2; exit 1; }
  [ "$ping" = "pong from keel" ] || { echo "demo.sh: unexpected /ping answer" >&2; exit 1; }
  echo "demo: ok"
  exit 0
fi

cat <<MSG

Keel is running (log: $WORK/keel.log). In another terminal, paste:
  curl http://127.0.0.1:15080/
  curl -i -H 'Host: web' http://127.0.0.1:15082/
  curl http://127.0.0.1:15000/stats/prometheus
Press Ctrl-C to stop.
MSG
wait "${pids[1]}"
