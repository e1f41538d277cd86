"""The projections compute the official formulas (checked against the formulas written out here)."""
import torch
from torch.nn import functional as F

from ipx_tools.random_adapters import random_adapter


def test_linear_projection_is_layernorm_of_reshaped_linear():
    proj = random_adapter("sd15", seed=2).image_proj
    x = torch.randn(3, 1024)
    y = F.linear(x, proj.proj.weight, proj.proj.bias).reshape(3, 4, 768)
    expected = F.layer_norm(y, (768,), proj.norm.weight, proj.norm.bias)
    torch.testing.assert_close(proj(x), expected)


def test_mlp_projection_acts_per_token():
    proj = random_adapter("full_face", seed=2).image_proj.proj
    x = torch.randn(2, 257, 1280)
    h = F.gelu(F.linear(x, proj[0].weight, proj[0].bias))
    expected = F.layer_norm(F.linear(h, proj[2].weight, proj[2].bias), (768,), proj[3].weight, proj[3].bias)
    out = random_adapter("full_face", seed=2).image_proj(x)
    assert out.shape == (2, 257, 768)
    torch.testing.assert_close(out, expected)


def reference_resampler(r, x, heads=12):
    """Perceiver resampler as the paper's code writes it: q and k both scaled by dim_head ** -0.25, float softmax."""
    latents = r.latents.repeat(x.shape[0], 1, 1)
    x = F.linear(x, r.proj_in.weight, r.proj_in.bias)
    for attn, ff in r.layers:
        xs = F.layer_norm(x, (768,), attn.norm1.weight, attn.norm1.bias)
        ls = F.layer_norm(latents, (768,), attn.norm2.weight, attn.norm2.bias)
        q = F.linear(ls, attn.to_q.weight)
        k, v = F.linear(torch.cat([xs, ls], dim=1), attn.to_kv.weight).chunk(2, dim=-1)
        split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)
        q, k, v = split(q), split(k), split(v)
        scale = 1 / (q.shape[-1] ** 0.25)
        w = torch.softmax((q * scale) @ (k * scale).transpose(-2, -1), dim=-1)
        out = (w @ v).transpose(1, 2).reshape(x.shape[0], -1, 768)
        latents = F.linear(out, attn.to_out.weight) + latents
        h = F.layer_norm(latents, (768,), ff[0].weight, ff[0].bias)
        latents = F.linear(F.gelu(F.linear(h, ff[1].weight)), ff[3].weight) + latents
    return F.layer_norm(F.linear(latents, r.proj_out.weight, r.proj_out.bias), (768,), r.norm_out.weight,
                        r.norm_out.bias)


def test_resampler_matches_the_written_out_perceiver():
    r = random_adapter("plus", seed=4).image_proj
    x = torch.randn(2, 257, 1280)
    out = r(x)
    assert out.shape == (2, 16, 768)
    torch.testing.assert_close(out, reference_resampler(r, x), rtol=1e-4, atol=1e-5)
