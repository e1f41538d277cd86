#!/usr/bin/env bash
# The test suite: the core alone, the core inside ComfyUI in-process, and a real ComfyUI server end to end.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/find_python.sh" || { echo "!!! ComfyUI not found: host and server tests will be SKIPPED" >&2; PY=python3; }
[ -f "${COMFYUI:-/nonexistent}/main.py" ] && bash "$PACK_DIR/scripts/setup.sh"
cd "$PACK_DIR"
exec "$PY" -m pytest tests "$@"
