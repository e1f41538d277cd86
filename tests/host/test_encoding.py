"""Encoding reference images with the host's CLIP vision model, as each adapter variant reads them."""
import pytest
import torch

from ipx_tools.standins import CLIP_VISION_NAMES, build_models_dir_subprocess

from .test_patching import pack_module


@pytest.fixture(scope="module")
def clip_visions(host, cache_dir):
    import comfy.clip_vision
    root = cache_dir / "models"
    build_models_dir_subprocess(root, variants=("sd15", "plus"), clip_vision=("vit-h", "vit-l"))
    return {kind: comfy.clip_vision.load(str(root / "clip_vision" / name)) for kind, name in CLIP_VISION_NAMES.items()
            if kind in ("vit-h", "vit-l")}


@pytest.fixture(scope="module")
def api(host, adapter_dir):
    encoding = pack_module(host, "IPXEncodeImage")
    loading = pack_module(host, "IPXLoadAdapter")
    applying = pack_module(host, "IPXApplyAdapter")
    errors = pack_module(host, "IPXApplyAdapter", "ipadapter_core.errors")
    return dict(encode=encoding.encode_images, load=loading.load_adapter_file, apply=applying.apply_adapter,
                errors=errors, check_model=applying.check_model)


def image(h=300, w=200, c=3, seed=0):
    return torch.rand(1, h, w, c, generator=torch.Generator().manual_seed(seed))


def test_base_reads_image_embeds_and_its_uncond_is_zero(api, clip_visions):
    vit_h = clip_visions["vit-h"]
    with torch.inference_mode():
        embeds = api["encode"](vit_h, image(), api["load"]("ip-adapter_sd15.safetensors"))
        direct = vit_h.encode_image(image(), crop=True)
    assert embeds.cond.shape == (1, 1024) and embeds.encoder_output == "image_embeds"
    torch.testing.assert_close(embeds.cond, direct.image_embeds.float())
    assert torch.equal(embeds.uncond, torch.zeros(1, 1024))


def test_plus_uncond_is_the_encoder_on_zero_pixels_not_a_black_image(api, clip_visions):
    vit_h = clip_visions["vit-h"]
    plus = api["load"]("ip-adapter-plus_sd15.safetensors")
    with torch.inference_mode():
        embeds = api["encode"](vit_h, image(), plus)
        zeros = vit_h.model(pixel_values=torch.zeros(1, 3, 224, 224), intermediate_output=-2)[1].float()
        black = vit_h.encode_image(torch.zeros(1, 224, 224, 3)).penultimate_hidden_states.float()
        direct = vit_h.encode_image(image()).penultimate_hidden_states.float()
    assert embeds.cond.shape == embeds.uncond.shape == (1, 257, 1280)
    torch.testing.assert_close(embeds.cond, direct)
    torch.testing.assert_close(embeds.uncond, zeros)
    assert (embeds.uncond - black).abs().max() > 1e-2, "a black image is not zero after CLIP normalisation"


def test_several_images_give_one_row_each(api, clip_visions):
    batch = torch.cat([image(seed=1), image(seed=2), image(seed=3)])
    with torch.inference_mode():
        embeds = api["encode"](clip_visions["vit-h"], batch, api["load"]("ip-adapter-plus_sd15.bin"))
    assert embeds.cond.shape == embeds.uncond.shape == (3, 257, 1280)
    assert torch.equal(embeds.uncond[0], embeds.uncond[2])


@pytest.mark.parametrize("shape", [(1, 37, 91, 3), (1, 224, 224, 4), (1, 64, 64, 1), (2, 1000, 17, 3)],
                         ids=["odd-size", "rgba", "gray", "extreme-aspect"])
def test_any_image_size_and_channel_count_encodes(api, clip_visions, shape):
    with torch.inference_mode():
        embeds = api["encode"](clip_visions["vit-h"], torch.rand(shape), api["load"]("ip-adapter_sd15.bin"))
    assert embeds.cond.shape == (shape[0], 1024) and torch.isfinite(embeds.cond).all()


def test_empty_or_odd_tensors_are_refused_clearly(api, clip_visions):
    adapter = api["load"]("ip-adapter_sd15.bin")
    with pytest.raises(ValueError, match="empty"):
        api["encode"](clip_visions["vit-h"], torch.rand(0, 64, 64, 3), adapter)
    with pytest.raises(ValueError, match="5 channels"):
        api["encode"](clip_visions["vit-h"], torch.rand(1, 64, 64, 5), adapter)
    with pytest.raises(ValueError, match="expected an IMAGE batch"):
        api["encode"](clip_visions["vit-h"], torch.rand(64, 64, 3), adapter)


@pytest.mark.parametrize("adapter_name,expected", [
    ("ip-adapter_sd15.safetensors", r"CLIP ViT-L/14 \(image embeds 768\).*needs CLIP ViT-H/14 \(image embeds 1024\)"),
    ("ip-adapter-plus_sd15.safetensors", r"CLIP ViT-L/14 \(hidden states 1024\).*needs CLIP ViT-H/14 \(hidden states "
                                         r"1280\)"),
])
def test_mismatched_encoder_is_refused_naming_both(api, clip_visions, adapter_name, expected):
    with pytest.raises(api["errors"].EncoderMismatchError, match=expected):
        api["encode"](clip_visions["vit-l"], image(), api["load"](adapter_name))


def test_embeds_made_for_another_variant_are_refused(api, clip_visions, host_sd15):
    with torch.inference_mode():
        embeds = api["encode"](clip_visions["vit-h"], image(), api["load"]("ip-adapter_sd15.bin"))
    with pytest.raises(api["errors"].EncoderMismatchError, match="needs CLIP ViT-H/14 \\(hidden states 1280\\)"):
        api["apply"](host_sd15, api["load"]("ip-adapter-plus_sd15.bin"), embeds, 1.0)


def test_sd15_adapter_on_an_sdxl_model_is_refused(api):
    class Config:  # what the host's SDXL model config reports
        unet_config = {"context_dim": 2048, "adm_in_channels": 2816}

    class Model:
        model_config = Config()

    class Patcher:
        model = Model()

    with pytest.raises(api["errors"].ModelMismatchError, match=r"SD1.5 adapter \(cross-attention width 768\); the "
                                                               r"model is Config \(cross-attention width 2048\)"):
        api["check_model"](Patcher(), api["load"]("ip-adapter_sd15.bin"))


def test_negative_image_replaces_the_uncond(api, clip_visions):
    vit_h = clip_visions["vit-h"]
    negative = image(seed=9)
    with torch.inference_mode():
        embeds = api["encode"](vit_h, torch.cat([image(seed=1), image(seed=2)]),
                               api["load"]("ip-adapter_sd15.bin"), "concat", negative)
        expected = vit_h.encode_image(negative).image_embeds.float()
    assert embeds.uncond.shape == (2, 1024)
    torch.testing.assert_close(embeds.uncond, expected.expand(2, -1))


def test_encoder_combine_merges_the_batch(api, clip_visions):
    batch = torch.cat([image(seed=1), image(seed=2), image(seed=3)])
    adapter = api["load"]("ip-adapter_sd15.bin")
    with torch.inference_mode():
        rows = api["encode"](clip_visions["vit-h"], batch, adapter, "concat")
        averaged = api["encode"](clip_visions["vit-h"], batch, adapter, "average")
    assert rows.cond.shape == (3, 1024) and averaged.cond.shape == (1, 1024)
    torch.testing.assert_close(averaged.cond, rows.cond.mean(0, keepdim=True))
