"""The one-command runner (scripts/run_workflow.py): an image out from the real server, and bad input ending in one
clear message and a non-zero exit, never a traceback."""
import subprocess
import sys
from pathlib import Path

import pytest

PACK_DIR = Path(__file__).resolve().parents[2]
RUNNER = PACK_DIR / "scripts" / "run_workflow.py"
REFERENCE = PACK_DIR / "example_inputs" / "reference.png"


def runner(*args, timeout=900):
    proc = subprocess.run([sys.executable, str(RUNNER), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=PACK_DIR)
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    return proc


def png_size(path):
    from PIL import Image
    with Image.open(path) as im:
        return im.format, im.size


def test_runner_on_a_running_server_writes_the_png_and_shows_progress(server, tmp_path):
    out = tmp_path / "out.png"
    proc = runner("--server", server.url, "--standins", "--image", REFERENCE, "--prompt", "a clay figure",
                  "--size", 64, "--steps", 2, "--seed", 5, "--output", out)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}" in proc.stdout
    assert "Sampler [" in proc.stderr and "2/2" in proc.stderr, "progress comes from the websocket events"
    assert png_size(out) == ("PNG", (64, 64))


def test_runner_starts_its_own_server_with_standins(server_host, standin_models, tmp_path):
    out = tmp_path / "own.png"
    proc = runner("--comfyui", server_host, "--models-dir", standin_models, "--standins", "--image", REFERENCE,
                  "--size", 64, "--steps", 1, "--output", out)
    assert proc.returncode == 0, proc.stderr
    assert "starting ComfyUI" in proc.stderr
    assert png_size(out) == ("PNG", (64, 64))


def test_missing_image_file(tmp_path):
    proc = runner("--image", tmp_path / "nope.png")
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: reference image not found: {tmp_path / 'nope.png'}"


def test_unreadable_image(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    proc = runner("--image", bad)
    assert proc.returncode == 2 and f"cannot read {bad} as an image" in proc.stderr


def test_unknown_server():
    proc = runner("--image", REFERENCE, "--server", "http://127.0.0.1:9")
    assert proc.returncode == 2 and "no ComfyUI answers at http://127.0.0.1:9" in proc.stderr


def test_missing_models_are_listed_with_their_folders(server, tmp_path):
    proc = runner("--server", server.url, "--image", REFERENCE, "--adapter", "ip-adapter-full-face_sd15.bin")
    assert proc.returncode == 2
    assert "missing model files" in proc.stderr
    assert "v1-5-pruned-emaonly.safetensors  ->  checkpoints/" in proc.stderr
    assert "ip-adapter-full-face_sd15.bin  ->  ipadapter/" in proc.stderr


def test_server_error_is_one_clear_message(server, models_dir, tmp_path):
    broken = models_dir / "ipadapter" / "ip-adapter_sd15-runner-broken.safetensors"
    broken.write_bytes(b"\x00" * 64)
    proc = runner("--server", server.url, "--standins", "--image", REFERENCE, "--size", 64, "--steps", 1,
                  "--adapter", broken.name, "--output", tmp_path / "x.png")
    assert proc.returncode == 1
    assert "IPXLoadAdapter" in proc.stderr and broken.name in proc.stderr and "corrupt" in proc.stderr
    assert not (tmp_path / "x.png").exists()
