"""The three image projections of the official SD1.5 IP-Adapters, with the official parameter names.

``operations`` supplies Linear and LayerNorm (``torch.nn`` by default; the host passes ``comfy.ops.manual_cast``).
"""
import torch
from einops import rearrange
from torch import nn
from torch.nn import functional as F


class LinearProjection(nn.Module):
    """Base / light / vit-G: one Linear to ``tokens * dim`` and a LayerNorm per token. (n, width) -> (n, tokens, dim)."""

    def __init__(self, width: int, dim: int, tokens: int, operations=nn):
        super().__init__()
        self.tokens = tokens
        self.proj = operations.Linear(width, tokens * dim)
        self.norm = operations.LayerNorm(dim)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        x = self.proj(image_embeds)
        return self.norm(rearrange(x, "n (t d) -> n t d", t=self.tokens))


class MLPProjection(nn.Module):
    """Full face: Linear, GELU, Linear, LayerNorm on every encoder token. (n, 257, width) -> (n, 257, dim)."""

    def __init__(self, width: int, dim: int, operations=nn):
        super().__init__()
        self.proj = nn.Sequential(operations.Linear(width, width), nn.GELU(), operations.Linear(width, dim),
                                  operations.LayerNorm(dim))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden_states)


class PerceiverAttention(nn.Module):
    """Learned latents attend over the encoder tokens and themselves (keys/values = [tokens; latents])."""

    def __init__(self, dim: int, heads: int, dim_head: int, operations=nn):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.norm1 = operations.LayerNorm(dim)
        self.norm2 = operations.LayerNorm(dim)
        self.to_q = operations.Linear(dim, inner, bias=False)
        self.to_kv = operations.Linear(dim, inner * 2, bias=False)
        self.to_out = operations.Linear(inner, dim, bias=False)

    def forward(self, tokens: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        tokens = self.norm1(tokens)
        latents = self.norm2(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([tokens, latents], dim=1)).chunk(2, dim=-1)
        q, k, v = (rearrange(t, "n s (h d) -> n h s d", h=self.heads) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(rearrange(out, "n h s d -> n s (h d)"))


def _feed_forward(dim: int, mult: int, operations=nn) -> nn.Sequential:
    # Indices 0, 1, 3 carry weights: the official names are layers.{i}.1.{0,1,3}.
    return nn.Sequential(operations.LayerNorm(dim), operations.Linear(dim, dim * mult, bias=False), nn.GELU(),
                         operations.Linear(dim * mult, dim, bias=False))


class Resampler(nn.Module):
    """Plus / plus-face: a Perceiver resampler from encoder hidden states to ``tokens`` learned queries."""

    def __init__(self, width: int, dim: int, tokens: int, depth: int = 4, heads: int = 12, dim_head: int = 64,
                 ff_mult: int = 4, operations=nn):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(1, tokens, dim) / dim ** 0.5)
        self.proj_in = operations.Linear(width, dim)
        self.proj_out = operations.Linear(dim, dim)
        self.norm_out = operations.LayerNorm(dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, heads, dim_head, operations), _feed_forward(dim, ff_mult, operations)])
            for _ in range(depth))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        latents = self.latents.to(hidden_states.dtype).expand(hidden_states.shape[0], -1, -1)
        x = self.proj_in(hidden_states)
        for attention, feed_forward in self.layers:
            latents = attention(x, latents) + latents
            latents = feed_forward(latents) + latents
        return self.norm_out(self.proj_out(latents))


def build_image_proj(spec, operations=nn) -> nn.Module:
    if spec.image_proj == "linear":
        return LinearProjection(spec.encoder_width, spec.cross_attention_dim, spec.tokens, operations)
    if spec.image_proj == "mlp":
        return MLPProjection(spec.encoder_width, spec.cross_attention_dim, operations)
    if spec.image_proj == "resampler":
        return Resampler(spec.encoder_width, spec.cross_attention_dim, spec.tokens, depth=spec.resampler_depth,
                         heads=spec.resampler_heads, operations=operations)
    raise ValueError(f"unknown image projection {spec.image_proj!r}")
