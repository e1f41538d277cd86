#!/usr/bin/env bash
# The main job in one command: sets everything up, then runs the example workflow headless (see run_workflow.py).
#   bash scripts/run.sh --standins --image example_inputs/reference.png --prompt "a clay figure" --output out.png
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/find_python.sh"
bash "$PACK_DIR/scripts/setup.sh" >&2
exec "$PY" "$PACK_DIR/scripts/run_workflow.py" "$@"
