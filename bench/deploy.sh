#!/usr/bin/env bash
# Deploying onto the real Docker Engine: a real controller (in-process,
# embedded store) and one agent on DockerRuntime, the keel-testserver image
# already built (FROM scratch, built here: no registry).
# Measures, 20 times: apply of an app with 3 instances (HTTP health check)
# to all 3 running and ready through the API; next to it, in the same run,
# three plain `docker run -p` at once plus the first successful health
# probe of each, done by the benchmark itself.
# Last line: RESULT deploy ready_p50_ms=N docker_baseline_p50_ms=N ratio=R
# Goals: ready_p50_ms < 800, ratio < 1.5 (orchestration adds little over
# the engine itself).
# --quick: 3 runs in the dev profile, for CI; its figures mean little.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--quick" ]; then
  cargo run --quiet --locked -p keel-agent --features testing --example deploy_bench -- --quick
else
  cargo run --quiet --locked --release -p keel-agent --features testing --example deploy_bench
fi
