"""Saving and loading encoded reference images as safetensors with metadata; never pickle."""
import os

from safetensors import safe_open
from safetensors.torch import save_file

from .embeds import ImageEmbeds
from .errors import IPAdapterError

FORMAT = "ipx-ipadapter-embeds"
VERSION = "1"


class EmbedsFileError(IPAdapterError):
    """An embeddings file that cannot be read, or is not one of ours."""


def save_embeds(embeds: ImageEmbeds, path: str, extra_metadata: dict | None = None) -> None:
    metadata = {"format": FORMAT, "version": VERSION, "encoder_output": embeds.encoder_output,
                "uncond_mode": embeds.uncond_mode, **{k: str(v) for k, v in (extra_metadata or {}).items()}}
    save_file({"cond": embeds.cond.detach().cpu().contiguous(), "uncond": embeds.uncond.detach().cpu().contiguous()},
              path, metadata=metadata)


def load_embeds(path: str) -> tuple:
    """(ImageEmbeds, metadata dict)."""
    name = os.path.basename(path)
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            keys = set(f.keys())
            tensors = {k: f.get_tensor(k) for k in keys & {"cond", "uncond"}}
    except Exception as e:  # SafetensorError, OSError, a damaged header...
        raise EmbedsFileError(f"{name} cannot be read as a safetensors embeddings file: {e}") from e
    if metadata.get("format") != FORMAT or keys != {"cond", "uncond"}:
        raise EmbedsFileError(f"{name} is not an IPX embeddings file (format {metadata.get('format')!r}, tensors "
                              f"{sorted(keys)}); save embeddings with IPX Save Embeds")
    if tensors["cond"].shape != tensors["uncond"].shape:
        raise EmbedsFileError(f"{name}: cond {list(tensors['cond'].shape)} and uncond "
                              f"{list(tensors['uncond'].shape)} differ in shape")
    embeds = ImageEmbeds(cond=tensors["cond"].float(), uncond=tensors["uncond"].float(),
                         encoder_output=metadata["encoder_output"], uncond_mode=metadata["uncond_mode"])
    return embeds, metadata
