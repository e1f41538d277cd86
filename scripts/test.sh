#!/usr/bin/env bash
# The test suite: the core alone, the core inside ComfyUI in-process, and a real ComfyUI server end to end.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/find_python.sh" || { echo "!!! ComfyUI not found: host and server tests will be SKIPPED" >&2; PY=python3; }
[ -f "${COMFYUI:-/nonexistent}/main.py" ] && bash "$PACK_DIR/scripts/setup.sh"
# The browser ring needs Debian's Chromium and Playwright; CI installs them and must not skip that ring.
if [ "${CI:-}" = "true" ] || [ "${IPX_REQUIRE_BROWSER:-}" = "1" ]; then
  bash "$PACK_DIR/scripts/install_browser.sh" "$PY"
  export IPX_REQUIRE_BROWSER=1
fi
cd "$PACK_DIR"
exec "$PY" -m pytest tests "$@"
