"""IPX Encode Image: the reference images through the host's CLIP vision model, as the adapter reads them."""
import torch

import comfy.clip_vision
import comfy.model_management
from comfy_api.latest import io

from ..ipadapter_core.embeds import (COMBINE_METHODS, ImageEmbeds, check_encoder_width, combine_embeds,
                                    zero_embeds_uncond)
from ..ipadapter_core.errors import EncoderMismatchError
from ..ipadapter_core.variants import IMAGE_EMBEDS, PENULTIMATE, UNCOND_ZERO_PIXELS
from .types import CATEGORY, AdapterSocket, EmbedsSocket, LoadedAdapter


def encoder_widths(clip_vision) -> dict:
    """{output name: width} from the encoder's weights, before running it."""
    projection = getattr(getattr(clip_vision, "model", None), "visual_projection", None)
    if projection is None or not hasattr(projection, "weight"):
        raise EncoderMismatchError("the CLIP vision model has no visual projection; IP-Adapter needs a CLIP vision "
                                   "encoder (ViT-H/14 for SD1.5), not SigLIP or DINO")
    projection_dim, hidden = projection.weight.shape
    return {IMAGE_EMBEDS: projection_dim, PENULTIMATE: hidden}


def check_image(image: torch.Tensor) -> torch.Tensor:
    """A host IMAGE (batch, height, width, channels in 0..1) as RGB; a clear error for anything else."""
    if not isinstance(image, torch.Tensor) or image.ndim != 4:
        raise ValueError(f"expected an IMAGE batch (batch, height, width, channels), got "
                         f"{getattr(image, 'shape', type(image).__name__)}")
    if image.shape[0] == 0 or image.shape[1] == 0 or image.shape[2] == 0:
        raise ValueError(f"the reference image is empty (shape {list(image.shape)})")
    channels = image.shape[-1]
    if channels == 1:
        return image.expand(-1, -1, -1, 3)
    if channels not in (3, 4):
        raise ValueError(f"the reference image has {channels} channels; expected 1 (gray), 3 (RGB) or 4 (RGBA)")
    return image[..., :3]


def zero_pixels_output(clip_vision, output: str, count: int) -> torch.Tensor:
    """The encoder run on an all-zero image in normalised pixel space (the plus / full-face uncond)."""
    comfy.model_management.load_model_gpu(clip_vision.patcher)
    pixels = torch.zeros(1, 3, clip_vision.image_size, clip_vision.image_size, device=clip_vision.load_device)
    out = clip_vision.model(pixel_values=pixels, intermediate_output=-2)
    hidden = out[1] if output == PENULTIMATE else out[2]
    hidden = hidden.to(comfy.model_management.intermediate_device(), torch.float32)
    return hidden.expand(count, *hidden.shape[1:]).clone()


def encode_images(clip_vision, image: torch.Tensor, adapter: LoadedAdapter, combine: str = "concat",
                  negative_image: torch.Tensor | None = None) -> ImageEmbeds:
    """The adapter's encoder output for each image (cond), and the uncond: the negative image's encoding when one is
    given (one, or one per reference image), else what the variant was trained with. Several images are then
    combined by ``combine``."""
    spec = adapter.spec
    widths = encoder_widths(clip_vision)
    check_encoder_width(spec, spec.encoder_output, widths[spec.encoder_output], "the connected CLIP vision model")
    cond = clip_vision.encode_image(check_image(image), crop=True)[spec.encoder_output].to(torch.float32)
    if negative_image is not None:
        uncond = clip_vision.encode_image(check_image(negative_image), crop=True)[spec.encoder_output].float()
        if uncond.shape[0] not in (1, cond.shape[0]):
            raise ValueError(f"{uncond.shape[0]} negative images for {cond.shape[0]} reference images; give one "
                             f"negative image, or one per reference image")
        uncond = uncond.expand_as(cond).clone()
    elif spec.uncond == UNCOND_ZERO_PIXELS:
        uncond = zero_pixels_output(clip_vision, spec.encoder_output, cond.shape[0])
    else:
        uncond = zero_embeds_uncond(cond)
    embeds = ImageEmbeds(cond=cond, uncond=uncond, encoder_output=spec.encoder_output, uncond_mode=spec.uncond)
    return combine_embeds([embeds], combine) if cond.shape[0] > 1 else embeds


class EncodeImage(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IPXEncodeImage",
            display_name="IPX Encode Reference Image",
            category=CATEGORY,
            description="Encodes reference images with the CLIP vision model into what the adapter reads (image "
                        "embeds for base/light, penultimate hidden states for plus/full-face), plus the unconditional "
                        "prompt made as the adapter was trained. Several images in the batch become one image prompt "
                        "(their tokens are concatenated).",
            inputs=[
                AdapterSocket.Input("adapter", tooltip="The adapter these embeddings are for: it decides which encoder "
                                                       "output is used and how the uncond is made."),
                io.ClipVision.Input("clip_vision", tooltip="CLIP vision encoder; ViT-H/14 for SD1.5 adapters "
                                                           "(ViT-bigG/14 for *_vit-G)."),
                io.Image.Input("image", tooltip="One or more reference images, any size; each is resized and "
                                                "centre-cropped to the encoder's 224x224 (IPX Prep Reference Image "
                                                "gives other crops)."),
                io.Combo.Input("combine", options=list(COMBINE_METHODS), default="concat", optional=True,
                               tooltip="How several images in the batch become one prompt: concat keeps each "
                                       "image's tokens; add, subtract (first minus the rest), average, norm average, "
                                       "max, min merge them element-wise."),
                io.Image.Input("negative_image", optional=True,
                               tooltip="Optional image whose encoding replaces the unconditional image prompt (what "
                                       "CFG steers away from); one, or one per reference image."),
            ],
            outputs=[EmbedsSocket.Output(display_name="embeds", tooltip="Cond and uncond image embeddings.")],
        )

    @classmethod
    def execute(cls, adapter, clip_vision, image, combine="concat", negative_image=None):
        return io.NodeOutput(encode_images(clip_vision, image, adapter, combine, negative_image))


NODES = [EncodeImage]
