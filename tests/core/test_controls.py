"""The controls, one behaviour each: per-layer weights, K/V scaling, precise layers, step schedules, masks."""
import pytest
import torch

from ipadapter_core import SD15_LAYERS, DecoupledCrossAttention, ImagePrompt
from ipadapter_core.prompt import layer_grid, scale_kv
from ipadapter_core.weights import layer_weights_for, parse_layer_weights, parse_step_schedule, schedule_table
from ipx_tools.random_adapters import random_adapter

from .test_attention import HEADS, expected_ip, options, qkv, reference_attention

LAYER = SD15_LAYERS[0]  # 320 channels, 64x64 latent -> 4096 tokens; the tests use an 8x8 grid (64 tokens)


@pytest.fixture(scope="module")
def adapter():
    return random_adapter("sd15", seed=21)


@pytest.fixture
def embeds():
    return torch.randn(1, 1024, generator=torch.Generator().manual_seed(3)), torch.zeros(1, 1024)


def grid_options(cond_or_uncond=(0, 1), sigmas=None, sample_sigmas=None, hw=(8, 8)):
    o = options(cond_or_uncond, sigmas)
    o.update(activations_shape=[2, 320, *hw], original_shape=[2, 4, *hw], sample_sigmas=sample_sigmas)
    return o


def run(prompt, q, k, v, o):
    return DecoupledCrossAttention(LAYER, [prompt])(q, k, v, o)


def plain(q, k, v, o):
    return DecoupledCrossAttention(LAYER, [])(q, k, v, o)


def test_weight_types_give_the_documented_multipliers():
    weights, neutral = layer_weights_for("ease in", 2.0)
    assert weights[0] == pytest.approx(2.0) and weights[15] == pytest.approx(2.0 * (0.05 + 0.95 / 16))
    assert layer_weights_for("weak middle", 1.0)[0] == {t: 0.2 if t == 6 else 1.0 for t in range(16)}
    style, _ = layer_weights_for("style transfer", 0.8)
    assert [t for t, w in style.items() if w] == [0, 1, 2, 3, 9, 10, 11, 12, 13, 14, 15] and style[0] == 0.8
    both, _ = layer_weights_for("style and composition", 1.0, weight_composition=2.0)
    assert (both[0], both[4], both[5], both[6]) == (1.0, 0.5, 2.0, 0.0)
    assert layer_weights_for("style transfer precise", 1.0)[1] == {4, 5, 6, 7, 8}
    with pytest.raises(ValueError, match="unknown weight type 'loud'"):
        layer_weights_for("loud", 1.0)


def test_free_layer_weights_parse_and_refuse_bad_text():
    assert parse_layer_weights("6:1.5, 0:0\n9:0.25") == {6: 1.5, 0: 0.0, 9: 0.25}
    assert parse_layer_weights("  ") == {}
    with pytest.raises(ValueError, match="'16:1'.*0..15"):
        parse_layer_weights("16:1")
    with pytest.raises(ValueError, match="'x' is not 'index:weight'"):
        parse_layer_weights("x")


def test_step_schedules_as_lists_and_curves():
    assert schedule_table(parse_step_schedule("1, 0.5"), 4) == [1.0, 0.5, 0.5, 0.5]
    assert schedule_table(parse_step_schedule("0:0, 1:1"), 5) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert schedule_table(parse_step_schedule("0.5:1, 1:0"), 3) == [1.0, 1.0, 0.0]
    assert parse_step_schedule("") is None
    with pytest.raises(ValueError, match="neither weights per step"):
        parse_step_schedule("1, 0.5:1")


def test_layer_weight_overrides_the_weight_on_its_layer_only(adapter, embeds):
    q, k, v = qkv(LAYER)
    o = grid_options()
    overridden = run(ImagePrompt(adapter, *embeds, 1.0, layer_weights={LAYER.layer_index: 0.0}), q, k, v, o)
    assert torch.equal(overridden, plain(q, k, v, o))
    other = run(ImagePrompt(adapter, *embeds, 0.6, layer_weights={31: 0.0}), q, k, v, o)
    torch.testing.assert_close(other, run(ImagePrompt(adapter, *embeds, 0.6), q, k, v, o))


@pytest.mark.parametrize("scaling", ["K+V", "K+V w/ C penalty", "K+mean(V) w/ C penalty"])
def test_kv_scaling_modes_follow_their_formulas(adapter, embeds, scaling):
    k, v = torch.randn(2, 4, 320), torch.randn(2, 4, 320)
    w = 0.7 * (320 / 1280 if "penalty" in scaling else 1.0)
    sk, sv = scale_kv(k, v, 0.7, scaling)
    torch.testing.assert_close(sk, k * w)
    expected_v = v - v.mean(1, keepdim=True) + v.mean(1, keepdim=True) * w if "mean" in scaling else v * w
    torch.testing.assert_close(sv, expected_v)


def test_v_only_scaling_is_the_weighted_output(adapter, embeds):
    k, v = torch.randn(2, 4, 320), torch.randn(2, 4, 320)
    assert scale_kv(k, v, 0.3, "V only")[0] is k


def test_precise_layers_feed_the_uncond_image_to_both_halves(adapter, embeds):
    cond, uncond = embeds
    q, k, v = qkv(LAYER)
    out = run(ImagePrompt(adapter, cond, uncond, neutral_layers={LAYER.layer_index}), q, k, v, grid_options())
    expected = reference_attention(q, k, v) + torch.cat([expected_ip(adapter, LAYER, uncond, q[:1]),
                                                         expected_ip(adapter, LAYER, uncond, q[1:])])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_schedule_weight_follows_the_step_index(adapter, embeds):
    q, k, v = qkv(LAYER)
    sample_sigmas = torch.tensor([10.0, 5.0, 2.0, 0.0])
    prompt = ImagePrompt(adapter, *embeds, schedule=parse_step_schedule("0, 1, 0.5"))
    full = run(ImagePrompt(adapter, *embeds), q, k, v, grid_options())
    base = plain(q, k, v, grid_options())
    for sigma, w in ((10.0, 0.0), (5.0, 1.0), (2.0, 0.5)):
        out = run(prompt, q, k, v, grid_options(sigmas=torch.tensor([sigma]), sample_sigmas=sample_sigmas))
        torch.testing.assert_close(out, base + w * (full - base), rtol=1e-5, atol=1e-5)


def test_mask_of_zeros_is_plain_and_mask_of_ones_is_no_mask(adapter, embeds):
    q, k, v = qkv(LAYER)
    o = grid_options()
    assert torch.equal(run(ImagePrompt(adapter, *embeds, mask=torch.zeros(1, 40, 30)), q, k, v, o), plain(q, k, v, o))
    torch.testing.assert_close(run(ImagePrompt(adapter, *embeds, mask=torch.ones(1, 40, 30)), q, k, v, o),
                               run(ImagePrompt(adapter, *embeds), q, k, v, o))


def test_mask_acts_where_it_is_set_on_the_layer_grid(adapter, embeds):
    """A left-half mask at any size is resized to the layer's exact grid (here 8 rows x 8 columns)."""
    q, k, v = qkv(LAYER)
    o = grid_options()
    mask = torch.zeros(1, 37, 51)
    mask[:, :, :25] = 1.0  # left half, odd size and aspect
    out = run(ImagePrompt(adapter, *embeds, mask=mask), q, k, v, o).reshape(2, 8, 8, -1)
    base = plain(q, k, v, o).reshape(2, 8, 8, -1)
    full = run(ImagePrompt(adapter, *embeds), q, k, v, o).reshape(2, 8, 8, -1)
    torch.testing.assert_close(out[:, :, :3], full[:, :, :3])
    torch.testing.assert_close(out[:, :, 5:], base[:, :, 5:])


def test_per_latent_masks_follow_the_latents_in_each_chunk(adapter, embeds):
    q, k, v = qkv(LAYER, batch=4)
    o = grid_options()
    masks = torch.stack([torch.ones(16, 16), torch.zeros(16, 16)])
    out = run(ImagePrompt(adapter, *embeds, mask=masks), q, k, v, o)
    full = run(ImagePrompt(adapter, *embeds), q, k, v, o)
    base = plain(q, k, v, o)
    for row, on in enumerate([True, False, True, False]):  # two chunks (cond, uncond) of two latents
        torch.testing.assert_close(out[row], (full if on else base)[row])
    with pytest.raises(ValueError, match="3 masks for 2 latents"):
        run(ImagePrompt(adapter, *embeds, mask=torch.ones(3, 8, 8)), q, k, v, o)


def test_layer_grid_comes_from_the_hosts_shapes():
    assert layer_grid({"activations_shape": [2, 320, 48, 80]}, 48 * 80) == (48, 80)
    assert layer_grid({"original_shape": [2, 4, 48, 80]}, 12 * 20) == (12, 20)
    with pytest.raises(ValueError, match="token grid"):
        layer_grid({"original_shape": [2, 4, 48, 80]}, 7)


def test_gate_and_mask_combine(adapter, embeds):
    q, k, v = qkv(LAYER)
    prompt = ImagePrompt(adapter, *embeds, sigma_range=(5.0, 1.0), mask=torch.ones(1, 8, 8))
    off = run(prompt, q, k, v, grid_options(sigmas=torch.tensor([9.0])))
    on = run(prompt, q, k, v, grid_options(sigmas=torch.tensor([3.0])))
    assert torch.equal(off, plain(q, k, v, grid_options()))
    torch.testing.assert_close(on, run(ImagePrompt(adapter, *embeds), q, k, v, grid_options()))
