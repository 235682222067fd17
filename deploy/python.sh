#!/usr/bin/env bash
# Makes sure .flotilla/venv holds the Python packages the tests need: pika for the Python worker
# (examples/workers/python), the deployment checks' tools (deploy/requirements.txt) and
# schemathesis for the API contract test (tests/requirements.txt). Does
# nothing when they are installed already, so it costs the test command nothing after the
# first run.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.flotilla/venv
requirements=(examples/workers/python/requirements.txt deploy/requirements.txt tests/requirements.txt)
wanted=$(cat "${requirements[@]}" | sha256sum | cut -d' ' -f1)
stamp=$venv/.requirements.sha256
if [ -x "$venv/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$wanted" ]; then
  exit 0
fi

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

if ! command -v python3 >/dev/null 2>&1 || ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
  echo "[python] installing Python 3 with venv from the distribution's packages" >&2
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3 python3-venv >/dev/null
fi
echo "[python] installing ${requirements[*]} into $venv" >&2
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
args=()
for file in "${requirements[@]}"; do args+=(-r "$file"); done
"$venv/bin/pip" install --quiet --disable-pip-version-check "${args[@]}"
echo "$wanted" > "$stamp"
