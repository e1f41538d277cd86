"""One UNet call through the host's real sampling path (sample_custom -> CFGGuider -> calc_cond_batch), returning the
noise predictions for cond and uncond, batched together as the sampler batches them."""
import torch


def _one_step(model, x, sigmas, extra_args=None, callback=None, disable=None):
    return model(x, sigmas[0] * x.new_ones([x.shape[0]]), **(extra_args or {}))


def predict_noise(model, noise, sigma, cond_context, uncond_context):
    """(eps_cond, eps_uncond, x_in) for latent input x_in = noise * sigma at noise level ``sigma``.

    The host's eps model returns denoised = x - eps * sigma; the cfg hook receives x - denoised = eps * sigma."""
    import comfy.sample
    import comfy.samplers

    captured = {}

    def capture(args):
        captured["cond"], captured["uncond"], captured["x"] = args["cond"], args["uncond"], args["input"]
        return args["cond"]

    patched = model.clone()
    patched.set_model_sampler_cfg_function(capture, disable_cfg1_optimization=True)
    sampler = comfy.samplers.KSAMPLER(_one_step)
    sigmas = torch.tensor([float(sigma), 0.0])
    with torch.inference_mode():
        comfy.sample.sample_custom(patched, noise, 2.0, sampler, sigmas, [[cond_context, {}]], [[uncond_context, {}]],
                                   torch.zeros_like(noise))
    return captured["cond"] / sigma, captured["uncond"] / sigma, captured["x"]


def sigma_at(model, timestep: int) -> float:
    """The schedule's sigma for an integer timestep, so the host's timestep() gives back exactly that integer."""
    return float(model.get_model_object("model_sampling").sigmas[timestep])
