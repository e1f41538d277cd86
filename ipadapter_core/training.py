"""Training an IP-Adapter, as the official ``tutorial_train.py`` does, through the same decoupled cross-attention patch
the inference nodes install.

Frozen: the UNet, the VAE, the text and image encoders. Trained: the image projection and every cross-attention
layer's ``to_k_ip`` / ``to_v_ip``, which start as a copy of that layer's own ``to_k`` / ``to_v``. The loss is the MSE
between the UNet's noise prediction and the noise (see :mod:`.train_batches` for how a batch is drawn); the optimiser
is AdamW (lr 1e-4, weight decay 1e-2 officially).

The UNet is called through ``unet_call(x, timesteps, context, transformer_options)``, which the caller supplies (the
host's UNet, or a test double): its 16 cross-attention layers are replaced, through
``transformer_options["patches_replace"]["attn2"]``, by :class:`DecoupledCrossAttention` with a per-latent
:class:`ImagePrompt` made for that call (the image tokens projected once for the 16 layers, as the official model
projects them once), so gradients reach the adapter and the trained adapter is exactly what the inference patch
applies. Mixed precision: the UNet runs in ``compute_dtype`` (its frozen weights in that dtype), the adapter's weights,
gradients and AdamW state stay float32 and its projections run under autocast; float16 uses a gradient scaler.
Several processes: the adapter-only :class:`AdapterDenoiser` is wrapped in DistributedDataParallel (the frozen UNet is
not part of it); the process group is the caller's.
"""
import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from .adapter import IPAdapter, adapter_from_state_dict
from .attention import DecoupledCrossAttention, ImagePrompt, sdpa_attention
from .layers import BY_LAYER_INDEX, SD15_CROSS_ATTENTION_DIM, SD15_LAYERS
from .train_batches import (DroppedInputs, DropRates, EncodedExamples, dataset_indices, draw, rank_positions,
                            training_inputs)
from .variants import IMAGE_EMBEDS, PENULTIMATE, UNCOND_ZERO_EMBEDS, UNCOND_ZERO_PIXELS, AdapterSpec

TRAINABLE_VARIANTS = ("sd15", "plus")
LATENT_CHANNELS = 4


@dataclass(frozen=True)
class TrainingSettings:
    """``batch_size`` is per process; one optimiser step consumes batch_size * grad_accumulation * processes
    samples."""
    learning_rate: float = 1e-4
    weight_decay: float = 1e-2
    batch_size: int = 8
    grad_accumulation: int = 1
    drops: DropRates = field(default_factory=DropRates)
    seed: int = 0

    def __post_init__(self):
        if self.batch_size < 1 or self.grad_accumulation < 1:
            raise ValueError(f"batch_size ({self.batch_size}) and grad_accumulation ({self.grad_accumulation}) must "
                             f"be at least 1")
        if self.learning_rate <= 0 or self.weight_decay < 0:
            raise ValueError(f"learning_rate ({self.learning_rate}) must be > 0 and weight_decay "
                             f"({self.weight_decay}) >= 0")


def new_adapter_spec(variant: str, encoder_width: int | None = None) -> AdapterSpec:
    """The spec of a new adapter: ``sd15`` (base: Linear + LayerNorm, 4 tokens from image_embeds) or ``plus``
    (Resampler of 4 layers and 12 heads, 16 tokens from the penultimate hidden states), for an encoder of the given
    width (ViT-H/14 by default: 1024 image_embeds, 1280 hidden)."""
    if variant == "sd15":
        width = encoder_width or 1024
        return AdapterSpec("sd15" if width != 1280 else "sd15_vit-G", "linear", 4, SD15_CROSS_ATTENTION_DIM,
                           IMAGE_EMBEDS, width, UNCOND_ZERO_EMBEDS)
    if variant == "plus":
        return AdapterSpec("plus", "resampler", 16, SD15_CROSS_ATTENTION_DIM, PENULTIMATE, encoder_width or 1280,
                           UNCOND_ZERO_PIXELS, resampler_depth=4, resampler_heads=12)
    raise ValueError(f"cannot train variant {variant!r}: choose one of {', '.join(TRAINABLE_VARIANTS)}")


def init_adapter(spec: AdapterSpec, text_kv: dict, seed: int = 0) -> IPAdapter:
    """A new float32 adapter: the projection with PyTorch's default initialisation (seeded), and each layer's
    ``to_k_ip`` / ``to_v_ip`` a copy of ``text_kv[layer_index] = (to_k.weight, to_v.weight)`` of the UNet layer."""
    missing = sorted(set(spec.layer_indices) - set(text_kv))
    if missing:
        raise ValueError(f"text key/value weights are missing for layers {missing}; every SD1.5 cross-attention "
                         f"layer must be given")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        adapter = IPAdapter(spec)
    with torch.no_grad():
        for index in spec.layer_indices:
            to_k, to_v = text_kv[index]
            layer = adapter.layer(index)
            expected = (BY_LAYER_INDEX[index].channels, spec.cross_attention_dim)
            if tuple(to_k.shape) != expected or tuple(to_v.shape) != expected:
                raise ValueError(f"layer {index}: to_k {list(to_k.shape)} / to_v {list(to_v.shape)}, expected "
                                 f"{list(expected)}: the UNet is not SD1.5-shaped")
            layer.to_k_ip.weight.copy_(to_k)
            layer.to_v_ip.weight.copy_(to_v)
    return adapter


def adapter_from_start(state_dict: dict, source: str = "starting adapter") -> IPAdapter:
    """A float32, trainable copy of an existing adapter (the given tensors are not touched)."""
    flat = {k: v.detach().to("cpu", torch.float32).clone() for k, v in state_dict.items()}
    return adapter_from_state_dict(flat, source).requires_grad_(True)


class _AutocastAdapter:
    """The adapter as ImagePrompt reads it, with its projections run under autocast: weights stay float32, the
    matrix products run in the compute dtype."""

    def __init__(self, adapter: IPAdapter, device_type: str, dtype: torch.dtype):
        self.adapter, self.device_type, self.dtype = adapter, device_type, dtype

    def parameters(self):
        return self.adapter.parameters()

    def image_tokens(self, embeds):
        with torch.autocast(self.device_type, self.dtype):
            return self.adapter.image_tokens(embeds)

    def project_kv(self, layer_index, ip_tokens):
        with torch.autocast(self.device_type, self.dtype):
            return self.adapter.project_kv(layer_index, ip_tokens)


class AdapterDenoiser(nn.Module):
    """UNet noise prediction with the adapter's image prompt in every cross-attention layer. Its only parameters are
    the adapter's: the UNet is reached through ``unet_call``, which is deliberately not a submodule."""

    def __init__(self, adapter: IPAdapter, unet_call, attention=sdpa_attention, image_attention=None,
                 compute_dtype=torch.float32, base_options: dict | None = None):
        """``attention`` / ``image_attention``: as DecoupledCrossAttention takes them (the apply node's own, so
        that training computes exactly what inference will)."""
        super().__init__()
        self.adapter = adapter
        object.__setattr__(self, "_unet_call", unet_call)  # never registered, whatever it is
        self._attention = attention
        self._image_attention = image_attention
        self.compute_dtype = compute_dtype
        self._base_options = dict(base_options or {})

    def _transformer_options(self, prompt: ImagePrompt) -> dict:
        base = self._base_options
        replace = base.get("patches_replace", {})
        existing = replace.get("attn2", {})
        attn2 = {layer.host_key: DecoupledCrossAttention(
            layer, [prompt], self._attention, previous=existing.get(layer.host_key, existing.get(layer.host_key[:2])),
            image_attention=self._image_attention) for layer in SD15_LAYERS}
        return {**base, "patches_replace": {**replace, "attn2": attn2}, "cond_or_uncond": [0]}

    def forward(self, noisy_latents, timesteps, contexts, image_embeds):
        adapter = self.adapter
        if self.compute_dtype != torch.float32:
            adapter = _AutocastAdapter(self.adapter, noisy_latents.device.type, self.compute_dtype)
        # One prompt per UNet call: its image tokens are projected once for the 16 layers (and kept only for this
        # call, so gradients reach the adapter); training calls the UNet on conditional chunks alone.
        prompt = ImagePrompt(adapter, image_embeds, None, cache=True, per_latent=True)
        return self._unet_call(noisy_latents.to(self.compute_dtype), timesteps, contexts.to(self.compute_dtype),
                               self._transformer_options(prompt))


class AdapterTrainer:
    """The training loop's state: the adapter, AdamW, the gradient scaler, the step and the samples consumed.

    ``fetch(indices) -> EncodedExamples`` supplies the encoded dataset examples a micro-batch reads; ``dropped``
    the inputs of dropped samples; ``alphas_cumprod`` the UNet's noise schedule; ``latent_scale`` its latent scale
    (0.18215 for SD1.5). With ``world_size`` > 1 the process group must be initialised (any backend).
    """

    def __init__(self, adapter: IPAdapter, unet_call, *, num_examples: int, dropped: DroppedInputs,
                 alphas_cumprod: torch.Tensor, latent_scale: float, settings: TrainingSettings = TrainingSettings(),
                 device="cpu", compute_dtype=torch.float32, attention=sdpa_attention, image_attention=None,
                 base_options=None, rank: int = 0, world_size: int = 1):
        self.device = torch.device(device)
        self.settings = settings
        self.num_examples = num_examples
        self.rank, self.world_size = rank, world_size
        self.dropped = DroppedInputs(dropped.image_embeds.to(self.device), dropped.context.to(self.device))
        self.alphas_cumprod = alphas_cumprod.to(self.device, torch.float32)
        self.latent_scale = float(latent_scale)
        self.adapter = adapter.to(self.device, torch.float32).train().requires_grad_(True)
        self.denoiser = AdapterDenoiser(self.adapter, unet_call, attention, image_attention, compute_dtype,
                                        base_options)
        self.model = self._distributed(self.denoiser) if world_size > 1 else self.denoiser
        self.optimizer = torch.optim.AdamW(self.adapter.parameters(), lr=settings.learning_rate,
                                           weight_decay=settings.weight_decay, fused=self.device.type == "cuda")
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=compute_dtype == torch.float16)
        self.step = 0
        self.samples_seen = 0
        self.losses = []

    def _distributed(self, module):
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=device_ids)  # the adapter has no buffers

    def _inputs(self, examples: EncodedExamples, positions):
        examples = examples.to(self.device)
        draws = draw(self.settings.seed, positions, (LATENT_CHANNELS, *examples.latents.shape[-2:]),
                     self.settings.drops)
        return training_inputs(examples, draws, self.dropped, self.alphas_cumprod, self.latent_scale)

    def _loss(self, model, inputs) -> torch.Tensor:
        prediction = model(inputs.noisy_latents, inputs.timesteps, inputs.contexts, inputs.image_embeds)
        return F.mse_loss(prediction.float(), inputs.target.float())

    def train_step(self, fetch) -> torch.Tensor:
        """One optimiser step over ``grad_accumulation`` micro-batches; returns this process's mean loss (a tensor on
        the device: reading it is left to the caller, so that no step waits for the GPU)."""
        accumulation = self.settings.grad_accumulation
        global_batch = self.settings.batch_size * self.world_size
        total = torch.zeros((), device=self.device)
        for micro in range(accumulation):
            positions = rank_positions(self.samples_seen, self.settings.batch_size, self.world_size, self.rank)
            inputs = self._inputs(fetch(dataset_indices(self.settings.seed, positions, self.num_examples)), positions)
            last = micro == accumulation - 1
            skip_sync = self.model.no_sync() if self.model is not self.denoiser and not last else \
                contextlib.nullcontext()
            with skip_sync:
                loss = self._loss(self.model, inputs)
                self.scaler.scale(loss / accumulation).backward()
            total += loss.detach() / accumulation
            self.samples_seen += global_batch
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.losses.append(total)
        return total

    @torch.no_grad()
    def evaluation_loss(self, examples: EncodedExamples, positions) -> float:
        """The loss on given examples with the draws of given positions, without training (same noise, timesteps
        and drops every time it is asked)."""
        return self._loss(self.denoiser, self._inputs(examples, list(positions))).item()

    def loss_history(self) -> list:
        return torch.stack(self.losses).tolist() if self.losses else []

    def state_dict(self) -> dict:
        return {"adapter": {k: v.detach().clone() for k, v in self.adapter.state_dict().items()},
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(), "step": self.step,
                "samples_seen": self.samples_seen}

    def load_state_dict(self, state: dict) -> None:
        self.adapter.load_state_dict(state["adapter"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.samples_seen = int(state["samples_seen"])


def mean_across_processes(value: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar over the processes of the default group (itself when there is none)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() and \
            torch.distributed.get_world_size() > 1:
        value = value.detach().clone()
        torch.distributed.all_reduce(value)
        value /= torch.distributed.get_world_size()
    return value
