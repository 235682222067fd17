#!/usr/bin/env bash
# Makes sure Debian's headless-capable Chromium and its WebDriver (chromedriver) are installed,
# for the dashboard's browser test (tests/tests/dashboard.rs). Does nothing when both are there.
set -euo pipefail

if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  exit 0
fi

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

echo "[chromium] installing chromium and chromium-driver from the distribution's packages" >&2
as_root apt-get update -qq
as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
