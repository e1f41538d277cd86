"""Encoded reference images: what the adapter reads from the CLIP vision encoder, for cond and uncond."""
from dataclasses import dataclass

import torch

from .errors import EncoderMismatchError
from .variants import AdapterSpec, encoder_name


@dataclass(frozen=True)
class ImageEmbeds:
    """``cond``: one row per reference image (image_embeds (n, width) or hidden states (n, tokens, width)).
    ``uncond``: the same shape, made the way the adapter was trained (see AdapterSpec.uncond)."""
    cond: torch.Tensor
    uncond: torch.Tensor
    encoder_output: str
    uncond_mode: str

    @property
    def width(self) -> int:
        return self.cond.shape[-1]

    @property
    def images(self) -> int:
        return self.cond.shape[0]


def check_encoder_width(spec: AdapterSpec, output: str, width: int, encoder: str = "the CLIP vision encoder") -> None:
    """Raise EncoderMismatchError unless ``output`` of width ``width`` is what the adapter reads."""
    if output != spec.encoder_output or width != spec.encoder_width:
        raise EncoderMismatchError(
            f"{encoder} gives {encoder_name(output, width)}, but this {spec.variant} adapter needs {spec.encoder}. "
            f"Load the matching CLIP vision model (ViT-H/14 'CLIP-ViT-H-14-laion2B-s32B-b79K' for every SD1.5 adapter "
            f"except *_vit-G, which needs ViT-bigG/14)")


def check_embeds_for(spec: AdapterSpec, embeds: ImageEmbeds) -> None:
    check_encoder_width(spec, embeds.encoder_output, embeds.width, "these embeddings were made from an encoder that")
    if embeds.uncond_mode != spec.uncond:
        raise EncoderMismatchError(f"these embeddings carry a '{embeds.uncond_mode}' uncond, but the {spec.variant} "
                                   f"adapter was trained with '{spec.uncond}'; encode the image again with this adapter")


def zero_embeds_uncond(cond: torch.Tensor) -> torch.Tensor:
    """Base / light / vit-G: the unconditional image prompt is the projection of zero image embeddings."""
    return torch.zeros_like(cond)
