"""In the real host, in-process: what apply does to the model, layer by layer."""
import sys

import pytest
import torch
from torch.nn import functional as F

from .sampling import predict_noise, sigma_at

TIMESTEP = 500


def pack_module(host, node_id, name=None):
    module = sys.modules[host.NODE_CLASS_MAPPINGS[node_id].__module__]
    return module if name is None else sys.modules[module.__package__.rsplit(".", 1)[0] + "." + name]


@pytest.fixture(scope="module")
def api(host, adapter_dir):
    loading = pack_module(host, "IPXLoadAdapter")
    applying = pack_module(host, "IPXApplyAdapter")
    core = pack_module(host, "IPXApplyAdapter", "ipadapter_core")
    embeds = pack_module(host, "IPXApplyAdapter", "ipadapter_core.embeds")
    return dict(load=loading.load_adapter_file, apply=applying.apply_adapter, core=core, ImageEmbeds=embeds.ImageEmbeds)


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(11)
    return dict(noise=torch.randn(1, 4, 8, 8, generator=g), cond=torch.randn(1, 77, 768, generator=g),
                uncond=torch.randn(1, 77, 768, generator=g), image=torch.randn(1, 1024, generator=g),
                image2=torch.randn(2, 1024, generator=g))


def base_embeds(api, image):
    return api["ImageEmbeds"](image, torch.zeros_like(image), "image_embeds", "zero_embeds")


@pytest.fixture
def spy(api, monkeypatch):
    """Records (layer, q, k, v, extra_options, output) for every call of the pack's attn2 replacement."""
    cls = api["core"].DecoupledCrossAttention
    calls = []
    original = cls.__call__

    def recording(self, q, k, v, extra_options):
        out = original(self, q, k, v, extra_options)
        calls.append(dict(patch=self, q=q, k=k, v=v, options=dict(extra_options), out=out))
        return out

    monkeypatch.setattr(cls, "__call__", recording)
    return calls


def test_all_sixteen_attn2_keys_are_patched_and_called_in_one_forward(api, host_sd15, inputs, spy):
    adapter = api["load"]("ip-adapter_sd15.safetensors")
    model = api["apply"](host_sd15, adapter, base_embeds(api, inputs["image"]), 1.0)
    keys = model.model_options["transformer_options"]["patches_replace"]["attn2"]
    expected = {layer.host_key for layer in api["core"].SD15_LAYERS}
    assert set(keys) == expected and len(expected) == 16
    assert ("middle", 0, 0) in keys
    predict_noise(model, inputs["noise"], sigma_at(host_sd15, TIMESTEP), inputs["cond"], inputs["uncond"])
    called = [c["options"]["transformer_index"] for c in spy]
    assert sorted(called) == list(range(16)), "one UNet call (cond and uncond batched) reaches every layer once"
    assert {c["patch"].layer.host_key for c in spy} == expected
    assert all(c["options"]["block"][:2] == c["patch"].layer.host_key[:2] for c in spy)
    assert all(c["q"].shape[0] == 2 and sorted(c["options"]["cond_or_uncond"]) == [0, 1] for c in spy)


def test_input_model_is_unchanged_by_apply(api, host_sd15, inputs):
    sigma = sigma_at(host_sd15, TIMESTEP)
    before = predict_noise(host_sd15, inputs["noise"], sigma, inputs["cond"], inputs["uncond"])
    options_before = repr(host_sd15.model_options)
    adapter = api["load"]("ip-adapter_sd15.bin")
    patched = api["apply"](host_sd15, adapter, base_embeds(api, inputs["image"]), 1.0)
    assert patched is not host_sd15
    assert repr(host_sd15.model_options) == options_before
    assert "patches_replace" not in host_sd15.model_options["transformer_options"]
    after = predict_noise(host_sd15, inputs["noise"], sigma, inputs["cond"], inputs["uncond"])
    changed = predict_noise(patched, inputs["noise"], sigma, inputs["cond"], inputs["uncond"])
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    assert (changed[0] - before[0]).abs().max() > 1e-3


def reference_ip_term(adapter_module, layer_index, embeds_row, q, heads):
    tokens = adapter_module.image_proj(embeds_row).reshape(1, -1, 768)
    layer = adapter_module.ip_adapter[str(layer_index)]
    k, v = F.linear(tokens, layer.to_k_ip.weight), F.linear(tokens, layer.to_v_ip.weight)
    b, n, inner = q.shape
    split = lambda t: t.reshape(t.shape[0], -1, heads, inner // heads).transpose(1, 2)
    out = F.scaled_dot_product_attention(split(q), split(k).expand(b, -1, -1, -1), split(v).expand(b, -1, -1, -1))
    return out.transpose(1, 2).reshape(b, n, inner)


def test_stacked_adapters_add_both_weighted_terms_in_every_layer(api, host_sd15, inputs, spy):
    first = api["load"]("ip-adapter_sd15.safetensors")
    second = api["load"]("ip-adapter_sd15.bin")  # different random weights (seed 1)
    model = api["apply"](host_sd15, first, base_embeds(api, inputs["image"]), 0.6)
    model = api["apply"](model, second, base_embeds(api, inputs["image2"]), 1.3)
    patches = model.model_options["transformer_options"]["patches_replace"]["attn2"]
    assert all(len(p.prompts) == 2 for p in patches.values())
    predict_noise(model, inputs["noise"], sigma_at(host_sd15, TIMESTEP), inputs["cond"], inputs["uncond"])
    assert len(spy) == 16
    for call in spy:
        q, k, v, heads = call["q"], call["k"], call["v"], call["options"]["n_heads"]
        index = call["patch"].layer.layer_index
        split = lambda t: t.reshape(t.shape[0], -1, heads, t.shape[-1] // heads).transpose(1, 2)
        text = F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).reshape(q.shape)
        expected = text.clone()
        for row, c in enumerate(call["options"]["cond_or_uncond"]):
            for adapter, image, weight in ((first, inputs["image"], 0.6), (second, inputs["image2"], 1.3)):
                embeds_row = image if c == 0 else torch.zeros_like(image)
                expected[row:row + 1] += weight * reference_ip_term(adapter.module, index, embeds_row,
                                                                    q[row:row + 1], heads)
        torch.testing.assert_close(call["out"], expected, rtol=1e-4, atol=1e-4,
                                   msg=lambda m: f"layer {index}: {m}")
        assert (call["out"] - text).abs().max() > 1e-3, f"layer {index}: the image terms must matter"


def test_applying_does_not_touch_the_adapter_weights(api, host_sd15, inputs):
    adapter = api["load"]("ip-adapter-plus_sd15.safetensors")
    before = {k: v.clone() for k, v in adapter.module.state_dict().items()}
    embeds = api["ImageEmbeds"](torch.randn(1, 257, 1280), torch.randn(1, 257, 1280), "penultimate_hidden_states",
                                "zero_pixels")
    model = api["apply"](host_sd15, adapter, embeds, 1.0)
    predict_noise(model, inputs["noise"], sigma_at(host_sd15, TIMESTEP), inputs["cond"], inputs["uncond"])
    assert all(torch.equal(before[k], v) for k, v in adapter.module.state_dict().items())


def test_image_kv_cache_is_dropped_when_the_run_ends(api, host_sd15, inputs):
    adapter = api["load"]("ip-adapter_sd15.safetensors")
    model = api["apply"](host_sd15, adapter, base_embeds(api, inputs["image"]), 1.0)
    prompt = next(iter(model.model_options["transformer_options"]["patches_replace"]["attn2"].values())).prompts[0]
    predict_noise(model, inputs["noise"], sigma_at(host_sd15, TIMESTEP), inputs["cond"], inputs["uncond"])
    assert prompt._kv == {} and prompt._tokens == {}


def key_tokens(k) -> int:
    return k.shape[-2] if k.ndim == 4 else k.shape[1]


def test_fast_attention_paths_equal_the_hosts_attention(api, host_sd15, inputs, monkeypatch):
    """Where the host runs PyTorch attention (GPUs), the patched layers call PyTorch's fused attention directly, for
    the image attention and for the text attention, skipping the host's per-call wrappers; on this CPU the host runs
    sub-quadratic attention, and the patch calls it for the text. Both must give the same numbers."""
    import comfy.ldm.modules.attention as attention
    adapter = api["load"]("ip-adapter-plus_sd15.safetensors")
    embeds = api["ImageEmbeds"](torch.randn(2, 257, 1280), torch.randn(2, 257, 1280), "penultimate_hidden_states",
                                "zero_pixels")  # two images: 32 image tokens, a count no other attention here has
    model = api["apply"](host_sd15, adapter, embeds, 1.0)
    sigma = sigma_at(host_sd15, TIMESTEP)
    sub_quad = attention.optimized_attention
    assert sub_quad is not attention.attention_pytorch
    text_via_host = []
    monkeypatch.setattr(attention, "optimized_attention",
                        lambda q, k, v, *a, **kw: text_via_host.append(key_tokens(k)) or sub_quad(q, k, v, *a, **kw))
    hosts = predict_noise(model, inputs["noise"], sigma, inputs["cond"], inputs["uncond"])
    assert text_via_host.count(77) == 16, "with another backend the text attention goes through the host's"
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(attention, "optimized_attention", attention.attention_pytorch)
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, k, v, **kw: calls.append(k.shape) or sdpa(q, k, v,
                                                                                                            **kw))
    import comfy.ops
    through_host = []
    host_sdpa = comfy.ops.scaled_dot_product_attention
    monkeypatch.setattr(comfy.ops, "scaled_dot_product_attention",
                        lambda q, k, v, *a, **kw: through_host.append(k.shape) or host_sdpa(q, k, v, *a, **kw))
    fast = predict_noise(model, inputs["noise"], sigma, inputs["cond"], inputs["uncond"])
    assert len([shape for shape in calls if shape[-2] == 32]) == 16
    assert len([shape for shape in calls if shape[-2] == 77]) == 16
    assert [shape for shape in through_host if shape[-2] in (32, 77)] == [], "both skip the host's wrappers"
    assert through_host, "the self-attention layers (not patched) still go through the host"
    for a, b in zip(hosts, fast):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_an_attention_override_sees_the_patched_layers_text_attention(api, host_sd15, inputs, monkeypatch):
    """A node's attention override (transformer_options["optimized_attention_override"]) is honoured: with it the
    patched layers' text attention goes through the host's attention, and so through the override."""
    import comfy.ldm.modules.attention as attention
    monkeypatch.setattr(attention, "optimized_attention", attention.attention_pytorch)
    embeds = api["ImageEmbeds"](torch.randn(2, 257, 1280), torch.randn(2, 257, 1280), "penultimate_hidden_states",
                                "zero_pixels")  # 32 image tokens: no self-attention here has as many keys
    model = api["apply"](host_sd15, api["load"]("ip-adapter-plus_sd15.safetensors"), embeds, 1.0)
    seen = []

    def override(func, q, k, v, *args, **kwargs):
        seen.append(key_tokens(k))
        return func(q, k, v, *args, **kwargs)
    model.model_options["transformer_options"]["optimized_attention_override"] = override
    predict_noise(model, inputs["noise"], sigma_at(host_sd15, TIMESTEP), inputs["cond"], inputs["uncond"])
    assert seen.count(77) == 16 and seen.count(32) == 16, f"keys seen by the override: {sorted(set(seen))}"
