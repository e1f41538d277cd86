"""IPX Apply IP-Adapter (advanced): every control over where and when the image prompt acts."""
from comfy_api.latest import io

from ..ipadapter_core.prompt import SCALINGS
from ..ipadapter_core.weights import WEIGHT_TYPES, parse_layer_weights, parse_step_schedule
from .applying import apply_adapter, weight_inputs
from .types import CATEGORY, AdapterSocket, EmbedsSocket


def control_inputs():
    return [
        io.Combo.Input("weight_type", options=list(WEIGHT_TYPES), default="linear",
                       tooltip="How the weight is spread over the 16 cross-attention layers (transformer index t = "
                               "0..15: input 0-5, middle 6, output 7-15). See NODES.md for each type's numbers."),
        io.Float.Input("weight_composition", default=1.0, min=-1.0, max=5.0, step=0.05,
                       tooltip="'style and composition' only: the weight of the composition layers (t = 4 at a "
                               "quarter of it, t = 5), while 'weight' drives the style layers."),
        io.Combo.Input("embeds_scaling", options=list(SCALINGS), default="V only",
                       tooltip="Where the weight is applied: 'V only' scales the image attention's output (the "
                               "official behaviour); 'K+V' also scales the keys; 'C penalty' weakens the 320/640-wide "
                               "layers by channels/1280; 'K+mean(V)' scales the keys and only the values' mean."),
        io.String.Input("layer_weights", default="", multiline=False,
                        tooltip="Optional per-layer weights 'index:weight, ...' by transformer index 0..15, "
                                "overriding the weight type on those layers, e.g. '6:1.0, 9:0.5'."),
        io.String.Input("step_weights", default="", multiline=False,
                        tooltip="Optional per-step schedule multiplying the weight: one weight per sampling step "
                                "('1, 1, 0.5, 0') with the last repeated, or a curve of percent:weight points "
                                "('0:1, 0.6:1, 1:0') interpolated over the run."),
        io.Mask.Input("attn_mask", optional=True,
                      tooltip="Optional grayscale mask (0..1): where in the image the image prompt acts. Resized to "
                              "each layer's token grid (any size or aspect); one mask, or one per latent."),
    ]


class ApplyAdapterAdvanced(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IPXApplyAdapterAdvanced",
            display_name="IPX Apply IP-Adapter (advanced)",
            category=CATEGORY,
            description="Apply IP-Adapter with weight types, per-layer weights, a per-step schedule, K/V scaling and "
                        "an attention mask. With the defaults it computes exactly what IPX Apply IP-Adapter does.",
            inputs=[io.Model.Input("model", tooltip="An SD1.5 model; it is not modified."),
                    AdapterSocket.Input("adapter", tooltip="From IPX Load IP-Adapter."),
                    EmbedsSocket.Input("embeds", tooltip="From IPX Encode Reference Image, made for this adapter."),
                    *weight_inputs(), *control_inputs()],
            outputs=[io.Model.Output(tooltip="The patched copy of the model.")],
        )

    @classmethod
    def execute(cls, model, adapter, embeds, weight, start_at, end_at, weight_type, weight_composition,
                embeds_scaling, layer_weights, step_weights, attn_mask=None):
        return io.NodeOutput(apply_adapter(
            model, adapter, embeds, weight, start_at, end_at, weight_type=weight_type,
            weight_composition=weight_composition, layer_weights=layer_weights, step_weights=step_weights,
            embeds_scaling=embeds_scaling, mask=attn_mask))

    @classmethod
    def validate_inputs(cls, weight_type=None, layer_weights=None, step_weights=None, **kwargs):
        try:
            parse_layer_weights(layer_weights or "")
            parse_step_schedule(step_weights or "")
        except ValueError as e:
            return str(e)
        return True


NODES = [ApplyAdapterAdvanced]
