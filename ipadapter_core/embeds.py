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


COMBINE_METHODS = ("concat", "add", "subtract", "average", "norm average", "max", "min")


def _combine_rows(rows: torch.Tensor, method: str) -> torch.Tensor:
    """Rows (n, ...) -> one row (1, ...) by an element-wise method."""
    if method == "add":
        return rows.sum(0, keepdim=True)
    if method == "subtract":
        return rows[:1] - rows[1:].sum(0, keepdim=True)
    if method == "average":
        return rows.mean(0, keepdim=True)
    if method == "norm average":
        norms = rows.flatten(1).norm(dim=1).clamp_min(1e-12).reshape(-1, *[1] * (rows.ndim - 1))
        return (rows / norms).mean(0, keepdim=True) * norms.mean()
    if method == "max":
        return rows.amax(0, keepdim=True)
    if method == "min":
        return rows.amin(0, keepdim=True)
    raise ValueError(f"unknown combine method '{method}'; one of: {', '.join(COMBINE_METHODS)}")


def combine_embeds(embeds: list, method: str = "concat") -> ImageEmbeds:
    """Several reference images (the rows of one or more ImageEmbeds) as one image prompt.

    concat: every image keeps its tokens (the prompt grows by one image's tokens per image); the others merge the
    cond rows element-wise into one: add = sum, subtract = first - sum of the rest, average = mean, norm average =
    mean of the rows each scaled to unit L2 norm, times their mean norm, max / min = element-wise extremes. The
    uncond of a merged prompt is the mean of the uncond rows (they are equal unless a negative image was given)."""
    if not embeds:
        raise ValueError("nothing to combine")
    first = embeds[0]
    for other in embeds[1:]:
        if (other.encoder_output, other.uncond_mode, other.cond.shape[1:]) != \
                (first.encoder_output, first.uncond_mode, first.cond.shape[1:]):
            raise EncoderMismatchError(
                f"cannot combine embeddings of different kinds: {first.encoder_output} {list(first.cond.shape[1:])} "
                f"({first.uncond_mode}) and {other.encoder_output} {list(other.cond.shape[1:])} "
                f"({other.uncond_mode}); encode every image with the same adapter and encoder")
    cond = torch.cat([e.cond for e in embeds])
    uncond = torch.cat([e.uncond for e in embeds])
    if method != "concat":
        cond, uncond = _combine_rows(cond, method), uncond.mean(0, keepdim=True)
    return ImageEmbeds(cond=cond, uncond=uncond, encoder_output=first.encoder_output, uncond_mode=first.uncond_mode)
