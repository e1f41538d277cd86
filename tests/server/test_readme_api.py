"""The README's headless Python example runs as written against a real server."""
import json
import re
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parents[2]


def readme_python_example() -> str:
    text = (PACK_DIR / "README.md").read_text()
    section = text[text.index("In Python (standard library only)"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_example_produces_an_image(server, models_dir, tmp_path):
    from ipx_tools.standins import CHECKPOINT_NAME
    link = models_dir / "checkpoints" / "v1-5-pruned-emaonly.safetensors"
    if not link.exists():
        link.symlink_to((models_dir / "checkpoints" / CHECKPOINT_NAME).resolve())
    graph = json.loads((PACK_DIR / "workflows" / "api" / "ipadapter_sd15.json").read_text())
    graph["4"]["inputs"].update(width=64, height=64)     # the CPU is slow: small and short, same graph
    graph["10"]["inputs"].update(steps=2, seed=77)
    small = tmp_path / "small.json"
    small.write_text(json.dumps(graph))
    name = server.upload_image(PACK_DIR / "example_inputs" / "reference.png", name="ref.png")
    code = readme_python_example().replace("http://127.0.0.1:8188", server.url)
    code = code.replace("workflows/api/ipadapter_sd15.json", str(small)).replace('"ref.png"', json.dumps(name))
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["png"][:8] == b"\x89PNG\r\n\x1a\n"
    assert scope["entry"][scope["prompt_id"]]["status"]["status_str"] == "success"
