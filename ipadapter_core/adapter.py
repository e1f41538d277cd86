"""The adapter as a module whose state_dict is exactly the official flat layout."""
import os

import torch
from torch import nn

from .errors import AdapterFileError
from .files import load_adapter_state_dict
from .layers import BY_LAYER_INDEX
from .projection import build_image_proj
from .variants import AdapterSpec, detect_variant


class IPAdapterLayer(nn.Module):
    """One cross-attention layer's image key/value projections (no bias, as in the official files)."""

    def __init__(self, channels: int, cross_attention_dim: int, operations=nn):
        super().__init__()
        self.to_k_ip = operations.Linear(cross_attention_dim, channels, bias=False)
        self.to_v_ip = operations.Linear(cross_attention_dim, channels, bias=False)


class IPAdapter(nn.Module):
    """``image_proj`` (the projection) and ``ip_adapter.{layer_index}.to_k_ip / to_v_ip`` (16 layers on SD1.5)."""

    def __init__(self, spec: AdapterSpec, operations=nn):
        super().__init__()
        self.spec = spec
        self.image_proj = build_image_proj(spec, operations)
        self.ip_adapter = nn.ModuleDict({
            str(index): IPAdapterLayer(BY_LAYER_INDEX[index].channels, spec.cross_attention_dim, operations)
            for index in spec.layer_indices})

    def layer(self, layer_index: int) -> IPAdapterLayer:
        return self.ip_adapter[str(layer_index)]

    def image_tokens(self, embeds: torch.Tensor) -> torch.Tensor:
        """Encoder output for n reference images -> (n, tokens, cross_attention_dim)."""
        return self.image_proj(embeds)

    def project_kv(self, layer_index: int, ip_tokens: torch.Tensor):
        layer = self.layer(layer_index)
        return layer.to_k_ip(ip_tokens), layer.to_v_ip(ip_tokens)


def load_state_dict_strict(module: IPAdapter, state_dict: dict, source: str) -> None:
    """Load the official keys with nothing missing, nothing extra and every shape right."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = [f"{k} {list(state_dict[k].shape)} (expected {list(v.shape)})" for k, v in expected.items()
             if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = [f"missing {missing[:5]}" if missing else "", f"unexpected {unexpected[:5]}" if unexpected else "",
                 f"wrong shapes {wrong[:5]}" if wrong else ""]
        raise AdapterFileError(f"{source} does not match the {module.spec.variant} layout: "
                               + "; ".join(p for p in parts if p))
    module.load_state_dict(state_dict, strict=True)


def adapter_from_state_dict(state_dict: dict, source: str = "adapter", operations=nn,
                            dtype: torch.dtype | None = None) -> IPAdapter:
    spec = detect_variant(state_dict, source)
    module = IPAdapter(spec, operations)
    if dtype is not None:
        module.to(dtype)
    load_state_dict_strict(module, state_dict, source)
    return module.eval().requires_grad_(False)


def load_adapter(path: str, operations=nn, dtype: torch.dtype | None = None) -> IPAdapter:
    """Read, detect and strictly load an official adapter file."""
    return adapter_from_state_dict(load_adapter_state_dict(path), os.path.basename(path), operations, dtype)
