"""Test doubles for training in the core ring (no host): a small network that calls the 16 SD1.5 cross-attention
layers exactly as the host's UNet does (its own to_q / to_k / to_v, then the attn2 replacement found in
``transformer_options["patches_replace"]["attn2"]`` under the host key, with the host's extra options), so that the
SD1.5-shaped adapter trains through the real patch in seconds. No tests here."""
import math

import torch
from torch import nn

from ipadapter_core import SD15_LAYERS, sdpa_attention
from ipadapter_core.train_batches import EncodedExamples, DroppedInputs, alphas_cumprod_from_sigmas

HEADS = 8
CONTEXT_DIM = 768


class FakeCrossAttentionUNet(nn.Module):
    """x (b, 4, h, w) -> (b, 4, h, w): for each cross-attention layer, the latent tokens (plus a timestep embedding)
    projected to the layer's width attend over the context, and the layer outputs are summed back to 4 channels."""

    def __init__(self, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.layers = nn.ModuleList(self._layer(layer.channels) for layer in SD15_LAYERS)

    @staticmethod
    def _layer(channels):
        return nn.ModuleDict({"proj_in": nn.Linear(4 + 16, channels), "to_q": nn.Linear(channels, channels, bias=False),
                              "to_k": nn.Linear(CONTEXT_DIM, channels, bias=False),
                              "to_v": nn.Linear(CONTEXT_DIM, channels, bias=False),
                              "proj_out": nn.Linear(channels, 4)})

    def text_kv(self) -> dict:
        """{layer_index: (to_k.weight, to_v.weight)}, as the host glue reads them from a real UNet."""
        return {layer.layer_index: (m["to_k"].weight, m["to_v"].weight) for layer, m in zip(SD15_LAYERS, self.layers)}

    def forward(self, x, timesteps, context, transformer_options):
        b, c, h, w = x.shape
        half = torch.arange(8, device=x.device) / 8
        angles = timesteps.float()[:, None] * torch.exp(-math.log(1000.0) * half)[None]
        temb = torch.cat([angles.sin(), angles.cos()], dim=-1).to(x.dtype)
        tokens = torch.cat([x.flatten(2).transpose(1, 2), temb[:, None].expand(-1, h * w, -1)], dim=-1)
        patches = transformer_options.get("patches_replace", {}).get("attn2", {})
        out = 0
        for layer, m in zip(SD15_LAYERS, self.layers):
            hidden = m["proj_in"](tokens)
            q, k, v = m["to_q"](hidden), m["to_k"](context), m["to_v"](context)
            extra = {**transformer_options, "n_heads": HEADS, "dim_head": layer.channels // HEADS,
                     "block": layer.host_key[:2], "block_index": 0, "transformer_index": layer.transformer_index}
            patch = patches.get(layer.host_key)
            attended = patch(q, k, v, extra) if patch is not None else sdpa_attention(q, k, v, HEADS)
            out = out + m["proj_out"](attended)
        return out.transpose(1, 2).reshape(b, c, h, w)


def unet_call(unet):
    def call(x, timesteps, context, transformer_options):
        return unet(x, timesteps, context, transformer_options)
    return call


def sd15_alphas_cumprod() -> torch.Tensor:
    """SD1.5's schedule (scaled linear betas 0.00085..0.012, 1000 steps)."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas = torch.cumprod(1 - betas, dim=0)
    return alphas_cumprod_from_sigmas(((1 - alphas) / alphas).sqrt())


def fake_examples(count: int, embeds_shape=(1024,), size: int = 4, seed: int = 5) -> EncodedExamples:
    g = torch.Generator().manual_seed(seed)
    moments = torch.cat([torch.randn(count, 4, size, size, generator=g) * 5,
                         torch.full((count, 4, size, size), -6.0)], dim=1)
    return EncodedExamples(moments, torch.randn(count, *embeds_shape, generator=g),
                           torch.randn(count, 77, CONTEXT_DIM, generator=g))


def fake_dropped(embeds_shape=(1024,), seed: int = 6) -> DroppedInputs:
    g = torch.Generator().manual_seed(seed)
    return DroppedInputs(torch.zeros(1, *embeds_shape), torch.randn(1, 77, CONTEXT_DIM, generator=g))


def training_differences(first: dict, second: dict, learning_rate: float) -> dict:
    """How far two training runs ended apart, from their saved states ({"adapter", "optimizer"}, as
    AdapterTrainer.state_dict gives them): ``gradient`` = the largest relative difference of AdamW's first moments
    (a running mean of the gradients: linear in them), ``weights_off`` = the fraction of weights that differ by more
    than 1% of the learning rate, ``weights_max`` = the largest weight difference in units of the learning rate.
    AdamW divides each gradient by its own magnitude, so an element whose gradient is close to zero turns float
    rounding into a visible step: the weights are compared by fraction, the gradients by value."""
    gradient = 0.0
    moments = zip(first["optimizer"]["state"].values(), second["optimizer"]["state"].values())
    for a, b in moments:
        scale = a["exp_avg"].abs().max().clamp_min(1e-30)
        gradient = max(gradient, ((a["exp_avg"] - b["exp_avg"]).abs().max() / scale).item())
    off, total, largest = 0, 0, 0.0
    for key, value in first["adapter"].items():
        delta = (value - second["adapter"][key]).abs()
        off += int((delta > 0.01 * learning_rate).sum())
        total += delta.numel()
        largest = max(largest, delta.max().item() / learning_rate)
    return {"gradient": gradient, "weights_off": off / total, "weights_max": largest}


def assert_same_training(first: dict, second: dict, learning_rate: float, steps: int) -> dict:
    diff = training_differences(first, second, learning_rate)
    assert diff["gradient"] <= 1e-4, f"gradients differ: {diff}"
    assert diff["weights_off"] <= 1e-4, f"too many weights differ by more than 1% of the learning rate: {diff}"
    assert diff["weights_max"] <= 2 * steps, f"a weight moved further than AdamW can in {steps} steps: {diff}"
    return diff
