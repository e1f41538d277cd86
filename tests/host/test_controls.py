"""The control surface in the real host, one behaviour per test, through the host's own sampling path."""
import sys

import pytest
import torch
from torch.nn import functional as F

from .sampling import predict_noise, sigma_at
from .test_patching import base_embeds, pack_module

TIMESTEP = 500


@pytest.fixture(scope="module")
def api(host, adapter_dir):
    applying = pack_module(host, "IPXApplyAdapter")
    return dict(load=pack_module(host, "IPXLoadAdapter").load_adapter_file, apply=applying.apply_adapter,
                core=pack_module(host, "IPXApplyAdapter", "ipadapter_core"),
                ImageEmbeds=pack_module(host, "IPXApplyAdapter", "ipadapter_core.embeds").ImageEmbeds,
                nodes=host.NODE_CLASS_MAPPINGS)


@pytest.fixture(scope="module")
def inputs(host_sd15):
    g = torch.Generator().manual_seed(31)
    return dict(noise=torch.randn(1, 4, 8, 8, generator=g), cond=torch.randn(1, 77, 768, generator=g),
                uncond=torch.randn(1, 77, 768, generator=g), image=torch.randn(1, 1024, generator=g),
                sigma=sigma_at(host_sd15, TIMESTEP))


@pytest.fixture(scope="module")
def plain(host_sd15, inputs):
    return predict_noise(host_sd15, inputs["noise"], inputs["sigma"], inputs["cond"], inputs["uncond"])


@pytest.fixture(scope="module")
def adapter(api):
    return api["load"]("ip-adapter_sd15.safetensors")


def eps(model, inputs):
    return predict_noise(model, inputs["noise"], inputs["sigma"], inputs["cond"], inputs["uncond"])


def assert_same(a, b):
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_weight_type_sets_each_layers_weight(api, host_sd15, inputs, adapter):
    model = api["apply"](host_sd15, adapter, base_embeds(api, inputs["image"]), 0.8, weight_type="style transfer")
    patches = model.model_options["transformer_options"]["patches_replace"]["attn2"]
    by_t = {p.layer.transformer_index: p.prompts[0].layer_weight(p.layer.layer_index) for p in patches.values()}
    assert by_t == {t: (0.8 if t in (0, 1, 2, 3, 9, 10, 11, 12, 13, 14, 15) else 0.0) for t in range(16)}


def test_layers_at_weight_zero_give_the_text_attention_only(api, host_sd15, inputs, adapter, monkeypatch):
    cls = api["core"].DecoupledCrossAttention
    calls, original = [], cls.__call__

    def recording(self, q, k, v, extra_options):
        out = original(self, q, k, v, extra_options)
        calls.append((self.layer.transformer_index, q, k, v, extra_options["n_heads"], out))
        return out

    monkeypatch.setattr(cls, "__call__", recording)
    model = api["apply"](host_sd15, adapter, base_embeds(api, inputs["image"]), 1.0, weight_type="composition")
    eps(model, inputs)
    for t, q, k, v, heads, out in calls:
        split = lambda x: x.reshape(x.shape[0], -1, heads, x.shape[-1] // heads).transpose(1, 2)
        text = F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).reshape(q.shape)
        if t in (4, 5):
            assert (out - text).abs().max() > 1e-3, f"layer {t} is a composition layer"
        else:
            torch.testing.assert_close(out, text, rtol=1e-5, atol=1e-5, msg=f"layer {t}")


def test_mask_of_zeros_is_the_plain_model_and_of_ones_is_no_mask(api, host_sd15, inputs, adapter, plain):
    embeds = base_embeds(api, inputs["image"])
    assert_same(eps(api["apply"](host_sd15, adapter, embeds, 1.0, mask=torch.zeros(1, 64, 48)), inputs), plain)
    assert_same(eps(api["apply"](host_sd15, adapter, embeds, 1.0, mask=torch.ones(64, 48)), inputs),
                eps(api["apply"](host_sd15, adapter, embeds, 1.0), inputs))


def test_bad_masks_are_refused_clearly(api, host_sd15, inputs, adapter):
    embeds = base_embeds(api, inputs["image"])
    mask = torch.zeros(1, 8, 8)
    mask[0, 0, 0] = 2.0
    with pytest.raises(ValueError, match=r"values in 0..1 \(found 0 .. 2\)"):
        api["apply"](host_sd15, adapter, embeds, 1.0, mask=mask)
    with pytest.raises(ValueError, match=r"values in 0..1 \(found nan"):
        api["apply"](host_sd15, adapter, embeds, 1.0, mask=torch.full((8, 8), float("nan")))
    with pytest.raises(ValueError, match="must be \\(height, width\\) or \\(batch, height, width\\)"):
        api["apply"](host_sd15, adapter, embeds, 1.0, mask=torch.ones(1, 1, 8, 8))


def test_start_and_end_outside_the_current_step_leave_the_model_plain(api, host_sd15, inputs, adapter, plain):
    embeds = base_embeds(api, inputs["image"])
    # sigma at timestep 500 sits at about 50% of the schedule
    assert_same(eps(api["apply"](host_sd15, adapter, embeds, 1.0, 0.8, 1.0), inputs), plain)
    assert_same(eps(api["apply"](host_sd15, adapter, embeds, 1.0, 0.0, 0.2), inputs), plain)
    inside = eps(api["apply"](host_sd15, adapter, embeds, 1.0, 0.2, 0.8), inputs)
    assert_same(inside, eps(api["apply"](host_sd15, adapter, embeds, 1.0), inputs))


def test_step_schedule_weights_the_current_step(api, host_sd15, inputs, adapter, plain):
    embeds = base_embeds(api, inputs["image"])
    assert_same(eps(api["apply"](host_sd15, adapter, embeds, 1.0, step_weights="0, 1"), inputs), plain)
    assert_same(eps(api["apply"](host_sd15, adapter, embeds, 1.0, step_weights="1, 0"), inputs),
                eps(api["apply"](host_sd15, adapter, embeds, 1.0), inputs))


def test_saved_and_loaded_embeds_reproduce_the_output_exactly(api, host_sd15, inputs, adapter, tmp_path):
    import folder_paths
    folder_paths.folder_names_and_paths["ipx_embeds"][0].insert(0, str(tmp_path))
    try:
        embeds = api["ImageEmbeds"](torch.randn(2, 1024), torch.zeros(2, 1024), "image_embeds", "zero_embeds")
        with torch.inference_mode():
            api["nodes"]["IPXSaveEmbeds"].execute(embeds=embeds, filename_prefix="roundtrip")
            loaded = api["nodes"]["IPXLoadEmbeds"].execute(embeds_name="roundtrip_00001.safetensors").result[0]
    finally:
        folder_paths.folder_names_and_paths["ipx_embeds"][0].remove(str(tmp_path))
    assert_same(eps(api["apply"](host_sd15, adapter, loaded, 0.9), inputs),
                eps(api["apply"](host_sd15, adapter, embeds, 0.9), inputs))


def test_a_foreign_attn2_replacement_is_chained_and_still_called(api, host_sd15, inputs, adapter):
    import comfy.ldm.modules.attention as attention
    calls = []

    def foreign(q, k, v, extra_options):
        calls.append(extra_options["transformer_index"])
        return attention.optimized_attention(q, k, v, extra_options["n_heads"]) * 0.5

    other = host_sd15.clone()
    for layer in api["core"].SD15_LAYERS:
        other.set_model_attn2_replace(foreign, *layer.host_key[:2])  # another pack's 2-tuple keys
    ours_on_top = api["apply"](other, adapter, base_embeds(api, inputs["image"]), 1.0)
    chained = eps(ours_on_top, inputs)
    assert sorted(calls) == list(range(16))
    foreign_only = eps(other, inputs)
    assert (chained[0] - foreign_only[0]).abs().max() > 1e-3, "our image term is added on top"
    zero = eps(api["apply"](other, adapter, base_embeds(api, inputs["image"]), 0.0), inputs)
    assert_same(zero, foreign_only)


def test_default_advanced_node_equals_the_simple_node(api, host_sd15, inputs, adapter):
    embeds = base_embeds(api, inputs["image"])
    with torch.inference_mode():
        simple = api["nodes"]["IPXApplyAdapter"].execute(model=host_sd15, adapter=adapter, embeds=embeds, weight=0.7,
                                                         start_at=0.0, end_at=1.0).result[0]
        advanced = api["nodes"]["IPXApplyAdapterAdvanced"].execute(
            model=host_sd15, adapter=adapter, embeds=embeds, weight=0.7, start_at=0.0, end_at=1.0,
            weight_type="linear", weight_composition=1.0, embeds_scaling="V only", layer_weights="",
            step_weights="").result[0]
    assert_same(eps(simple, inputs), eps(advanced, inputs))
