#!/usr/bin/env bash
# The whole fleet on one machine: makes sure RabbitMQ and PostgreSQL run, builds Flotilla,
# starts a coordinator and two echo workers as separate processes, runs the example workflow
# with live progress, prints its result, and stops what it started.
set -euo pipefail
cd "$(dirname "$0")/.."

deploy/toolchain.sh
export PATH="$HOME/.cargo/bin:$PATH"
deploy/services.sh
# shellcheck source=/dev/null
source .flotilla/env

echo "building Flotilla (the first build takes a few minutes)"
cargo build --quiet --bins

logs=.flotilla/logs
mkdir -p "$logs"
export PORT=${PORT:-3020}
export FLOTILLA_URL=http://127.0.0.1:$PORT
# The coordinator's admin token, and the CLI's credential.
FLOTILLA_ADMIN_TOKEN=${FLOTILLA_ADMIN_TOKEN:-flt_$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')}
export FLOTILLA_ADMIN_TOKEN FLOTILLA_API_TOKEN=$FLOTILLA_ADMIN_TOKEN
agents=(--agent agent1 --agent agent6 --agent agent7 --agent agent8 --agent agent9 --agent agent10 --agent agent19)

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

target/debug/flotilla-coordinator >"$logs/coordinator.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do
  curl -fs "$FLOTILLA_URL/health/ready" >/dev/null 2>&1 && break
  if ! kill -0 "${pids[0]}" 2>/dev/null; then
    echo "the coordinator stopped; its log:" >&2
    cat "$logs/coordinator.log" >&2
    exit 2
  fi
  sleep 0.2
done
echo "coordinator on $FLOTILLA_URL (log: $logs/coordinator.log)"

for n in 1 2; do
  target/debug/flotilla-agent-echo "${agents[@]}" --worker-id "echo-$n" >"$logs/echo-$n.log" 2>&1 &
  pids+=($!)
done
echo "two echo workers started (logs: $logs/echo-1.log, $logs/echo-2.log)"
echo

status=0
target/debug/flotilla workflows execute examples/workflow.yml --param passed=true --wait || status=$?
exit "$status"
