#!/usr/bin/env bash
# The README's first command: sets up what running Keel needs on Debian 12
# (setup.sh run: Docker Engine and the build's tools, not the test tools),
# builds the `keel` binary and the tour's example image, and starts the whole
# cloud on this machine with the embedded store. Arguments go to `keel up`
# (try `--help`).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh run
echo "up: building keel (release)"
cargo build --release --locked -q -p keel
echo "up: building the example image keel-testserver:dev"
cargo run --release --locked -q -p keel-testing --example testserver_image
bin="${CARGO_TARGET_DIR:-$PWD/target}/release"
echo "up: starting Keel; in another shell: export PATH=\"$bin:\$PATH\"; keel nodes"
exec "$bin/keel" up "$@"
