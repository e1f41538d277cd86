"""Reading and writing IP-Adapter weight files in the official layouts, without ever running pickled code.

Two layouts exist:
- ``.bin`` (torch.save): a nested dict ``{"image_proj": {...}, "ip_adapter": {"1.to_k_ip.weight": ...}}``.
- ``.safetensors``: flat keys ``image_proj.*`` and ``ip_adapter.*``.
Both read into the flat form, which is also the state_dict layout of :class:`ipadapter_core.adapter.IPAdapter`.
"""
import os
import pickle

import torch
from safetensors.torch import load_file, save_file

from .errors import AdapterFileError

SECTIONS = ("image_proj", "ip_adapter")


def flatten_sections(state_dict: dict, source: str = "state dict") -> dict:
    """Turn the nested official layout into flat ``section.key`` names; a flat dict passes through."""
    flat = {}
    for key, value in state_dict.items():
        if isinstance(value, dict):
            if key not in SECTIONS:
                raise AdapterFileError(f"{source}: unexpected section '{key}'; an IP-Adapter file holds only "
                                       f"{' and '.join(SECTIONS)}")
            for sub_key, tensor in value.items():
                flat[f"{key}.{sub_key}"] = tensor
        else:
            flat[key] = value
    for key, value in flat.items():
        if not isinstance(value, torch.Tensor):
            raise AdapterFileError(f"{source}: entry '{key}' is a {type(value).__name__}, not a tensor")
    return flat


def _first_sentence(error: Exception) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text.split(". ")[0][:200]


def _load_pickle(path: str) -> dict:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise AdapterFileError(
            f"{os.path.basename(path)} was refused: it is a pickle that asks to run code or build objects other than "
            f"tensors, which an adapter file never needs. Use the official file, or convert it to .safetensors with a "
            f"tool you trust. (torch said: {_first_sentence(e)})") from e
    except Exception as e:  # a corrupt file makes the unpickler fail in many ways (EOFError, IndexError, ...)
        raise AdapterFileError(f"{os.path.basename(path)} cannot be read as a torch file; it is probably truncated or "
                               f"corrupt (download it again): {_first_sentence(e)}") from e
    if not isinstance(data, dict):
        raise AdapterFileError(f"{os.path.basename(path)} holds a {type(data).__name__}, not a dict of tensors")
    if "state_dict" in data and isinstance(data["state_dict"], dict):
        data = data["state_dict"]
    return data


def _load_safetensors(path: str) -> dict:
    try:
        return load_file(path, device="cpu")
    except Exception as e:  # SafetensorError, OSError, and whatever a damaged header provokes
        raise AdapterFileError(f"{os.path.basename(path)} cannot be read as safetensors; it is probably truncated or "
                               f"corrupt (download it again): {e}") from e


def load_adapter_state_dict(path: str) -> dict:
    """Read an adapter file (.bin/.pt/.pth/.ckpt or .safetensors) into flat ``image_proj.*`` / ``ip_adapter.*`` keys."""
    if not os.path.isfile(path):
        raise AdapterFileError(f"adapter file not found: {path}")
    if os.path.getsize(path) == 0:
        raise AdapterFileError(f"{os.path.basename(path)} is empty (0 bytes); download it again")
    if path.lower().endswith(".safetensors"):
        raw = _load_safetensors(path)
    else:
        raw = _load_pickle(path)
    return flatten_sections(raw, os.path.basename(path))


def save_adapter_safetensors(state_dict: dict, path: str, metadata: dict | None = None) -> None:
    """Write the flat official layout as safetensors (contiguous CPU tensors)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in flatten_sections(state_dict).items()}
    save_file(tensors, path, metadata={k: str(v) for k, v in (metadata or {}).items()})


def save_adapter_bin(state_dict: dict, path: str) -> None:
    """Write the nested official .bin layout ``{"image_proj": ..., "ip_adapter": ...}``."""
    nested = {section: {} for section in SECTIONS}
    for key, tensor in flatten_sections(state_dict).items():
        section, _, rest = key.partition(".")
        nested[section][rest] = tensor.detach().to("cpu").contiguous()
    torch.save(nested, path)
