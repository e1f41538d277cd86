"""Training batches, as the official ``tutorial_train.py`` makes them, drawn so that the result does not depend on how the
global batch is split over processes.

Every sample the training run consumes has a *position* 0, 1, 2, ... in one global stream. Position p reads dataset
example ``order(epoch)[p % n]`` (a fresh permutation each epoch) and draws its own randomness - noise, VAE posterior
noise, timestep, which inputs are dropped - from a generator seeded by (seed, p) alone. One process with a batch of 8
and two processes with 4 each therefore see the same samples with the same noise, and DDP's averaged gradient equals
the single process's.

Per sample, with probabilities ``image_drop``, ``text_drop`` and ``both_drop`` (0.05 each officially): the image prompt
is dropped (base: zero image embeds; plus: the encoder's output for zero pixels), the text is dropped (the empty
prompt), or both. The target latent is ``latent_scale * (mean + std * eps)`` from the VAE posterior (the official
``latent_dist.sample() * scaling_factor``), noised at a uniform integer timestep t:
``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) noise`` with ``a_t`` the model's cumulative alpha; the UNet predicts ``noise``.
"""
import functools
import hashlib
from dataclasses import dataclass

import torch

NUM_TIMESTEPS = 1000
LOGVAR_RANGE = (-30.0, 20.0)  # the clamp of the VAE posterior's log-variance (ldm and diffusers)


@dataclass(frozen=True)
class DropRates:
    image: float = 0.05
    text: float = 0.05
    both: float = 0.05

    def __post_init__(self):
        rates = (self.image, self.text, self.both)
        if min(rates) < 0 or sum(rates) > 1:
            raise ValueError(f"drop rates must be >= 0 and sum to at most 1 (image {self.image}, text {self.text}, "
                             f"both {self.both})")


@dataclass
class EncodedExamples:
    """What the frozen encoders made of n examples.

    ``latents``: (n, 8, h, w) VAE posterior moments (mean, log-variance; unscaled), or (n, 4, h, w) fixed latents.
    ``image_embeds``: what the adapter reads from the CLIP vision encoder, (n, width) or (n, tokens, width).
    ``contexts``: the text encoder's hidden states, (n, 77, 768).
    """
    latents: torch.Tensor
    image_embeds: torch.Tensor
    contexts: torch.Tensor

    def __len__(self):
        return self.latents.shape[0]

    def select(self, indices) -> "EncodedExamples":
        index = torch.as_tensor(list(indices), dtype=torch.long, device=self.latents.device)
        return EncodedExamples(*(t.index_select(0, index) for t in (self.latents, self.image_embeds, self.contexts)))

    def to(self, device, dtype=None) -> "EncodedExamples":
        return EncodedExamples(*(t.to(device, dtype, non_blocking=True) for t in
                                 (self.latents, self.image_embeds, self.contexts)))

    @staticmethod
    def cat(parts) -> "EncodedExamples":
        parts = list(parts)
        return EncodedExamples(*(torch.cat([getattr(p, name) for p in parts]) for name in
                                 ("latents", "image_embeds", "contexts")))


@dataclass(frozen=True)
class DroppedInputs:
    """What a sample sees in place of a dropped input: ``image_embeds`` (1, ...) and the empty prompt ``context``
    (1, 77, 768)."""
    image_embeds: torch.Tensor
    context: torch.Tensor


@dataclass
class Draws:
    """The randomness of a batch of samples, one row per sample (CPU tensors)."""
    noise: torch.Tensor            # (b, 4, h, w)
    posterior_noise: torch.Tensor  # (b, 4, h, w)
    timesteps: torch.Tensor        # (b,) int64 in [0, NUM_TIMESTEPS)
    drop_image: torch.Tensor       # (b,) bool
    drop_text: torch.Tensor        # (b,) bool


@dataclass
class TrainingInputs:
    """One batch ready for the UNet: noised latents, integer timesteps, text contexts, image embeds, and the target."""
    noisy_latents: torch.Tensor
    timesteps: torch.Tensor
    contexts: torch.Tensor
    image_embeds: torch.Tensor
    target: torch.Tensor


def _seed_of(*parts) -> int:
    digest = hashlib.blake2b("/".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def rank_positions(samples_seen: int, batch_size: int, world_size: int = 1, rank: int = 0) -> list:
    """The positions this process reads in the next micro-batch: its slice of the global batch that starts at
    ``samples_seen`` (global batch = batch_size * world_size)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    start = samples_seen + rank * batch_size
    return list(range(start, start + batch_size))


@functools.lru_cache(maxsize=4)
def epoch_order(seed: int, epoch: int, count: int) -> torch.Tensor:
    """The order of the ``count`` examples in one epoch (kept for the few epochs a run is in: a large dataset's
    permutation is not drawn again on every step)."""
    generator = torch.Generator().manual_seed(_seed_of(seed, "epoch", epoch))
    return torch.randperm(count, generator=generator)


def dataset_indices(seed: int, positions, count: int) -> list:
    """The example each position reads: a fresh random permutation of the ``count`` examples in every epoch."""
    if count <= 0:
        raise ValueError("the dataset is empty: training needs at least one example")
    return [int(epoch_order(seed, p // count, count)[p % count]) for p in positions]


def draw(seed: int, positions, latent_shape, drops: DropRates, num_timesteps: int = NUM_TIMESTEPS) -> Draws:
    """Each position's randomness from its own generator: the same position gives the same draw whatever the
    batch and process layout. ``latent_shape`` is (4, h, w)."""
    rows = []
    for p in positions:
        g = torch.Generator().manual_seed(_seed_of(seed, "sample", p))
        u = torch.rand((), generator=g).item()
        t = torch.randint(0, num_timesteps, (), generator=g)
        noise = torch.randn(latent_shape, generator=g)
        posterior = torch.randn(latent_shape, generator=g)
        drop_image = u < drops.image or drops.image + drops.text <= u < drops.image + drops.text + drops.both
        drop_text = drops.image <= u < drops.image + drops.text + drops.both
        rows.append((noise, posterior, t, drop_image, drop_text))
    noise, posterior, t, drop_image, drop_text = zip(*rows)
    return Draws(torch.stack(noise), torch.stack(posterior), torch.stack(t), torch.tensor(drop_image),
                 torch.tensor(drop_text))


def sample_latents(latents: torch.Tensor, posterior_noise: torch.Tensor) -> torch.Tensor:
    """A sample of the VAE posterior (mean + std * eps) from (b, 8, h, w) moments; (b, 4, h, w) latents pass."""
    if latents.shape[1] == posterior_noise.shape[1]:
        return latents
    if latents.shape[1] != 2 * posterior_noise.shape[1]:
        raise ValueError(f"latents have {latents.shape[1]} channels; expected {posterior_noise.shape[1]} (latents) or "
                         f"{2 * posterior_noise.shape[1]} (posterior mean and log-variance)")
    mean, logvar = latents.chunk(2, dim=1)
    return mean + torch.exp(0.5 * logvar.clamp(*LOGVAR_RANGE)) * posterior_noise


def _where_rows(mask: torch.Tensor, replacement: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.device).reshape(-1, *([1] * (values.ndim - 1)))
    return torch.where(mask, replacement.to(values.device, values.dtype), values)


def training_inputs(examples: EncodedExamples, draws: Draws, dropped: DroppedInputs, alphas_cumprod: torch.Tensor,
                    latent_scale: float) -> TrainingInputs:
    """Drops applied, posterior sampled, latents scaled and noised, in float32 on the examples' device."""
    device = examples.latents.device
    noise = draws.noise.to(device, non_blocking=True)
    x0 = latent_scale * sample_latents(examples.latents.float(), draws.posterior_noise.to(device, non_blocking=True))
    timesteps = draws.timesteps.to(device, non_blocking=True)
    alpha = alphas_cumprod.to(device, torch.float32)[timesteps].reshape(-1, 1, 1, 1)
    noisy = alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise
    contexts = _where_rows(draws.drop_text, dropped.context, examples.contexts)
    image_embeds = _where_rows(draws.drop_image, dropped.image_embeds, examples.image_embeds)
    return TrainingInputs(noisy, timesteps, contexts, image_embeds, noise)


def alphas_cumprod_from_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """The cumulative alphas of a discrete schedule given as the host's sigmas (sigma^2 = (1 - a) / a)."""
    return 1.0 / (1.0 + sigmas.double() ** 2)
