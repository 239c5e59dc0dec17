#!/usr/bin/env bash
# Store throughput and watch latency: the embedded store against a single
# local etcd member (default durability), side by side in one run.
# Last line: RESULT store embedded_puts_64=N etcd_puts_64=N ratio_64=R watch_p99_ms=N
# Goal (issue 2): ratio_64 >= 5, watch_p99_ms < 5.
# --quick: a few seconds, for CI; its figures mean nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--quick" ]; then
  cargo run --quiet --locked -p keel-store --example store_bench -- --quick
else
  cargo run --quiet --locked --release -p keel-store --example store_bench
fi
