"""IPX Apply: patch a clone of the model's 16 cross-attention layers with the adapter's decoupled attention."""
import torch

import comfy.ldm.modules.attention
import comfy.patcher_extension
from comfy_api.latest import io

from ..ipadapter_core import BY_TRANSFORMER_INDEX, SD15_LAYERS, DecoupledCrossAttention, ImagePrompt, fused
from ..ipadapter_core.weights import layer_weights_for, parse_layer_weights, parse_step_schedule
from ..ipadapter_core.embeds import ImageEmbeds, check_embeds_for
from ..ipadapter_core.errors import ModelMismatchError
from ..ipadapter_core.layers import SD15_CROSS_ATTENTION_DIM
from .encoding import encode_images
from .types import CATEGORY, AdapterSocket, EmbedsSocket, LoadedAdapter

WRAPPER_KEY = "ipx_ipadapter"


def host_attention(q, k, v, heads, attn_precision=None, skip_output_reshape=False, transformer_options=None):
    """The host's optimized attention, looked up at call time so backend switches and overrides are honoured."""
    return comfy.ldm.modules.attention.optimized_attention(q, k, v, heads, attn_precision=attn_precision,
                                                            skip_output_reshape=skip_output_reshape,
                                                            transformer_options=transformer_options)


def skips_host_wrappers(rows: int, transformer_options) -> bool:
    """Whether a patched layer calls PyTorch's fused attention itself rather than the host's attention function: when
    the host would run plain PyTorch attention, no node overrides attention and the batch is within the host's limit
    for one call. The math is the same softmax attention, without the host's per-call wrappers: it enters an SDPA
    backend-priority context (cuDNN first) on every call, which costs the CPU more than the attention's own launch
    (``benchmarks/attention_call_benchmark.py``) and, with cuDNN, an extra memset kernel. Otherwise the host's
    attention, so that other backends and overrides keep working."""
    attention = comfy.ldm.modules.attention
    return not (transformer_options and "optimized_attention_override" in transformer_options) and \
        attention.optimized_attention is attention.attention_pytorch and rows <= attention.SDP_BATCH_LIMIT


def host_text_attention(q, k, v, heads, attn_precision=None, skip_output_reshape=False, transformer_options=None):
    """A patched layer's text attention on (batch, tokens, heads * dim_head) inputs, direct where
    skips_host_wrappers allows it."""
    if not skips_host_wrappers(q.shape[0], transformer_options):
        return host_attention(q, k, v, heads, attn_precision=attn_precision, skip_output_reshape=skip_output_reshape,
                              transformer_options=transformer_options)
    batch, _, channels = q.shape
    q, k, v = (t.reshape(batch, -1, heads, channels // heads).transpose(1, 2) for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    return out if skip_output_reshape else out.transpose(1, 2).reshape(batch, -1, channels)


def host_image_attention(q, k, v, transformer_options):
    """The image attention on heads-split (rows, heads, tokens, dim_head) tensors, direct where skips_host_wrappers
    allows it."""
    if not skips_host_wrappers(q.shape[0], transformer_options):
        return comfy.ldm.modules.attention.optimized_attention(q, k, v, q.shape[1], skip_reshape=True,
                                                                skip_output_reshape=True,
                                                                transformer_options=transformer_options)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def host_fuse(q, transformer_options):
    """Whether the image attention of this call runs as one fused kernel (image attention, weighting and add): on
    the GPU in fp16/bf16 without gradients (fused.usable), for UNet calls big enough that the GPU's time, not the
    CPU's launches, sets the pace (fused.large_enough), and only when no node overrides the host's attention (an
    override sees every attention call, so the unfused path keeps calling it). The host's backend choice (PyTorch,
    xformers, sage, flash) only changes how the same softmax attention is computed; the fused kernel computes it
    exactly, with float32 scores and sums."""
    return "optimized_attention_override" not in transformer_options and fused.usable(q) and \
        fused.large_enough(q, transformer_options)


def check_model(model, adapter: LoadedAdapter) -> None:
    config = getattr(model.model, "model_config", None)
    unet_config = getattr(config, "unet_config", {}) or {}
    context_dim = unet_config.get("context_dim")
    name = type(config).__name__ if config is not None else type(model.model).__name__
    if context_dim != SD15_CROSS_ATTENTION_DIM or unet_config.get("adm_in_channels"):
        raise ModelMismatchError(f"{adapter.name} is an SD1.5 adapter (cross-attention width "
                                 f"{SD15_CROSS_ATTENTION_DIM}); the model is {name} (cross-attention width "
                                 f"{context_dim}). Use an SD1.5 checkpoint, or an adapter made for this model")


def sigma_range(model, start_at: float, end_at: float):
    """(sigma_start, sigma_end) for the host's percent convention, or None when the prompt acts on every step."""
    if not 0.0 <= start_at <= end_at <= 1.0:
        raise ValueError(f"start_at ({start_at}) and end_at ({end_at}) must satisfy 0 <= start_at <= end_at <= 1")
    if start_at <= 0.0 and end_at >= 1.0:
        return None
    sampling = model.get_model_object("model_sampling")
    return (sampling.percent_to_sigma(start_at), sampling.percent_to_sigma(end_at))


def clear_caches_after_run(executor, *args, **kwargs):
    """OUTER_SAMPLE wrapper: the image keys/values cached during a run are dropped when it ends."""
    try:
        return executor(*args, **kwargs)
    finally:
        options = executor.class_obj.model_options.get("transformer_options", {})
        for patch in options.get("patches_replace", {}).get("attn2", {}).values():
            if isinstance(patch, DecoupledCrossAttention):
                patch.clear_cache()


def prepare_unet_call(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None,
                      **kwargs):
    """APPLY_MODEL wrapper: before each UNet call, the patched layers fill their caches (image keys and values,
    resized masks) for this call's cond/uncond order, latent shape, device and dtype, outside the UNet, so that a
    compiled UNet only reads them (DecoupledCrossAttention.prepare). Each later call of a run finds them there."""
    options = transformer_options or {}
    patches = [p for p in options.get("patches_replace", {}).get("attn2", {}).values()
               if isinstance(p, DecoupledCrossAttention)]
    unet = getattr(executor.class_obj, "diffusion_model", None)  # (or the compiled module around it)
    if patches and hasattr(unet, "num_heads"):  # the host's UNetModel (SD1.5): heads per layer below
        model = executor.class_obj
        dtype = model.manual_cast_dtype or model.get_dtype()
        cond_or_uncond = options.get("cond_or_uncond") or [0]
        for patch in patches:
            per_head = getattr(unet, "num_head_channels", -1)
            heads = unet.num_heads if per_head == -1 else patch.layer.channels // per_head
            patch.prepare(cond_or_uncond, x.shape, x.device, dtype, heads)
    return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)


def check_mask(mask):
    """A host MASK ((H, W) or (B, H, W), values 0..1) as (B, H, W); a clear error for anything else."""
    if mask is None:
        return None
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3 or 0 in mask.shape:
        raise ValueError(f"the attention mask must be (height, width) or (batch, height, width), got "
                         f"{list(mask.shape)}")
    if not torch.isfinite(mask).all() or mask.min() < 0 or mask.max() > 1:
        raise ValueError(f"the attention mask must hold values in 0..1 (found {mask.min().item():.3g} .. "
                         f"{mask.max().item():.3g}); 1 = the image prompt acts, 0 = it does not")
    return mask.float()


def controls_to_prompt_args(weight: float, weight_type: str = "linear", weight_composition: float = 1.0,
                            layer_weights: str = "", step_weights: str = "") -> dict:
    """The per-layer and per-step controls as ImagePrompt arguments (layers by official index)."""
    by_transformer, neutral = layer_weights_for(weight_type, weight, weight_composition)
    by_transformer.update(parse_layer_weights(layer_weights))
    return dict(layer_weights={BY_TRANSFORMER_INDEX[t].layer_index: w for t, w in by_transformer.items()},
                neutral_layers={BY_TRANSFORMER_INDEX[t].layer_index for t in neutral},
                schedule=parse_step_schedule(step_weights))


def apply_adapter(model, adapter: LoadedAdapter, embeds: ImageEmbeds, weight: float, start_at: float = 0.0,
                  end_at: float = 1.0, *, weight_type: str = "linear", weight_composition: float = 1.0,
                  layer_weights: str = "", step_weights: str = "", embeds_scaling: str = "V only", mask=None):
    """A clone of ``model`` whose cross-attention layers add this image prompt; ``model`` itself is untouched."""
    check_model(model, adapter)
    check_embeds_for(adapter.spec, embeds)
    patched = model.clone()
    prompt = ImagePrompt(adapter.module, embeds.cond, embeds.uncond, weight, scaling=embeds_scaling,
                         sigma_range=sigma_range(patched, start_at, end_at), mask=check_mask(mask),
                         **controls_to_prompt_args(weight, weight_type, weight_composition, layer_weights,
                                                   step_weights))
    existing = patched.model_options["transformer_options"].get("patches_replace", {}).get("attn2", {})
    for layer in SD15_LAYERS:
        current = existing.get(layer.host_key, existing.get(layer.host_key[:2]))
        if isinstance(current, DecoupledCrossAttention):
            patch = current.stacked(prompt, models=[adapter.patcher])
        else:
            patch = DecoupledCrossAttention(layer, [prompt], host_text_attention, previous=current,
                                            models=[adapter.patcher], image_attention=host_image_attention,
                                            fuse=host_fuse)
        patched.set_model_attn2_replace(patch, *layer.host_key)
    for kind, wrapper in ((comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, clear_caches_after_run),
                          (comfy.patcher_extension.WrappersMP.APPLY_MODEL, prepare_unet_call)):
        if not comfy.patcher_extension.get_wrappers_with_key(kind, WRAPPER_KEY, patched.model_options,
                                                             is_model_options=True):
            patched.add_wrapper_with_key(kind, WRAPPER_KEY, wrapper)
    return patched


def weight_inputs():
    return [
        io.Float.Input("weight", default=1.0, min=-1.0, max=5.0, step=0.05,
                       tooltip="Strength of the image prompt: the image attention's output is multiplied by it before "
                               "it is added to the text attention's. 0 = plain model, 1 = as trained."),
        io.Float.Input("start_at", default=0.0, min=0.0, max=1.0, step=0.01,
                       tooltip="Fraction of the sampling schedule at which the image prompt starts acting (0 = first "
                               "step). Uses the host's percent-to-sigma convention, like ControlNet's start."),
        io.Float.Input("end_at", default=1.0, min=0.0, max=1.0, step=0.01,
                       tooltip="Fraction of the sampling schedule after which the image prompt stops acting (1 = "
                               "last step)."),
    ]


class ApplyAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IPXApplyAdapter",
            display_name="IPX Apply IP-Adapter",
            category=CATEGORY,
            description="Returns a copy of the model whose 16 cross-attention layers (middle block included) compute "
                        "attn(q, K_text, V_text) + weight * attn(q, to_k_ip(image tokens), to_v_ip(image tokens)). "
                        "Applying it again on the result stacks another adapter.",
            inputs=[io.Model.Input("model", tooltip="An SD1.5 model; it is not modified."),
                    AdapterSocket.Input("adapter", tooltip="From IPX Load IP-Adapter."),
                    EmbedsSocket.Input("embeds", tooltip="From IPX Encode Reference Image, made for this adapter."),
                    *weight_inputs()],
            outputs=[io.Model.Output(tooltip="The patched copy of the model.")],
        )

    @classmethod
    def execute(cls, model, adapter, embeds, weight, start_at, end_at):
        return io.NodeOutput(apply_adapter(model, adapter, embeds, weight, start_at, end_at))


class ApplyAdapterImage(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IPXApplyAdapterImage",
            display_name="IPX Apply IP-Adapter (image)",
            category=CATEGORY,
            description="Encode Reference Image and Apply IP-Adapter in one node.",
            inputs=[io.Model.Input("model", tooltip="An SD1.5 model; it is not modified."),
                    AdapterSocket.Input("adapter", tooltip="From IPX Load IP-Adapter."),
                    io.ClipVision.Input("clip_vision", tooltip="CLIP vision encoder; ViT-H/14 for SD1.5 adapters "
                                                               "(ViT-bigG/14 for *_vit-G)."),
                    io.Image.Input("image", tooltip="One or more reference images, any size; each is resized and "
                                                    "centre-cropped to 224x224. Several images form one prompt."),
                    *weight_inputs()],
            outputs=[io.Model.Output(tooltip="The patched copy of the model.")],
        )

    @classmethod
    def execute(cls, model, adapter, clip_vision, image, weight, start_at, end_at):
        embeds = encode_images(clip_vision, image, adapter)
        return io.NodeOutput(apply_adapter(model, adapter, embeds, weight, start_at, end_at))


NODES = [ApplyAdapter, ApplyAdapterImage]
