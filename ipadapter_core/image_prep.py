"""Preparing a reference image for the CLIP vision encoder's square input, for any aspect ratio."""
import torch
from torch.nn import functional as F

CROP_POSITIONS = ("center", "top", "bottom", "left", "right", "pad")
INTERPOLATIONS = ("bicubic", "bilinear", "area", "nearest")


def _crop_box(h: int, w: int, size: int, position: str):
    top = {"top": 0, "bottom": h - size}.get(position, (h - size) // 2)
    left = {"left": 0, "right": w - size}.get(position, (w - size) // 2)
    return top, left


def prep_image(image: torch.Tensor, size: int = 224, crop_position: str = "center", interpolation: str = "bicubic",
               sharpening: float = 0.0, pad_value: float = 0.0) -> torch.Tensor:
    """(B, H, W, C) in 0..1 -> (B, size, size, C).

    A crop position scales the short side to ``size`` and cuts a square at that side (center, top, bottom, left,
    right); 'pad' scales the long side to ``size`` and pads the short side evenly with ``pad_value`` (the whole image
    is kept). ``sharpening`` in 0..1 adds that much of the difference to a 3x3 box blur (unsharp mask)."""
    if crop_position not in CROP_POSITIONS:
        raise ValueError(f"unknown crop position '{crop_position}'; one of: {', '.join(CROP_POSITIONS)}")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation '{interpolation}'; one of: {', '.join(INTERPOLATIONS)}")
    x = image.movedim(-1, 1).float()
    h, w = x.shape[-2:]
    scale = size / (max(h, w) if crop_position == "pad" else min(h, w))
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    options = {"align_corners": False, "antialias": True} if interpolation in ("bicubic", "bilinear") else {}
    x = F.interpolate(x, size=(new_h, new_w), mode=interpolation, **options)
    if crop_position == "pad":
        pad_h, pad_w = size - new_h, size - new_w
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=pad_value)
    else:
        top, left = _crop_box(new_h, new_w, size, crop_position)
        x = x[..., top:top + size, left:left + size]
    if sharpening > 0:
        blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        x = x + sharpening * (x - blur)
    return x.clamp(0, 1).movedim(1, -1)
