#!/usr/bin/env bash
# The whole test suite: formatting, lints, then every test against the real RabbitMQ and
# PostgreSQL (started, or installed, when missing).
set -euo pipefail
cd "$(dirname "$0")/.."

deploy/toolchain.sh --with-nextest
export PATH="$HOME/.cargo/bin:$PATH"
deploy/services.sh
# shellcheck source=/dev/null
source .flotilla/env

cargo fmt --all --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
# The end-to-end tests start the real binaries.
cargo build --workspace --bins --quiet
cargo nextest run --workspace --profile ci "$@"
