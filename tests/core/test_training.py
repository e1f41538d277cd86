"""Training in the core alone: initialisation, how batches are drawn, and the loop (through the real decoupled
attention patch, on a small stand-in network with SD1.5's 16 cross-attention layers; see test_training_fakes)."""
import math

import pytest
import torch

from ipadapter_core import detect_variant
from ipadapter_core.train_batches import (DropRates, EncodedExamples, dataset_indices, draw, rank_positions,
                                          sample_latents, training_inputs)
from ipadapter_core.training import (AdapterTrainer, TrainingSettings, adapter_from_start, init_adapter,
                                     new_adapter_spec)

from .test_training_fakes import (FakeCrossAttentionUNet, assert_same_training, fake_dropped, fake_examples,
                                 sd15_alphas_cumprod, unet_call)

LATENT = (4, 4, 4)


@pytest.fixture(scope="module")
def unet():
    return FakeCrossAttentionUNet(seed=0).requires_grad_(False)


def make_trainer(unet, adapter=None, examples=None, **settings):
    examples = examples if examples is not None else fake_examples(4)
    adapter = adapter or init_adapter(new_adapter_spec("sd15"), unet.text_kv(), seed=1)
    return AdapterTrainer(adapter, unet_call(unet), num_examples=len(examples), dropped=fake_dropped(),
                          alphas_cumprod=sd15_alphas_cumprod(), latent_scale=0.18215,
                          settings=TrainingSettings(**settings))


def adapter_weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.adapter.state_dict().items()}


# --- initialisation ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant, tensors", [("sd15", 36), ("plus", 83)])
def test_new_adapter_has_the_official_layout_of_its_variant(unet, variant, tensors):
    adapter = init_adapter(new_adapter_spec(variant), unet.text_kv())
    state_dict = adapter.state_dict()
    assert len(state_dict) == tensors
    assert detect_variant(state_dict).variant == variant
    assert all(v.dtype == torch.float32 for v in state_dict.values())


def test_image_keys_and_values_start_as_the_layers_text_keys_and_values(unet):
    adapter = init_adapter(new_adapter_spec("plus"), unet.text_kv())
    for index, (to_k, to_v) in unet.text_kv().items():
        assert torch.equal(adapter.layer(index).to_k_ip.weight, to_k)
        assert torch.equal(adapter.layer(index).to_v_ip.weight, to_v)
        assert adapter.layer(index).to_k_ip.weight.data_ptr() != to_k.data_ptr(), "a copy, not the UNet's tensor"


def test_projection_initialisation_is_seeded(unet):
    first, again, other = (init_adapter(new_adapter_spec("sd15"), unet.text_kv(), seed=s).image_proj.proj.weight
                           for s in (3, 3, 4))
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_starting_adapter_is_copied_to_float32_and_left_untouched(unet):
    start = {k: v.half() for k, v in init_adapter(new_adapter_spec("sd15"), unet.text_kv()).state_dict().items()}
    before = {k: v.clone() for k, v in start.items()}
    trainer = make_trainer(unet, adapter=adapter_from_start(start))
    trainer.train_step(fake_examples(4).select)
    assert all(torch.equal(start[k], before[k]) for k in start)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in trainer.adapter.parameters())


def test_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="full_face"):
        new_adapter_spec("full_face")


# --- batches -----------------------------------------------------------------------------------------------------------

def test_a_positions_draw_does_not_depend_on_the_batch_it_is_in():
    drops = DropRates()
    whole = draw(7, range(0, 6), LATENT, drops)
    parts = [draw(7, range(0, 2), LATENT, drops), draw(7, range(2, 6), LATENT, drops)]
    for name in ("noise", "posterior_noise", "timesteps", "drop_image", "drop_text"):
        assert torch.equal(getattr(whole, name), torch.cat([getattr(p, name) for p in parts])), name


def test_drops_follow_the_official_rates():
    draws = draw(0, range(4000), (1, 1, 1), DropRates(0.05, 0.05, 0.05))
    image_only = (draws.drop_image & ~draws.drop_text).float().mean().item()
    text_only = (draws.drop_text & ~draws.drop_image).float().mean().item()
    both = (draws.drop_image & draws.drop_text).float().mean().item()
    for name, value in (("image", image_only), ("text", text_only), ("both", both)):
        assert 0.035 < value < 0.065, f"{name} dropped in {value:.3f} of samples, expected 0.05"
    assert draws.timesteps.min() >= 0 and draws.timesteps.max() <= 999
    assert draws.timesteps.float().std() > 250, "timesteps are uniform over 0..999"


def test_every_epoch_visits_every_example_once():
    order = dataset_indices(3, range(0, 30), 10)
    assert [sorted(order[i:i + 10]) for i in (0, 10, 20)] == [list(range(10))] * 3
    assert order[:10] != order[10:20], "a new order each epoch"


def test_processes_take_consecutive_slices_of_the_global_batch():
    assert rank_positions(16, 4, world_size=2, rank=0) == [16, 17, 18, 19]
    assert rank_positions(16, 4, world_size=2, rank=1) == [20, 21, 22, 23]


def test_training_inputs_noise_the_sampled_latent_and_replace_dropped_inputs():
    examples = fake_examples(3)
    dropped = fake_dropped()
    draws = draw(1, range(3), LATENT, DropRates(0, 0, 0))
    draws.drop_image = torch.tensor([True, False, True])
    draws.drop_text = torch.tensor([False, True, True])
    alphas = sd15_alphas_cumprod()
    inputs = training_inputs(examples, draws, dropped, alphas, 0.5)
    x0 = 0.5 * sample_latents(examples.latents, draws.posterior_noise)
    a = alphas.float()[draws.timesteps].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(inputs.noisy_latents, a.sqrt() * x0 + (1 - a).sqrt() * draws.noise)
    assert torch.equal(inputs.target, draws.noise)
    assert torch.equal(inputs.image_embeds[0], dropped.image_embeds[0])
    assert torch.equal(inputs.image_embeds[1], examples.image_embeds[1])
    assert torch.equal(inputs.contexts[0], examples.contexts[0])
    assert torch.equal(inputs.contexts[1], dropped.context[0]) and torch.equal(inputs.contexts[2], dropped.context[0])


def test_posterior_sample_is_mean_plus_std_times_noise():
    mean, logvar = torch.randn(2, 4, 3, 3), torch.full((2, 4, 3, 3), -2.0)
    noise = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(sample_latents(torch.cat([mean, logvar], 1), noise), mean + math.exp(-1.0) * noise)
    assert torch.equal(sample_latents(mean, noise), mean), "plain latents pass through"


# --- the loop ----------------------------------------------------------------------------------------------------------

def test_loss_falls_when_overfitting_a_few_examples(unet):
    examples = fake_examples(4)
    trainer = make_trainer(unet, examples=examples, batch_size=4)
    probe = range(10 ** 6, 10 ** 6 + 4)  # fixed noise, timesteps and drops for the before/after comparison
    before = trainer.evaluation_loss(examples, probe)
    for _ in range(30):
        trainer.train_step(examples.select)
    after = trainer.evaluation_loss(examples, probe)
    assert after < 0.6 * before, f"loss {before:.3f} -> {after:.3f}"
    assert len(trainer.loss_history()) == 30


def test_only_the_adapter_changes_and_all_of_it_trains(unet):
    unet_before = {k: v.clone() for k, v in unet.state_dict().items()}
    trainer = make_trainer(unet, batch_size=2)
    start = adapter_weights(trainer)
    trainer.train_step(fake_examples(4).select)
    assert all(torch.equal(v, unet_before[k]) for k, v in unet.state_dict().items())
    assert all(p.grad is None for p in unet.parameters())
    unchanged = [k for k, v in adapter_weights(trainer).items() if torch.equal(v, start[k])]
    assert not unchanged, f"these adapter weights did not train: {unchanged}"


def test_image_tokens_are_projected_once_per_unet_call_for_the_conditional_rows_only(unet, monkeypatch):
    """As the official model: one projection of the batch's embeds per forward, read by all 16 layers (the
    gradient still reaches every layer's to_k_ip / to_v_ip and the projection)."""
    trainer = make_trainer(unet, batch_size=2, grad_accumulation=3)
    rows = []
    project = type(trainer.adapter).image_tokens
    monkeypatch.setattr(type(trainer.adapter), "image_tokens",
                        lambda self, embeds: rows.append(embeds.shape[0]) or project(self, embeds))
    start = adapter_weights(trainer)
    trainer.train_step(fake_examples(4).select)
    assert rows == [2, 2, 2], "one projection of the micro-batch's 2 rows per UNet call, no unconditional half"
    unchanged = [k for k, v in adapter_weights(trainer).items() if torch.equal(v, start[k])]
    assert not unchanged, f"these adapter weights did not train: {unchanged}"


def test_plus_variant_trains_through_zero_pixel_drops(unet):
    examples = fake_examples(2, embeds_shape=(257, 1280))
    adapter = init_adapter(new_adapter_spec("plus"), unet.text_kv())
    trainer = AdapterTrainer(adapter, unet_call(unet), num_examples=2, dropped=fake_dropped((257, 1280)),
                             alphas_cumprod=sd15_alphas_cumprod(), latent_scale=0.18215,
                             settings=TrainingSettings(batch_size=2, drops=DropRates(0.5, 0.0, 0.0)))
    start = adapter_weights(trainer)
    loss = trainer.train_step(examples.select)
    assert torch.isfinite(loss)
    assert not torch.equal(adapter_weights(trainer)["image_proj.latents"], start["image_proj.latents"])


def test_gradient_accumulation_equals_the_combined_batch(unet):
    combined, accumulated = make_trainer(unet, batch_size=2), make_trainer(unet, batch_size=1, grad_accumulation=2)
    for trainer in (combined, accumulated):
        for _ in range(2):
            trainer.train_step(fake_examples(4).select)
    assert combined.samples_seen == accumulated.samples_seen == 4
    assert_same_training(combined.state_dict(), accumulated.state_dict(), combined.settings.learning_rate, steps=2)


def test_same_seed_same_adapter_and_resuming_changes_nothing(unet):
    straight = make_trainer(unet, batch_size=2, seed=9)
    for _ in range(3):
        straight.train_step(fake_examples(4).select)
    first = make_trainer(unet, batch_size=2, seed=9)
    first.train_step(fake_examples(4).select)
    resumed = make_trainer(unet, adapter=init_adapter(new_adapter_spec("sd15"), unet.text_kv(), seed=77),
                           batch_size=2, seed=9)
    resumed.load_state_dict(first.state_dict())
    for _ in range(2):
        resumed.train_step(fake_examples(4).select)
    assert resumed.step == 3 and resumed.samples_seen == straight.samples_seen
    for key, value in adapter_weights(straight).items():
        assert torch.equal(adapter_weights(resumed)[key], value), key


def test_a_different_seed_trains_differently(unet):
    a, b = make_trainer(unet, batch_size=2, seed=1), make_trainer(unet, batch_size=2, seed=2)
    for trainer in (a, b):
        trainer.train_step(fake_examples(4).select)
    assert not torch.equal(adapter_weights(a)["ip_adapter.1.to_k_ip.weight"],
                           adapter_weights(b)["ip_adapter.1.to_k_ip.weight"])


def test_examples_select_keeps_rows_in_the_order_asked():
    examples = fake_examples(5)
    picked = examples.select([4, 0, 4])
    assert isinstance(picked, EncodedExamples) and len(picked) == 3
    assert torch.equal(picked.contexts[0], examples.contexts[4]) and torch.equal(picked.contexts[2],
                                                                                 examples.contexts[4])


def test_training_through_a_compiled_unet_is_one_graph_and_trains_as_eager(unet):
    """torch.compile friendliness of training (a first step towards compiling the UNet for speed): the UNet call, with
    the patch and a new conditional image prompt in every call, is captured as one graph with no break and no
    recompilation across steps, and gives the eager updates exactly (aot_eager: Dynamo and AOTAutograd, no codegen)."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(unet, backend="aot_eager")
    examples = fake_examples(4)
    trainers = [make_trainer(unet, examples=examples, batch_size=2)]
    trainers.append(AdapterTrainer(init_adapter(new_adapter_spec("sd15"), unet.text_kv(), seed=1),
                                   lambda x, t, c, o: compiled(x, t, c, o), num_examples=len(examples),
                                   dropped=fake_dropped(), alphas_cumprod=sd15_alphas_cumprod(), latent_scale=0.18215,
                                   settings=TrainingSettings(batch_size=2)))
    start = adapter_weights(trainers[0])
    for _ in range(3):
        for trainer in trainers:
            trainer.train_step(examples.select)
    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    torch._dynamo.reset()
    assert (graphs, breaks) == (1, 0), f"{graphs} graphs, {breaks} graph breaks"
    eager, compiled_weights = adapter_weights(trainers[0]), adapter_weights(trainers[1])
    assert any(not torch.equal(eager[k], start[k]) for k in eager)  # it trained
    for name in eager:
        torch.testing.assert_close(compiled_weights[name], eager[name], rtol=0, atol=1e-6, msg=name)
