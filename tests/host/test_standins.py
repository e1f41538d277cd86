"""The random-weight stand-ins (ipx_tools.standins) load through the host's own loaders as the models they stand in
for, with the official shapes, and nothing in them is trivially zero. Reuses the cached files of the server ring."""
import gc
import json
import shutil

import pytest
import torch
from safetensors import safe_open

from ipx_tools.standins import (CHECKPOINT_NAME, CLIP_VISION_NAMES, STAMP_NAME, build_models_dir_subprocess,
                                missing_files)

VARIANTS = ("sd15", "plus")
CLIP_VISION = ("vit-h", "vit-l")  # the same set as tests/server, so that one build serves both rings
SD15_UNET_PARAMETERS = 859_520_964  # runwayml/stable-diffusion-v1-5 unet


@pytest.fixture(scope="module")
def standins(host, cache_dir):
    """The cached models folder, registered in the host's checkpoints and clip_vision search paths."""
    import folder_paths
    root = cache_dir / "standins"
    build_models_dir_subprocess(root, VARIANTS, clip_vision=CLIP_VISION)
    assert not missing_files(root, VARIANTS, CLIP_VISION)
    folder_paths.add_model_folder_path("checkpoints", str(root / "checkpoints"))
    folder_paths.add_model_folder_path("clip_vision", str(root / "clip_vision"))
    return root


def free_host_memory():
    import comfy.model_management
    comfy.model_management.unload_all_models()
    gc.collect()


def file_keys(path):
    with safe_open(str(path), framework="pt") as f:
        return {key: f.get_slice(key).get_dtype() for key in f.keys()}


def test_checkpoint_file_has_the_official_sections_in_fp16(standins):
    keys = file_keys(standins / "checkpoints" / CHECKPOINT_NAME)
    prefixes = {key.split(".")[0] + "." + key.split(".")[1] for key in keys}
    assert prefixes == {"model.diffusion_model", "cond_stage_model.transformer", "first_stage_model.encoder",
                        "first_stage_model.decoder", "first_stage_model.quant_conv",
                        "first_stage_model.post_quant_conv"}, prefixes
    assert "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight" in keys
    assert "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight" in keys
    assert {dtype for dtype in keys.values()} == {"F16"}


def test_checkpoint_loads_through_checkpoint_loader_simple_as_sd15(host, standins):
    model, clip, vae = host.CheckpointLoaderSimple().load_checkpoint(CHECKPOINT_NAME)[:3]
    try:
        config = model.model.model_config
        assert type(config).__name__ == "SD15"
        assert config.unet_config["context_dim"] == 768 and config.unet_config["model_channels"] == 320
        unet = model.model.diffusion_model
        assert sum(p.numel() for p in unet.parameters()) == SD15_UNET_PARAMETERS
        # Layers the host initialises to zero were randomised too (else the UNet output would be exactly zero).
        assert unet.out[2].weight.float().std() > 1e-3
        assert unet.input_blocks[1][1].proj_out.weight.float().std() > 1e-3
        with torch.inference_mode():
            x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
            eps = unet(x, torch.tensor([500.0]), context=torch.randn(1, 77, 768))
            assert eps.shape == (1, 4, 8, 8) and torch.isfinite(eps).all() and eps.std() > 1e-3

            cond = clip.encode_from_tokens(clip.tokenize("a photo of a red fox"))
            other = clip.encode_from_tokens(clip.tokenize("a painting of a blue house"))
            assert cond.shape == (1, 77, 768) and torch.isfinite(cond).all()
            assert (cond - other).abs().mean() > 1e-2, "the text encoder ignores the text"

            pixels = vae.decode(torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)))
            assert tuple(pixels.shape[-3:]) == (64, 64, 3)
            assert 0.0 <= pixels.min() and pixels.max() <= 1.0 and pixels.std() > 0.01
    finally:
        del model, clip, vae
        free_host_memory()


@pytest.mark.parametrize("kind, embeds, hidden", [("vit-h", 1024, 1280), ("vit-l", 768, 1024)])
def test_clip_vision_standin_gives_the_official_shapes(host, standins, kind, embeds, hidden):
    clip_vision = host.CLIPVisionLoader().load_clip(CLIP_VISION_NAMES[kind])[0]
    try:
        assert clip_vision.image_size == 224
        images = torch.rand(2, 100, 120, 3, generator=torch.Generator().manual_seed(2))
        with torch.inference_mode():
            out = clip_vision.encode_image(images, crop=True)
        assert tuple(out["image_embeds"].shape) == (2, embeds)
        assert tuple(out["penultimate_hidden_states"].shape) == (2, 257, hidden)
        assert tuple(out["last_hidden_state"].shape) == (2, 257, hidden)
        for name in ("image_embeds", "penultimate_hidden_states"):
            assert torch.isfinite(out[name]).all(), name
        assert (out["image_embeds"][0] - out["image_embeds"][1]).abs().mean() > 1e-3, "both images encode alike"
    finally:
        del clip_vision
        free_host_memory()


def test_adapters_are_in_the_official_layout(standins):
    from ipadapter_core import load_adapter
    from ipx_tools.random_adapters import OFFICIAL_NAMES
    expected = {"sd15": (36, "linear", 1024), "plus": (83, "resampler", 1280)}
    for variant, (tensors, projection, width) in expected.items():
        path = standins / "ipadapter" / f"{OFFICIAL_NAMES[variant]}.safetensors"
        keys = file_keys(path)
        assert len(keys) == tensors and set(keys.values()) == {"F16"}, (variant, len(keys))
        spec = load_adapter(str(path)).spec
        assert (spec.variant, spec.image_proj, spec.encoder_width) == (variant, projection, width)


def test_models_dir_is_reused_and_a_changed_recipe_rebuilds(standins, tmp_path):
    assert missing_files(standins, VARIANTS, CLIP_VISION) == []
    # A copy of the folder (symlinked files, same stamp) is up to date; a stamp from another builder is not.
    for rel in json.loads((standins / STAMP_NAME).read_text())["files"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).symlink_to(standins / rel)
    shutil.copy(standins / STAMP_NAME, tmp_path / STAMP_NAME)
    assert missing_files(tmp_path, VARIANTS, CLIP_VISION) == []
    stamp = json.loads((tmp_path / STAMP_NAME).read_text())
    rel = "ipadapter/ip-adapter_sd15.safetensors"
    stamp["files"][rel]["recipe"] = "another-builder"
    (tmp_path / STAMP_NAME).write_text(json.dumps(stamp))
    assert missing_files(tmp_path, VARIANTS, CLIP_VISION) == [rel]
    stamp["host_version"] = "0.0.1"
    (tmp_path / STAMP_NAME).write_text(json.dumps(stamp))
    assert len(missing_files(tmp_path, VARIANTS, CLIP_VISION)) == 5
