"""Parity with an independent implementation: diffusers' IP-Adapter against the host model patched by this pack.

diffusers side: ``UNet2DConditionModel`` with SD1.5's configuration (the ``diffusers_unet`` fixture, deep-copied so the
shared one stays clean), the adapter loaded by diffusers' own ``IPAdapterMixin.load_ip_adapter`` from the same file,
the strength set with ``set_ip_adapter_scale``, and the encoder features passed as ``ip_adapter_image_embeds`` through
``StableDiffusionPipeline.prepare_ip_adapter_image_embeds``; the UNet is called as StableDiffusionPipeline calls it
under classifier-free guidance: one batch ``[negative; positive]`` for the latents, the text and the image embeds.

host side: the ``host_sd15`` ModelPatcher (same UNet weights) patched by ``apply_adapter`` with the adapter read by
``load_adapter_file``, run for one step through the host's real sampling path (``sampling.predict_noise``:
sample_custom -> CFGGuider -> calc_cond_batch), so that the conds are processed, cond and uncond batched into one UNet
call and ``cond_or_uncond`` set exactly as in a real run. A UNet function wrapper checks that there was exactly one such
call. The latent is x = noise * sigma with sigma = the schedule's sigma at timestep 500, which the host turns back into
timestep 500 exactly; its UNet input is x / sqrt(sigma^2 + 1), which is what diffusers' UNet is given.

Metric everywhere: relative error = max|host - diffusers| / max|diffusers| over the whole batch (uncond and cond rows),
on the noise prediction eps, in fp32; parity means <= 1e-4.
"""
import copy
import gc
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from .sampling import predict_noise, sigma_at

TOLERANCE = 1e-4          # relative error allowed between host and diffusers (fp32)
MIN_EFFECT = 100 * TOLERANCE  # an effect that a parity of TOLERANCE could not hide
TIMESTEP = 500            # sigma = model_sampling.sigmas[TIMESTEP], so the host's timestep is exactly this integer
LATENT_SHAPE = (1, 4, 8, 8)   # 64x64 pixels, one image per cond

BASE = "ip-adapter_sd15"
PLUS = "ip-adapter-plus_sd15"
FULL_FACE = "ip-adapter-full-face_sd15"
# What each variant reads from the image encoder, and how its unconditional input is made (as the official
# IP-Adapter code and diffusers' pipelines make it): base = image_embeds with zeros as uncond; plus / full face =
# penultimate hidden states with the encoder's output for an all-zero pixel image as uncond (a fixed tensor here).
READS_HIDDEN_STATES = {BASE: False, PLUS: True, FULL_FACE: True}
ADAPTER_FILES = [f"{stem}.{ext}" for stem in (BASE, PLUS, FULL_FACE) for ext in ("bin", "safetensors")]

MID_BLOCK_LAYER = 31      # official index of the middle block's cross-attention in the weight files
MID_CHANGED = f"{BASE}-mid-changed.safetensors"


def relative_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """max |actual - reference| / max |reference|."""
    return ((actual - reference).abs().max() / reference.abs().max()).item()


def stem(file_name: str) -> str:
    """The official name a file stands for: 'ip-adapter_sd15' for ip-adapter_sd15.bin and its -mid-changed copy."""
    return file_name.rsplit(".", 1)[0].removesuffix("-mid-changed")


# ---------------------------------------------------------------------------------------------------------------------
# Shared inputs and the two sides
# ---------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def inputs(host_sd15):
    """Fixed random inputs shared by both sides."""
    g = torch.Generator().manual_seed(2024)
    sigma = sigma_at(host_sd15, TIMESTEP)
    timestep = host_sd15.get_model_object("model_sampling").timestep(torch.tensor([sigma]))
    assert timestep.item() == TIMESTEP, "sigma must map back to the integer timestep exactly"
    return {
        "sigma": sigma,
        "noise": torch.randn(LATENT_SHAPE, generator=g),
        "text_cond": torch.randn(1, 77, 768, generator=g),
        "text_uncond": torch.randn(1, 77, 768, generator=g),
        "image_embeds": torch.randn(1, 1024, generator=g),             # CLIP ViT-H image_embeds of one image
        "hidden_states": torch.randn(1, 257, 1280, generator=g),       # its penultimate hidden states
        "zero_pixel_hidden_states": torch.randn(1, 257, 1280, generator=g),  # stands in for the zero-pixel image's
    }


def encoder_features(file_name: str, inputs: dict):
    """(cond, uncond) encoder features for one reference image, as the variant reads them."""
    if READS_HIDDEN_STATES[stem(file_name)]:
        return inputs["hidden_states"], inputs["zero_pixel_hidden_states"]
    return inputs["image_embeds"], torch.zeros_like(inputs["image_embeds"])


@pytest.fixture(scope="module")
def pack(host):
    """The pack's functions, from the modules the host loaded."""
    loading = sys.modules[host.NODE_CLASS_MAPPINGS["IPXLoadAdapter"].__module__]
    applying = sys.modules[host.NODE_CLASS_MAPPINGS["IPXApplyAdapter"].__module__]
    return {"load_adapter_file": loading.load_adapter_file, "apply_adapter": applying.apply_adapter,
            "ImageEmbeds": applying.ImageEmbeds}


def host_prediction(model, inputs) -> dict:
    """One UNet call of ``model`` through the host's sampling path (``predict_noise``), recorded by a UNet function
    wrapper: ``eps`` in diffusers' CFG row order [uncond, cond], the latent ``x`` (before the host's input scaling),
    the call's raw ``denoised`` output (host row order) and its ``cond_or_uncond`` layout."""
    calls = []

    def record(apply_model, args):
        out = apply_model(args["input"], args["timestep"], **args["c"])
        calls.append({"cond_or_uncond": list(args["cond_or_uncond"]), "denoised": out.clone()})
        return out

    probed = model.clone()
    probed.set_model_unet_function_wrapper(record)
    eps_cond, eps_uncond, x = predict_noise(probed, inputs["noise"], inputs["sigma"], inputs["text_cond"],
                                            inputs["text_uncond"])
    layouts = [call["cond_or_uncond"] for call in calls]
    assert layouts in ([[0, 1]], [[1, 0]]), f"expected one UNet call batching cond (0) and uncond (1), got {layouts}"
    return {"x": x, "eps": torch.cat([eps_uncond, eps_cond]), "denoised": calls[0]["denoised"], "layout": layouts[0]}


def diffusers_prediction(unet, host_pred: dict, inputs: dict, image_embeds=None) -> torch.Tensor:
    """diffusers' eps for the same batch the host ran: latents scaled by 1/sqrt(sigma^2 + 1) (EulerDiscreteScheduler's
    scale_model_input), text [negative; positive], image embeds as prepared by the pipeline."""
    sigma = torch.tensor(inputs["sigma"], dtype=torch.float32)
    latent_model_input = torch.cat([host_pred["x"]] * 2) / (sigma ** 2 + 1) ** 0.5
    text = torch.cat([inputs["text_uncond"], inputs["text_cond"]])
    kwargs = {} if image_embeds is None else {"added_cond_kwargs": {"image_embeds": image_embeds}}
    with torch.inference_mode():
        return unet(latent_model_input, TIMESTEP, encoder_hidden_states=text, **kwargs).sample


@pytest.fixture(scope="module")
def ip_pipeline(diffusers_unet):
    """A diffusers pipeline holding only a private copy of the UNet, with diffusers' IP-Adapter loading mixed in."""
    from diffusers import DiffusionPipeline
    from diffusers.loaders import IPAdapterMixin

    class UNetOnlyPipeline(DiffusionPipeline, IPAdapterMixin):
        _optional_components = ["image_encoder", "feature_extractor"]

        def __init__(self, unet, image_encoder=None, feature_extractor=None):
            super().__init__()
            self.register_modules(unet=unet, image_encoder=image_encoder, feature_extractor=feature_extractor)

    pipe = UNetOnlyPipeline(copy.deepcopy(diffusers_unet))
    unet = pipe.unet
    yield pipe
    unet.to("meta")  # frees the copy's 3.4 GB now, whoever still holds the pipeline
    gc.collect()


def diffusers_image_embeds(file_name: str, inputs: dict) -> list:
    """``ip_adapter_image_embeds`` as a diffusers user passes them under CFG (negative and positive stacked on the
    batch axis, one image per prompt), run through StableDiffusionPipeline.prepare_ip_adapter_image_embeds."""
    from diffusers import StableDiffusionPipeline

    cond, uncond = encoder_features(file_name, inputs)
    user_embeds = torch.stack([uncond, cond])  # (2, images=1, ...) = [negative; positive]
    return StableDiffusionPipeline.prepare_ip_adapter_image_embeds(
        None, ip_adapter_image=None, ip_adapter_image_embeds=[user_embeds], device=torch.device("cpu"),
        num_images_per_prompt=1, do_classifier_free_guidance=True)


@pytest.fixture(scope="module")
def mid_changed_dir(host, adapter_dir, tmp_path_factory):
    """A copy of the base .safetensors adapter whose middle-block (layer 31) image key/value weights are re-randomised
    five times larger (the middle block sees a 1x1 latent at this size: a same-sized change would move eps by under
    1%), in its own folder, registered in the host's ipadapter search path for this module only."""
    import folder_paths

    state_dict = load_file(str(adapter_dir / f"{BASE}.safetensors"))
    g = torch.Generator().manual_seed(31)
    changed = [f"ip_adapter.{MID_BLOCK_LAYER}.{name}.weight" for name in ("to_k_ip", "to_v_ip")]
    for key in changed:
        old = state_dict[key]
        state_dict[key] = torch.randn(old.shape, generator=g) * 5 * old.std()
    folder = tmp_path_factory.mktemp("ipadapter_mid_changed")
    save_file(state_dict, str(folder / MID_CHANGED))
    folder_paths.add_model_folder_path("ipadapter", str(folder))
    yield folder
    folder_paths.folder_names_and_paths["ipadapter"][0].remove(str(folder))
    folder_paths.filename_list_cache.pop("ipadapter", None)


class Predictions:
    """Every prediction the tests compare, each computed once (UNet calls are the expensive part)."""

    def __init__(self, host_sd15, diffusers_unet, pipe, pack, inputs, adapter_dir, mid_changed_dir):
        self.host_sd15, self.diffusers_unet, self.pipe, self.pack = host_sd15, diffusers_unet, pipe, pack
        self.inputs = inputs
        self.folders = {MID_CHANGED: mid_changed_dir}
        self.default_folder = adapter_dir
        self._cache = {}

    def _cached(self, key, compute):
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def host(self, file_name=None, weight=1.0) -> dict:
        """The host's prediction, plain (file_name None) or patched by the pack with ``file_name`` at ``weight``."""
        def compute():
            model = self.host_sd15
            if file_name is not None:
                adapter = self.pack["load_adapter_file"](file_name)
                cond, uncond = encoder_features(file_name, self.inputs)
                embeds = self.pack["ImageEmbeds"](cond=cond, uncond=uncond, encoder_output=adapter.spec.encoder_output,
                                                  uncond_mode=adapter.spec.uncond)
                model = self.pack["apply_adapter"](self.host_sd15, adapter, embeds, weight, 0.0, 1.0)
            return host_prediction(model, self.inputs)
        return self._cached(("host", file_name, weight), compute)

    def diffusers(self, file_name=None, scale=1.0) -> torch.Tensor:
        """diffusers' eps, plain (file_name None) or with ``file_name`` loaded by load_ip_adapter at ``scale``."""
        def compute():
            reference = self.host()  # same x as every host prediction (asserted in assert_parity)
            if file_name is None:
                return diffusers_prediction(self.diffusers_unet, reference, self.inputs)
            self.pipe.load_ip_adapter(str(self.folders.get(file_name, self.default_folder)), subfolder="",
                                      weight_name=file_name, image_encoder_folder=None, local_files_only=True,
                                      low_cpu_mem_usage=False)
            self.pipe.set_ip_adapter_scale(scale)
            return diffusers_prediction(self.pipe.unet, reference, self.inputs,
                                        diffusers_image_embeds(file_name, self.inputs))
        return self._cached(("diffusers", file_name, scale), compute)


@pytest.fixture(scope="module")
def predictions(host_sd15, diffusers_unet, ip_pipeline, pack, inputs, adapter_dir, mid_changed_dir):
    return Predictions(host_sd15, diffusers_unet, ip_pipeline, pack, inputs, adapter_dir, mid_changed_dir)


def assert_parity(host_pred: dict, diffusers_eps: torch.Tensor, plain: dict, what: str):
    assert torch.equal(host_pred["x"], plain["x"]), "the host must have sampled the same latent in every run"
    eps = host_pred["eps"]
    err = relative_error(eps, diffusers_eps)
    per_row = ", ".join(f"{name} {relative_error(eps[i], diffusers_eps[i]):.2e}" for i, name in enumerate(("uncond",
                                                                                                         "cond")))
    assert err <= TOLERANCE, (f"{what}: host eps differs from diffusers' by relative error {err:.3e} "
                              f"(max|host - diffusers| / max|diffusers|; rows: {per_row}) > {TOLERANCE:g}")


# ---------------------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------------------

def test_plain_models_agree(predictions):
    """Baseline: without any adapter, the host's SD1.5 and diffusers' UNet give the same eps (so any disagreement in
    the tests below is the adapter's)."""
    plain = predictions.host()
    assert_parity(plain, predictions.diffusers(), plain, "plain model")


@pytest.mark.parametrize("file_name", ADAPTER_FILES)
def test_noise_prediction_matches_diffusers(predictions, file_name):
    """The host patched by the pack at weight 1 predicts the same eps, for cond and uncond, as diffusers with the same
    file loaded by load_ip_adapter at scale 1."""
    assert_parity(predictions.host(file_name), predictions.diffusers(file_name), predictions.host(),
                  f"{file_name} at weight 1")


@pytest.mark.parametrize("file_name", ADAPTER_FILES)
def test_adapter_changes_prediction(predictions, file_name):
    """Guard against a vacuous parity: at weight 1 the adapter moves eps far more than the parity tolerance."""
    effect = relative_error(predictions.host(file_name)["eps"], predictions.host()["eps"])
    assert effect > MIN_EFFECT, f"{file_name} changed eps by only {effect:.3e} (relative), parity would be vacuous"


def test_weight_matches_diffusers_scale(predictions):
    """The weight is diffusers' IP-Adapter scale: weight 0.5 on the host = set_ip_adapter_scale(0.5)."""
    file_name = f"{BASE}.bin"
    assert_parity(predictions.host(file_name, weight=0.5), predictions.diffusers(file_name, scale=0.5),
                  predictions.host(), f"{file_name} at weight 0.5")


def test_weight_zero_is_the_plain_model_exactly(predictions):
    """Weight 0 gives exactly (bit for bit) the unpatched model's prediction."""
    plain, zero = predictions.host(), predictions.host(f"{BASE}.safetensors", weight=0.0)
    assert zero["layout"] == plain["layout"]
    assert torch.equal(zero["denoised"], plain["denoised"]), \
        f"weight 0 differs from the plain model by {(zero['denoised'] - plain['denoised']).abs().max().item():.3e}"
    assert torch.equal(zero["eps"], plain["eps"])


def test_middle_block_weights_change_prediction(predictions):
    """Changing only the middle block's (layer 31) to_k_ip / to_v_ip weights changes the host's eps, as it changes
    diffusers' - and by the same amount: the changed file is still in parity."""
    original, changed = f"{BASE}.safetensors", MID_CHANGED
    host_effect = relative_error(predictions.host(changed)["eps"], predictions.host(original)["eps"])
    diffusers_effect = relative_error(predictions.diffusers(changed), predictions.diffusers(original))
    assert diffusers_effect > MIN_EFFECT, \
        f"cross-check failed: diffusers' eps moved by only {diffusers_effect:.3e} when layer 31 changed"
    assert host_effect > MIN_EFFECT, \
        f"the host's eps moved by only {host_effect:.3e} when layer {MID_BLOCK_LAYER} changed (diffusers': " \
        f"{diffusers_effect:.3e}): is the middle block patched?"
    assert_parity(predictions.host(changed), predictions.diffusers(changed), predictions.host(), changed)
