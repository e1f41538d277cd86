# Sourced by the other scripts: sets COMFYUI (the host folder) and PY (the Python that runs it), or explains.
# The host is never downloaded or built here: it must already be installed (see README, "Install").
PACK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

find_comfyui() {
  if [ -n "${COMFYUI_PATH:-}" ]; then echo "$COMFYUI_PATH"; return; fi
  local parent; parent="$(dirname "$PACK_DIR")"
  if [ "$(basename "$parent")" = "custom_nodes" ] && [ -f "$(dirname "$parent")/main.py" ]; then
    dirname "$parent"; return
  fi
  echo "$HOME/comfy/ComfyUI"
}

COMFYUI="$(find_comfyui)"
if [ ! -f "$COMFYUI/main.py" ] || [ ! -f "$COMFYUI/comfyui_version.py" ]; then
  echo "ComfyUI was not found at $COMFYUI." >&2
  echo "This pack runs inside an existing ComfyUI (0.3.64 or newer). Install ComfyUI first (for example with" >&2
  echo "comfy-cli: 'comfy install', which puts it in ~/comfy/ComfyUI), or set COMFYUI_PATH to your ComfyUI folder." >&2
  return 1 2>/dev/null || exit 1
fi

# The Python that runs ComfyUI: $COMFYUI_PYTHON, else a venv beside or inside the host, else ~/comfy/venv (created).
PY="${COMFYUI_PYTHON:-}"
if [ -z "$PY" ]; then
  for candidate in "$(dirname "$COMFYUI")/venv/bin/python" "$COMFYUI/venv/bin/python" "$COMFYUI/.venv/bin/python"; do
    if [ -x "$candidate" ]; then PY="$candidate"; break; fi
  done
fi
if [ -z "$PY" ]; then PY="$(dirname "$COMFYUI")/venv/bin/python"; fi
export COMFYUI_PATH="$COMFYUI"
