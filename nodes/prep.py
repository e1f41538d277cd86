"""IPX Prep Reference Image: a non-square reference made square for the encoder, your way."""
from comfy_api.latest import io

from ..ipadapter_core.image_prep import CROP_POSITIONS, INTERPOLATIONS, prep_image
from .encoding import check_image
from .types import CATEGORY


class PrepImage(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IPXPrepImage", display_name="IPX Prep Reference Image", category=CATEGORY,
            description="Makes reference images square at the encoder's size (224): crop at a chosen side, or pad to "
                        "keep the whole image; choose the resampling filter and sharpen. The encoder otherwise "
                        "centre-crops.",
            inputs=[io.Image.Input("image", tooltip="Reference images, any size and aspect."),
                    io.Combo.Input("crop_position", options=list(CROP_POSITIONS), default="center",
                                   tooltip="Which square to keep after scaling the short side to 224 (center, top, "
                                           "bottom, left, right), or 'pad': scale the long side to 224 and pad."),
                    io.Combo.Input("interpolation", options=list(INTERPOLATIONS), default="bicubic",
                                   tooltip="Resampling filter (bicubic and bilinear antialias when shrinking)."),
                    io.Float.Input("sharpening", default=0.0, min=0.0, max=1.0, step=0.05,
                                   tooltip="Unsharp mask strength 0..1: adds that much of the detail a 3x3 blur "
                                           "removes."),
                    io.Int.Input("size", default=224, min=16, max=1024, step=1,
                                 tooltip="Output side in pixels; 224 is the ViT-H/14 input.")],
            outputs=[io.Image.Output(tooltip="Square images, ready for IPX Encode Reference Image.")],
        )

    @classmethod
    def execute(cls, image, crop_position, interpolation, sharpening, size):
        return io.NodeOutput(prep_image(check_image(image), size, crop_position, interpolation, sharpening))


NODES = [PrepImage]
