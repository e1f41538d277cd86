"""End to end through a real ComfyUI server: API-format graphs posted to /prompt, results read from /history and
/view, errors read from the execution_error the host records. Random-weight models, 64x64, 2 steps."""
import io
import itertools
import json

import pytest

from ipx_tools.server import PACK_NAME, PromptRejected, execution_error, output_images, status_messages
from ipx_tools.standins import CHECKPOINT_NAME, CLIP_VISION_NAMES

VIT_H = CLIP_VISION_NAMES["vit-h"]
VIT_L = CLIP_VISION_NAMES["vit-l"]
BASE = "ip-adapter_sd15.safetensors"
PLUS = "ip-adapter-plus_sd15.safetensors"
IPX_NODES = ("IPXLoadAdapter", "IPXEncodeImage", "IPXApplyAdapter", "IPXApplyAdapterImage")
SEED = 42
PROMPT_TIMEOUT = 600
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_fresh_seeds = itertools.count(1000)  # a seed never used before, so that the host's cache cannot answer


def base_graph(seed: int, prefix: str) -> dict:
    """Checkpoint -> text prompts -> KSampler (2 steps, euler, cfg 7) on a 64x64 latent -> VAEDecode -> SaveImage."""
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT_NAME}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "a photo of a red fox"}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "blurry, low quality"}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "sampler": {"class_type": "KSampler", "inputs": {
            "model": ["ckpt", 0], "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0],
            "seed": seed, "steps": 2, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sampler", 0], "vae": ["ckpt", 2]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": prefix}},
    }


def ipx_graph(reference: str, seed: int, adapter: str = BASE, clip_vision: str = VIT_H, weight: float = 1.0,
              prefix: str = "ipx") -> dict:
    """base_graph with the image prompt: LoadImage + CLIPVisionLoader -> IPXLoadAdapter -> IPXEncodeImage ->
    IPXApplyAdapter -> the KSampler's model."""
    graph = base_graph(seed, prefix)
    graph.update({
        "image": {"class_type": "LoadImage", "inputs": {"image": reference}},
        "clip_vision": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": clip_vision}},
        "adapter": {"class_type": "IPXLoadAdapter", "inputs": {"adapter_name": adapter}},
        "encode": {"class_type": "IPXEncodeImage", "inputs": {
            "adapter": ["adapter", 0], "clip_vision": ["clip_vision", 0], "image": ["image", 0]}},
        "apply": {"class_type": "IPXApplyAdapter", "inputs": {
            "model": ["ckpt", 0], "adapter": ["adapter", 0], "embeds": ["encode", 0], "weight": weight,
            "start_at": 0.0, "end_at": 1.0}},
    })
    graph["sampler"]["inputs"]["model"] = ["apply", 0]
    return graph


def run_to_image(server, graph):
    """Run a graph that must succeed; return its one saved image, fetched through /view, as HxWx3 uint8 array."""
    import numpy as np
    from PIL import Image
    entry = server.run(graph, timeout=PROMPT_TIMEOUT, check=False)
    error = execution_error(entry)
    assert error is None, f"{error['node_type']} failed: {error['exception_message']}"
    assert entry["status"]["status_str"] == "success" and entry["status"]["completed"] is True
    assert [event for event, _ in status_messages(entry)][-1] == "execution_success"
    images = output_images(entry)
    assert len(images) == 1 and images[0]["type"] == "output", images
    data = server.fetch_image(**images[0])
    assert data[:8] == PNG_SIGNATURE, data[:16]
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG" and image.size == (64, 64) and image.mode == "RGB", (image.format, image.size,
                                                                                     image.mode)
    pixels = np.asarray(image)
    assert pixels.std() > 5.0, f"the decoded image is nearly constant (std {pixels.std():.2f})"
    return pixels


def run_to_error(server, graph) -> dict:
    """Run a graph that must fail in a node; return the host's execution_error message."""
    entry = server.run(graph, timeout=PROMPT_TIMEOUT, check=False)
    error = execution_error(entry)
    assert error is not None, "the prompt succeeded; it should have failed"
    assert entry["status"]["status_str"] == "error"
    assert output_images(entry) == []
    return error


def assert_keeps_serving(server, reference):
    """After a failed prompt the same server still runs a good graph to an image."""
    assert server.process.poll() is None, server.log_tail()
    run_to_image(server, ipx_graph(reference, next(_fresh_seeds), prefix="after-error"))


def mean_abs_diff(a, b) -> float:
    return float(abs(a.astype("float32") - b.astype("float32")).mean())


@pytest.fixture(scope="module")
def plain_image(server):
    """The same sampling with the unpatched model: what an applied adapter must change."""
    return run_to_image(server, base_graph(SEED, "plain"))


def test_pack_loads_without_errors_and_only_this_pack(server):
    log = server.log_text()
    assert "Starting server" in log, server.log_tail()
    startup = log.split("Starting server")[0]
    pack_lines = [line for line in startup.splitlines() if PACK_NAME in line]
    import_lines = [line for line in pack_lines if "seconds" in line]
    assert len(import_lines) == 1 and import_lines[0].rstrip().endswith(f"custom_nodes/{PACK_NAME}"), pack_lines
    assert "IMPORT FAILED" not in import_lines[0], f"the pack failed to import:\n{startup[-3000:]}"
    for bad in ("Cannot import", "Traceback", "Error while calling comfy_entrypoint", "did not return"):
        assert bad not in startup, f"{bad!r} in the server's start-up log:\n{startup[-3000:]}"
    info = server.object_info()
    assert set(IPX_NODES) <= set(info)
    for name in IPX_NODES:
        assert info[name]["python_module"] == f"custom_nodes.{PACK_NAME}"
        assert info[name]["category"] == "conditioning/ip-adapter (IPX)"
    other_packs = {node["python_module"] for node in info.values()
                   if node["python_module"].startswith("custom_nodes.")}
    assert other_packs == {f"custom_nodes.{PACK_NAME}"}, other_packs


def test_graph_with_the_three_nodes_produces_an_image(server, reference_image, plain_image):
    info = server.object_info()
    for name in IPX_NODES:
        inputs = {**info[name]["input"].get("required", {}), **info[name]["input"].get("optional", {})}
        assert inputs, name
        for input_name, (_, options) in inputs.items():
            assert len(options.get("tooltip", "")) >= 10, f"{name}.{input_name} has no tooltip"
        assert all(len(t) >= 10 for t in info[name]["output_tooltips"]), name
        assert len(info[name]["description"]) >= 20, name
    adapter_names = info["IPXLoadAdapter"]["input"]["required"]["adapter_name"][1]["options"]
    assert {BASE, PLUS} <= set(adapter_names), adapter_names
    assert info["IPXApplyAdapter"]["input"]["required"]["weight"][1]["default"] == 1.0

    pixels = run_to_image(server, ipx_graph(reference_image, SEED, BASE, prefix="ipx-base"))
    change = mean_abs_diff(pixels, plain_image)
    assert change > 1.0, f"the adapter left the image (nearly) unchanged: mean |diff| {change:.3f} of 255"


def test_plus_graph_produces_an_image(server, reference_image, plain_image):
    # This one reads the reference through POST /upload/image, as a client on another machine would send it.
    data = (server.input_dir / reference_image).read_bytes()
    uploaded = server.upload_image(data, name="ipx-uploaded.png")
    assert uploaded == "ipx-uploaded.png" and (server.input_dir / uploaded).read_bytes() == data
    pixels = run_to_image(server, ipx_graph(uploaded, SEED, PLUS, prefix="ipx-plus"))
    change = mean_abs_diff(pixels, plain_image)
    assert change > 1.0, f"the plus adapter left the image (nearly) unchanged: mean |diff| {change:.3f} of 255"


def test_an_invalid_graph_is_rejected_with_the_hosts_json(server, reference_image):
    graph = ipx_graph(reference_image, next(_fresh_seeds), clip_vision="no-such-encoder.safetensors")
    with pytest.raises(PromptRejected) as rejected:
        server.queue_prompt(graph)
    response = rejected.value.response
    assert response["error"]["type"] == "prompt_outputs_failed_validation", response
    node = response["node_errors"]["clip_vision"]
    assert node["class_type"] == "CLIPVisionLoader"
    assert node["errors"][0]["type"] == "value_not_in_list", node
    assert node["errors"][0]["details"] == f"clip_name: 'no-such-encoder.safetensors' not in ['{VIT_H}', '{VIT_L}']"
    assert "CLIPVisionLoader" in str(rejected.value) and "no-such-encoder" in str(rejected.value)
    assert server.process.poll() is None


def test_unknown_adapter_name_is_rejected_at_validation(server, reference_image):
    """The host checks combo values only for V1 list inputs; IPXLoadAdapter.validate_inputs does it for V3."""
    name = "no-such-adapter.safetensors"
    with pytest.raises(PromptRejected) as rejected:
        server.queue_prompt(ipx_graph(reference_image, next(_fresh_seeds), adapter=name))
    node = rejected.value.response["node_errors"]["adapter"]
    assert node["class_type"] == "IPXLoadAdapter"
    assert f"'{name}' is not in models/ipadapter" in json.dumps(node["errors"]), node
    assert server.process.poll() is None


def test_corrupt_adapter_gives_a_clear_prompt_error_and_the_server_keeps_serving(server, models_dir,
                                                                                  reference_image, tmp_path):
    from ipx_tools.random_adapters import random_adapter, write_adapter
    folder = models_dir / "ipadapter"
    write_adapter(random_adapter("sd15", seed=7), str(tmp_path / "good.bin"))
    sources = {"ip-adapter_sd15-truncated.safetensors": folder / BASE,
               "ip-adapter_sd15-truncated.bin": tmp_path / "good.bin"}
    for name, source in sources.items():
        (folder / name).write_bytes(source.read_bytes()[:1000])
    for name in sources:
        error = run_to_error(server, ipx_graph(reference_image, next(_fresh_seeds), adapter=name))
        message = error["exception_message"]
        assert error["node_type"] == "IPXLoadAdapter", error
        assert error["exception_type"].endswith("AdapterFileError"), error["exception_type"]
        assert name in message, message
        assert "truncated" in message and "corrupt" in message, message
    assert (folder / BASE).stat().st_size > 40_000_000
    assert_keeps_serving(server, reference_image)


@pytest.mark.parametrize("adapter, expected", [
    (BASE, ("CLIP ViT-L/14 (image embeds 768)", "CLIP ViT-H/14 (image embeds 1024)")),
    (PLUS, ("CLIP ViT-L/14 (hidden states 1024)", "CLIP ViT-H/14 (hidden states 1280)")),
], ids=["base", "plus"])
def test_wrong_clip_vision_names_both_encoders(server, reference_image, adapter, expected):
    error = run_to_error(server, ipx_graph(reference_image, next(_fresh_seeds), adapter=adapter, clip_vision=VIT_L))
    message = error["exception_message"]
    assert error["node_type"] == "IPXEncodeImage", error
    assert error["exception_type"].endswith("EncoderMismatchError"), error["exception_type"]
    gives, needs = expected
    assert f"gives {gives}" in message and f"needs {needs}" in message, message


def write_sdxl_like_adapter(path):
    """The layout of ip-adapter_sdxl: a Linear+LayerNorm projection to 4 tokens of width 2048 and to_k_ip / to_v_ip
    reading 2048-wide tokens (only the first four of its 70 layers, to keep the file small)."""
    import torch
    from safetensors.torch import save_file
    generator = torch.Generator().manual_seed(5)

    def rand(*shape):
        return (0.02 * torch.randn(shape, generator=generator)).half()

    state_dict = {"image_proj.proj.weight": rand(4 * 2048, 1280), "image_proj.proj.bias": rand(4 * 2048),
                  "image_proj.norm.weight": rand(2048), "image_proj.norm.bias": rand(2048)}
    for index, channels in ((1, 640), (3, 640), (5, 640), (7, 640)):
        state_dict[f"ip_adapter.{index}.to_k_ip.weight"] = rand(channels, 2048)
        state_dict[f"ip_adapter.{index}.to_v_ip.weight"] = rand(channels, 2048)
    save_file(state_dict, str(path))


def test_sdxl_adapter_says_sdxl_and_the_server_keeps_serving(server, models_dir, reference_image):
    name = "ip-adapter_sdxl.safetensors"
    write_sdxl_like_adapter(models_dir / "ipadapter" / name)
    error = run_to_error(server, ipx_graph(reference_image, next(_fresh_seeds), adapter=name))
    message = error["exception_message"]
    assert error["node_type"] == "IPXLoadAdapter", error
    assert error["exception_type"].endswith("UnsupportedAdapterError"), error["exception_type"]
    assert f"{name} is an SDXL adapter (cross-attention width 2048)" in message, message
    assert "SD1.5 (768)" in message, message
    assert_keeps_serving(server, reference_image)
