#!/usr/bin/env bash
# Prepares the Python that runs ComfyUI for this pack and its tests. Idempotent: a second run installs nothing.
# It installs Python packages from the package registry; it never downloads or builds ComfyUI itself.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/find_python.sh"

if [ ! -x "$PY" ]; then
  echo "Creating a virtual environment for ComfyUI at $(dirname "$(dirname "$PY")")"
  python3 -m venv "$(dirname "$(dirname "$PY")")"
fi

if "$PY" - <<'PY' 2>/dev/null
import importlib, sys
for name in ("torch", "torchvision", "torchsde", "av", "aiohttp", "einops", "safetensors", "transformers", "requests",
             "comfyui_frontend_package", "diffusers", "pytest"):
    importlib.import_module(name)
PY
then
  echo "Python at $PY already has ComfyUI's and this pack's requirements."
else
  echo "Installing ComfyUI's requirements, this pack's and the test tools into $PY (a few minutes)"
  # torch and torchvision pinned to a pair that imports together on a CPU machine; a GPU machine may use its own.
  "$PY" -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1 \
    -r "$COMFYUI/requirements.txt" -r "$PACK_DIR/requirements.txt" -r "$PACK_DIR/requirements-test.txt"
fi
echo "ComfyUI $("$PY" -c "import sys; sys.path.insert(0, '$COMFYUI'); import comfyui_version as v; print(v.__version__)") at $COMFYUI, Python $PY"
