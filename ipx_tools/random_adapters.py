"""Random-weight IP-Adapters in the official layouts, for tests and for newcomers without downloaded weights."""
import torch

from ipadapter_core import IPAdapter, save_adapter_bin, save_adapter_safetensors
from ipadapter_core.variants import (IMAGE_EMBEDS, PENULTIMATE, UNCOND_ZERO_EMBEDS, UNCOND_ZERO_PIXELS,
                                     AdapterSpec)

SPECS = {
    "sd15": AdapterSpec("sd15", "linear", 4, 768, IMAGE_EMBEDS, 1024, UNCOND_ZERO_EMBEDS),
    "sd15_vit-G": AdapterSpec("sd15_vit-G", "linear", 4, 768, IMAGE_EMBEDS, 1280, UNCOND_ZERO_EMBEDS),
    "plus": AdapterSpec("plus", "resampler", 16, 768, PENULTIMATE, 1280, UNCOND_ZERO_PIXELS, resampler_depth=4,
                        resampler_heads=12),
    "full_face": AdapterSpec("full_face", "mlp", None, 768, PENULTIMATE, 1280, UNCOND_ZERO_PIXELS),
}

# The official file names of each variant (base and light share an architecture, plus and plus-face too).
OFFICIAL_NAMES = {
    "sd15": "ip-adapter_sd15",
    "sd15_vit-G": "ip-adapter_sd15_vit-G",
    "plus": "ip-adapter-plus_sd15",
    "full_face": "ip-adapter-full-face_sd15",
}


def random_adapter(variant: str, seed: int = 0) -> IPAdapter:
    """An adapter of the given variant with every parameter random (LayerNorms included, so nothing is trivial)."""
    generator = torch.Generator().manual_seed(seed)
    module = IPAdapter(SPECS[variant])
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.ndim >= 2:
                fan_in = param.shape[-1]
                param.copy_(torch.randn(param.shape, generator=generator) / fan_in ** 0.5)
            elif name.endswith("weight"):
                param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    return module.eval().requires_grad_(False)


def write_adapter(module: IPAdapter, path: str, dtype: torch.dtype = torch.float32) -> str:
    """Save in the official layout: nested .bin for *.bin, flat safetensors otherwise."""
    state_dict = {k: v.to(dtype) for k, v in module.state_dict().items()}
    if str(path).endswith(".bin"):
        save_adapter_bin(state_dict, str(path))
    else:
        save_adapter_safetensors(state_dict, str(path))
    return str(path)
