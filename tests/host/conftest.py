"""Fixtures for the in-process host ring: one random-weight SD1.5 UNet, as diffusers builds it and as the host loads
it, and random adapters written in the official file layouts into the host's models/ipadapter search path."""
import pytest
import torch

from ipx_tools.random_adapters import OFFICIAL_NAMES, random_adapter, write_adapter

SEED = 1234


@pytest.fixture(scope="session")
def diffusers_unet():
    """diffusers' UNet2DConditionModel with SD1.5's configuration and random weights (fp32, eval)."""
    from diffusers import UNet2DConditionModel
    torch.manual_seed(SEED)
    return UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8).eval().requires_grad_(False)


@pytest.fixture(scope="session")
def host_sd15(host, diffusers_unet):
    """The host's SD1.5 model (a ModelPatcher) carrying exactly the diffusers UNet's weights."""
    import comfy.sd
    model = comfy.sd.load_diffusion_model_state_dict(diffusers_unet.state_dict(),
                                                     model_options={"dtype": torch.float32})
    assert type(model.model.model_config).__name__ == "SD15"
    return model


@pytest.fixture(scope="session")
def adapter_dir(host, tmp_path_factory):
    """A folder registered in the host's ipadapter search path, holding random sd15 / plus / full-face adapters
    (seed 0 .safetensors, seed 1 .bin) under their official names."""
    import folder_paths
    folder = tmp_path_factory.mktemp("ipadapter")
    for variant, name in OFFICIAL_NAMES.items():
        write_adapter(random_adapter(variant, seed=0), folder / f"{name}.safetensors")
        write_adapter(random_adapter(variant, seed=1), folder / f"{name}.bin")
    folder_paths.add_model_folder_path("ipadapter", str(folder))
    return folder


@pytest.fixture(scope="session")
def pack_nodes(host):
    """The pack's node classes, as the host loaded them."""
    return {name: cls for name, cls in host.NODE_CLASS_MAPPINGS.items() if name.startswith("IPX")}
