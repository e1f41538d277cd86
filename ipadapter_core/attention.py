"""Decoupled cross-attention: ``out = attn(q, K_text, V_text) + sum_i w_i * attn(q, to_k_ip_i(ip_i), to_v_ip_i(ip_i))``.

:class:`DecoupledCrossAttention` is the callable the host calls in place of one cross-attention layer, with the
``(q, k, v, extra_options)`` signature of ComfyUI's attn2 replacement patches. Nothing here imports the host: its
attention function is passed in (``attention=``) and defaults to PyTorch's scaled_dot_product_attention.

Each image prompt (prompt.ImagePrompt: an adapter, its reference images and controls) adds one attention call and one
add per layer. Performance rules, since the patch runs 16 times per UNet call: no GPU->CPU synchronisation (no
``.item()``, no branch on tensor values), and nothing computed per call that can be computed per run.
"""
import copy

import torch
from torch.nn import functional as F

from . import fused
from .layers import CrossAttentionLayer
from .prompt import ImagePrompt  # noqa: F401  (re-exported: the patch's companion)


def sdpa_attention(q, k, v, heads, attn_precision=None, skip_output_reshape=False, transformer_options=None,
                   **kwargs):
    """Multi-head attention on (batch, tokens, heads * dim_head) inputs, as the host's attention functions take them;
    with ``skip_output_reshape`` the output stays (batch, heads, tokens, dim_head)."""
    b, _, inner = q.shape
    q, k, v = (t.reshape(b, -1, heads, inner // heads).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    return out if skip_output_reshape else out.transpose(1, 2).reshape(b, -1, inner)


def heads_first(out, batch, tokens, heads):
    """An attention output as (batch, heads, tokens, dim_head), a view where the layout allows. It may come as
    (rows, heads, rows_tokens, dim_head) or (rows, rows_tokens, heads * dim_head) with rows * rows_tokens ==
    batch * tokens: the host's backends differ in what they return for skip_output_reshape."""
    if out.ndim == 4:
        out = out.transpose(1, 2)
    return out.reshape(batch, tokens, heads, -1).transpose(1, 2)


class DecoupledCrossAttention:
    """The attn2 replacement for one layer: text attention (or the replacement that was there before), plus each
    image prompt's weighted attention over its own image keys and values."""

    def __init__(self, layer: CrossAttentionLayer, prompts, attention=sdpa_attention, previous=None, models=(),
                 image_attention=None, fuse=None):
        """``attention(q, k, v, heads, attn_precision, skip_output_reshape, transformer_options)`` computes the text
        attention (and the image attention unless ``image_attention`` is given); ``image_attention(q, k, v,
        transformer_options)`` takes heads-split (rows, heads, tokens, dim_head) tensors and returns the same.
        ``fuse(q, transformer_options)``: whether this call's image attention may run as fused.attention_add (one
        kernel per prompt: image attention, weighting and the add, written in the output layout); None: never."""
        self.layer = layer
        self.prompts = tuple(prompts)
        self.attention = attention
        self.image_attention = image_attention
        self.previous = previous
        self._models = tuple(models)
        self.fuse = fuse

    def __call__(self, q, k, v, extra_options):
        heads = extra_options["n_heads"]
        precision = extra_options.get("attn_precision")
        batch, tokens, channels = q.shape
        if self.previous is not None:
            out = self.previous(q, k, v, extra_options)
        else:
            out = self.attention(q, k, v, heads, attn_precision=precision, skip_output_reshape=True,
                                 transformer_options=extra_options)
        if out.ndim != 4 or out.shape[0] != batch:
            out = heads_first(out, batch, tokens, heads)
        cond_or_uncond = extra_options.get("cond_or_uncond") or [0]
        if self.fuse is not None and self.prompts and self.fuse(q, extra_options):
            try:
                return self._fused(q, out, heads, cond_or_uncond, extra_options)
            except torch.OutOfMemoryError:
                raise
            except Exception as error:  # the fused kernel is an optimisation: never the reason a prompt fails
                fused.switch_off(error)  # (``out`` is untouched: the first prompt writes a new tensor)
        # The adds run on (batch, tokens, heads, dim_head) views, the layout the result is returned in (and the one
        # flash attention's outputs already have): the sum then reshapes to (batch, tokens, channels) as a view. Added
        # in (batch, heads, tokens, dim_head) order instead, torch.compile materialised that order and then copied it.
        out = out.transpose(1, 2)
        for prompt in self.prompts:
            ip_out = self._image_term(prompt, q, heads, precision, cond_or_uncond, extra_options)
            if ip_out.ndim != 4 or ip_out.shape[0] != batch:
                ip_out = heads_first(ip_out, batch, tokens, heads)
            if prompt.has_factor:
                factor = prompt.factor(extra_options, tokens, batch, q.device, out.dtype)
                out = torch.addcmul(out, ip_out.transpose(1, 2), factor.transpose(1, 2))
            else:
                out = out + ip_out.transpose(1, 2)
        return out.reshape(batch, tokens, channels)

    def _fused(self, q, out, heads, cond_or_uncond, extra_options):
        batch, tokens, _ = q.shape
        result = None
        for prompt in self.prompts:  # the first prompt writes the output layout; the next ones add to it in place
            ip_k, ip_v = prompt.layer_kv(self.layer.layer_index, cond_or_uncond, batch, q.device, q.dtype, heads)
            factor = prompt.factor(extra_options, tokens, batch, q.device, q.dtype) if prompt.has_factor else None
            result = fused.attention_add(q, out, ip_k, ip_v, factor, result)
            out = result.unflatten(-1, (heads, -1)).transpose(1, 2)
        return result

    def _image_term(self, prompt, q, heads, precision, cond_or_uncond, extra_options):
        # Attention treats queries independently, so the latents sharing one row of image keys (a cond/uncond chunk)
        # can be one long sequence: one attention call, no per-latent copies of the keys and values.
        batch, _, channels = q.shape
        if self.image_attention is not None:
            ip_k, ip_v = prompt.layer_kv(self.layer.layer_index, cond_or_uncond, batch, q.device, q.dtype, heads)
            q_rows = q.reshape(ip_k.shape[0], -1, heads, channels // heads).transpose(1, 2)
            return self.image_attention(q_rows, ip_k, ip_v, extra_options)
        ip_k, ip_v = prompt.layer_kv(self.layer.layer_index, cond_or_uncond, batch, q.device, q.dtype)
        return self.attention(q.reshape(ip_k.shape[0], -1, channels), ip_k, ip_v, heads, attn_precision=precision,
                              skip_output_reshape=True, transformer_options=extra_options)

    def prepare(self, cond_or_uncond, latent_shape, device, dtype, heads):
        """Before a UNet call (the host's apply_model, outside a compiled UNet): compute and keep what this layer's
        call will read from the prompts' caches, the image keys and values and the masks. The call itself then
        only looks them up, so torch.compile captures one graph for every step of a run (not one more for the
        first step, which would compute them) and CUDA graphs never own them. Keys that do not match the call
        (another dtype, say) only mean the call computes its own, as without this."""
        batch = latent_shape[0]
        kv_heads = heads if self.image_attention is not None or self.fuse is not None else None
        for prompt in self.prompts:
            if prompt.cache:
                prompt.layer_kv(self.layer.layer_index, cond_or_uncond, batch, device, dtype, kv_heads)
                prompt.prepare_masks(cond_or_uncond, latent_shape, device, dtype)

    def stacked(self, prompt: ImagePrompt, models=()):
        """A new patch with one more image prompt; this one is left as it is."""
        return DecoupledCrossAttention(self.layer, self.prompts + (prompt,), self.attention, self.previous,
                                       self._models + tuple(models), self.image_attention, self.fuse)

    def to(self, device_or_dtype):
        # Caches are keyed by device and dtype, and the adapter weights travel through models(): nothing to move.
        return self

    def models(self):
        previous = list(self.previous.models()) if hasattr(self.previous, "models") else []
        return previous + list(self._models)

    def clear_cache(self):
        for prompt in self.prompts:
            prompt.clear_cache()

    def __deepcopy__(self, memo):
        # The host deep-copies model options on every clone: share the prompts (weights, embeddings, caches).
        previous = copy.deepcopy(self.previous, memo) if self.previous is not None else None
        return DecoupledCrossAttention(self.layer, self.prompts, self.attention, previous, self._models,
                                       self.image_attention, self.fuse)
