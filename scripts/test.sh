#!/usr/bin/env bash
# The whole test suite: installs what it needs, then lints, tests and runs
# every benchmark in its quick mode. This is the README's test command and
# what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh test

echo "== format"
cargo fmt --all -- --check

echo "== lint"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "== benchmarks (quick mode, so they cannot rot)"
for bench in bench/*.sh; do
  echo "-- $bench --quick"
  bash "$bench" --quick
done

echo "== tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
else
  cargo test --workspace --locked --no-fail-fast
fi
