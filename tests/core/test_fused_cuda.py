"""The fused image-attention kernel compiled for the GPU (fp16 and bf16, SD1.5's layer sizes), against float32
attention written out by hand and against the patch's unfused path. CUDA only: run on the GPU machine with
`python -m pytest tests/core/test_fused_cuda.py` (the CPU checks of the same kernel are in test_fused.py)."""
import pytest
import torch

from ipadapter_core import SD15_LAYERS, DecoupledCrossAttention, ImagePrompt, fused
from ipadapter_core.weights import parse_step_schedule
from ipx_tools.random_adapters import random_adapter

from .fused_reference import reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or fused.triton is None,
                                reason="LOUD SKIP: needs a CUDA GPU and Triton (the fused kernel is GPU-only; its CPU "
                                       "check runs in test_fused.py)")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tokens,channels,image_tokens", [(4096, 320, 4), (1024, 640, 16), (64, 1280, 257),
                                                          (4096, 320, 257)])
def test_kernel_matches_float32_attention(dtype, tokens, channels, image_tokens):
    g = torch.Generator(device="cuda").manual_seed(0)
    batch, heads = 8, 8
    q = torch.randn(batch, tokens, channels, device="cuda", generator=g).to(dtype)
    text_out = torch.randn(batch, tokens, heads, channels // heads, device="cuda", generator=g).to(dtype)
    text_out = text_out.transpose(1, 2)
    k, v = (torch.randn(2, image_tokens, channels, device="cuda", generator=g).to(dtype)
            .reshape(2, image_tokens, heads, -1).transpose(1, 2) for _ in range(2))
    factor = torch.rand(batch, 1, tokens, 1, device="cuda", generator=g)
    with torch.no_grad():
        got = fused.attention_add(q, text_out, k, v, factor)
    want = reference(q, text_out, k, v, factor)
    tolerance = 2e-3 if dtype == torch.float16 else 1.6e-2  # one rounding of the output: 2^-11, 2^-8 relative
    assert ((got.float() - want).abs().max() / want.abs().max()).item() < tolerance


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_patch_fused_equals_unfused(dtype, monkeypatch):
    base, plus = random_adapter("sd15", seed=7).cuda(), random_adapter("plus", seed=8).cuda()
    g = torch.Generator().manual_seed(1)
    mask = torch.zeros(1, 64, 64)
    mask[:, :, :32] = 1.0
    prompts = [ImagePrompt(base, torch.randn(1, 1024, generator=g), torch.zeros(1, 1024), 0.8, mask=mask,
                           sigma_range=(20.0, 0.5), schedule=parse_step_schedule("0:1, 1:0.2")),
               ImagePrompt(plus, torch.randn(1, 257, 1280, generator=g), torch.randn(1, 257, 1280, generator=g), 0.6)]
    layer = SD15_LAYERS[0]
    q, k, v = (torch.randn(2, 4096, layer.channels, generator=g).cuda().to(dtype) for _ in range(3))
    options = {"n_heads": 8, "attn_precision": None, "cond_or_uncond": [1, 0], "sigmas": torch.tensor([8.0]).cuda(),
               "sample_sigmas": torch.tensor([14.6, 8.0, 3.0, 1.0, 0.0]).cuda(), "original_shape": [2, 4, 64, 64]}
    calls = []
    original = fused.attention_add
    monkeypatch.setattr(fused, "attention_add", lambda *args: calls.append(1) or original(*args))
    fused_patch = DecoupledCrossAttention(layer, prompts, fuse=lambda q, o: fused.usable(q))
    with torch.no_grad():
        want = DecoupledCrossAttention(layer, prompts)(q.float(), k.float(), v.float(), dict(options))
        got = fused_patch(q, k, v, dict(options))
    assert len(calls) == 2, "the fused kernel did not run once per prompt"
    tolerance = 1e-2 if dtype == torch.float16 else 3e-2
    assert ((got.float() - want).abs().max() / want.abs().max()).item() < tolerance
