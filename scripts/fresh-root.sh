#!/usr/bin/env bash
# Proves the README's two commands on a fresh Debian 12, inside a root file
# system made for the purpose, so that nothing a developer installed by hand
# on this machine can hide a missing install step.
#
# In a new Debian 12 (debootstrap, minbase) holding a clone of the committed
# HEAD and only the Rust toolchain (carried in read-only, as the README
# assumes "Rust installed"), it runs:
#   1. `scripts/setup.sh run` and `scripts/up.sh` (only what running Keel
#      needs), then the README's tour against it: a node ready, the example
#      app deployed, an answer through the router, the app removed;
#   2. `scripts/setup.sh test` and a build of every target.
# The suite itself runs afterwards on this machine (.ci/run).
#
# Docker Engine is this machine's, reached through its socket (Docker cannot
# run inside a chroot). The base file system is cached in $KEEL_FRESH_CACHE
# (default /var/cache/keel-fresh-root); KEEL_FRESH_REBUILD=1 makes it anew.
# Needs root. Usage: bash scripts/fresh-root.sh
set -euo pipefail
cd "$(dirname "$0")/.."

[ "$(id -u)" -eq 0 ] || { echo "fresh-root: needs root (chroot, mounts)" >&2; exit 2; }
command -v debootstrap >/dev/null ||
  { echo "fresh-root: debootstrap is missing: install the Debian package debootstrap (bash scripts/setup.sh test)" >&2; exit 2; }
command -v rustup >/dev/null || { echo "fresh-root: rustup is missing: the toolchain is carried in from rustup's home" >&2; exit 2; }

cache=${KEEL_FRESH_CACHE:-/var/cache/keel-fresh-root}
base=$cache/bookworm-minbase.tar
if [ ! -s "$base" ] || [ "${KEEL_FRESH_REBUILD:-0}" = 1 ]; then
  # This machine's package mirror, so the fresh root installs from where
  # this machine does (deb822 sources first, then the one-line format).
  mirror=$(sed -n 's/^URIs:[[:space:]]*//p' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $1; exit}')
  [ -n "$mirror" ] || mirror=$(awk '$1 == "deb" { print $2; exit }' /etc/apt/sources.list 2>/dev/null)
  [ -n "$mirror" ] || { echo "fresh-root: no Debian mirror found in /etc/apt" >&2; exit 2; }
  mkdir -p "$cache"
  staging=$(mktemp -d /var/tmp/keel-debootstrap.XXXXXX)
  echo "fresh-root: making a Debian 12 base file system from $mirror (cached in $base)"
  if ! debootstrap --variant=minbase bookworm "$staging" "$mirror" >"$cache/debootstrap.log" 2>&1; then
    rm -rf --one-file-system "$staging"
    echo "fresh-root: debootstrap failed; see $cache/debootstrap.log" >&2
    exit 1
  fi
  tar -C "$staging" -cf "$base.part" . && mv "$base.part" "$base"
  rm -rf --one-file-system "$staging"
fi

root=$(mktemp -d /var/tmp/keel-fresh-root.XXXXXX)
mounts=()
cleanup() {
  local i
  for ((i = ${#mounts[@]} - 1; i >= 0; i--)); do
    umount -l "${mounts[i]}" 2>/dev/null || true
  done
  rm -rf --one-file-system "$root"
}
trap cleanup EXIT
bind() { # bind SOURCE TARGET [ro]
  mount --bind "$1" "$2"
  [ "${3:-}" = ro ] && mount -o remount,bind,ro "$2"
  mounts+=("$2")
}
tar -C "$root" -xf "$base"

# The package sources, certificate authorities and resolver of this machine:
# its mirror and the crate registry may only be reachable through them.
rm -rf "$root/etc/apt/sources.list" "$root/etc/apt/sources.list.d" "$root/etc/apt/apt.conf.d"
cp -a /etc/apt/sources.list.d /etc/apt/apt.conf.d "$root/etc/apt/"
[ -f /etc/apt/sources.list ] && cp /etc/apt/sources.list "$root/etc/apt/"
cp -a /usr/share/keyrings/. "$root/usr/share/keyrings/" 2>/dev/null || true
cp -aL /etc/ssl/. "$root/etc/ssl/"
mkdir -p "$root/usr/local/share/ca-certificates"
cp -a /usr/local/share/ca-certificates/. "$root/usr/local/share/ca-certificates/" 2>/dev/null || true
cp -L /etc/resolv.conf "$root/etc/resolv.conf"

mkdir -p "$root/proc" "$root/sys" "$root/dev" "$root/opt/rustup" "$root/opt/cargo-bin" "$root/src"
mount -t proc proc "$root/proc" && mounts+=("$root/proc")
mount --rbind /sys "$root/sys" && mounts+=("$root/sys")
bind /dev "$root/dev"
bind /dev/pts "$root/dev/pts"
bind "${RUSTUP_HOME:-$HOME/.rustup}" "$root/opt/rustup" ro
bind "${CARGO_HOME:-$HOME/.cargo}/bin" "$root/opt/cargo-bin" ro
socket=$(readlink -f /var/run/docker.sock 2>/dev/null || true)
[ -S "$socket" ] || { echo "fresh-root: no Docker Engine socket on this machine (run bash scripts/setup.sh first)" >&2; exit 2; }
mkdir -p "$root/run" && touch "$root/run/docker.sock"
bind "$socket" "$root/run/docker.sock"

git clone -q "$PWD" "$root/src/keel"
echo "fresh-root: HEAD $(git rev-parse --short HEAD) in a fresh Debian 12 at $root"

# What runs inside. The tour uses ports and a node name of its own, so it
# cannot meet anything else this machine runs.
cat >"$root/src/fresh-steps.sh" <<'STEPS'
set -euo pipefail
cd /src/keel
step() { echo "fresh-root: == $*"; }

step "the README's first command: scripts/up.sh (setup run, build, keel up)"
# Its own session, so the whole group (cargo while it builds) can be stopped.
setsid bash scripts/up.sh --data-dir /var/lib/keel-fresh --listen 127.0.0.1:17070 \
  --http 127.0.0.1:18080 --https off --name fresh-root-tour >/var/log/keel-up.log 2>&1 &
up=$!
stop_up() { kill -INT -- "-$up" 2>/dev/null || true; wait "$up" 2>/dev/null || true; }
failed() {
  echo "fresh-root: $*; keel up's output:" >&2
  tail -n 40 /var/log/keel-up.log >&2
  stop_up
  exit 1
}
export PATH="/src/keel/target/release:$PATH"
# Building takes as long as it takes; once keel starts, its node has a minute.
until grep -q '^up: starting Keel' /var/log/keel-up.log; do
  kill -0 "$up" 2>/dev/null || failed "scripts/up.sh stopped before starting Keel"
  sleep 2
done
ready=false
for _ in $(seq 1 60); do
  kill -0 "$up" 2>/dev/null || failed "keel up stopped"
  if keel nodes 2>/dev/null | grep -q 'fresh-root-tour.*ready'; then ready=true; break; fi
  sleep 1
done
$ready || failed "keel up did not bring its node to ready within a minute"
{
  keel deploy -f examples/hello/app.yaml --timeout 3m &&
    answer=$(curl -fsS --max-time 10 -H 'Host: hello.keel.test' http://127.0.0.1:18080/) &&
    echo "fresh-root: the tour's app answered through the router: ${answer:0:60}" &&
    keel rm hello --project tour
} || failed "the tour failed"
stop_up

step "the README's second command's set-up, and a build of every target"
# Debian's nginx and etcd would serve on 80 and 2379; set-up must leave no
# such service running. (The network is this machine's: only a port that was
# free before set-up counts.)
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
free_before=()
for port in 80 2379; do listening "$port" || free_before+=("$port"); done
bash scripts/setup.sh test
for port in "${free_before[@]}"; do
  if listening "$port"; then
    echo "fresh-root: something listens on port $port after scripts/setup.sh test" >&2
    exit 1
  fi
done
cargo build --workspace --all-targets --locked
STEPS

chroot "$root" /usr/bin/env -i HOME=/root TERM=dumb CI=true LANG=C.UTF-8 \
  PATH=/opt/cargo-bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  RUSTUP_HOME=/opt/rustup CARGO_HOME=/root/.cargo \
  SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt SSL_CERT_DIR=/etc/ssl/certs \
  bash /src/fresh-steps.sh
echo "fresh-root: passed"
