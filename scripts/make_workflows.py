"""Writes the example workflows twice from one description: the frontend's UI format (workflows/*.json, what users
drag into ComfyUI) and the API format (workflows/api/*.json, what is posted to /prompt). Run it after editing a graph:

    python scripts/make_workflows.py
"""
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "workflows"

CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
CLIP_VISION = "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"
MODELS_NOTE = (
    "Model files for this workflow (ComfyUI/models/...):\n"
    f"- checkpoints/{CHECKPOINT}: any SD1.5 checkpoint\n"
    f"- clip_vision/{CLIP_VISION}: the ViT-H/14 image encoder every SD1.5 IP-Adapter uses (except *_vit-G)\n"
    "- ipadapter/{adapters}: official IP-Adapter files, .bin or .safetensors, unchanged\n"
    "Put your reference image in ComfyUI/input (or use the upload button on Load Image).")


class Graph:
    """Nodes with titles, positions, widget values (in the frontend's order) and links by (node, output slot)."""

    def __init__(self):
        self.nodes = []
        self.links = []

    def node(self, type_, title, pos, widgets=(), inputs=(), outputs=(), size=(320, 120)):
        """inputs: [(name, type, (source_node, slot))]; outputs: [(name, type)]. Returns the node id."""
        node_id = len(self.nodes) + 1
        node = {"id": node_id, "type": type_, "pos": list(pos), "size": list(size), "flags": {}, "order": node_id - 1,
                "mode": 0, "inputs": [], "outputs": [{"name": n, "type": t, "links": [], "slot_index": i}
                                                      for i, (n, t) in enumerate(outputs)],
                "title": title, "properties": {"Node name for S&R": type_}, "widgets_values": list(widgets)}
        for name, type_name, (source, slot) in inputs:
            link_id = len(self.links) + 1
            self.links.append([link_id, source, slot, node_id, len(node["inputs"]), type_name])
            self.nodes[source - 1]["outputs"][slot]["links"].append(link_id)
            node["inputs"].append({"name": name, "type": type_name, "link": link_id})
        self.nodes.append(node)
        return node_id

    def note(self, text, pos, size=(420, 200)):
        self.nodes.append({"id": len(self.nodes) + 1, "type": "Note", "pos": list(pos), "size": list(size),
                           "flags": {}, "order": len(self.nodes), "mode": 0, "inputs": [], "outputs": [],
                           "title": "Which model files go where", "properties": {}, "widgets_values": [text]})

    def ui(self):
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                "links": self.links, "groups": [], "config": {},
                "extra": {"ds": {"scale": 0.8, "offset": [40, 40]}}, "version": 0.4}


# Widget names in the frontend's order, for the API format (an INT "seed" is followed by control_after_generate,
# an upload-enabled "image" by the upload button: both are widget values with no API input).
WIDGETS = {
    "CheckpointLoaderSimple": ["ckpt_name"], "CLIPTextEncode": ["text"], "LoadImage": ["image", None],
    "CLIPVisionLoader": ["clip_name"], "IPXLoadAdapter": ["adapter_name"], "IPXEncodeImage": ["combine"],
    "IPXApplyAdapter": ["weight", "start_at", "end_at"],
    "IPXApplyAdapterImage": ["weight", "start_at", "end_at"],
    "IPXApplyAdapterAdvanced": ["weight", "start_at", "end_at", "weight_type", "weight_composition", "embeds_scaling",
                                "layer_weights", "step_weights"],
    "IPXPrepImage": ["crop_position", "interpolation", "sharpening", "size"],
    "EmptyLatentImage": ["width", "height", "batch_size"],
    "KSampler": ["seed", None, "steps", "cfg", "sampler_name", "scheduler", "denoise"],
    "VAEDecode": [], "SaveImage": ["filename_prefix"],
    "IPXTrainAdapter": ["captions", "steps", "batch_size", "grad_accumulation", "learning_rate", "weight_decay",
                        "image_drop", "text_drop", "both_drop", "seed", None, "variant", "resolution", "precision",
                        "cache_encodings"],
    "IPXSaveAdapter": ["filename_prefix", "dtype"],
}


def api(graph: Graph) -> dict:
    links = {link[0]: link for link in graph.links}
    prompt = {}
    for node in graph.nodes:
        if node["type"] == "Note":
            continue
        inputs = {name: value for name, value in zip(WIDGETS[node["type"]], node["widgets_values"]) if name}
        for entry in node["inputs"]:
            link = links[entry["link"]]
            inputs[entry["name"]] = [str(link[1]), link[2]]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs, "_meta": {"title": node["title"]}}
    return prompt


def sd15_front(g: Graph):
    """Checkpoint, prompts, latent: the part every example shares. Returns (checkpoint, positive, negative, latent)."""
    ckpt = g.node("CheckpointLoaderSimple", "SD1.5 checkpoint", (40, 60), [CHECKPOINT],
                  outputs=[("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")], size=(320, 100))
    pos = g.node("CLIPTextEncode", "Positive prompt", (400, 60), ["a portrait photo of a person, best quality"],
                 inputs=[("clip", "CLIP", (ckpt, 1))], outputs=[("CONDITIONING", "CONDITIONING")], size=(380, 140))
    neg = g.node("CLIPTextEncode", "Negative prompt", (400, 240), ["blurry, low quality, deformed"],
                 inputs=[("clip", "CLIP", (ckpt, 1))], outputs=[("CONDITIONING", "CONDITIONING")], size=(380, 140))
    latent = g.node("EmptyLatentImage", "Image size", (400, 420), [512, 512, 1], outputs=[("LATENT", "LATENT")],
                    size=(320, 110))
    return ckpt, pos, neg, latent


def sd15_back(g: Graph, model, ckpt, pos, neg, latent, x=1250):
    sampler = g.node("KSampler", "Sampler", (x, 60), [42, "fixed", 20, 7.0, "euler", "normal", 1.0],
                     inputs=[("model", "MODEL", (model, 0)), ("positive", "CONDITIONING", (pos, 0)),
                             ("negative", "CONDITIONING", (neg, 0)), ("latent_image", "LATENT", (latent, 0))],
                     outputs=[("LATENT", "LATENT")], size=(320, 270))
    decode = g.node("VAEDecode", "Decode", (x, 380), inputs=[("samples", "LATENT", (sampler, 0)),
                                                              ("vae", "VAE", (ckpt, 2))],
                    outputs=[("IMAGE", "IMAGE")], size=(210, 50))
    g.node("SaveImage", "Output image", (x + 360, 60), ["ipadapter"], inputs=[("images", "IMAGE", (decode, 0))],
           size=(420, 460))


def reference(g: Graph, title, image, pos):
    return g.node("LoadImage", title, pos, [image, "image"], outputs=[("IMAGE", "IMAGE"), ("MASK", "MASK")],
                  size=(320, 320))


def example_base() -> Graph:
    g = Graph()
    ckpt, pos, neg, latent = sd15_front(g)
    image = reference(g, "Reference image", "reference.png", (40, 560))
    vision = g.node("CLIPVisionLoader", "CLIP vision (ViT-H/14)", (40, 220), [CLIP_VISION],
                    outputs=[("CLIP_VISION", "CLIP_VISION")], size=(320, 60))
    adapter = g.node("IPXLoadAdapter", "IP-Adapter", (40, 320), ["ip-adapter_sd15.safetensors"],
                     outputs=[("adapter", "IPX_ADAPTER")], size=(320, 60))
    embeds = g.node("IPXEncodeImage", "Encode reference", (820, 420), ["concat"],
                    inputs=[("adapter", "IPX_ADAPTER", (adapter, 0)), ("clip_vision", "CLIP_VISION", (vision, 0)),
                            ("image", "IMAGE", (image, 0))], outputs=[("embeds", "IPX_EMBEDS")], size=(300, 120))
    model = g.node("IPXApplyAdapter", "Apply IP-Adapter", (820, 60), [1.0, 0.0, 1.0],
                   inputs=[("model", "MODEL", (ckpt, 0)), ("adapter", "IPX_ADAPTER", (adapter, 0)),
                           ("embeds", "IPX_EMBEDS", (embeds, 0))], outputs=[("MODEL", "MODEL")], size=(320, 150))
    sd15_back(g, model, ckpt, pos, neg, latent)
    g.note(MODELS_NOTE.format(adapters="ip-adapter_sd15.safetensors"), (820, 600))
    return g


def example_plus() -> Graph:
    g = Graph()
    ckpt, pos, neg, latent = sd15_front(g)
    image = reference(g, "Reference image", "reference.png", (40, 560))
    vision = g.node("CLIPVisionLoader", "CLIP vision (ViT-H/14)", (40, 220), [CLIP_VISION],
                    outputs=[("CLIP_VISION", "CLIP_VISION")], size=(320, 60))
    adapter = g.node("IPXLoadAdapter", "IP-Adapter plus", (40, 320), ["ip-adapter-plus_sd15.safetensors"],
                     outputs=[("adapter", "IPX_ADAPTER")], size=(320, 60))
    model = g.node("IPXApplyAdapterImage", "Apply IP-Adapter plus (image)", (820, 60), [0.8, 0.0, 1.0],
                   inputs=[("model", "MODEL", (ckpt, 0)), ("adapter", "IPX_ADAPTER", (adapter, 0)),
                           ("clip_vision", "CLIP_VISION", (vision, 0)), ("image", "IMAGE", (image, 0))],
                   outputs=[("MODEL", "MODEL")], size=(320, 170))
    sd15_back(g, model, ckpt, pos, neg, latent)
    g.note(MODELS_NOTE.format(adapters="ip-adapter-plus_sd15.safetensors"), (820, 560))
    return g


def example_stacked() -> Graph:
    g = Graph()
    ckpt, pos, neg, latent = sd15_front(g)
    first = reference(g, "Reference image (content)", "reference.png", (40, 560))
    second = reference(g, "Reference image (style)", "reference_style.png", (400, 560))
    vision = g.node("CLIPVisionLoader", "CLIP vision (ViT-H/14)", (40, 220), [CLIP_VISION],
                    outputs=[("CLIP_VISION", "CLIP_VISION")], size=(320, 60))
    base = g.node("IPXLoadAdapter", "IP-Adapter", (40, 320), ["ip-adapter_sd15.safetensors"],
                  outputs=[("adapter", "IPX_ADAPTER")], size=(320, 60))
    plus = g.node("IPXLoadAdapter", "IP-Adapter plus", (40, 420), ["ip-adapter-plus_sd15.safetensors"],
                  outputs=[("adapter", "IPX_ADAPTER")], size=(320, 60))
    model = g.node("IPXApplyAdapterImage", "Apply IP-Adapter (content)", (820, 60), [0.7, 0.0, 1.0],
                   inputs=[("model", "MODEL", (ckpt, 0)), ("adapter", "IPX_ADAPTER", (base, 0)),
                           ("clip_vision", "CLIP_VISION", (vision, 0)), ("image", "IMAGE", (first, 0))],
                   outputs=[("MODEL", "MODEL")], size=(320, 170))
    model = g.node("IPXApplyAdapterImage", "Apply IP-Adapter plus (style)", (820, 260), [0.5, 0.0, 0.8],
                   inputs=[("model", "MODEL", (model, 0)), ("adapter", "IPX_ADAPTER", (plus, 0)),
                           ("clip_vision", "CLIP_VISION", (vision, 0)), ("image", "IMAGE", (second, 0))],
                   outputs=[("MODEL", "MODEL")], size=(320, 170))
    sd15_back(g, model, ckpt, pos, neg, latent)
    g.note(MODELS_NOTE.format(adapters="ip-adapter_sd15.safetensors and ip-adapter-plus_sd15.safetensors"),
           (820, 560))
    return g


def example_style() -> Graph:
    """Style transfer from a non-square reference: padded (not cropped) for the encoder, the prompt acting on the
    style layers only, fading out over the last third of the run."""
    g = Graph()
    ckpt, pos, neg, latent = sd15_front(g)
    image = reference(g, "Style reference", "reference_style.png", (40, 560))
    vision = g.node("CLIPVisionLoader", "CLIP vision (ViT-H/14)", (40, 220), [CLIP_VISION],
                    outputs=[("CLIP_VISION", "CLIP_VISION")], size=(320, 60))
    adapter = g.node("IPXLoadAdapter", "IP-Adapter plus", (40, 320), ["ip-adapter-plus_sd15.safetensors"],
                     outputs=[("adapter", "IPX_ADAPTER")], size=(320, 60))
    prepped = g.node("IPXPrepImage", "Pad to square", (400, 560), ["pad", "bicubic", 0.0, 224],
                     inputs=[("image", "IMAGE", (image, 0))], outputs=[("IMAGE", "IMAGE")], size=(300, 150))
    embeds = g.node("IPXEncodeImage", "Encode style reference", (820, 420), ["concat"],
                    inputs=[("adapter", "IPX_ADAPTER", (adapter, 0)), ("clip_vision", "CLIP_VISION", (vision, 0)),
                            ("image", "IMAGE", (prepped, 0))], outputs=[("embeds", "IPX_EMBEDS")], size=(300, 120))
    model = g.node("IPXApplyAdapterAdvanced", "Apply IP-Adapter (style transfer)", (820, 60),
                   [1.0, 0.0, 1.0, "style transfer", 1.0, "V only", "", "0:1, 0.66:1, 1:0"],
                   inputs=[("model", "MODEL", (ckpt, 0)), ("adapter", "IPX_ADAPTER", (adapter, 0)),
                           ("embeds", "IPX_EMBEDS", (embeds, 0))], outputs=[("MODEL", "MODEL")], size=(340, 290))
    sd15_back(g, model, ckpt, pos, neg, latent)
    g.note(MODELS_NOTE.format(adapters="ip-adapter-plus_sd15.safetensors"), (820, 600))
    return g


TRAIN_NOTE = (
    "Training an IP-Adapter on your images, then using it at once.\n"
    "Model files (ComfyUI/models/...):\n"
    f"- checkpoints/{CHECKPOINT}: the SD1.5 checkpoint to train against (frozen)\n"
    f"- clip_vision/{CLIP_VISION}: the ViT-H/14 image encoder the adapter reads\n"
    "- ipadapter/: where IPX Save IP-Adapter writes the trained adapter (ipx_trained_00001_.safetensors, ...), "
    "ready for IPX Load IP-Adapter\n"
    "As shipped this is a quick demo (one image, 20 steps at 256 px) that runs even on a CPU. For real training: "
    "many images (e.g. the host's Load Image Dataset from Folder), one caption per line, resolution 512, batch 8, "
    "thousands of steps, on a GPU; connect the loss output to Plot Loss Graph to watch it fall. Headless and on "
    "several GPUs: scripts/train.py.")


def example_train() -> Graph:
    """Train a new base adapter on the reference image, save it, and sample with it right away."""
    g = Graph()
    ckpt, pos, neg, latent = sd15_front(g)
    image = reference(g, "Training image", "reference.png", (40, 560))
    vision = g.node("CLIPVisionLoader", "CLIP vision (ViT-H/14)", (40, 220), [CLIP_VISION],
                    outputs=[("CLIP_VISION", "CLIP_VISION")], size=(320, 60))
    adapter = g.node("IPXTrainAdapter", "Train IP-Adapter", (820, 60),
                     ["a portrait photo of a person", 20, 1, 1, 0.0001, 0.01, 0.05, 0.05, 0.05, 0, "fixed", "sd15",
                      256, "auto", True],
                     inputs=[("model", "MODEL", (ckpt, 0)), ("clip", "CLIP", (ckpt, 1)), ("vae", "VAE", (ckpt, 2)),
                             ("clip_vision", "CLIP_VISION", (vision, 0)), ("images", "IMAGE", (image, 0))],
                     outputs=[("adapter", "IPX_ADAPTER"), ("loss", "LOSS_MAP")], size=(380, 620))
    g.node("IPXSaveAdapter", "Save trained adapter", (820, 720), ["ipx_trained", "fp16"],
           inputs=[("adapter", "IPX_ADAPTER", (adapter, 0))], outputs=[("adapter_name", "STRING")], size=(380, 110))
    model = g.node("IPXApplyAdapterImage", "Apply the trained adapter", (1250, 60), [1.0, 0.0, 1.0],
                   inputs=[("model", "MODEL", (ckpt, 0)), ("adapter", "IPX_ADAPTER", (adapter, 0)),
                           ("clip_vision", "CLIP_VISION", (vision, 0)), ("image", "IMAGE", (image, 0))],
                   outputs=[("MODEL", "MODEL")], size=(320, 170))
    sd15_back(g, model, ckpt, pos, neg, latent, x=1650)
    g.note(TRAIN_NOTE, (400, 600), size=(380, 300))
    return g


EXAMPLES = {"ipadapter_sd15": example_base, "ipadapter_sd15_plus": example_plus,
            "ipadapter_sd15_stacked": example_stacked, "ipadapter_sd15_style": example_style, "ipadapter_sd15_train": example_train}


def main():
    (ROOT / "api").mkdir(parents=True, exist_ok=True)
    for name, build in EXAMPLES.items():
        graph = build()
        (ROOT / f"{name}.json").write_text(json.dumps(graph.ui(), indent=1) + "\n")
        (ROOT / "api" / f"{name}.json").write_text(json.dumps(api(graph), indent=1) + "\n")
        print(f"wrote workflows/{name}.json and workflows/api/{name}.json")


if __name__ == "__main__":
    main()
