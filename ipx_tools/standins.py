"""Random-weight stand-ins for the models an IP-Adapter graph needs, built with the HOST's own classes and written in
the official file layouts, so that the host's real loaders (CheckpointLoaderSimple, CLIPVisionLoader) and this pack's
IPXLoadAdapter read them exactly as they read the downloaded files.

- ``build_sd15_checkpoint``: SD1.5 (UNet from the public v1-inference config, CLIP-L text encoder, SD VAE) in one
  .safetensors, as ``BaseModel.state_dict_for_saving`` lays it out.
- ``build_clip_vision``: CLIP ViT-H/14 (what every SD1.5 adapter except *_vit-G needs) or ViT-L/14 (a wrong encoder,
  for mismatch tests), transformers key layout (``vision_model.encoder.layers.N...``).
- ``build_models_dir``: a ComfyUI-style models folder (checkpoints/, clip_vision/, ipadapter/) that only builds what is
  missing or was built by a different version of the builders.

Every weight is random, layers that normally start at zero included, so no output is trivially zero. The host is
imported lazily inside the functions: this module is importable without ComfyUI.

    python -m ipx_tools.standins --out DIR [--variants sd15 plus] [--vit-l] [--seed 0]
"""
import argparse
import contextlib
import gc
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parent.parent
log = logging.getLogger(__name__)

CHECKPOINT_NAME = "sd15-standin.safetensors"
CLIP_VISION_NAMES = {
    "vit-h": "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors",
    "vit-l": "clip-vit-large-patch14.safetensors",
}
CLIP_VISION_CONFIGS = {"vit-h": "clip_vision_config_h.json", "vit-l": "clip_vision_config_vitl.json"}
STAMP_NAME = "standins-stamp.json"

# Sources whose content decides the bytes of the files built here: a change to any of them rebuilds.
_MODEL_SOURCES = ("ipx_tools/standins.py",)
_ADAPTER_SOURCES = ("ipx_tools/standins.py", "ipx_tools/random_adapters.py", "ipadapter_core/adapter.py",
                    "ipadapter_core/projection.py", "ipadapter_core/layers.py", "ipadapter_core/files.py",
                    "ipadapter_core/variants.py")


# --- the host --------------------------------------------------------------------------------------------------------

def ensure_host_importable(host_path=None) -> Path:
    """Make ``comfy.*`` importable (host root on sys.path, CPU mode) and return the host root. A host already imported
    in this process wins; else ``host_path``; else ipx_tools.host.find_comfyui()."""
    comfy = sys.modules.get("comfy")
    if comfy is not None and getattr(comfy, "__file__", None):
        return Path(comfy.__file__).resolve().parent.parent
    if host_path is None:
        from .host import find_comfyui
        host_path, how = find_comfyui()
        if host_path is None:
            raise RuntimeError(f"cannot build stand-ins without ComfyUI: {how}")
    host_path = str(Path(host_path).resolve())
    if host_path not in sys.path:
        sys.path.insert(0, host_path)
    if "comfy.model_management" not in sys.modules:
        from comfy.cli_args import args
        args.cpu = True  # must precede comfy.model_management; the stand-ins are built on the CPU
    return Path(host_path)


# --- randomising the host's modules ----------------------------------------------------------------------------------

def _torch_reset(module) -> bool:
    """Run torch's own reset_parameters for ``module`` (the host's ops classes override it with a no-op)."""
    for cls in type(module).__mro__:
        if cls.__module__.startswith("torch.nn.modules") and "reset_parameters" in cls.__dict__:
            cls.reset_parameters(module)
            return True
    return False


def randomize_(model, seed: int):
    """Give every parameter of ``model`` random values, deterministically from ``seed``: each layer gets torch's
    default initialisation (which also covers the layers the host zero-initialises, e.g. the UNet's out and proj_out
    convolutions), norm layers get scales near 1 and small biases, and any parameter no layer owns (CLIP's class
    embedding, ...) gets N(0, 0.02). Returns ``model``."""
    import torch
    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.BatchNorm2d)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed + 1)
        for param in model.parameters():
            param.fill_(float("nan"))
        for module in model.modules():
            if isinstance(module, norms):
                if getattr(module, "weight", None) is not None:
                    module.weight.copy_(1.0 + 0.1 * torch.randn(module.weight.shape, generator=generator))
                if getattr(module, "bias", None) is not None:
                    module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
            else:
                _torch_reset(module)
        for param in model.parameters():
            if torch.isnan(param).any():
                param.copy_(0.02 * torch.randn(param.shape, generator=generator))
    return model


def _fp16(state_dict: dict) -> dict:
    import torch
    return {k: (v.to(torch.float16) if v.is_floating_point() else v).contiguous() for k, v in state_dict.items()}


def _save(state_dict: dict, path: Path, metadata: dict | None = None) -> None:
    """Write atomically (a killed build never leaves a half file under the final name)."""
    import comfy.utils
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    comfy.utils.save_torch_file(state_dict, str(partial), metadata=metadata)
    os.replace(partial, path)


# --- SD1.5 -----------------------------------------------------------------------------------------------------------

def sd15_unet_config() -> dict:
    """The UNet config of models/configs/v1-inference.yaml, converted as the host converts ldm configs, with the keys
    its SD15 detection compares."""
    import yaml
    import comfy.model_detection
    host = ensure_host_importable()
    with open(host / "models" / "configs" / "v1-inference.yaml", encoding="utf-8") as f:
        params = dict(yaml.safe_load(f)["model"]["params"]["unet_config"]["params"])
    config = comfy.model_detection.convert_config(params)
    config.update(use_checkpoint=False, use_linear_in_transformer=False, adm_in_channels=None,
                  use_temporal_attention=False)
    return config


def build_sd15_checkpoint(path, seed: int = 0) -> Path:
    """A random SD1.5 checkpoint (UNet, CLIP-L text encoder, SD VAE) as one fp16 .safetensors that
    CheckpointLoaderSimple loads and detects as SD15."""
    ensure_host_importable()
    import torch
    import comfy.model_detection
    import comfy.sd1_clip
    import comfy.supported_models
    from comfy.ldm.models.autoencoder import AutoencoderKL

    model_config = comfy.model_detection.model_config_from_unet_config(sd15_unet_config())
    if type(model_config) is not comfy.supported_models.SD15:
        raise RuntimeError(f"the host matched the v1-inference UNet config to {type(model_config).__name__}, not SD15")
    model_config.set_inference_dtype(torch.float32, None)

    clip = randomize_(comfy.sd1_clip.SD1ClipModel(device="cpu", dtype=torch.float32), seed + 1)
    clip_sd = _fp16(clip.state_dict())
    del clip
    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    vae = randomize_(AutoencoderKL(ddconfig=ddconfig, embed_dim=4), seed + 2)
    vae_sd = _fp16(vae.state_dict())
    del vae
    gc.collect()

    model = model_config.get_model({}, device="cpu")
    randomize_(model.diffusion_model, seed)
    model.diffusion_model.to(torch.float16)  # halves the peak: state_dict_for_saving then holds fp16 tensors
    state_dict = _fp16(model.state_dict_for_saving(clip_sd, vae_sd))
    del model, clip_sd, vae_sd
    gc.collect()
    _save(state_dict, path, {"ipx_standin": f"sd15 seed {seed}"})  # one key: byte-identical rebuilds
    del state_dict
    gc.collect()
    return Path(path)


# --- CLIP vision -----------------------------------------------------------------------------------------------------

def build_clip_vision(path, kind: str = "vit-h", seed: int = 0) -> Path:
    """A random CLIP vision encoder from the host's config for ``kind`` ("vit-h" or "vit-l"), as fp16 .safetensors in
    the transformers layout that CLIPVisionLoader reads."""
    if kind not in CLIP_VISION_CONFIGS:
        raise ValueError(f"kind must be one of {sorted(CLIP_VISION_CONFIGS)}, not {kind!r}")
    host = ensure_host_importable()
    import torch
    import comfy.clip_model
    import comfy.ops
    with open(host / "comfy" / CLIP_VISION_CONFIGS[kind], encoding="utf-8") as f:
        config = json.load(f)
    model = comfy.clip_model.CLIPVisionModelProjection(config, torch.float32, "cpu", comfy.ops.manual_cast)
    randomize_(model, seed)
    state_dict = _fp16(model.state_dict())
    del model
    gc.collect()
    _save(state_dict, path, {"ipx_standin": f"clip_vision {kind} seed {seed}"})
    del state_dict
    gc.collect()
    return Path(path)


# --- adapters --------------------------------------------------------------------------------------------------------

def build_adapter(path, variant: str, seed: int = 0) -> Path:
    """A random adapter of ``variant`` (see ipx_tools.random_adapters.SPECS) in the official layout for ``path``'s
    extension, fp16 like the official files. Needs no host."""
    if str(PACK_DIR) not in sys.path:
        sys.path.append(str(PACK_DIR))
    import torch
    from .random_adapters import random_adapter, write_adapter
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial" + path.suffix)
    write_adapter(random_adapter(variant, seed=seed), str(partial), dtype=torch.float16)
    os.replace(partial, path)
    return path


# --- the models folder -----------------------------------------------------------------------------------------------

def _sources_hash(sources) -> str:
    digest = hashlib.sha256()
    for rel in sources:
        digest.update(rel.encode())
        digest.update((PACK_DIR / rel).read_bytes())
    return digest.hexdigest()[:16]


def planned_files(variants=("sd15", "plus"), clip_vision=("vit-h",), seed: int = 0) -> dict:
    """{path relative to the models folder: (what to build, its recipe hash)}. Pure: imports no host."""
    from .random_adapters import OFFICIAL_NAMES
    models_hash = _sources_hash(_MODEL_SOURCES)
    adapters_hash = _sources_hash(_ADAPTER_SOURCES)
    plan = {f"checkpoints/{CHECKPOINT_NAME}": (("sd15", seed), f"{models_hash}-{seed}")}
    for kind in clip_vision:
        plan[f"clip_vision/{CLIP_VISION_NAMES[kind]}"] = (("clip_vision", kind, seed), f"{models_hash}-{kind}-{seed}")
    for variant in variants:
        plan[f"ipadapter/{OFFICIAL_NAMES[variant]}.safetensors"] = (("adapter", variant, seed),
                                                                    f"{adapters_hash}-{variant}-{seed}")
    return plan


def _read_stamp(root: Path) -> dict:
    try:
        return json.loads((root / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return {}


def _host_version_or_none(host_path=None):
    """The version of the host the files are (or would be) built with: the one imported, else ``host_path``, else
    the one find_comfyui() finds."""
    try:
        from .host import comfyui_version, find_comfyui
        comfy = sys.modules.get("comfy")
        if comfy is not None and getattr(comfy, "__file__", None):
            return comfyui_version(Path(comfy.__file__).resolve().parent.parent)
        path = host_path or find_comfyui()[0]
        return comfyui_version(path) if path else None
    except OSError:
        return None


def missing_files(root, variants=("sd15", "plus"), clip_vision=("vit-h",), seed: int = 0, host_path=None) -> list:
    """The files of the plan that are absent, or were built by other builder sources or another host version."""
    root = Path(root)
    stamp = _read_stamp(root)
    files = stamp.get("files", {})
    host_ok = stamp.get("host_version") == _host_version_or_none(host_path)
    out = []
    for rel, (_, recipe) in planned_files(variants, clip_vision, seed).items():
        entry = files.get(rel, {})
        path = root / rel
        if not (host_ok and path.is_file() and entry.get("recipe") == recipe
                and entry.get("size") == path.stat().st_size):
            out.append(rel)
    return out


@contextlib.contextmanager
def _locked(root: Path):
    """An exclusive lock on the folder while it is built (two test runs may share the cache); no-op without fcntl."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(root / ".standins.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def build_models_dir(root, variants=("sd15", "plus"), seed: int = 0, clip_vision=("vit-h",), host_path=None) -> dict:
    """Lay out ``root/checkpoints``, ``root/clip_vision`` and ``root/ipadapter`` with random stand-ins, building only
    what is missing or stale (see STAMP_NAME). Returns {relative path: seconds spent building it}."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root):
        return _build_missing(root, variants, seed, clip_vision, host_path)


def _build_missing(root: Path, variants, seed, clip_vision, host_path) -> dict:
    todo = missing_files(root, variants, clip_vision, seed, host_path)
    built = {}
    if not todo:
        return built
    if any(not rel.startswith("ipadapter/") for rel in todo):
        ensure_host_importable(host_path)
    stamp = _read_stamp(root)
    version = _host_version_or_none(host_path)
    if stamp.get("host_version") != version:
        stamp = {}
    stamp["host_version"] = version
    files = stamp.setdefault("files", {})
    plan = planned_files(variants, clip_vision, seed)
    for rel in todo:
        (what, *args), recipe = plan[rel]
        path = root / rel
        started = time.perf_counter()
        log.info("building stand-in %s", path)
        if what == "sd15":
            build_sd15_checkpoint(path, seed=args[0])
        elif what == "clip_vision":
            build_clip_vision(path, kind=args[0], seed=args[1])
        else:
            build_adapter(path, variant=args[0], seed=args[1])
        gc.collect()
        built[rel] = round(time.perf_counter() - started, 1)
        files[rel] = {"recipe": recipe, "size": path.stat().st_size, "build_s": built[rel]}
        # Written after each file, so that an interrupted build keeps what it finished.
        (root / STAMP_NAME).write_text(json.dumps(stamp, indent=1, sort_keys=True))
    return built


def build_models_dir_subprocess(root, variants=("sd15", "plus"), seed: int = 0, clip_vision=("vit-h",),
                                python: str | None = None, host_path=None, timeout: float = 1800) -> dict:
    """build_models_dir in a child process (its 5-7 GB of build memory goes back to the OS when it exits); a no-op
    when everything is up to date. Returns {relative path: seconds} as the child reported it."""
    import subprocess
    if not missing_files(root, variants, clip_vision, seed, host_path):
        return {}
    cmd = [python or sys.executable, "-m", "ipx_tools.standins", "--out", str(root), "--seed", str(seed),
           "--variants", *variants, "--clip-vision", *clip_vision, "--json"]
    if host_path is not None:
        cmd += ["--host", str(host_path)]
    proc = subprocess.run(cmd, cwd=PACK_DIR, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"building stand-ins failed ({' '.join(cmd)}), exit {proc.returncode}:\n"
                           f"{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ipx_tools.standins", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="models folder to fill (checkpoints/, clip_vision/, ipadapter/)")
    parser.add_argument("--variants", nargs="+", default=["sd15", "plus"],
                        help="adapter variants (ipx_tools.random_adapters.SPECS); default: sd15 plus")
    parser.add_argument("--clip-vision", nargs="+", default=["vit-h"], choices=sorted(CLIP_VISION_NAMES),
                        help="CLIP vision encoders; default: vit-h")
    parser.add_argument("--vit-l", action="store_true", help="also build the ViT-L/14 encoder (for mismatch tests)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--host", default=None, help="ComfyUI folder (default: $COMFYUI_PATH, then ~/comfy/ComfyUI)")
    parser.add_argument("--json", action="store_true", help="print {file: build seconds} as JSON on the last line")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    kinds = tuple(dict.fromkeys([*args.clip_vision, *(["vit-l"] if args.vit_l else [])]))
    started = time.perf_counter()
    built = build_models_dir(args.out, tuple(args.variants), args.seed, kinds, host_path=args.host)
    if args.json:
        print(json.dumps(built))
    else:
        for rel, seconds in built.items():
            print(f"built {rel} in {seconds:.1f} s")
        print(f"{args.out}: {'up to date' if not built else f'{len(built)} file(s) built'} "
              f"({time.perf_counter() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
