#!/usr/bin/env bash
# The test suite: the core alone, the core inside ComfyUI in-process, a real ComfyUI server end to end, a real browser.
#
# With no arguments the suite runs as several pytest processes, one per group below, one after the other: each group
# builds full-size SD1.5 models (diffusers' UNet, the host's, training copies, benchmark subprocesses), and a single
# process holding all of them outgrows a 24 GB machine. Every group runs even when an earlier one fails; the exit
# status is non-zero if any failed, and the last lines list each group's result. Ctrl-C stops the whole run (exit 130).
# With arguments, one pytest process runs them as given, e.g. `bash scripts/test.sh tests/core -k variants`.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/find_python.sh" || { echo "!!! ComfyUI not found: host and server tests will be SKIPPED" >&2; PY=python3; }
if [ -f "${COMFYUI:-/nonexistent}/main.py" ]; then bash "$PACK_DIR/scripts/setup.sh" || exit 1; fi
# The browser ring needs Debian's Chromium and Playwright; CI installs them and must not skip that ring.
if [ "${CI:-}" = "true" ] || [ "${IPX_REQUIRE_BROWSER:-}" = "1" ]; then
  bash "$PACK_DIR/scripts/install_browser.sh" "$PY" || exit 1
  export IPX_REQUIRE_BROWSER=1
fi
cd "$PACK_DIR"
if [ $# -gt 0 ]; then exec "$PY" -m pytest "$@"; fi

HEAVY_HOST=(tests/host/test_training.py tests/host/test_training_cli.py
            tests/host/test_benchmark_smoke.py tests/host/test_training_benchmark.py)
IGNORE_HEAVY=()
for path in "${HEAVY_HOST[@]}"; do IGNORE_HEAVY+=(--ignore "$path"); done
GROUPS_RUN=(
  "core|tests/core"
  "host|tests/host ${IGNORE_HEAVY[*]}"
  "host training|tests/host/test_training.py tests/host/test_training_cli.py"
  "host benchmarks|tests/host/test_benchmark_smoke.py tests/host/test_training_benchmark.py"
  "server|tests/server"
  "browser|tests/browser"
)

status=0
summary=()
# Ctrl-C (or SIGTERM) stops the whole run: pytest exits on it without dying of it, and bash alone would go on with
# the next group. A trapped signal is acted on once the running group has stopped.
trap 'echo; echo "!!! Interrupted: the remaining groups did not run." >&2; exit 130' INT TERM
for group in "${GROUPS_RUN[@]}"; do
  name="${group%%|*}"
  read -r -a args <<< "${group#*|}"
  echo
  echo "=================== test group: $name ($PY -m pytest ${args[*]}) ==================="
  start=$SECONDS
  "$PY" -m pytest "${args[@]}"
  rc=$?
  # pytest exit 5 means "no tests collected": a group that collected nothing is a failure of the suite.
  if [ $rc -ne 0 ]; then status=1; result="FAILED (pytest exit $rc)"; else result="passed"; fi
  summary+=("$(printf '%-16s %-26s %5ss' "$name" "$result" "$((SECONDS - start))")")
done

echo
echo "=================== test groups ==================="
printf '%s\n' "${summary[@]}"
[ $status -eq 0 ] && echo "All groups passed." || echo "!!! Some groups FAILED: see each group's output above."
exit $status
