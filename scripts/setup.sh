#!/usr/bin/env bash
# Installs what building and testing Keel needs on Debian 12, and nothing
# else. Safe to run again: packages already present are skipped.
set -euo pipefail

packages=(
  protobuf-compiler # the etcd client's gRPC code is generated at build time
  libprotobuf-dev   # ...and imports google/protobuf/*.proto, which only this package holds
  etcd-server       # tests start real etcd members on loopback
  etcd-client       # etcdctl, for poking at those members by hand
  pkg-config
  gcc               # ring and mimalloc compile C; rustup's toolchain links with cc
  libc6-dev         # libc.a: the test server is linked statically (crt-static)
  docker.io         # the agent runs instances in a real Docker Engine
  haproxy           # bench/router.sh compares the router with HAProxy...
  nginx             # ...and nginx, which is also the benchmark's backend
  wrk               # load for the router tests and benchmarks
  curl              # HTTP/1.1, HTTP/2 and TLS clients in the router tests
  openssl           # openssl s_client through a passthrough route
  chromium          # the console is tested in a real browser
  chromium-driver
  python3           # bench/failover.sh and bench/router.sh drive their runs with it
  procps            # kill(1): tests stop the processes they start by PID
)

missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" ||
    missing+=("$package")
done

if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  sudo_if_needed=()
  [ "$(id -u)" -eq 0 ] || sudo_if_needed=(sudo)
  "${sudo_if_needed[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_if_needed[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Docker Engine: start dockerd when nothing answers on its socket (a fresh
# machine, or a container without systemd).
if ! docker info >/dev/null 2>&1; then
  echo "setup: starting dockerd"
  sudo_if_needed=()
  [ "$(id -u)" -eq 0 ] || sudo_if_needed=(sudo)
  if command -v systemctl >/dev/null && systemctl is-system-running >/dev/null 2>&1; then
    "${sudo_if_needed[@]}" systemctl start docker
  else
    "${sudo_if_needed[@]}" sh -c 'nohup dockerd >/var/log/keel-dockerd.log 2>&1 &'
  fi
  for _ in $(seq 1 60); do
    docker info >/dev/null 2>&1 && break
    sleep 0.5
  done
  docker info >/dev/null 2>&1 || { echo "setup: dockerd did not start; see /var/log/keel-dockerd.log" >&2; exit 1; }
fi

# Debian's etcd-server package may start a system etcd on 2379; the tests
# never use it (they start their own on free ports), so it is left alone.
command -v cargo >/dev/null || { echo "setup: cargo is missing: install Rust with rustup" >&2; exit 1; }
installed=$(rustup component list --installed 2>/dev/null || true)
grep -q '^clippy' <<< "$installed" && grep -q '^rustfmt' <<< "$installed" || rustup component add clippy rustfmt
