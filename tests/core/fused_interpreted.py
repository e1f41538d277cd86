"""Run by test_fused.py under TRITON_INTERPRET=1 (the Triton kernel executed on the CPU): checks fused.attention_add
against attention written out by hand in float32, and the patch's fused path against its unfused path. Exits non-zero
with the failing case on any mismatch; prints the number of cases checked."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ipadapter_core import BY_LAYER_INDEX, SD15_LAYERS, DecoupledCrossAttention, ImagePrompt, fused  # noqa: E402
from ipadapter_core.weights import parse_step_schedule  # noqa: E402
from ipx_tools.random_adapters import random_adapter  # noqa: E402
from fused_reference import reference  # noqa: E402

assert fused.INTERPRET and fused.triton is not None, "run with TRITON_INTERPRET=1 and Triton installed"
checked = 0


def close(name, got, want, tolerance):
    global checked
    error = ((got.float() - want).abs().max() / want.abs().max()).item()
    if not error <= tolerance:
        sys.exit(f"{name}: relative error {error:.3g} > {tolerance}")
    checked += 1


g = torch.Generator().manual_seed(0)
# (batch, tokens, heads, dim, rows, image tokens, factor): the SD1.5 head widths 40/80/160, base/plus/full-face token
# counts (257 spans several key blocks), one row per chunk or per latent, odd sizes that leave partial blocks.
cases = [(2, 100, 8, 40, 2, 4, None), (4, 64, 8, 80, 2, 16, "mask"), (2, 33, 8, 160, 1, 257, "step"),
         (3, 20, 5, 40, 3, 4, "mask*step"), (2, 130, 8, 40, 1, 8, None)]
for batch, tokens, heads, dim, rows, image_tokens, kind in cases:
    q = torch.randn(batch, tokens, heads * dim, generator=g).half()
    text_out = torch.randn(batch, tokens, heads, dim, generator=g).half().transpose(1, 2)  # the host's strides
    k, v = (torch.randn(rows, image_tokens, heads * dim, generator=g).half().reshape(rows, image_tokens, heads, dim)
            .transpose(1, 2) for _ in range(2))
    factor = {None: None, "mask": torch.rand(batch, 1, tokens, 1, generator=g),
              "step": torch.full((1, 1, 1, 1), 0.7),
              "mask*step": 0.5 * torch.rand(1, 1, tokens, 1, generator=g)}[kind]
    with torch.no_grad():
        got = fused.attention_add(q, text_out, k, v, factor)
        close(f"attention_add {batch, tokens, heads, dim, rows, image_tokens, kind}", got,
              reference(q, text_out, k, v, factor), 2e-3)
        # A second prompt adds in place to the first one's output, read through the (batch, heads, tokens, dim) view.
        k2, v2 = k.flip(0), v.flip(0)
        first = got.clone()
        again = fused.attention_add(q, got.unflatten(-1, (heads, dim)).transpose(1, 2), k2, v2, None, got)
        assert again.data_ptr() == got.data_ptr()
        close(f"chained {batch, tokens, heads, dim}", again,
              reference(q, first.unflatten(-1, (heads, dim)).transpose(1, 2), k2, v2, None), 2e-3)

# The patch: fused (fp16) against unfused (float32), two stacked prompts with a mask, start/end, a step schedule.
calls = []
original = fused.attention_add


def counting(*args, **kwargs):
    calls.append(1)
    return original(*args, **kwargs)


fused.attention_add = counting
base, plus = random_adapter("sd15", seed=7), random_adapter("plus", seed=8)
base_embeds = (torch.randn(1, 1024, generator=g), torch.zeros(1, 1024))
plus_embeds = (torch.randn(1, 257, 1280, generator=g), torch.randn(1, 257, 1280, generator=g))
mask = torch.zeros(1, 16, 16)
mask[:, :, :8] = 1.0
for layer in (SD15_LAYERS[0], BY_LAYER_INDEX[31], SD15_LAYERS[-1]):
    prompts = [ImagePrompt(base, *base_embeds, 0.8, mask=mask, sigma_range=(20.0, 0.5),
                           schedule=parse_step_schedule("0:1, 1:0.2")),
               ImagePrompt(plus, *plus_embeds, 0.6, scaling="K+V")]
    q, k, v = (torch.randn(4, 64, layer.channels, generator=g) for _ in range(3))
    sample_sigmas = torch.tensor([14.6, 8.0, 3.0, 1.0, 0.0])
    options = {"n_heads": 8, "attn_precision": None, "cond_or_uncond": [0, 1], "sigmas": torch.tensor([8.0]),
               "sample_sigmas": sample_sigmas, "original_shape": [4, 4, 8, 8]}
    fused_patch = DecoupledCrossAttention(layer, prompts, fuse=lambda q, options: fused.usable(q))
    with torch.no_grad():
        want = DecoupledCrossAttention(layer, prompts)(q, k, v, options)
        before = len(calls)
        got = fused_patch(q.half(), k.half(), v.half(), dict(options))
    assert len(calls) - before == 2, "the fused path did not run (once per prompt)"
    close(f"patch {layer.host_key}", got, want, 1e-2)
    with torch.enable_grad():
        assert not fused.usable(q.half()), "the fused kernel has no backward: it must not run with gradients on"
    assert not fused.usable(q), "float32 takes the unfused path"
    checked += 1
print(f"checked {checked} cases")
