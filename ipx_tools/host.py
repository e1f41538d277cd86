"""Finding an existing ComfyUI install and importing it in-process. The pack never downloads or builds the host."""
import asyncio
import os
import re
import sys
import threading
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parent.parent
PINNED_VERSION = "0.3.64"


def _is_comfyui(path: Path) -> bool:
    return (path / "main.py").is_file() and (path / "comfy").is_dir() and (path / "nodes.py").is_file()


def find_comfyui():
    """(path, how it was found) or (None, why not). Order: $COMFYUI_PATH, the ComfyUI holding this pack under
    custom_nodes/, ~/comfy/ComfyUI (comfy-cli's default)."""
    tried = []
    env = os.environ.get("COMFYUI_PATH")
    if env:
        if _is_comfyui(Path(env)):
            return Path(env).resolve(), "$COMFYUI_PATH"
        tried.append(f"$COMFYUI_PATH={env} (not a ComfyUI folder)")
    if PACK_DIR.parent.name == "custom_nodes":
        if _is_comfyui(PACK_DIR.parent.parent):
            return PACK_DIR.parent.parent, "the ComfyUI folder holding this pack"
        tried.append(f"{PACK_DIR.parent.parent} (holds this pack, but is not a ComfyUI folder)")
    default = Path.home() / "comfy" / "ComfyUI"
    if _is_comfyui(default):
        return default, "~/comfy/ComfyUI"
    tried.append(f"{default} (missing)")
    return None, "no ComfyUI found; tried " + ", ".join(tried) + ". Set COMFYUI_PATH to your ComfyUI folder."


def comfyui_or_exit(given: str | None = None) -> Path:
    """The ComfyUI folder a command line named (``--comfyui``), else the one find_comfyui finds; exits with the
    reason when there is none."""
    if given is not None:
        if not _is_comfyui(Path(given)):
            sys.exit(f"--comfyui {given}: not a ComfyUI folder (no main.py, nodes.py and comfy/ there)")
        return Path(given).resolve()
    path, how = find_comfyui()
    if path is None:
        sys.exit(f"ComfyUI not found: {how}")
    return path


def comfyui_version(path: Path) -> str:
    text = (Path(path) / "comfyui_version.py").read_text()
    match = re.search(r'__version__\s*=\s*"([^"]+)"', text)
    return match.group(1) if match else "unknown"


def _run_coroutine(coroutine):
    """asyncio.run in a thread of its own, so that it also works where this thread already runs an event loop
    (Playwright's sync API in the browser tests keeps one)."""
    result = {}
    thread = threading.Thread(target=lambda: result.update(value=asyncio.run(coroutine)))
    thread.start()
    thread.join()
    return result.get("value")


def import_host(path: Path, cpu: bool = True, pytorch_attention: bool = False):
    """Import the host in this process (no server). Returns its ``nodes`` module, with this pack loaded.
    ``pytorch_attention``: the host's PyTorch attention even on the CPU (where it would pick split attention, which
    asks the OS for free memory in every call: torch.compile cannot capture that in one graph)."""
    path = str(path)
    if path not in sys.path:
        sys.path.insert(0, path)
    from comfy.cli_args import args
    if cpu:
        args.cpu = True
    if pytorch_attention:
        args.use_pytorch_cross_attention = True
    import utils.extra_config  # noqa: F401  (must come before nodes, which puts comfy/ first on sys.path)
    import nodes
    if "IPXApplyAdapter" not in nodes.NODE_CLASS_MAPPINGS:
        if not _run_coroutine(nodes.load_custom_node(str(PACK_DIR))):
            raise RuntimeError(f"ComfyUI at {path} could not load the pack at {PACK_DIR}; see the log above")
    return nodes
