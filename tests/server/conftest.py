"""Fixtures for the server ring: a real ComfyUI server (a subprocess on 127.0.0.1) with this pack as its only custom
node pack, random-weight stand-ins of SD1.5, CLIP ViT-H/14 (and ViT-L/14) and two adapters, and a reference image.

The stand-ins are built once into the persistent cache (cache_dir/models, ~47 s and ~4.5 GB of memory in a child
process) and reused while their builders are unchanged. Each test module gets one server; its models folder is a
writable folder of symlinks to the cached files, so tests may add broken files without touching the cache.
"""
import time
from pathlib import Path

import pytest

from ipx_tools.host import find_comfyui
from ipx_tools.server import ComfyServer
from ipx_tools.standins import build_models_dir_subprocess, missing_files

HOST_PATH, HOST_HOW = find_comfyui()  # the same search as tests/conftest.py
VARIANTS = ("sd15", "plus")
CLIP_VISION = ("vit-h", "vit-l")
REFERENCE_IMAGE = "ipx-reference.png"
TIMINGS = {}  # what the terminal summary reports: build, server start


def pytest_terminal_summary(terminalreporter):
    if TIMINGS:
        terminalreporter.write_line("tests/server timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in TIMINGS.items()))


@pytest.fixture(scope="session")
def server_host() -> Path:
    if HOST_PATH is None:
        pytest.skip(f"HOST NOT FOUND, server test skipped: {HOST_HOW}")
    return HOST_PATH


@pytest.fixture(scope="session")
def standin_models(server_host, cache_dir) -> Path:
    """The cached models folder (checkpoints/, clip_vision/, ipadapter/); read-only for tests."""
    root = cache_dir / "models"
    started = time.perf_counter()
    stale = missing_files(root, VARIANTS, CLIP_VISION)
    build_models_dir_subprocess(root, VARIANTS, clip_vision=CLIP_VISION, host_path=server_host)
    TIMINGS["stand-in build" if stale else "stand-in check (cached)"] = time.perf_counter() - started
    assert not missing_files(root, VARIANTS, CLIP_VISION)
    return root


def link_models(source: Path, target: Path) -> Path:
    """A writable models folder whose files are symlinks to ``source``'s."""
    for folder in ("checkpoints", "clip_vision", "ipadapter"):
        (target / folder).mkdir(parents=True, exist_ok=True)
        for path in (source / folder).iterdir():
            if path.is_file() and not path.name.endswith(".partial"):
                (target / folder / path.name).symlink_to(path)
    return target


def write_reference_image(path: Path) -> Path:
    """A deterministic 96x80 RGB image (smooth gradients plus a checker), not square so that the encoder crops."""
    import numpy as np
    from PIL import Image
    y, x = np.mgrid[0:80, 0:96].astype(np.float32)
    rgb = np.stack([x / 95.0, y / 79.0, ((x // 8 + y // 8) % 2).astype(np.float32)], axis=-1)
    Image.fromarray((rgb * 255).round().astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def server(server_host, standin_models, tmp_path_factory):
    """One ComfyUI server per test module, with the stand-ins and the reference image in its input folder."""
    work = tmp_path_factory.mktemp("comfyui")
    models = link_models(standin_models, work / "models")
    srv = ComfyServer(server_host, models, work)
    srv.start(timeout=240)
    TIMINGS["server start"] = srv.startup_s
    write_reference_image(srv.input_dir / REFERENCE_IMAGE)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def models_dir(server) -> Path:
    """The server's models folder (writable; files in it are symlinks into the cache)."""
    return server.models_dir


@pytest.fixture(scope="module")
def reference_image(server) -> str:
    """The reference image's name in the server's input folder (for LoadImage)."""
    return REFERENCE_IMAGE
