"""Decoupled cross-attention computes attn(q, K_text, V_text) + w * attn(q, to_k_ip(ip), to_v_ip(ip)) per layer,
with the host's batch layout, and does its per-run work once."""
import copy

import pytest
import torch
from torch.nn import functional as F

from ipadapter_core import BY_LAYER_INDEX, SD15_LAYERS, DecoupledCrossAttention, ImagePrompt
from ipx_tools.random_adapters import random_adapter

HEADS = 8


def reference_attention(q, k, v, heads=HEADS):
    """Multi-head softmax attention written out by hand (no SDPA), as an independent check."""
    b, n, inner = q.shape
    d = inner // heads
    q, k, v = (t.reshape(b, -1, heads, d).permute(0, 2, 1, 3) for t in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / d ** 0.5, dim=-1)
    return (weights @ v).permute(0, 2, 1, 3).reshape(b, n, inner)


@pytest.fixture(scope="module")
def adapter():
    return random_adapter("sd15", seed=7)


@pytest.fixture
def embeds():
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 1024, generator=g), torch.zeros(1, 1024)


def qkv(layer, batch=2, tokens=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    ch = layer.channels
    return (torch.randn(batch, tokens, ch, generator=g), torch.randn(batch, 77, ch, generator=g),
            torch.randn(batch, 77, ch, generator=g))


def options(cond_or_uncond=(0, 1), sigmas=None):
    return {"n_heads": HEADS, "attn_precision": None, "cond_or_uncond": list(cond_or_uncond), "sigmas": sigmas}


def expected_ip(adapter, layer, embeds, q):
    """Per batch row: the image attention with that row's (cond or uncond) image tokens."""
    tokens = adapter.image_proj(embeds)
    k_ip = adapter.ip_adapter[str(layer.layer_index)].to_k_ip(tokens)
    v_ip = adapter.ip_adapter[str(layer.layer_index)].to_v_ip(tokens)
    return reference_attention(q, k_ip, v_ip)


@pytest.mark.parametrize("layer", [SD15_LAYERS[0], BY_LAYER_INDEX[31], SD15_LAYERS[-1]], ids=lambda l: str(l.host_key))
def test_output_is_text_attention_plus_weighted_image_attention(adapter, embeds, layer):
    cond, uncond = embeds
    q, k, v = qkv(layer)
    patch = DecoupledCrossAttention(layer, [ImagePrompt(adapter, cond, uncond, weight=0.7)])
    out = patch(q, k, v, options((0, 1)))
    expected = reference_attention(q, k, v) + 0.7 * torch.cat([expected_ip(adapter, layer, cond, q[:1]),
                                                               expected_ip(adapter, layer, uncond, q[1:])])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_batch_layout_follows_cond_or_uncond(adapter, embeds):
    """The host may put uncond first and several rows per chunk; each row gets its own image prompt."""
    layer = SD15_LAYERS[3]
    cond, uncond = embeds
    q, k, v = qkv(layer, batch=4)
    patch = DecoupledCrossAttention(layer, [ImagePrompt(adapter, cond, uncond)])
    out = patch(q, k, v, options((1, 0)))
    rows = [uncond, uncond, cond, cond]
    expected = reference_attention(q, k, v) + torch.cat(
        [expected_ip(adapter, layer, e, q[i:i + 1]) for i, e in enumerate(rows)])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_weight_zero_is_exactly_the_text_attention(adapter, embeds):
    layer = SD15_LAYERS[5]
    q, k, v = qkv(layer)
    patch = DecoupledCrossAttention(layer, [ImagePrompt(adapter, *embeds, weight=0.0)])
    assert torch.equal(patch(q, k, v, options()), DecoupledCrossAttention(layer, [])(q, k, v, options()))


def test_several_images_concatenate_their_tokens(adapter):
    layer = SD15_LAYERS[0]
    g = torch.Generator().manual_seed(5)
    cond = torch.randn(3, 1024, generator=g)
    prompt = ImagePrompt(adapter, cond, torch.zeros_like(cond))
    tokens = prompt.image_tokens()
    assert tokens.shape == (2, 1, 12, 768)
    torch.testing.assert_close(tokens[0, 0], adapter.image_proj(cond).reshape(12, 768))


def test_stacked_prompts_add_both_terms(adapter, embeds):
    layer = SD15_LAYERS[8]
    other = random_adapter("sd15", seed=8)
    cond, uncond = embeds
    q, k, v = qkv(layer, batch=1)
    patch = DecoupledCrossAttention(layer, [ImagePrompt(adapter, cond, uncond, 0.5)])
    stacked = patch.stacked(ImagePrompt(other, cond, uncond, 1.5))
    assert len(patch.prompts) == 1 and len(stacked.prompts) == 2
    expected = reference_attention(q, k, v) + 0.5 * expected_ip(adapter, layer, cond, q) + \
        1.5 * expected_ip(other, layer, cond, q)
    torch.testing.assert_close(stacked(q, k, v, options((0,))), expected, rtol=1e-5, atol=1e-5)


def test_previous_replacement_is_called_for_the_text_part(adapter, embeds):
    layer = SD15_LAYERS[2]
    calls = []

    def foreign(q, k, v, extra_options):
        calls.append(extra_options["n_heads"])
        return torch.full_like(q, 2.0)

    q, k, v = qkv(layer, batch=1)
    patch = DecoupledCrossAttention(layer, [ImagePrompt(adapter, *embeds, weight=0.0)], previous=foreign)
    out = patch(q, k, v, options((0,)))
    assert calls == [HEADS]
    assert torch.equal(out, torch.full_like(q, 2.0))


def test_gate_switches_the_image_term_by_sigma_without_reading_it_on_the_host(adapter, embeds):
    layer = SD15_LAYERS[1]
    q, k, v = qkv(layer)
    prompt = ImagePrompt(adapter, *embeds, sigma_range=(5.0, 1.0))
    patch = DecoupledCrossAttention(layer, [prompt])
    plain = DecoupledCrossAttention(layer, [])(q, k, v, options())
    full = DecoupledCrossAttention(layer, [ImagePrompt(adapter, *embeds)])(q, k, v, options())
    assert torch.equal(patch(q, k, v, options(sigmas=torch.tensor([9.0, 9.0]))), plain)
    assert torch.equal(patch(q, k, v, options(sigmas=torch.tensor([0.5, 0.5]))), plain)
    torch.testing.assert_close(patch(q, k, v, options(sigmas=torch.tensor([3.0, 3.0]))), full)


def test_gate_is_computed_once_per_sigmas_tensor(adapter, embeds):
    prompt = ImagePrompt(adapter, *embeds, sigma_range=(5.0, 1.0))
    sigmas = torch.tensor([3.0, 3.0])
    first = prompt.factor(options(sigmas=sigmas), 64, 2, "cpu", torch.float32)
    assert prompt.factor(options(sigmas=sigmas), 64, 2, "cpu", torch.float32) is first
    assert prompt.factor(options(sigmas=torch.tensor([3.0, 3.0])), 64, 2, "cpu", torch.float32) is not first


def test_image_keys_values_are_projected_once_per_layout(adapter, embeds, monkeypatch):
    layer = SD15_LAYERS[0]
    prompt = ImagePrompt(adapter, *embeds)
    patch = DecoupledCrossAttention(layer, [prompt])
    calls = []
    original = adapter.project_kv
    monkeypatch.setattr(adapter, "project_kv", lambda *a: calls.append(a[0]) or original(*a))
    q, k, v = qkv(layer)
    for _ in range(5):
        patch(q, k, v, options())
    assert calls == [layer.layer_index]
    patch(q[:1], k[:1], v[:1], options((0,)))
    assert len(calls) == 2
    prompt.clear_cache()
    patch(q, k, v, options())
    assert len(calls) == 3


def test_deepcopy_shares_prompts_and_weights(adapter, embeds):
    patch = DecoupledCrossAttention(SD15_LAYERS[0], [ImagePrompt(adapter, *embeds)])
    copied = copy.deepcopy({"p": patch})["p"]
    assert copied is not patch
    assert copied.prompts[0] is patch.prompts[0]
    assert copied.prompts[0].adapter is adapter


def test_mismatched_cond_and_uncond_shapes_are_refused(adapter):
    with pytest.raises(ValueError, match="same shape"):
        ImagePrompt(adapter, torch.zeros(2, 1024), torch.zeros(1, 1024))


def test_sdpa_default_matches_reference():
    layer = SD15_LAYERS[0]
    q, k, v = qkv(layer)
    patch = DecoupledCrossAttention(layer, [])
    torch.testing.assert_close(patch(q, k, v, options()), reference_attention(q, k, v), rtol=1e-5, atol=1e-5)


def test_image_keys_values_hold_one_row_per_chunk_whatever_the_batch(adapter, embeds):
    """The latents of a chunk share their image keys/values: the cache does not grow with the batch."""
    layer = SD15_LAYERS[4]
    prompt = ImagePrompt(adapter, *embeds)
    patch = DecoupledCrossAttention(layer, [prompt])
    q, k, v = qkv(layer, batch=8)
    patch(q, k, v, options((1, 0)))
    (ip_k, ip_v), = prompt._kv.values()
    assert ip_k.shape == ip_v.shape == (2, 4, layer.channels)
    tokens = adapter.image_proj(torch.cat(embeds))
    torch.testing.assert_close(ip_k[0], adapter.ip_adapter[str(layer.layer_index)].to_k_ip(tokens[1]))  # uncond first


def test_per_latent_prompts_give_each_latent_its_own_image(adapter):
    """Training and batches of different references: row i of the embeds is latent i's image prompt."""
    layer = SD15_LAYERS[6]
    g = torch.Generator().manual_seed(9)
    cond = torch.randn(3, 1024, generator=g)
    prompt = ImagePrompt(adapter, cond, torch.zeros_like(cond), weight=0.9, per_latent=True)
    patch = DecoupledCrossAttention(layer, [prompt])
    q, k, v = qkv(layer, batch=6)
    out = patch(q, k, v, options((0, 1)))
    rows = [cond[0:1], cond[1:2], cond[2:3], torch.zeros(1, 1024), torch.zeros(1, 1024), torch.zeros(1, 1024)]
    expected = reference_attention(q, k, v) + 0.9 * torch.cat(
        [expected_ip(adapter, layer, e, q[i:i + 1]) for i, e in enumerate(rows)])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="3 reference rows for 2 latents per chunk"):
        DecoupledCrossAttention(layer, [prompt])(*qkv(layer, batch=4), options((0, 1)))


def test_without_cache_gradients_reach_the_adapter():
    trainable = random_adapter("sd15", seed=10).requires_grad_(True)
    layer = SD15_LAYERS[0]
    cond = torch.randn(2, 1024)
    patch = DecoupledCrossAttention(layer, [ImagePrompt(trainable, cond, cond, cache=False, per_latent=True)])
    patch(*qkv(layer, batch=2), options((0,))).square().mean().backward()
    assert trainable.image_proj.proj.weight.grad.abs().sum() > 0
    assert trainable.ip_adapter[str(layer.layer_index)].to_k_ip.weight.grad.abs().sum() > 0
    assert trainable.ip_adapter["31"].to_k_ip.weight.grad is None  # another layer's weights are not involved


def test_fused_kernel_is_chosen_only_for_big_unet_calls():
    """Small UNet calls are bound by kernel launches, where Triton's launch costs more than it saves (fused.py)."""
    from ipadapter_core import fused
    q = torch.zeros(2, 4096, 320)
    assert not fused.large_enough(q, {"original_shape": [2, 4, 64, 64]})  # 512x512, batch 1 with cfg
    assert fused.large_enough(q, {"original_shape": [16, 4, 96, 96]})  # 768x768, batch 8 with cfg
    assert fused.large_enough(torch.zeros(16, 4096, 320), {})  # no latent shape given: the layer's own tokens


def test_compiled_patch_adds_in_the_layout_it_returns(adapter, embeds):
    """Under torch.compile (inductor, here on the CPU) the sum is built in the (batch, tokens, channels) layout the
    patch returns: no (batch, heads, tokens, dim_head) intermediate written and then copied once more."""
    from torch._inductor.utils import run_and_get_code
    layer = SD15_LAYERS[0]
    q, k, v = qkv(layer)
    batch, tokens, channels = q.shape
    dim = channels // HEADS
    patch = DecoupledCrossAttention(layer, [ImagePrompt(adapter, *embeds, weight=0.7)])
    torch._dynamo.reset()
    with torch.no_grad():
        eager = patch(q, k, v, options())  # also projects and keeps the image keys and values
        compiled, code = run_and_get_code(torch.compile(lambda q, k, v: patch(q, k, v, options())), q, k, v)
    torch._dynamo.reset()
    heads_first_buffer = f"({batch}, {HEADS}, {tokens}, {dim}), ({tokens * channels}, {tokens * dim}, {dim}, 1)"
    assert "empty_strided" in "\n".join(code)  # the generated code is the kind this test reads
    assert heads_first_buffer not in "\n".join(code)
    torch.testing.assert_close(compiled, eager)


def test_a_failing_fused_kernel_falls_back_to_the_unfused_result_and_stays_off(adapter, embeds, monkeypatch, caplog):
    """Triton failing on a user's machine (no compiler, old driver) must not fail the prompt."""
    from ipadapter_core import fused

    def broken(*args, **kwargs):
        raise RuntimeError("ptxas not found")
    monkeypatch.setattr(fused, "attention_add", broken)
    monkeypatch.setattr(fused, "_failure", None)
    layer = SD15_LAYERS[2]
    q, k, v = qkv(layer)
    prompts = [ImagePrompt(adapter, *embeds, weight=0.7), ImagePrompt(adapter, *embeds, weight=0.3)]
    asked = []
    patch = DecoupledCrossAttention(layer, prompts, fuse=lambda q, o: asked.append(1) or fused._failure is None)
    with torch.no_grad():
        got = patch(q, k, v, options())
        want = DecoupledCrossAttention(layer, prompts)(q, k, v, options())
    assert asked and torch.equal(got, want)
    assert isinstance(fused._failure, RuntimeError) and "ptxas not found" in caplog.text
    assert not fused.usable(q.half())  # off for the rest of the session
