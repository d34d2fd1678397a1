#!/usr/bin/env bash
# A headless-Chromium screenshot of a study report, to check how it reads (docs/demo/report.png was made so):
#   bash docs/report_screenshot.sh demo/report/report.html docs/demo/report.png [WIDTHxHEIGHT]
# Installs Debian's chromium when it is missing (root, package registries only).
set -euo pipefail
html=$(realpath "$1"); out=$2; size=${3:-1400,5200}
command -v chromium >/dev/null || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }
profile=$(mktemp -d); trap 'rm -rf "$profile"' EXIT
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking \
  --disable-component-update --disable-sync --hide-scrollbars --user-data-dir="$profile" \
  --window-size="$size" --screenshot="$(realpath -m "$out")" "file://$html" 2>/dev/null
echo "screenshot: $out"
