#!/usr/bin/env bash
# Node loss, as a user sees it through the router, with default settings.
# `keel up` (node a, zone a) and a second `keel agent` (node b, zone b,
# advertise address 127.0.0.2) run the workspace's test server, 4 instances
# spread over both nodes. A client sends a request through the router every
# 10 ms. Then node b is unplugged: its agent is SIGKILLed and its
# containers removed. Measured per run: the time from the loss to the last
# failed request (after it, every request succeeds), and to 4 instances
# ready again on node a. 5 runs (--quick: 1).
# Last line: RESULT failover node_loss_to_serving_p50_s=N max_s=N full_capacity_p50_s=N
# Goal: node_loss_to_serving under 7 s (Kubernetes needs about 5 minutes by
# default, Nomad about 30 seconds).
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-$PWD/target}"
runs=5
profile=release
if [ "${1:-}" = "--quick" ]; then runs=1; profile=dev; fi
if [ "$profile" = release ]; then
  cargo build --quiet --locked --release -p keel
  keel="$target/release/keel"
else
  cargo build --quiet --locked -p keel
  keel="$target/debug/keel"
fi
cargo run --quiet --locked --release -p keel-testing --example testserver_image
exec python3 bench/lib/failover.py "$keel" "$runs"
