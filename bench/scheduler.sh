#!/usr/bin/env bash
# Scheduler throughput and incrementality: places 1,000,000 instances (10,000
# apps x 100, with constraints and zone spread) on 10,000 nodes in 3 regions x
# 3 zones, in one process, with no store.
# Last line: RESULT scheduler placements_per_s=N first10_vs_last10=R
# (R = time per placement of the last tenth / that of the first tenth).
# Goal: placements_per_s >= 50000 on 2 cores, first10_vs_last10 <= 1.2.
# --quick: 20,000 instances on 1,000 nodes in the dev profile, for CI; its
# figures mean little.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--quick" ]; then
  cargo run --quiet --locked -p keel-scheduler --example scheduler_bench -- --quick
else
  cargo run --quiet --locked --release -p keel-scheduler --example scheduler_bench
fi
