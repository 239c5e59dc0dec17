#!/usr/bin/env bash
# Installs what Keel needs on Debian 12, and nothing else. Safe to run again:
# packages already present are skipped.
#
#   bash scripts/setup.sh run    # building and running Keel (scripts/up.sh)
#   bash scripts/setup.sh test   # ...and the test tools (scripts/test.sh); the default
#
# Every package is listed with the reason it is here. After installing, each
# is checked by a file it must provide, so a package that did not install is
# one line naming it, not a build script's panic later.
set -euo pipefail

purpose=${1:-test}
case "$purpose" in
  run | test) ;;
  *) echo "setup: unknown purpose '$purpose' (expected 'run' or 'test')" >&2; exit 2 ;;
esac

# package|a file it provides that the build or a test uses|why
run_packages=(
  "protobuf-compiler|/usr/bin/protoc|the etcd client's gRPC code is generated at build time"
  "libprotobuf-dev|/usr/include/google/protobuf/descriptor.proto|...and imports google/protobuf/*.proto, which only this package holds"
  "gcc|/usr/bin/gcc|ring and mimalloc compile C; rustup's toolchain links with cc"
  "libc6-dev|/usr/lib/$(uname -m)-linux-gnu/libc.a|libc.a: the example app's image is a statically linked binary"
  "docker.io|/usr/sbin/dockerd|the agent runs instances in Docker Engine"
  "curl|/usr/bin/curl|the README's tour reaches the example app through the router; router tests are HTTP/1.1, HTTP/2 and TLS clients with it"
)
test_packages=(
  "etcd-server|/usr/bin/etcd|tests start real etcd members on loopback"
  "etcd-client|/usr/bin/etcdctl|etcdctl, for poking at those members by hand"
  "haproxy|/usr/sbin/haproxy|bench/router.sh compares the router with HAProxy..."
  "nginx|/usr/sbin/nginx|...and nginx, which is also the benchmark's backend"
  "wrk|/usr/bin/wrk|load for the router tests and benchmarks"
  "openssl|/usr/bin/openssl|openssl s_client through a passthrough route"
  "chromium|/usr/bin/chromium|the console is tested in a real browser..."
  "chromium-driver|/usr/bin/chromedriver|...driven over WebDriver"
  "python3|/usr/bin/python3|bench/failover.sh and bench/router.sh drive their runs with it"
  "procps|/usr/bin/kill|kill(1) and ps: tests stop the processes they start by PID"
  "debootstrap|/usr/sbin/debootstrap|scripts/fresh-root.sh builds a fresh Debian 12 to prove the install steps"
)
# Packages whose postinst starts a system service on a port Keel's roles or
# tests use (nginx on 80, etcd on 2379): installed with the start blocked,
# and disabled afterwards, so set-up never leaves one running.
services_of=( "nginx:nginx" "etcd-server:etcd" )

wanted=("${run_packages[@]}")
[ "$purpose" = test ] && wanted+=("${test_packages[@]}")

sudo_if_needed=()
[ "$(id -u)" -eq 0 ] || sudo_if_needed=(sudo)

missing=()
for entry in "${wanted[@]}"; do
  package=${entry%%|*}
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" ||
    missing+=("$package")
done

if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  # policy-rc.d answering 101 tells invoke-rc.d and deb-systemd-invoke not
  # to start services from maintainer scripts (Debian policy 9.3.3).
  policy=/usr/sbin/policy-rc.d
  made_policy=false
  if [ ! -e "$policy" ]; then
    "${sudo_if_needed[@]}" sh -c "printf '#!/bin/sh\nexit 101\n' > $policy && chmod 755 $policy"
    made_policy=true
  fi
  status=0
  "${sudo_if_needed[@]}" apt-get update -qq || status=$?
  if [ "$status" -eq 0 ]; then
    DEBIAN_FRONTEND=noninteractive "${sudo_if_needed[@]}" apt-get install -y -qq --no-install-recommends \
      "${missing[@]}" >/dev/null || status=$?
  fi
  $made_policy && "${sudo_if_needed[@]}" rm -f "$policy"
  [ "$status" -eq 0 ] || { echo "setup: apt-get failed (exit $status) installing ${missing[*]}" >&2; exit 1; }

  # Nothing we installed may serve on boot either.
  for pair in "${services_of[@]}"; do
    package=${pair%%:*} service=${pair#*:}
    [[ " ${missing[*]} " == *" $package "* ]] || continue
    if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
      "${sudo_if_needed[@]}" systemctl disable --now "$service.service" >/dev/null 2>&1 || true
    elif command -v update-rc.d >/dev/null && [ -e "/etc/init.d/$service" ]; then
      "${sudo_if_needed[@]}" update-rc.d "$service" disable >/dev/null 2>&1 || true
    fi
    echo "setup: $package installed with its $service service stopped and disabled (Keel's tests start their own)"
  done
fi

# Each package proves itself by a file the build or the tests use.
absent=0
for entry in "${wanted[@]}"; do
  package=${entry%%|*} rest=${entry#*|}
  file=${rest%%|*}
  if [ ! -e "$file" ]; then
    echo "setup: $file is missing: install the Debian package $package" >&2
    absent=1
  fi
done
[ "$absent" -eq 0 ] || exit 1

# Docker Engine: start dockerd when nothing answers on its socket (a fresh
# machine, or a container without systemd).
if ! docker info >/dev/null 2>&1; then
  echo "setup: starting dockerd"
  if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
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

command -v cargo >/dev/null || { echo "setup: cargo is missing: install Rust with rustup" >&2; exit 1; }
if [ "$purpose" = test ]; then
  installed=$(rustup component list --installed 2>/dev/null || true)
  grep -q '^clippy' <<< "$installed" && grep -q '^rustfmt' <<< "$installed" || rustup component add clippy rustfmt
fi
