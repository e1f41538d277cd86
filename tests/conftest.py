"""Test rings: tests/core (no host), tests/host (ComfyUI in-process), tests/server (a real ComfyUI server).

The host is found at $COMFYUI_PATH, else the ComfyUI folder holding this pack under custom_nodes/, else
~/comfy/ComfyUI. Host and server tests skip with a loud reason when it is missing; the summary says which ran.
"""
import os
import sys
from pathlib import Path

import pytest

PACK_DIR = Path(__file__).resolve().parent.parent
if str(PACK_DIR) not in sys.path:
    sys.path.append(str(PACK_DIR))  # appended: the host's own nodes.py must win over this pack's nodes/ package

from ipx_tools.host import comfyui_version, find_comfyui, import_host  # noqa: E402

HOST_PATH, HOST_HOW = find_comfyui()
HOST_RINGS = ("host", "server", "browser")


def host_banner() -> str:
    if HOST_PATH is None:
        return f"!!! ComfyUI host NOT FOUND: host and server tests are SKIPPED. {HOST_HOW}"
    return f"ComfyUI host: version {comfyui_version(HOST_PATH)} at {HOST_PATH} (found via {HOST_HOW})"


def pytest_report_header(config):
    return host_banner()


def _ring(report) -> str:
    parts = Path(report.nodeid.split("::")[0]).parts
    return next((part for part in parts if part in HOST_RINGS), "")


def pytest_terminal_summary(terminalreporter):
    counts = {ring: {"passed": 0, "failed": 0, "skipped": 0} for ring in HOST_RINGS}
    for outcome in ("passed", "failed", "skipped", "error"):
        for report in terminalreporter.stats.get(outcome, []):
            ring = _ring(report)
            if ring and (outcome != "passed" or getattr(report, "when", None) == "call"):
                counts[ring]["failed" if outcome == "error" else outcome] += 1
    terminalreporter.write_sep("=", "ComfyUI host tests")
    terminalreporter.write_line(host_banner())
    for ring, c in counts.items():
        if not any(c.values()):
            continue  # not part of this run (scripts/test.sh runs the rings as separate processes)
        terminalreporter.write_line(f"tests/{ring}: {c['passed']} passed, {c['failed']} failed, {c['skipped']} skipped")
    if HOST_PATH is None or any(c["skipped"] for c in counts.values()):
        terminalreporter.write_line("!!! Some host tests did NOT run: see the skip reasons above (pytest -rs).")


@pytest.fixture(scope="session")
def host():
    """The host's ``nodes`` module, imported in this process with this pack loaded."""
    if HOST_PATH is None:
        pytest.skip(f"HOST NOT FOUND, host test skipped: {HOST_HOW}")
    return import_host(HOST_PATH)


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """Random-weight models built by the tests, kept between runs."""
    path = Path(os.environ.get("IPX_TEST_CACHE", Path.home() / ".cache" / "ipx-ipadapter-tests"))
    path.mkdir(parents=True, exist_ok=True)
    return path
