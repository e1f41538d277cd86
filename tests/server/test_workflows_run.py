"""Every example API workflow runs on a real server as shipped (only the checkpoint name, size and steps changed for
the CPU's sake) and produces an image."""
import json
from pathlib import Path

import pytest

from ipx_tools.server import execution_error, output_images

PACK_DIR = Path(__file__).resolve().parents[2]
API_WORKFLOWS = sorted((PACK_DIR / "workflows" / "api").glob("*.json"))


@pytest.fixture(scope="module")
def uploaded(server):
    for name in ("reference.png", "reference_style.png"):
        server.upload_image(PACK_DIR / "example_inputs" / name, name=name)


@pytest.mark.parametrize("path", API_WORKFLOWS, ids=lambda p: p.stem)
def test_example_api_workflow_runs_headless(server, uploaded, path):
    from ipx_tools.standins import CHECKPOINT_NAME
    graph = json.loads(path.read_text())
    for node in graph.values():
        inputs = node["inputs"]
        if node["class_type"] == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = CHECKPOINT_NAME
        elif node["class_type"] == "EmptyLatentImage":
            inputs.update(width=64, height=64)
        elif node["class_type"] == "KSampler":
            inputs.update(steps=2, seed=4242)
    entry = server.wait(server.queue_prompt(graph), 600)
    assert execution_error(entry) is None, execution_error(entry)
    images = output_images(entry)
    assert len(images) == 1 and server.fetch_image(**images[0])[:8] == b"\x89PNG\r\n\x1a\n"
