#!/usr/bin/env bash
# The whole test suite: formatting, lints, the deployment files' checks, then every test against
# the real RabbitMQ and PostgreSQL (started, or installed, when missing).
set -euo pipefail
cd "$(dirname "$0")/.."

deploy/toolchain.sh --with-nextest
export PATH="$HOME/.cargo/bin:$PATH"
deploy/services.sh
# pika for the Python worker of the polyglot tests, and the deployment checks' tools.
deploy/python.sh
# Chromium and chromedriver for the dashboard's browser test.
deploy/chromium.sh
# shellcheck source=/dev/null
source .flotilla/env
# Queues that failed tests and killed fleets of earlier runs left behind pile up on a long-lived
# RabbitMQ node until it stops answering: delete them first.
.flotilla/venv/bin/python tests/sweep_queues.py
tests/sweep_databases.sh

cargo fmt --all --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
# The end-to-end tests start the real binaries.
cargo build --workspace --bins --quiet
deploy/check.sh
cargo nextest run --workspace --profile ci "$@"
# The parsers of user input, fuzzed for a bounded time each (FUZZ_SECONDS, 30 by default).
fuzz/run.sh
