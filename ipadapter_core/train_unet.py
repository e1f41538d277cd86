"""The frozen UNet as training uses it, for UNets laid out as the original latent-diffusion code lays them out
(CompVis ldm ``UNetModel``, which the host uses for SD1.5): ``input_blocks`` / ``middle_block`` / ``output_blocks``
whose spatial transformers hold ``transformer_blocks[i].attn2`` with ``to_k`` / ``to_v``, and a forward
``(x, timesteps=..., context=..., transformer_options=...)`` that honours attn2 replacement patches. Read through
attributes only: nothing here imports the host."""
import copy

import torch

from .layers import SD15_LAYERS


def cross_attention(diffusion_model, host_key):
    """The attn2 module of the UNet's transformer block at ``host_key`` = (block, id, block_index)."""
    block, number, index = host_key
    stage = {"input": lambda: diffusion_model.input_blocks[number], "middle": lambda: diffusion_model.middle_block,
             "output": lambda: diffusion_model.output_blocks[number]}[block]()
    transformer = next(m for m in stage if hasattr(m, "transformer_blocks"))
    return transformer.transformer_blocks[index].attn2


def text_kv_weights(diffusion_model) -> dict:
    """{layer_index: (to_k.weight, to_v.weight)} of the 16 cross-attention layers, float32 on the CPU."""
    out = {}
    for layer in SD15_LAYERS:
        attn2 = cross_attention(diffusion_model, layer.host_key)
        out[layer.layer_index] = tuple(w.detach().to("cpu", torch.float32) for w in (attn2.to_k.weight,
                                                                                      attn2.to_v.weight))
    return out


def frozen_unet(diffusion_model, dtype, device, copy_weights: bool):
    """The UNet as training uses it: in ``dtype`` on ``device``, requires_grad off, eval. With ``copy_weights`` a
    private copy (the input model is left as it was, and tensors made under inference mode become usable by
    autograd); otherwise the module itself."""
    unet = copy.deepcopy(diffusion_model) if copy_weights else diffusion_model
    return unet.to(device, dtype).requires_grad_(False).eval()


def unet_call(diffusion_model, compile_backend: str | None = None):
    """The UNet's forward at integer DDPM timesteps (its input is the noised latent itself: ComfyUI's sigma
    scaling x / sqrt(sigma^2 + 1) of x0 + sigma * eps is exactly sqrt(a) x0 + sqrt(1 - a) eps).

    ``compile_backend`` (e.g. ``"inductor"``): the forward is compiled with torch.compile for static shapes (every
    training micro-batch has the same shape), with the patch and the per-call image prompt inside one graph; the
    first steps take the compilation time, and a change of grad mode (an evaluation without gradients) compiles
    once more."""
    forward = diffusion_model
    if compile_backend:
        forward = torch.compile(diffusion_model, backend=compile_backend, dynamic=False)

    def call(x, timesteps, context, transformer_options):
        return forward(x, timesteps=timesteps.float(), context=context, transformer_options=transformer_options)
    return call
