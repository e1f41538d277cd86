#!/usr/bin/env bash
# Prepares the real-browser tests (tests/browser): Debian's headless Chromium and its driver, and Playwright (the
# Python package only: it drives the system browser at /usr/bin/chromium; `playwright install` and its browser
# downloads are never used). Idempotent: a second run installs nothing.
#
#     bash scripts/install_browser.sh [PYTHON]
#
# PYTHON defaults to the Python that runs ComfyUI (see find_python.sh: $COMFYUI_PYTHON, a venv beside the host, or
# ~/comfy/venv/bin/python). apt-get needs root (or sudo).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CHROMIUM="${IPX_CHROMIUM:-/usr/bin/chromium}"

if [ -n "${1:-}" ]; then
  PY="$1"
else
  # shellcheck source=find_python.sh
  source "$HERE/find_python.sh" || { echo "!!! no ComfyUI Python found: pass one, e.g. $0 ~/comfy/venv/bin/python" >&2; exit 1; }
fi
[ -x "$PY" ] || { echo "!!! $PY is not an executable Python (run scripts/setup.sh first, or pass one)" >&2; exit 1; }

# --- the browser (Debian packages) ---
if [ -x "$CHROMIUM" ] && command -v chromedriver >/dev/null 2>&1; then
  # (2>/dev/null: Debian's launcher prints a harmless shell error where findmnt lists /dev/shm twice)
  echo "Browser: $("$CHROMIUM" --version 2>/dev/null || echo "$CHROMIUM") already installed."
else
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "!!! installing chromium needs root (or sudo)" >&2; exit 1; }
    SUDO="sudo"
  fi
  echo "Installing Debian's chromium and chromium-driver (apt-get)"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium chromium-driver
  echo "Browser: $("$CHROMIUM" --version 2>/dev/null)"
fi

# --- the Python driver ---
if "$PY" -c "import playwright.sync_api" 2>/dev/null; then
  echo "Playwright $("$PY" -m pip show playwright 2>/dev/null | sed -n 's/^Version: //p') already installed in $PY."
else
  echo "Installing Playwright (Python package only, no browser download) into $PY"
  "$PY" -m pip install -q --disable-pip-version-check "$(grep -E '^playwright' "$HERE/../requirements-test.txt" || echo playwright)"
fi

# --- a smoke test: the system browser starts headless under Playwright (as root too: --no-sandbox) ---
"$PY" - "$CHROMIUM" <<'PY'
import sys, tempfile
from playwright.sync_api import sync_playwright
args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
with tempfile.TemporaryDirectory(prefix="ipx-chromium-") as profile, sync_playwright() as p:
    context = p.chromium.launch_persistent_context(profile, executable_path=sys.argv[1], headless=True, args=args)
    page = context.new_page()
    page.set_content("<title>ok</title>")
    assert page.title() == "ok"
    print(f"Playwright drives {sys.argv[1]} (Chromium {context.browser.version if context.browser else '?'}): OK")
    context.close()
PY
