"""IPX Train / Save IP-Adapter in the real host, in-process, on a random-weight SD1.5 at 64x64: the node is run as
the host's executor runs it (under torch.inference_mode, with models loaded under it), and what it trains is checked
against the apply node, the loader, diffusers and the host's loss graph."""
import copy
import gc
import hashlib
import sys
import types
from pathlib import Path

import pytest
import torch

from ipx_tools.host import find_comfyui
from ipx_tools.standins import CHECKPOINT_NAME, CLIP_VISION_NAMES, build_models_dir_subprocess

from .sampling import predict_noise, sigma_at

PACK_DIR = Path(__file__).resolve().parents[2]
RESOLUTION = 64
OVERFIT = dict(steps=32, batch_size=4, learning_rate=1e-3)  # random UNet weights: a higher rate shows the fall sooner
PROBE = range(10 ** 6, 10 ** 6 + 8)  # positions whose noise, timesteps and drops are the fixed evaluation draw
DIFFUSERS_ATTN2 = [f"down_blocks.{b}.attentions.{a}" for b in range(3) for a in range(2)] + \
    [f"up_blocks.{b}.attentions.{a}" for b in range(1, 4) for a in range(3)] + ["mid_block.attentions.0"]
DIFFUSERS_INDICES = list(range(1, 32, 2))  # the official file's index of each of those layers, in that order


def pack_module(host, name):
    glue = sys.modules[host.NODE_CLASS_MAPPINGS["IPXTrainAdapter"].__module__]
    return glue if name is None else sys.modules[glue.__package__.rsplit(".", 1)[0] + "." + name]


@pytest.fixture(scope="module")
def glue(host):
    return pack_module(host, None)


@pytest.fixture(scope="module")
def encoders(host, cache_dir):
    """The stand-ins' text encoder, VAE and CLIP ViT-H/14, loaded under inference mode as the executor loads them."""
    import comfy.clip_vision
    import comfy.sd
    root = cache_dir / "models"
    build_models_dir_subprocess(root, ("sd15", "plus"), clip_vision=("vit-h",), host_path=find_comfyui()[0])
    with torch.inference_mode():
        clip, vae = comfy.sd.load_checkpoint_guess_config(str(root / "checkpoints" / CHECKPOINT_NAME),
                                                          output_model=False)[1:3]
        clip_vision = comfy.clip_vision.load(str(root / "clip_vision" / CLIP_VISION_NAMES["vit-h"]))
    yield types.SimpleNamespace(clip=clip, vae=vae, clip_vision=clip_vision)
    gc.collect()


def training_images(count: int, seed: int = 0) -> torch.Tensor:
    """Smooth random colour fields (B, H, W, 3) in 0..1, not square, so that the node crops."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, 4, 5, generator=g)
    return torch.nn.functional.interpolate(coarse, size=(72, 88), mode="bilinear").permute(0, 2, 3, 1).contiguous()


def run_node(host, model, encoders, images, **inputs):
    """The training node's execute, under inference mode as the host's executor calls it."""
    values = dict(captions="", steps=2, batch_size=2, grad_accumulation=1, learning_rate=1e-4, weight_decay=1e-2,
                  image_drop=0.05, text_drop=0.05, both_drop=0.05, seed=0, variant="sd15", resolution=RESOLUTION,
                  precision="auto", cache_encodings=True)
    values.update(inputs)
    node = host.NODE_CLASS_MAPPINGS["IPXTrainAdapter"]
    with torch.inference_mode():
        out = node.execute(model, encoders.clip, encoders.vae, encoders.clip_vision, images, **values)
    return out.result


def fingerprint(module) -> dict:
    """{name: (sha256 of the weight's bytes, requires_grad)}: changes if any weight's bits or flag change. Bytes, not
    sums: a weight the checkpoint does not hold (SD1.5's clip_l text_projection) is left uninitialised by the host and
    may hold NaN, which never equals itself. (The host's own memory management may swap a weight's storage for an
    equal one: that is not a change.)"""
    return {name: (hashlib.sha256(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest(),
                   t.requires_grad)
            for name, t in module.state_dict(keep_vars=True).items()}


class Probe:
    """The loss and predictions of an adapter on fixed examples with a fixed draw (noise, timesteps, drops),
    through the same glue the node uses (evaluation only: no gradients)."""

    def __init__(self, glue, model, encoders, images, captions):
        with torch.inference_mode(False):
            self.glue, self.model = glue, model
            self.spec = glue.new_adapter_spec("sd15", 1024)
            self.encoders = glue.HostEncoders(encoders.vae, encoders.clip, encoders.clip_vision, self.spec)
            fetch, count = glue.training_examples(self.encoders, images, RESOLUTION, captions, None, True)
            self.examples = fetch([i % count for i in range(len(PROBE))])
            self.unet = model.model.diffusion_model  # only ever run under no_grad here: no private copy needed

    def trainer(self, adapter):
        alphas, scale = self.glue.schedule(self.model)
        return self.glue.AdapterTrainer(adapter, self.glue.unet_call(self.unet), num_examples=len(self.examples),
                                        dropped=self.encoders.dropped(), alphas_cumprod=alphas, latent_scale=scale,
                                        attention=self.glue.host_text_attention,
                                        image_attention=self.glue.host_image_attention)

    def loss(self, adapter) -> float:
        with torch.inference_mode(False):
            return self.trainer(adapter).evaluation_loss(self.examples, PROBE)

    def initial_adapter(self, seed):
        return self.glue.init_adapter(self.spec, self.glue.text_kv_weights(self.unet), seed)


@pytest.fixture(scope="module")
def overfit(host, glue, host_sd15, encoders):
    """One training run of the node on four images, with everything needed to judge it."""
    images = training_images(4)
    captions = "a red thing\na green thing\na blue thing\na grey thing"
    watched = {"unet": host_sd15.model.diffusion_model, "vae": encoders.vae.first_stage_model,
               "clip": encoders.clip.cond_stage_model, "clip_vision": encoders.clip_vision.model}
    before = {name: fingerprint(m) for name, m in watched.items()}
    options_before = repr(host_sd15.model_options)
    adapter, loss = run_node(host, host_sd15, encoders, images, captions=captions, **OVERFIT)
    after = {name: fingerprint(m) for name, m in watched.items()}
    probe = Probe(glue, host_sd15, encoders, images, captions)
    yield types.SimpleNamespace(adapter=adapter, loss=loss, before=before, after=after, probe=probe,
                                options_changed=repr(host_sd15.model_options) != options_before)


def test_new_adapter_starts_from_each_layers_own_text_keys_and_values(glue, host_sd15, diffusers_unet):
    """Checked against the diffusers UNet the host model was loaded from, by diffusers' layer names: each official
    index gets its own layer's to_k / to_v (the middle block's included)."""
    adapter = glue.init_adapter(glue.new_adapter_spec("sd15"), glue.text_kv_weights(host_sd15.model.diffusion_model))
    modules = dict(diffusers_unet.named_modules())
    for name, index in zip(DIFFUSERS_ATTN2, DIFFUSERS_INDICES):
        attn2 = modules[f"{name}.transformer_blocks.0.attn2"]
        assert torch.equal(adapter.layer(index).to_k_ip.weight, attn2.to_k.weight), name
        assert torch.equal(adapter.layer(index).to_v_ip.weight, attn2.to_v.weight), name


def test_loss_falls_when_overfitting_four_images(overfit):
    start = overfit.probe.loss(overfit.probe.initial_adapter(seed=0))
    end = overfit.probe.loss(copy.deepcopy(overfit.adapter.module).float())
    assert end < 0.75 * start, f"loss on a fixed draw went {start:.4f} -> {end:.4f} in {OVERFIT['steps']} steps"
    assert len(overfit.loss["loss"]) == OVERFIT["steps"] and all(torch.isfinite(torch.tensor(overfit.loss["loss"])))


def test_frozen_models_and_the_input_model_are_left_as_they_were(overfit):
    for name, before in overfit.before.items():
        changed = [key for key, value in before.items() if overfit.after[name].get(key) != value]
        assert not changed and set(overfit.after[name]) == set(before), f"the {name} changed: {changed[:5]}"
    assert not overfit.options_changed


def test_every_adapter_weight_trained(overfit):
    start = overfit.probe.initial_adapter(seed=0).state_dict()
    trained = overfit.adapter.module.state_dict()
    assert set(trained) == set(start)
    unchanged = [k for k, v in trained.items() if torch.equal(v.float(), start[k])]
    assert not unchanged, f"these weights did not train: {unchanged}"


def test_loss_history_feeds_the_hosts_loss_graph(overfit, tmp_path, monkeypatch):
    import comfy_extras.nodes_train
    import folder_paths
    monkeypatch.setattr(folder_paths, "get_temp_directory", lambda: str(tmp_path))
    result = comfy_extras.nodes_train.LossGraphNode().plot_loss(overfit.loss, "ipx_training_test")
    assert (tmp_path / result["ui"]["images"][0]["filename"]).is_file()


@pytest.fixture
def saved(host, overfit, tmp_path, monkeypatch):
    """The trained adapter written by the save node (fp32) into a temporary models/ipadapter, and that folder. The
    host's folder list and file-list cache are restored whatever happens (a failed assert included)."""
    import folder_paths
    monkeypatch.setattr(folder_paths, "models_dir", str(tmp_path))
    paths, extensions = folder_paths.folder_names_and_paths["ipadapter"]
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "ipadapter",  # first: the save folder
                        ([str(tmp_path / "ipadapter"), *paths], extensions))
    try:
        save = host.NODE_CLASS_MAPPINGS["IPXSaveAdapter"]
        name = save.execute(overfit.adapter, "trained/ipx", "fp32").result[0]
        assert name == "trained/ipx_00001_.safetensors" and (tmp_path / "ipadapter" / name).is_file()
        assert save.execute(overfit.adapter, "trained/ipx", "fp16").result[0] == "trained/ipx_00002_.safetensors"
        yield tmp_path / "ipadapter", name
    finally:
        folder_paths.filename_list_cache.pop("ipadapter", None)  # it lists the temporary folder


def training_prediction(probe, adapter, latent, timestep, context, embeds):
    """The training-time noise prediction (the patch as training installs it) for one latent."""
    with torch.inference_mode(False), torch.no_grad():
        trainer = probe.trainer(copy.deepcopy(adapter).float())
        return trainer.denoiser(latent, torch.tensor([timestep]), context, embeds)


def test_saved_adapter_predicts_through_the_apply_node_as_in_training(host, overfit, saved, host_sd15):
    """Saved, loaded by IPX Load IP-Adapter and applied by IPX Apply IP-Adapter, the adapter gives in sampling the
    noise prediction it gave in training (and one that differs from the plain model's)."""
    folder, name = saved
    loaded = host.NODE_CLASS_MAPPINGS["IPXLoadAdapter"].execute(name).result[0]
    for key, value in overfit.adapter.module.state_dict().items():
        assert torch.equal(loaded.module.state_dict()[key], value.float()), key
    g = torch.Generator().manual_seed(3)
    noise, context = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 768, generator=g)
    embeds = torch.randn(1, 1024, generator=g)
    apply = pack_module(host, "nodes.applying")
    image_embeds = apply.ImageEmbeds(embeds, torch.zeros_like(embeds), "image_embeds", "zero_embeds")
    patched = apply.apply_adapter(host_sd15, loaded, image_embeds, 1.0)
    timestep = 400
    sigma = sigma_at(host_sd15, timestep)
    applied, _, _ = predict_noise(patched, noise, sigma, context, context)
    plain, _, _ = predict_noise(host_sd15, noise, sigma, context, context)
    alpha = 1.0 / (1.0 + sigma ** 2)
    trained = training_prediction(overfit.probe, loaded.module, noise * (1 - alpha) ** 0.5, timestep, context,
                                  embeds)
    error = ((applied - trained).abs().max() / trained.abs().max()).item()
    assert error < 1e-4, f"applied vs training prediction: relative error {error:.2e}"
    assert ((applied - plain).abs().max() / plain.abs().max()).item() > 1e-2


def test_saved_adapter_loads_in_diffusers_and_predicts_as_in_training(overfit, saved, diffusers_unet):
    """diffusers' own load_ip_adapter reads the saved file; its UNet then predicts what training predicted, and
    something else than without the image prompt."""
    from diffusers import DiffusionPipeline
    from diffusers.loaders import IPAdapterMixin

    class UNetOnlyPipeline(DiffusionPipeline, IPAdapterMixin):
        _optional_components = ["image_encoder", "feature_extractor"]

        def __init__(self, unet, image_encoder=None, feature_extractor=None):
            super().__init__()
            self.register_modules(unet=unet, image_encoder=image_encoder, feature_extractor=feature_extractor)

    folder, name = saved
    pipe = UNetOnlyPipeline(copy.deepcopy(diffusers_unet))
    try:
        g = torch.Generator().manual_seed(4)
        latent, context = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 768, generator=g)
        embeds = torch.randn(1, 1024, generator=g)
        with torch.inference_mode():
            plain = pipe.unet(latent, 250, encoder_hidden_states=context).sample
        pipe.load_ip_adapter(str(folder), subfolder="", weight_name=name, image_encoder_folder=None,
                             local_files_only=True, low_cpu_mem_usage=False)
        with torch.inference_mode():
            ours = pipe.unet(latent, 250, encoder_hidden_states=context,
                             added_cond_kwargs={"image_embeds": [embeds[:, None]]}).sample
    finally:
        pipe.unet.to("meta")
        gc.collect()
    trained = training_prediction(overfit.probe, overfit.adapter.module, latent, 250, context, embeds)
    assert ((ours - trained).abs().max() / trained.abs().max()).item() < 1e-4
    assert ((ours - plain).abs().max() / plain.abs().max()).item() > 1e-2


def test_plus_variant_continues_from_an_adapter_file_without_changing_it(host, host_sd15, encoders, adapter_dir):
    start = host.NODE_CLASS_MAPPINGS["IPXLoadAdapter"].execute("ip-adapter-plus_sd15.safetensors").result[0]
    before = {k: v.clone() for k, v in start.module.state_dict().items()}
    adapter, loss = run_node(host, host_sd15, encoders, training_images(1, seed=2), steps=1, batch_size=1,
                             start_adapter=start, variant="sd15")
    assert adapter.spec.variant == "plus" and len(loss["loss"]) == 1
    assert all(torch.equal(v, before[k]) for k, v in start.module.state_dict().items())
    moved = max((v.float() - before[k].float()).abs().max().item() for k, v in adapter.module.state_dict().items())
    assert 0 < moved <= 2e-4 * 1.01, "one AdamW step of lr 1e-4 moves each weight by at most about 1e-4"


def cancelled_after_one_step(host, host_sd15, encoders, monkeypatch):
    """Runs the node for 5 steps, cancelled (as the host's Cancel does) when the first step is reported; returns the
    (step, steps) reported and the raised exception's info."""
    import comfy.model_management
    import comfy.utils
    seen = []

    def hook(value, total, preview, node_id=None):
        seen.append((value, total))
        comfy.model_management.interrupt_current_processing(True)

    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", hook)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException) as raised:
            run_node(host, host_sd15, encoders, training_images(1), steps=5, batch_size=1)
    finally:
        comfy.model_management.interrupt_current_processing(False)
    return seen, raised


def test_cancel_stops_training_at_the_next_step(host, host_sd15, encoders, monkeypatch):
    seen, _ = cancelled_after_one_step(host, host_sd15, encoders, monkeypatch)
    assert seen == [(1, 5)], "one step done and reported, then stopped"


def test_a_cancelled_training_lets_go_of_the_adapter_it_trained(host, glue, host_sd15, encoders, monkeypatch):
    """The exception's traceback keeps the training function's frame alive (the host's executor holds it while it
    reports the error): the adapter (on the GPU, with the trainer's copy of the UNet and the optimiser state) must
    not be kept by it."""
    import weakref
    made = []
    init_adapter = glue.init_adapter

    def tracked_init_adapter(*args, **kwargs):
        adapter = init_adapter(*args, **kwargs)
        made.append(weakref.ref(adapter))
        return adapter

    monkeypatch.setattr(glue, "init_adapter", tracked_init_adapter)
    _, raised = cancelled_after_one_step(host, host_sd15, encoders, monkeypatch)
    gc.collect()
    assert len(made) == 1 and raised.tb is not None
    assert made[0]() is None, "the cancelled training's adapter is still referenced"


def test_conditioning_replaces_the_captions(glue):
    cond = torch.randn(1, 154, 768)
    contexts = glue.contexts_from_conditioning([[cond, {}]], 3)
    assert contexts.shape == (3, 77, 768) and torch.equal(contexts[2], cond[0, :77])
    with pytest.raises(ValueError, match="2 entries for 3 images"):
        glue.contexts_from_conditioning([[cond, {}], [cond, {}]], 3)


def test_a_v_prediction_model_is_refused_before_any_work(host, host_sd15, encoders):
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete
    v_model = ModelSamplingDiscrete().patch(host_sd15, "v_prediction", False)[0]
    with pytest.raises(Exception, match="epsilon") as raised:
        run_node(host, v_model, encoders, training_images(1), steps=1, batch_size=1)
    assert "ModelSamplingAdvanced (1000 discrete sigmas)" in str(raised.value), "names the model's own sampling"


def test_training_attention_has_a_backward_pass_whatever_backend_the_host_runs(host, host_sd15, encoders,
                                                                                monkeypatch):
    """Started with --use-sage-attention (or flash), the host's attention has no backward pass: a stand-in with the
    sage backend's name that cuts gradients shows training then goes through PyTorch's attention instead."""
    import comfy.ldm.modules.attention as attention
    calls = []

    @attention.wrap_attn
    def attention_sage(q, k, v, heads, **kwargs):  # named as the host's: no gradients flow through it
        calls.append(q.shape)
        with torch.no_grad():
            return attention.attention_pytorch(q, k, v, heads, **kwargs)

    monkeypatch.setattr(attention, "optimized_attention", attention_sage)
    monkeypatch.setattr(attention, "optimized_attention_masked", attention_sage)
    adapter, loss = run_node(host, host_sd15, encoders, training_images(1), steps=1, batch_size=1)
    assert calls == [], "the sage stand-in was bypassed"
    assert len(loss["loss"]) == 1 and torch.isfinite(torch.tensor(loss["loss"])).all()
    glue = pack_module(host, None)
    options = glue.training_transformer_options({})
    assert options["optimized_attention_override"] is glue.pytorch_attention
    monkeypatch.undo()
    assert "optimized_attention_override" not in glue.training_transformer_options({}), "PyTorch's own is left alone"


def test_caption_encodings_kept_in_memory_are_bounded(host, glue, encoders, monkeypatch):
    monkeypatch.setattr(glue, "CONTEXT_MEMO", 3)
    hosted = glue.HostEncoders(encoders.vae, encoders.clip, encoders.clip_vision, glue.new_adapter_spec("sd15"))
    first = hosted.context("")
    for i in range(6):
        hosted.context(f"caption {i}")
    assert len(hosted._contexts) == 3 and "" in hosted._contexts and "caption 5" in hosted._contexts
    assert hosted.context("") is first, "the empty prompt (every dropped text) is never encoded twice"


def test_headless_trainer_starts_ip_layers_from_the_checkpoint_files_own_weights(host, glue, encoders, cache_dir,
                                                                                 monkeypatch):
    """scripts/train.py loads the UNet in the compute dtype; to_k_ip / to_v_ip start from the file's weights."""
    import importlib.util
    import comfy.sd
    from safetensors import safe_open
    spec = importlib.util.spec_from_file_location("ipx_train_script", PACK_DIR / "scripts" / "train.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    _, core = script.pack_modules(host)
    path = str(cache_dir / "models" / "checkpoints" / CHECKPOINT_NAME)
    model = comfy.sd.load_checkpoint_guess_config(path, output_vae=False, output_clip=False,
                                                  model_options={"dtype": torch.bfloat16})[0]
    monkeypatch.setattr(glue, "text_kv_weights", lambda *a: pytest.fail("fell back to the loaded model's weights"))
    weights = script.checkpoint_text_kv(path, model.model.diffusion_model, glue, core)
    assert sorted(weights) == list(range(1, 32, 2))
    with safe_open(path, "pt") as f:
        middle = f.get_tensor("model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight")
        first_v = f.get_tensor("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_v.weight")
    assert weights[31][0].dtype == torch.float32 and torch.equal(weights[31][0], middle.float())
    assert torch.equal(weights[1][1], first_v.float())
    cast = model.model.diffusion_model.middle_block[1].transformer_blocks[0].attn2.to_k.weight
    assert cast.dtype == torch.bfloat16 and not torch.equal(cast.float(), middle.float()), "the model is cast"
