"""ImagePrompt: one adapter applied with one set of reference images and its controls (per-layer weights, K/V
scaling, start/end, per-step schedule, attention mask).

Per sampling run, per layer, the image keys and values are projected once (weights folded in); per UNet call, the
start/end gate and the step's weight are one small tensor computed on the device (the host passes the same ``sigmas``
tensor to all 16 layers); per layer resolution, the mask is resized once. Nothing reads a tensor back to the host.
"""
import torch
from torch.nn import functional as F

from .weights import schedule_table

SCALINGS = ("V only", "K+V", "K+V w/ C penalty", "K+mean(V) w/ C penalty")


def scale_kv(ip_k, ip_v, weight: float, scaling: str):
    """The weight applied to the image keys/values. 'V only' scales the values (= the attention output, exactly);
    'K+V' scales keys too (a sharper or flatter softmax); the 'C penalty' forms first multiply the weight by
    channels / 1280 (weaker in the 320- and 640-wide layers); 'K+mean(V)' scales only the values' token mean."""
    if scaling == "V only":
        return ip_k, ip_v * weight
    if scaling not in SCALINGS:
        raise ValueError(f"unknown embeds scaling '{scaling}'; one of: {', '.join(SCALINGS)}")
    if "C penalty" in scaling:
        weight = weight * ip_k.shape[-1] / 1280.0
    if scaling.startswith("K+mean(V)"):
        mean = ip_v.mean(dim=-2, keepdim=True)
        return ip_k * weight, ip_v - mean + mean * weight
    return ip_k * weight, ip_v * weight


def mark_static(tensors):
    """Tell torch.compile that these tensors' sizes are fixed: an adapter with another number of image tokens (plus
    after base, or more reference images) on the same compiled UNet then gets a graph of its own. Otherwise Dynamo
    makes the token count a symbolic size in one graph for both (automatic dynamic shapes), whose generated code costs
    the CPU far more per step. Only for tensors made outside a compiled region (the keys and values computed before
    each UNet call: see DecoupledCrossAttention.prepare)."""
    if torch.compiler.is_compiling():
        return
    for tensor in tensors:
        torch._dynamo.mark_static(tensor)


def layer_grid(extra_options, tokens: int):
    """(h, w) of the layer's token grid, from the activation shape the host reports (or the latent's shape)."""
    shape = extra_options.get("activations_shape") or extra_options.get("original_shape")
    if shape is not None and len(shape) == 4:
        h, w = shape[-2:]
        for factor in (1, 2, 4, 8, 16):
            gh, gw = -(-h // factor), -(-w // factor)
            if gh * gw == tokens:
                return gh, gw
    raise ValueError(f"cannot tell the token grid of a layer with {tokens} tokens (host shapes: {shape})")


class ImagePrompt:
    """Shared (not copied) by the 16 layer patches of one apply and by every clone of the patched model.

    ``cond_embeds`` / ``uncond_embeds``: the encoder outputs the adapter reads, one row per reference image; several
    images are concatenated along the token axis, as diffusers does for several images per prompt. ``uncond_embeds``
    None: a prompt for conditional chunks only (training calls the UNet on cond chunks; no unconditional half is
    projected).
    ``weight`` and ``layer_weights`` ({layer_index: weight}, overriding ``weight`` per layer): folded into the values.
    ``neutral_layers``: layer indices where the cond half reads the uncond image too ('precise' weight types).
    ``scaling``: one of SCALINGS.  ``sigma_range``: (sigma_start, sigma_end) between which the prompt acts, or None.
    ``schedule``: a parsed per-step schedule (weights.parse_step_schedule) or None.
    ``mask``: (1 or latents per chunk, H, W) in 0..1, or None: where in the image the prompt acts.
    ``per_latent``: row i of the embeds is latent i's image prompt (training, batches of different references).
    ``cache``: keep tokens and keys/values for as long as the prompt lives (a sampling run; in training one UNet
    call, where the kept tensors carry the gradient to the adapter); False recomputes them in every layer call.
    """

    def __init__(self, adapter, cond_embeds, uncond_embeds, weight=1.0, *, layer_weights=None, neutral_layers=(),
                 scaling="V only", sigma_range=None, schedule=None, mask=None, cache=True, per_latent=False):
        if uncond_embeds is not None and cond_embeds.shape != uncond_embeds.shape:
            raise ValueError(f"cond embeds {list(cond_embeds.shape)} and uncond embeds {list(uncond_embeds.shape)} "
                             f"must have the same shape")
        if scaling not in SCALINGS:
            raise ValueError(f"unknown embeds scaling '{scaling}'; one of: {', '.join(SCALINGS)}")
        if mask is not None and mask.ndim != 3:
            raise ValueError(f"the attention mask must be (batch, height, width), got {list(mask.shape)}")
        self.adapter = adapter
        self.cond_embeds = cond_embeds
        self.uncond_embeds = uncond_embeds
        self.weight = float(weight)
        self.layer_weights = dict(layer_weights or {})
        self.neutral_layers = frozenset(neutral_layers)
        self.scaling = scaling
        self.sigma_range = sigma_range
        self.schedule = schedule
        self.mask = mask
        self.cache = cache
        self.per_latent = per_latent
        self.has_factor = mask is not None or sigma_range is not None or schedule is not None
        self.clear_cache()

    def clear_cache(self):
        self._tokens, self._kv, self._masks, self._tables, self._factors = {}, {}, {}, {}, {}
        self._step_for, self._step = None, None

    def layer_weight(self, layer_index: int) -> float:
        return self.layer_weights.get(layer_index, self.weight)

    def image_tokens(self) -> torch.Tensor:
        """(halves, rows, tokens, dim): [0] the conditional image prompt, [1] the unconditional one (halves = 1, the
        conditional only, when ``uncond_embeds`` is None); one row holding every reference image's tokens, or one row
        per latent with ``per_latent``. Computed where the adapter's weights
        are; the embeddings travel there without blocking the host."""
        param = next(self.adapter.parameters())
        key = (param.device, param.dtype)
        tokens = self._tokens.get(key) if self.cache else None
        if tokens is None:
            halves = [self.cond_embeds] + ([] if self.uncond_embeds is None else [self.uncond_embeds])
            embeds = torch.cat(halves) if len(halves) > 1 else halves[0]
            tokens = self.adapter.image_tokens(embeds.to(param.device, param.dtype, non_blocking=True))
            rows = self.cond_embeds.shape[0] if self.per_latent else 1
            tokens = tokens.reshape(len(halves), rows, -1, tokens.shape[-1])
            if self.cache:
                self._tokens[key] = tokens
        return tokens

    def layer_kv(self, layer_index: int, cond_or_uncond, batch: int, device, dtype, heads=None):
        """Image keys and values for one layer in the host's cond/uncond chunk order: (rows, tokens, channels) each,
        one row per chunk (its latents share them: no per-latent copies) or, with ``per_latent``, per latent. With
        ``heads``, split into (rows, heads, tokens, dim_head) views."""
        key = (layer_index, tuple(cond_or_uncond), device, dtype, heads)
        kv = self._kv.get(key) if self.cache else None
        if kv is None:
            ip_k, ip_v = self.adapter.project_kv(layer_index, self.image_tokens())
            ip_k, ip_v = scale_kv(ip_k, ip_v, self.layer_weight(layer_index), self.scaling)
            neutral = layer_index in self.neutral_layers
            rows = [1 if c == 1 or neutral else 0 for c in cond_or_uncond]
            if self.uncond_embeds is None and any(rows):
                raise ValueError("this image prompt has no unconditional half (a training prompt): it serves "
                                 "conditional chunks of unweighted layers only")
            kv = tuple(torch.cat([t[r] for r in rows]).to(device, dtype) for t in (ip_k, ip_v))
            if heads is not None:
                kv = tuple(t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in kv)
            if self.cache:
                self._kv[key] = kv
                mark_static(kv)
        if self.per_latent and kv[0].shape[0] != batch:
            raise ValueError(f"per-latent image prompts: {self.cond_embeds.shape[0]} reference rows for "
                             f"{batch // len(cond_or_uncond)} latents per chunk; they must be equal")
        return kv

    def factor(self, extra_options, tokens: int, batch: int, device, dtype):
        """None, or what the image attention's output is multiplied by in this call, broadcastable to (batch,
        heads, tokens, dim_head): the start/end gate times the step's weight, times the mask at this resolution."""
        step = self._step_factor(extra_options, device, dtype)
        mask = self._mask_factor(extra_options, tokens, batch, device, dtype)
        if step is None or mask is None:
            return mask if step is None else step
        if torch.compiler.is_compiling():
            return step * mask  # fused into the graph; the cache below is per call state (see _step_factor)
        product = self._factors.get(tokens)
        if product is None:
            product = self._factors[tokens] = step * mask
        return product

    def _step_factor(self, extra_options, device, dtype):
        sigmas = extra_options.get("sigmas")
        if sigmas is None or (self.sigma_range is None and self.schedule is None):
            return None
        if torch.compiler.is_compiling():
            # Traced into the compiled UNet: a few fused operations on its inputs. The per-call cache below would
            # make torch.compile guard on this call's tensors (identity, the run's id) and recompile every run.
            return self._compute_step(sigmas, extra_options.get("sample_sigmas"), device, dtype)
        if self._step_for is not sigmas:  # a new UNet call: the host gives each call a new sigmas tensor
            self._step_for, self._factors = sigmas, {}
            self._step = self._compute_step(sigmas, extra_options.get("sample_sigmas"), device, dtype)
        return self._step

    def _compute_step(self, sigmas, sample_sigmas, device, dtype):
        """The start/end gate times the schedule's weight for this call's sigma, as a (1, 1, 1, 1) tensor."""
        sigma = sigmas.reshape(-1)[:1].to(device, torch.float32, non_blocking=True)
        step = torch.ones_like(sigma)
        if self.sigma_range is not None:
            start, end = self.sigma_range
            step = ((sigma <= start) & (sigma >= end)).to(torch.float32)
        if self.schedule is not None:
            step = step * self._schedule_weight(sample_sigmas, sigma)
        return step.to(dtype).reshape(1, 1, 1, 1)

    def _schedule_weight(self, sample_sigmas, sigma):
        """The schedule's weight at this step: the step index is the number of the run's sigmas above this one."""
        if sample_sigmas is None:
            return schedule_table(self.schedule, 1)[0]
        if torch.compiler.is_compiling():
            entry = self._schedule_tensors(sample_sigmas, sigma.device)
        else:
            key = id(sample_sigmas)
            entry = self._tables.get(key)
            if entry is None or entry[0] is not sample_sigmas:
                entry = self._schedule_tensors(sample_sigmas, sigma.device)
                self._tables = {key: entry}
        _, above, table = entry
        index = (above > sigma).sum().clamp(max=table.shape[0] - 1)
        return table.index_select(0, index.reshape(1))  # not table[index]: that reads the index back to the host

    def _schedule_tensors(self, sample_sigmas, device):
        """(the run's sigmas, its step sigmas on ``device``, the per-step weights on ``device``)."""
        steps = sample_sigmas.shape[0] - 1
        table = torch.tensor(schedule_table(self.schedule, max(steps, 1)), dtype=torch.float32)
        return (sample_sigmas, sample_sigmas[:-1].to(device, torch.float32, non_blocking=True),
                table.to(device, non_blocking=True))

    def prepare_masks(self, cond_or_uncond, latent_shape, device, dtype):
        """The mask resized for each of the UNet's attention resolutions (the latent's, halved up to three times),
        as the calls of one UNet call on a latent of ``latent_shape`` will read them."""
        if self.mask is None or len(latent_shape) != 4:
            return
        options = {"cond_or_uncond": cond_or_uncond, "original_shape": tuple(latent_shape)}
        h, w = latent_shape[-2:]
        for factor in (1, 2, 4, 8):
            self._mask_factor(options, -(-h // factor) * -(-w // factor), latent_shape[0], device, dtype)

    def _mask_factor(self, extra_options, tokens: int, batch: int, device, dtype):
        if self.mask is None:
            return None
        chunks = len(extra_options.get("cond_or_uncond") or [0])
        key = (tokens, chunks, batch, device, dtype)
        mask = self._masks.get(key)
        if mask is None:
            h, w = layer_grid(extra_options, tokens)
            resized = F.interpolate(self.mask[:, None].to(device, torch.float32, non_blocking=True), size=(h, w),
                                    mode="bilinear", align_corners=False)
            resized = resized.reshape(-1, 1, h * w, 1)
            per_chunk = batch // chunks
            if resized.shape[0] not in (1, per_chunk):
                raise ValueError(f"the attention mask has {resized.shape[0]} masks for {per_chunk} latents; give one "
                                 f"mask, or one per latent")
            if resized.shape[0] > 1:
                resized = resized.repeat(chunks, 1, 1, 1)
            mask = self._masks[key] = resized.to(dtype)
        return mask
