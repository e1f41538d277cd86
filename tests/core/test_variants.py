"""Variant detection reads tensor shapes only: every SD1.5 variant is recognised, anything else refused clearly."""
import pytest
import torch

from ipadapter_core import UnsupportedAdapterError, detect_variant
from ipadapter_core.layers import BY_LAYER_INDEX, SD15_LAYER_INDICES
from ipx_tools.random_adapters import SPECS, random_adapter


def state_dict_of(variant):
    return random_adapter(variant).state_dict()


def ip_layers(cross_dim=768, indices=SD15_LAYER_INDICES, channels=None):
    sd = {}
    for i in indices:
        ch = channels or BY_LAYER_INDEX.get(i, BY_LAYER_INDEX[1]).channels
        sd[f"ip_adapter.{i}.to_k_ip.weight"] = torch.zeros(ch, cross_dim)
        sd[f"ip_adapter.{i}.to_v_ip.weight"] = torch.zeros(ch, cross_dim)
    return sd


@pytest.mark.parametrize("variant,image_proj,tokens,output,width", [
    ("sd15", "linear", 4, "image_embeds", 1024),
    ("sd15_vit-G", "linear", 4, "image_embeds", 1280),
    ("plus", "resampler", 16, "penultimate_hidden_states", 1280),
    ("full_face", "mlp", None, "penultimate_hidden_states", 1280),
])
def test_each_sd15_variant_is_detected_from_shapes(variant, image_proj, tokens, output, width):
    spec = detect_variant(state_dict_of(variant), "x.bin")
    assert (spec.variant, spec.image_proj, spec.tokens, spec.encoder_output, spec.encoder_width) == \
        (variant, image_proj, tokens, output, width)
    assert spec.cross_attention_dim == 768
    assert spec.layer_indices == tuple(range(1, 32, 2))


def test_light_and_base_share_one_architecture():
    # ip-adapter_sd15_light has exactly the base layout: 4 tokens from 1024-wide ViT-H image embeds.
    light = {"image_proj.proj.weight": torch.zeros(4 * 768, 1024), "image_proj.proj.bias": torch.zeros(4 * 768),
             "image_proj.norm.weight": torch.ones(768), "image_proj.norm.bias": torch.zeros(768), **ip_layers()}
    assert detect_variant(light) == SPECS["sd15"]


def test_plus_reports_resampler_depth_and_heads():
    spec = detect_variant(state_dict_of("plus"))
    assert (spec.resampler_depth, spec.resampler_heads, spec.uncond) == (4, 12, "zero_pixels")


def test_uncond_mode_follows_training():
    assert detect_variant(state_dict_of("sd15")).uncond == "zero_embeds"
    assert detect_variant(state_dict_of("full_face")).uncond == "zero_pixels"


def test_file_name_plays_no_part():
    spec = detect_variant(state_dict_of("plus"), "ip-adapter_sd15.safetensors")
    assert spec.variant == "plus"


def test_sdxl_adapter_is_refused_naming_sdxl():
    sd = {"image_proj.proj.weight": torch.zeros(4 * 2048, 1280), "image_proj.proj.bias": torch.zeros(4 * 2048),
          "image_proj.norm.weight": torch.ones(2048), "image_proj.norm.bias": torch.zeros(2048),
          **ip_layers(cross_dim=2048, indices=range(1, 140, 2), channels=640)}
    with pytest.raises(UnsupportedAdapterError, match=r"ip-adapter_sdxl.bin is an SDXL adapter .*2048.*SD1.5 \(768\)"):
        detect_variant(sd, "ip-adapter_sdxl.bin")


def test_faceid_lora_adapter_is_refused():
    sd = state_dict_of("sd15")
    sd["ip_adapter.1.to_q_lora.down.weight"] = torch.zeros(128, 320)
    with pytest.raises(UnsupportedAdapterError, match="FaceID"):
        detect_variant(sd, "ip-adapter-faceid_sd15.bin")


def test_faceid_projection_is_refused():
    sd = {"image_proj.proj.0.weight": torch.zeros(1024, 512), "image_proj.proj.2.weight": torch.zeros(3072, 1024),
          "image_proj.norm.weight": torch.ones(768), **ip_layers()}
    with pytest.raises(UnsupportedAdapterError, match="FaceID"):
        detect_variant(sd)


def test_missing_middle_layer_is_refused_listing_it():
    sd = state_dict_of("sd15")
    del sd["ip_adapter.31.to_k_ip.weight"], sd["ip_adapter.31.to_v_ip.weight"]
    with pytest.raises(UnsupportedAdapterError, match=r"missing \[31\]"):
        detect_variant(sd)


def test_wrong_layer_width_is_refused_with_shapes():
    sd = state_dict_of("sd15")
    sd["ip_adapter.13.to_v_ip.weight"] = torch.zeros(640, 768)
    with pytest.raises(UnsupportedAdapterError, match=r"ip_adapter.13.to_v_ip.weight has shape \[640, 768\], expected "
                                                      r"\[1280, 768\]"):
        detect_variant(sd)


def test_not_an_adapter_is_refused():
    with pytest.raises(UnsupportedAdapterError, match="not an IP-Adapter file"):
        detect_variant({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}, "v1-5.safetensors")


def test_unknown_projection_is_refused():
    with pytest.raises(UnsupportedAdapterError, match="unknown image projection"):
        detect_variant({"image_proj.foo.weight": torch.zeros(2, 2), **ip_layers()})
