"""Fixtures for the browser ring: the ComfyUI web page as a user meets it, in a real headless Chromium.

One ComfyUI server per session (a subprocess on 127.0.0.1, this pack its only custom node pack, random-weight
stand-ins from the persistent cache linked under the file names the example workflows use, the example reference
images in its input folder) and one browser per session (Debian's /usr/bin/chromium driven by Playwright, which
gives it a fresh throw-away profile). Each test gets its own browser context and page, so nothing a test loads
(workflow tabs, local storage) leaks into the next.

The browser and Playwright come from ``scripts/install_browser.sh``; without them these tests skip LOUDLY (and
fail instead when IPX_REQUIRE_BROWSER=1, for CI).
"""
import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

from ipx_tools.host import find_comfyui
from ipx_tools.server import ComfyServer
from ipx_tools.standins import CHECKPOINT_NAME, build_models_dir_subprocess, missing_files

PACK_DIR = Path(__file__).resolve().parents[2]
HOST_PATH, HOST_HOW = find_comfyui()  # the same search as tests/conftest.py
CHROMIUM = Path(os.environ.get("IPX_CHROMIUM", "/usr/bin/chromium"))
# --no-sandbox: CI runs as root. --disable-dev-shm-usage: Debian's launcher adds it itself only when its /dev/shm check
# works (it misparses findmnt output on some hosts), and a container's 64 MB /dev/shm crashes the renderer without it.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]
VIEWPORT = {"width": 1920, "height": 1200}
VARIANTS = ("sd15", "plus")
CLIP_VISION = ("vit-h",)
UI_WORKFLOWS = sorted((PACK_DIR / "workflows").glob("*.json"))
OUTPUT_COPY_DIR = PACK_DIR / "test-output" / "browser"  # git-ignored; the screenshots land here too
# Where each model-loading node's file goes, by node type (the workflows name the official files).
MODEL_WIDGETS = {"CheckpointLoaderSimple": "checkpoints", "CLIPVisionLoader": "clip_vision",
                 "IPXLoadAdapter": "ipadapter"}
# Frontend settings for the fresh user: no first-run template browser, no minimap over the graph, no low-detail
# rendering (it drops all text below ~60 % zoom, which a whole wide graph needs in a screenshot); the load warnings and
# workflow validation explicitly on (they are the frontend's defaults), since the tests look for them.
FRONTEND_SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False,
                     "LiteGraph.Canvas.MinFontSizeForLOD": 0,
                     "Comfy.Workflow.ShowMissingNodesWarning": True, "Comfy.Workflow.ShowMissingModelsWarning": True,
                     "Comfy.Validation.Workflows": True}
TIMINGS = {}  # what the terminal summary reports


def pytest_terminal_summary(terminalreporter):
    if TIMINGS:
        terminalreporter.write_line("tests/browser timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in TIMINGS.items()))


def _missing(reason: str):
    message = (f"!!! BROWSER TESTS NOT RUN: {reason}. Install the browser and driver with "
               f"`bash scripts/install_browser.sh` (Debian chromium + chromium-driver, Playwright into ComfyUI's Python).")
    if os.environ.get("IPX_REQUIRE_BROWSER") == "1":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def playwright_api():
    """Playwright's sync API module, once the system browser and the package are both there."""
    if not os.access(CHROMIUM, os.X_OK):
        _missing(f"no Chromium at {CHROMIUM}")
    try:
        from playwright import sync_api
    except ImportError as e:
        _missing(f"the Python package playwright is not importable ({e})")
    return sync_api


@pytest.fixture(scope="session")
def browser_host() -> Path:
    if HOST_PATH is None:
        pytest.skip(f"HOST NOT FOUND, browser test skipped: {HOST_HOW}")
    return HOST_PATH


def workflow_models(paths=UI_WORKFLOWS) -> dict:
    """{"folder/file name": stand-in path relative to the models cache} for every model file the UI workflows name."""
    wanted = {}
    for path in paths:
        for node in json.loads(path.read_text())["nodes"]:
            folder = MODEL_WIDGETS.get(node["type"])
            if folder and node.get("widgets_values"):
                name = node["widgets_values"][0]
                wanted[f"{folder}/{name}"] = f"checkpoints/{CHECKPOINT_NAME}" if folder == "checkpoints" else f"{folder}/{name}"
    return wanted


@pytest.fixture(scope="session")
def browser_models(browser_host, cache_dir, tmp_path_factory) -> Path:
    """A models folder whose files carry the names the example workflows use, as symlinks to the cached stand-ins
    (the checkpoint is the SD1.5 stand-in under the name v1-5-pruned-emaonly.safetensors)."""
    cache = cache_dir / "models"
    started = time.perf_counter()
    stale = missing_files(cache, VARIANTS, CLIP_VISION)
    build_models_dir_subprocess(cache, VARIANTS, clip_vision=CLIP_VISION, host_path=browser_host)
    TIMINGS["stand-in build" if stale else "stand-in check (cached)"] = time.perf_counter() - started
    root = tmp_path_factory.mktemp("browser-models")
    for folder in MODEL_WIDGETS.values():
        (root / folder).mkdir(exist_ok=True)  # writable, as users' are; the cache itself stays untouched
    for name, source in workflow_models().items():
        target = cache / source
        assert target.is_file(), f"the workflows use {name}, but the stand-ins have no {source} (see VARIANTS)"
        (root / name).symlink_to(target)
    return root


@pytest.fixture(scope="session")
def browser_server(browser_host, browser_models, tmp_path_factory):
    """One ComfyUI server for the session, with the example reference images in its input folder and a user whose
    frontend settings are FRONTEND_SETTINGS."""
    work = tmp_path_factory.mktemp("comfyui-browser")
    settings = work / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True)
    settings.write_text(json.dumps(FRONTEND_SETTINGS, indent=1))
    srv = ComfyServer(browser_host, browser_models, work)
    srv.start(timeout=240)
    TIMINGS["server start"] = srv.startup_s
    for image in sorted((PACK_DIR / "example_inputs").glob("*.png")):
        shutil.copy(image, srv.input_dir / image.name)
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def browser(playwright_api, browser_server):
    """Headless Debian Chromium under Playwright, one per session (Playwright gives it a fresh temporary profile)."""
    started = time.perf_counter()
    manager = playwright_api.sync_playwright().start()
    try:
        chromium = manager.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
    except Exception:
        manager.stop()
        raise
    TIMINGS["browser launch"] = time.perf_counter() - started
    yield chromium
    chromium.close()
    manager.stop()


class ComfyPage:
    """A page showing the ComfyUI frontend, with everything the browser said on the way (console messages, page
    errors, failed requests)."""

    def __init__(self, page, server):
        self.page = page
        self.server = server
        self.console = []  # (type, text, url of the source)
        self.page_errors = []  # (message, stack)
        self.failed_requests = []  # (status or error, method, url)
        page.on("console", lambda m: self.console.append((m.type, m.text, (m.location or {}).get("url", ""))))
        page.on("pageerror", lambda e: self.page_errors.append((str(e), e.stack or "")))
        page.on("response", lambda r: self.failed_requests.append((r.status, r.request.method, r.url))
                if r.status >= 400 else None)
        page.on("requestfailed", lambda r: self.failed_requests.append((r.failure, r.method, r.url)))

    def open(self, timeout_s: float = 120) -> float:
        """Load the frontend and wait until the app is up and this pack's nodes are registered; returns seconds."""
        started = time.perf_counter()
        self.page.goto(self.server.url + "/", wait_until="load", timeout=timeout_s * 1000)
        self.page.wait_for_selector("#graph-canvas", state="visible", timeout=timeout_s * 1000)
        self.page.wait_for_function(
            "() => !!(window.app && window.app.graph && window.app.canvas && window.LiteGraph"
            " && window.LiteGraph.registered_node_types['IPXLoadAdapter'])", timeout=timeout_s * 1000)
        return time.perf_counter() - started

    def messages_about(self, pattern: str, ignore_urls: str = r"/api/userdata") -> list:
        """Console errors and warnings, page errors and failed requests that match ``pattern`` (a regex). Requests to
        ``ignore_urls`` do not count: the frontend probes the user's saved files (workflows/<name>.json...) and reads
        a 404 as "not saved yet"."""
        rx, skip = re.compile(pattern, re.IGNORECASE), re.compile(ignore_urls)
        hits = [f"console.{kind}: {text} ({url})" for kind, text, url in self.console
                if kind in ("error", "warning") and not skip.search(url) and (rx.search(text) or rx.search(url))]
        hits += [f"page error: {message}\n{stack}" for message, stack in self.page_errors
                 if rx.search(message) or rx.search(stack)]
        hits += [f"request {method} {url} -> {status}" for status, method, url in self.failed_requests
                 if rx.search(url) and not skip.search(url)]
        return hits

    def log(self) -> dict:
        return {"console": self.console, "page_errors": self.page_errors, "failed_requests": self.failed_requests}


@pytest.fixture
def comfy_page(browser, browser_server):
    """A fresh browser context and page with the ComfyUI frontend loaded (the app up, this pack's nodes known)."""
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    page.set_default_timeout(60_000)
    comfy = ComfyPage(page, browser_server)
    seconds = comfy.open()
    TIMINGS.setdefault("first page load", seconds)
    yield comfy
    context.close()


@pytest.fixture(scope="session")
def browser_timings() -> dict:
    """Seconds by step, reported in the terminal summary."""
    return TIMINGS


@pytest.fixture
def output_dir(tmp_path, request) -> Path:
    """The test's own output folder (tmp_path); what is saved there is also copied to test-output/browser/ under the
    pack root at the end of the test (passed or failed)."""
    yield tmp_path
    OUTPUT_COPY_DIR.mkdir(parents=True, exist_ok=True)
    for path in tmp_path.iterdir():
        if path.is_file():
            shutil.copy(path, OUTPUT_COPY_DIR / path.name)

