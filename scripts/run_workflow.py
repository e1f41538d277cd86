"""The main job in one command: an image prompt and a text prompt in, a generated PNG out, through ComfyUI headless.

    python scripts/run_workflow.py --image example_inputs/reference.png --prompt "a cat" --output out.png
    python scripts/run_workflow.py --standins --image example_inputs/reference.png --prompt "a cat"   # no downloads
    python scripts/run_workflow.py --server http://127.0.0.1:8188 --image ref.png --prompt "a cat"

It starts ComfyUI on loopback with this pack (or uses the running server given by --server), uploads the reference
image, submits workflows/api/ipadapter_sd15.json with the inputs filled in, shows the server's progress events and
writes the output PNG. --standins builds random-weight models in the official layouts (cached) so the whole path runs
without downloading weights; the picture is noise, the pipeline is real.
"""
import argparse
import json
import os
import sys
import time
import uuid
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PACK_DIR))

from ipx_tools.host import find_comfyui  # noqa: E402
from ipx_tools.server import (ComfyClient, ComfyServer, PromptFailed, PromptRejected, ServerError,  # noqa: E402
                              output_images)
from ipx_tools.websocket import WebSocket  # noqa: E402

DEFAULT_WORKFLOW = PACK_DIR / "workflows" / "api" / "ipadapter_sd15.json"
MODEL_INPUTS = {"CheckpointLoaderSimple": ("ckpt_name", "checkpoints"),
                "CLIPVisionLoader": ("clip_name", "clip_vision"),
                "IPXLoadAdapter": ("adapter_name", "ipadapter")}
STANDIN_CACHE = Path(os.environ.get("IPX_TEST_CACHE", Path.home() / ".cache" / "ipx-ipadapter-tests")) / "models"


class RunError(Exception):
    """A problem the user can fix: printed as one message, no traceback."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image", required=True, help="the reference image (PNG, JPEG, WebP...)")
    p.add_argument("--prompt", default="a portrait photo, best quality", help="the text prompt")
    p.add_argument("--negative", default="blurry, low quality", help="the negative text prompt")
    p.add_argument("--output", default="ipadapter_output.png", help="where to write the generated PNG")
    p.add_argument("--workflow", default=str(DEFAULT_WORKFLOW), help="an API-format workflow using the IPX nodes")
    p.add_argument("--weight", type=float, help="IP-Adapter weight (default: the workflow's)")
    p.add_argument("--adapter", help="adapter file name in models/ipadapter (default: the workflow's)")
    p.add_argument("--steps", type=int, help="sampling steps (default: the workflow's; 4 with --standins)")
    p.add_argument("--size", type=int, help="width and height in pixels (default: the workflow's; 128 with --standins)")
    p.add_argument("--seed", type=int, help="noise seed (default: the workflow's)")
    p.add_argument("--server", help="URL of a running ComfyUI (with this pack installed) instead of starting one")
    p.add_argument("--comfyui", help="ComfyUI folder (default: $COMFYUI_PATH, the ComfyUI holding this pack, "
                                     "~/comfy/ComfyUI)")
    p.add_argument("--models-dir", help="folder holding checkpoints/, clip_vision/, ipadapter/ (default: the "
                                        "ComfyUI's own models folder)")
    p.add_argument("--standins", action="store_true", help="use random-weight stand-in models (built once, cached "
                                                           f"in {STANDIN_CACHE}) instead of real ones")
    p.add_argument("--gpu", action="store_true", help="let a started server use the GPU (default: --cpu unless CUDA "
                                                      "is available)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds to wait for the image")
    return p.parse_args(argv)


def read_image(path: str) -> Path:
    image = Path(path)
    if not image.is_file():
        raise RunError(f"reference image not found: {image}")
    try:
        from PIL import Image
        with Image.open(image) as im:
            im.verify()
    except Exception as e:  # PIL raises many types for a bad file
        raise RunError(f"cannot read {image} as an image ({type(e).__name__}: {e}); use a PNG, JPEG or WebP file")
    return image


def load_workflow(path: str) -> dict:
    try:
        graph = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise RunError(f"cannot read the workflow {path}: {e}")
    if not isinstance(graph, dict) or not all(isinstance(n, dict) and "class_type" in n for n in graph.values()):
        raise RunError(f"{path} is not an API-format workflow (export it with 'Save (API)' in ComfyUI)")
    return graph


def nodes_of(graph, class_type):
    return [node for node in graph.values() if node["class_type"] == class_type]


def fill_workflow(graph: dict, args) -> dict:
    """Put the run's inputs into a copy of the workflow's nodes, found by type (and title for the two prompts)."""
    graph = json.loads(json.dumps(graph))
    if not nodes_of(graph, "LoadImage"):
        raise RunError("the workflow has no Load Image node for the reference image")
    for node in nodes_of(graph, "CLIPTextEncode"):
        title = node.get("_meta", {}).get("title", "").lower()
        node["inputs"]["text"] = args.negative if "negative" in title else args.prompt
    for node in nodes_of(graph, "KSampler"):
        node["inputs"].update({k: v for k, v in (("steps", args.steps), ("seed", args.seed)) if v is not None})
    for node in nodes_of(graph, "EmptyLatentImage"):
        if args.size:
            node["inputs"].update(width=args.size, height=args.size)
    for node in nodes_of(graph, "IPXApplyAdapter") + nodes_of(graph, "IPXApplyAdapterImage"):
        if args.weight is not None:
            node["inputs"]["weight"] = args.weight
    if args.adapter:
        for node in nodes_of(graph, "IPXLoadAdapter"):
            node["inputs"]["adapter_name"] = args.adapter
    for node in nodes_of(graph, "SaveImage"):
        node["inputs"]["filename_prefix"] = "ipx_run"
    if args.standins:
        from ipx_tools.standins import CHECKPOINT_NAME
        for node in nodes_of(graph, "CheckpointLoaderSimple"):
            node["inputs"]["ckpt_name"] = CHECKPOINT_NAME
    return graph


def required_models(graph: dict) -> list:
    """[(folder, file name)] for every model file the workflow loads."""
    needed = []
    for node in graph.values():
        if node["class_type"] in MODEL_INPUTS:
            name_input, folder = MODEL_INPUTS[node["class_type"]]
            needed.append((folder, node["inputs"][name_input]))
    return sorted(set(needed))


def combo_options(spec) -> list:
    """The choices of a combo input in /object_info: V1 nodes list them first, V3 nodes as ("COMBO", {options})."""
    if isinstance(spec[0], list):
        return spec[0]
    return (spec[1] if len(spec) > 1 else {}).get("options", [])


def check_models(client: ComfyClient, graph: dict, where: str) -> None:
    """One message listing every missing model file and the folder it belongs in."""
    info = client.object_info()
    missing = []
    for node_class, (name_input, folder) in MODEL_INPUTS.items():
        if node_class not in info:
            if node_class.startswith("IPX"):
                raise RunError(f"the server has no {node_class} node: this pack is not installed there (put it in "
                               f"ComfyUI/custom_nodes and restart ComfyUI)")
            continue
        available = set(combo_options(info[node_class]["input"]["required"][name_input]))
        missing += [(f, n) for f, n in required_models(graph) if f == folder and n not in available]
    if missing:
        lines = "\n".join(f"  - {name}  ->  {folder}/" for folder, name in missing)
        raise RunError(f"missing model files ({where}):\n{lines}\nPut each file in that folder of ComfyUI's models "
                       f"directory (or run with --standins to try the pipeline with random-weight stand-ins).")


def show_progress(ws: WebSocket, prompt_id: str, graph: dict, deadline: float) -> None:
    """Print the server's progress events for this prompt until it finishes."""
    current = None
    for event in ws.events():
        data = event.get("data") or {}
        if data.get("prompt_id") not in (None, prompt_id):
            continue
        kind = event.get("type")
        if kind == "executing":
            node = data.get("node")
            if node is None:
                print(file=sys.stderr)
                return
            current = graph.get(str(node), {}).get("_meta", {}).get("title") or graph.get(str(node), {}).get(
                "class_type", node)
            print(f"\r{'':70}\r{current}...", end="", file=sys.stderr, flush=True)
        elif kind == "progress":
            value, total = data.get("value", 0), data.get("max", 1) or 1
            bar = "#" * int(30 * value / total)
            print(f"\r{current or 'working'} [{bar:<30}] {value}/{total}", end="", file=sys.stderr, flush=True)
        elif kind in ("execution_error", "execution_interrupted", "execution_success"):
            print(file=sys.stderr)
            return
        if time.monotonic() > deadline:
            return


def run(client: ComfyClient, graph: dict, args, image: Path) -> Path:
    """Upload the image, submit the filled workflow, follow its progress, write the output PNG."""
    timeout, output = args.timeout, Path(args.output)
    graph = json.loads(json.dumps(graph))
    nodes_of(graph, "LoadImage")[0]["inputs"]["image"] = client.upload_image(image)
    client_id = uuid.uuid4().hex
    ws = None
    try:
        ws = WebSocket(client.url.replace("http", "ws", 1) + f"/ws?clientId={client_id}", timeout=timeout)
    except OSError:
        print("(no progress: the websocket did not open; waiting for the result)", file=sys.stderr)
    try:
        prompt_id = client.queue_prompt(graph, client_id=client_id)
        print(f"queued prompt {prompt_id}", file=sys.stderr)
        if ws is not None:
            try:
                show_progress(ws, prompt_id, graph, time.monotonic() + timeout)
            except OSError:
                pass
        entry = client.wait(prompt_id, timeout=timeout)
    finally:
        if ws is not None:
            ws.close()
    client.raise_for_error(entry)
    images = output_images(entry)
    if not images:
        raise RunError("the workflow finished without an output image (does it end in a Save Image node?)")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(client.fetch_image(**images[0]))
    return output


def prepare_standins() -> Path:
    from ipx_tools.standins import build_models_dir_subprocess
    print(f"preparing random-weight stand-in models in {STANDIN_CACHE} (built once, about a minute)",
          file=sys.stderr)
    build_models_dir_subprocess(STANDIN_CACHE, variants=("sd15", "plus"))
    return STANDIN_CACHE


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        image = read_image(args.image)
        if args.standins:
            args.steps = args.steps or 4
            args.size = args.size or 128
        graph = fill_workflow(load_workflow(args.workflow), args)
        if args.server:
            client = ComfyClient(args.server.rstrip("/"))
            try:
                client.object_info("CheckpointLoaderSimple")
            except (OSError, ServerError) as e:
                raise RunError(f"no ComfyUI answers at {args.server} ({e}); start it, or leave out --server to let "
                               f"this command start one")
            check_models(client, graph, f"on the server at {args.server}")
            written = run(client, graph, args, image)
        else:
            comfyui, how = (Path(args.comfyui), "--comfyui") if args.comfyui else find_comfyui()
            if comfyui is None or not (Path(comfyui) / "main.py").is_file():
                raise RunError(f"ComfyUI not found ({how}); install it or pass --comfyui")
            models = Path(args.models_dir) if args.models_dir else (prepare_standins() if args.standins
                                                                   else Path(comfyui) / "models")
            cpu = not args.gpu and not _cuda_available()
            print(f"starting ComfyUI at {comfyui} ({'CPU' if cpu else 'GPU'}), models from {models}",
                  file=sys.stderr)
            with ComfyServer(comfyui, models, cpu=cpu) as server:
                check_models(server, graph, f"in {models}")
                written = run(server, graph, args, image)
        print(f"wrote {written}")
        return 0
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except PromptRejected as e:
        print(f"error: the server rejected the workflow:\n{e}", file=sys.stderr)
        return 1
    except PromptFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ServerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _cuda_available() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    sys.exit(main())
