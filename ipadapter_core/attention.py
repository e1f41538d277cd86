"""Decoupled cross-attention: ``out = attn(q, K_text, V_text) + sum_i w_i * attn(q, to_k_ip_i(ip_i), to_v_ip_i(ip_i))``.

:class:`ImagePrompt` is one applied adapter (its module, the encoded reference images, weight and active sigma range);
:class:`DecoupledCrossAttention` is the callable the host calls in place of one cross-attention layer, with the
``(q, k, v, extra_options)`` signature of ComfyUI's attn2 replacement patches. Nothing here imports the host: its
attention function is passed in (``attention=``) and defaults to PyTorch's scaled_dot_product_attention.

Performance rules, since the patch runs 16 times per UNet call: no GPU->CPU synchronisation (no ``.item()``, no branch
on tensor values); image keys/values are projected once per sampling run per layer and batch layout, the weight is
folded into the values, and the start/end gate is computed once per UNet call (the host passes the same ``sigmas``
tensor to all 16 layers) on the device.
"""
import copy

import torch
from torch.nn import functional as F

from .layers import CrossAttentionLayer


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


class ImagePrompt:
    """One adapter applied with one set of reference images. Shared (not copied) by the 16 layer patches of one apply
    and by every clone of the patched model; its caches hold only values derived from immutable inputs.

    ``cond_embeds`` / ``uncond_embeds``: the encoder outputs the adapter reads, one row per reference image; several
    images are concatenated along the token axis, as diffusers does for several images per prompt.
    ``per_latent``: instead, row i is the image prompt of latent i of each cond/uncond chunk (training, batches of
    different references); the chunk size must then equal the number of rows.
    ``sigma_range``: (sigma_start, sigma_end) between which the prompt acts, or None for always.
    ``layer_weights``: optional {layer_index: multiplier} on top of ``weight``.
    ``cache``: keep image tokens and keys/values for the run; False recomputes them in every call, so that gradients
    reach the adapter (training).
    """

    def __init__(self, adapter, cond_embeds, uncond_embeds, weight=1.0, sigma_range=None, layer_weights=None,
                 cache=True, per_latent=False):
        if cond_embeds.shape != uncond_embeds.shape:
            raise ValueError(f"cond embeds {list(cond_embeds.shape)} and uncond embeds {list(uncond_embeds.shape)} "
                             f"must have the same shape")
        self.adapter = adapter
        self.cond_embeds = cond_embeds
        self.uncond_embeds = uncond_embeds
        self.weight = float(weight)
        self.sigma_range = sigma_range
        self.layer_weights = dict(layer_weights or {})
        self.cache = cache
        self.per_latent = per_latent
        self.clear_cache()

    def clear_cache(self):
        self._tokens = {}
        self._kv = {}
        self._gate_for = None
        self._gate = None

    def layer_weight(self, layer_index: int) -> float:
        return self.weight * self.layer_weights.get(layer_index, 1.0)

    def image_tokens(self) -> torch.Tensor:
        """(2, rows, tokens, dim): [0] the conditional image prompt, [1] the unconditional one; one row holding every
        reference image's tokens, or one row per latent with ``per_latent``. Computed where the adapter's weights
        are; the embeddings travel there without blocking the host."""
        param = next(self.adapter.parameters())
        key = (param.device, param.dtype)
        tokens = self._tokens.get(key) if self.cache else None
        if tokens is None:
            embeds = torch.cat([self.cond_embeds, self.uncond_embeds])
            embeds = embeds.to(param.device, param.dtype, non_blocking=True)
            tokens = self.adapter.image_tokens(embeds)
            rows = self.cond_embeds.shape[0] if self.per_latent else 1
            tokens = tokens.reshape(2, rows, -1, tokens.shape[-1])
            if self.cache:
                self._tokens[key] = tokens
        return tokens

    def layer_kv(self, layer_index: int, cond_or_uncond, batch: int, device, dtype):
        """Image keys and values for one layer, laid out in the host's cond/uncond chunk order: (rows, tokens,
        channels) each, where rows = one per chunk (its latents share them: no per-latent copies are made) or, with
        ``per_latent``, one per latent."""
        key = (layer_index, tuple(cond_or_uncond), device, dtype)
        kv = self._kv.get(key) if self.cache else None
        if kv is None:
            ip_k, ip_v = self.adapter.project_kv(layer_index, self.image_tokens())
            ip_v = ip_v * self.layer_weight(layer_index)
            rows = [1 if c == 1 else 0 for c in cond_or_uncond]
            kv = tuple(torch.cat([t[r] for r in rows]).to(device, dtype) for t in (ip_k, ip_v))
            if self.cache:
                self._kv[key] = kv
        if self.per_latent and kv[0].shape[0] != batch:
            raise ValueError(f"per-latent image prompts: {self.cond_embeds.shape[0]} reference rows for "
                             f"{batch // len(cond_or_uncond)} latents per chunk; they must be equal")
        return kv

    def gate(self, sigmas, dtype):
        """None when always active; else a 0/1 tensor computed on the device, once per UNet call."""
        if self.sigma_range is None or sigmas is None:
            return None
        if self._gate_for is not sigmas:
            # The host passes one sigma per latent (not per cond/uncond chunk) and, like its own ControlNet and
            # conditioning ranges, decides on the first: a (1, 1, 1) gate that broadcasts over the whole batch.
            start, end = self.sigma_range
            s = sigmas.reshape(-1)[:1].reshape(1, 1, 1)
            self._gate = ((s <= start) & (s >= end)).to(dtype)
            self._gate_for = sigmas
        return self._gate


class DecoupledCrossAttention:
    """The attn2 replacement for one layer: text attention (or the replacement that was there before), plus each
    image prompt's weighted attention over its own image keys and values."""

    def __init__(self, layer: CrossAttentionLayer, prompts, attention=sdpa_attention, previous=None, models=()):
        self.layer = layer
        self.prompts = tuple(prompts)
        self.attention = attention
        self.previous = previous
        self._models = tuple(models)

    def __call__(self, q, k, v, extra_options):
        heads = extra_options["n_heads"]
        precision = extra_options.get("attn_precision")
        batch, tokens, channels = q.shape
        if self.previous is not None:
            out = self.previous(q, k, v, extra_options)
        else:
            out = self.attention(q, k, v, heads, attn_precision=precision, skip_output_reshape=True,
                                 transformer_options=extra_options)
        out = heads_first(out, batch, tokens, heads)
        cond_or_uncond = extra_options.get("cond_or_uncond") or [0]
        sigmas = extra_options.get("sigmas")
        for prompt in self.prompts:
            ip_k, ip_v = prompt.layer_kv(self.layer.layer_index, cond_or_uncond, batch, q.device, q.dtype)
            # Attention treats queries independently, so the latents sharing one row of image keys (a cond/uncond
            # chunk) can be one long sequence: one attention call, no per-latent copies of the keys and values.
            ip_out = self.attention(q.reshape(ip_k.shape[0], -1, channels), ip_k, ip_v, heads,
                                    attn_precision=precision, skip_output_reshape=True,
                                    transformer_options=extra_options)
            ip_out = heads_first(ip_out, batch, tokens, heads)
            gate = prompt.gate(sigmas, out.dtype)
            out = out + ip_out if gate is None else torch.addcmul(out, ip_out, gate)
        return out.transpose(1, 2).reshape(batch, tokens, channels)

    def stacked(self, prompt: ImagePrompt, models=()):
        """A new patch with one more image prompt; this one is left as it is."""
        return DecoupledCrossAttention(self.layer, self.prompts + (prompt,), self.attention, self.previous,
                                       self._models + tuple(models))

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
        return DecoupledCrossAttention(self.layer, self.prompts, self.attention, previous, self._models)
