#!/usr/bin/env bash
# Installs what Keel needs on a Debian machine, only what is missing, then returns.
#
#   scripts/setup.sh           build + demo + tests: Rust toolchain (with clippy, rustfmt), C toolchain, curl, python3
#                              (with prometheus_client, to parse /stats/prometheus in tests, grpcio for the gRPC
#                              tests, h2, an HTTP/2 client for the HTTP/2 tests, and jwt + cryptography, which
#                              make the keys and tokens of the JWT tests), nghttp2-client (nghttp, h2load), openssl,
#                              iptables + iproute2 (the interception tests run `keel init-iptables` in network
#                              namespaces they create; they skip, saying why, without root)
#   scripts/setup.sh --bench   also the benchmark peers and load generators: nginx + stream module, haproxy, wrk
set -euo pipefail

want=(curl python3 python3-prometheus-client python3-h2 python3-grpcio python3-jwt python3-cryptography nghttp2-client openssl iptables iproute2 gcc make pkg-config ca-certificates)
[ "${1:-}" = "--bench" ] && want+=(nginx-light libnginx-mod-stream haproxy wrk)

missing=()
for pkg in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  if ! command -v apt-get >/dev/null; then
    echo "setup.sh: please install: ${missing[*]}" >&2
    exit 1
  fi
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "setup.sh: installing ${missing[*]}" >&2
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null; then
  [ -x "$HOME/.cargo/bin/cargo" ] || {
    echo "setup.sh: installing the Rust toolchain with rustup" >&2
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal -c clippy,rustfmt
  }
  export PATH="$HOME/.cargo/bin:$PATH"
fi
if command -v rustup >/dev/null; then
  for component in clippy rustfmt; do
    rustup component list --installed 2>/dev/null | grep -q "^$component" || rustup component add "$component" >/dev/null 2>&1 || true
  done
fi
