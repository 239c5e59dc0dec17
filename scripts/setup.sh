#!/usr/bin/env bash
# Installs what building and testing Keel needs on Debian 12, and nothing
# else. Safe to run again: packages already present are skipped.
set -euo pipefail

packages=(
  protobuf-compiler # the etcd client's gRPC code is generated at build time
  etcd-server       # tests start real etcd members on loopback
  etcd-client       # etcdctl, for poking at those members by hand
  pkg-config
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

# Debian's etcd-server package may start a system etcd on 2379; the tests
# never use it (they start their own on free ports), so it is left alone.
command -v cargo >/dev/null || { echo "setup: cargo is missing: install Rust with rustup" >&2; exit 1; }
rustup component list --installed 2>/dev/null | grep -q clippy || rustup component add clippy rustfmt
