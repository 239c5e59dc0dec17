#!/usr/bin/env bash
# The control plane under a fleet: a real controller (`keel server`, embedded
# store, default settings) in its own process, and 1,000 simulated nodes
# (in-process agents with the simulated runtime, heartbeats every second)
# talking to it over loopback HTTP.
# Measures create-app latency (POST /v1/apps), apply to all instances
# running (as agents report them), node loss to its instances running
# elsewhere, and the controller's resident memory (its own process only).
# Last line: RESULT control_plane apply_p99_ms=N node_loss_to_replaced_s=N controller_rss_mb=N
# Goals: apply_p99_ms < 20, node_loss_to_replaced_s < 7 (nodes lost after
# 5 s), controller_rss_mb < 100.
# --quick: 50 nodes in the dev profile, a few seconds, for CI; its figures
# mean little.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--quick" ]; then
  cargo build --quiet --locked -p keel
  cargo run --quiet --locked -p keel-agent --example control_plane_bench -- --quick
else
  cargo build --quiet --locked --release -p keel
  cargo run --quiet --locked --release -p keel-agent --example control_plane_bench
fi
