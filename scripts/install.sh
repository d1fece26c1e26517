#!/usr/bin/env bash
# Installs Keel as a systemd service: the binary, the unit, the docs, and a starter config.
#
#   sudo scripts/install.sh                      build (release) and install under /usr/local
#   scripts/install.sh --destdir /tmp/pkg        stage into a directory (packaging; no root needed)
#
# Options:
#   --prefix DIR     where bin/ and share/doc/keel go (default /usr/local)
#   --confdir DIR    the config directory the service reads (default /etc/keel)
#   --destdir DIR    stage everything under DIR instead of / (nothing is started or created)
#   --binary PATH    install this keel binary instead of building one
#   --no-systemd     install no unit
#
# An existing config is never overwritten. With root and no --destdir, the `keel` system user is
# created and systemd is told about the unit; start it with `systemctl enable --now keel`.
set -euo pipefail
cd "$(dirname "$0")/.."

PREFIX=/usr/local CONFDIR=/etc/keel DESTDIR= BINARY= SYSTEMD=1
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) PREFIX=$2; shift 2 ;;
    --confdir) CONFDIR=$2; shift 2 ;;
    --destdir) DESTDIR=$2; shift 2 ;;
    --binary) BINARY=$2; shift 2 ;;
    --no-systemd) SYSTEMD=0; shift ;;
    -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

if [ -z "$BINARY" ]; then
  command -v cargo >/dev/null || { echo "install.sh: cargo not found; run scripts/setup.sh first or pass --binary" >&2; exit 1; }
  cargo build --release --locked --bin keel
  BINARY=target/release/keel
fi
[ -x "$BINARY" ] || { echo "install.sh: $BINARY is not an executable" >&2; exit 1; }
"$BINARY" version >/dev/null || { echo "install.sh: $BINARY does not run" >&2; exit 1; }

BINDIR=$PREFIX/bin DOCDIR=$PREFIX/share/doc/keel
install -d "$DESTDIR$BINDIR" "$DESTDIR$DOCDIR" "$DESTDIR$CONFDIR"
# Debug sections stripped: the release profile keeps line tables for profiling, not needed here.
if command -v objcopy >/dev/null; then
  objcopy --strip-debug "$BINARY" "$DESTDIR$BINDIR/keel.new"
  chmod 755 "$DESTDIR$BINDIR/keel.new"
else
  install -m 755 "$BINARY" "$DESTDIR$BINDIR/keel.new"
fi
# Renamed into place: a running keel keeps its (old) file; SIGUSR2 then upgrades to the new one.
mv -f "$DESTDIR$BINDIR/keel.new" "$DESTDIR$BINDIR/keel"
install -m 644 README.md docs/*.md "$DESTDIR$DOCDIR/"

if [ -z "$(ls -A "$DESTDIR$CONFDIR" 2>/dev/null)" ]; then
  install -m 644 deploy/kubernetes/keel-config/00-proxy.yaml "$DESTDIR$CONFDIR/00-proxy.yaml"
  cat > "$DESTDIR$CONFDIR/10-sidecar.yaml" <<'YAML'
# Inbound: mesh traffic on 15006 goes to the app on 127.0.0.1:8080. Edit, then `systemctl reload keel`
# (or just save: Keel watches this directory).
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: { name: default, namespace: default }
spec:
  ingress:
  - port: { number: 15006, protocol: HTTP, name: http }
    bind: 0.0.0.0
    defaultEndpoint: 127.0.0.1:8080
YAML
  echo "install.sh: wrote a starter config to $DESTDIR$CONFDIR"
else
  echo "install.sh: kept the existing config in $DESTDIR$CONFDIR"
fi
"$DESTDIR$BINDIR/keel" validate -c "$DESTDIR$CONFDIR"

if [ "$SYSTEMD" = 1 ]; then
  UNITDIR=/etc/systemd/system
  install -d "$DESTDIR$UNITDIR"
  sed -e "s|@BINDIR@|$BINDIR|g" -e "s|@CONFDIR@|$CONFDIR|g" -e "s|@DOCDIR@|$DOCDIR|g" \
    deploy/systemd/keel.service > "$DESTDIR$UNITDIR/keel.service"
  chmod 644 "$DESTDIR$UNITDIR/keel.service"
  if [ -z "$DESTDIR" ] && [ "$(id -u)" -eq 0 ]; then
    id keel >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin keel
    if [ -d /run/systemd/system ]; then
      systemctl daemon-reload
      echo "install.sh: installed; start with: systemctl enable --now keel"
    fi
  fi
fi
echo "install.sh: keel $("$DESTDIR$BINDIR/keel" version | awk '{print $2}') in $DESTDIR$BINDIR"
