"""Embeddings as things of their own: combine several, save them as safetensors, load them back."""
import os

import folder_paths
from comfy_api.latest import io

from ..ipadapter_core.embeds import COMBINE_METHODS, combine_embeds
from ..ipadapter_core.embeds_files import load_embeds, save_embeds
from .paths import EMBEDS_FOLDER
from .types import CATEGORY, EmbedsSocket

COMBINE_TOOLTIP = ("How several reference images become one prompt: concat keeps each image's tokens; add, subtract "
                   "(first minus the rest), average, norm average (unit-norm rows averaged, at their mean norm), "
                   "max and min merge them element-wise into one image's worth.")


class CombineEmbeds(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IPXCombineEmbeds", display_name="IPX Combine Embeds", category=CATEGORY,
            description="Combines the reference images of several embeddings (same adapter kind) into one.",
            inputs=[EmbedsSocket.Input("embeds_1", tooltip="First embeddings (the minuend for subtract)."),
                    EmbedsSocket.Input("embeds_2", tooltip="Second embeddings."),
                    EmbedsSocket.Input("embeds_3", optional=True, tooltip="Optional third embeddings."),
                    EmbedsSocket.Input("embeds_4", optional=True, tooltip="Optional fourth embeddings."),
                    io.Combo.Input("method", options=list(COMBINE_METHODS), default="concat", tooltip=COMBINE_TOOLTIP)],
            outputs=[EmbedsSocket.Output(display_name="embeds", tooltip="The combined embeddings.")],
        )

    @classmethod
    def execute(cls, embeds_1, embeds_2, method, embeds_3=None, embeds_4=None):
        parts = [e for e in (embeds_1, embeds_2, embeds_3, embeds_4) if e is not None]
        return io.NodeOutput(combine_embeds(parts, method))


class SaveEmbeds(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IPXSaveEmbeds", display_name="IPX Save Embeds", category=CATEGORY, is_output_node=True,
            description="Saves embeddings (cond, uncond and what they were made for) as safetensors in "
                        "models/ipx_embeds, for IPX Load Embeds. No pickle.",
            inputs=[EmbedsSocket.Input("embeds", tooltip="The embeddings to save."),
                    io.String.Input("filename_prefix", default="ipx_embeds",
                                    tooltip="File name start; a counter is added: ipx_embeds_00001.safetensors.")],
            outputs=[],
        )

    @classmethod
    def execute(cls, embeds, filename_prefix):
        folder = folder_paths.get_folder_paths(EMBEDS_FOLDER)[0]
        os.makedirs(folder, exist_ok=True)
        prefix = os.path.basename(filename_prefix.strip()) or "ipx_embeds"
        counter = 1
        while os.path.exists(os.path.join(folder, f"{prefix}_{counter:05}.safetensors")):
            counter += 1
        path = os.path.join(folder, f"{prefix}_{counter:05}.safetensors")
        save_embeds(embeds, path, {"images": embeds.images})
        return io.NodeOutput(ui={"text": [os.path.basename(path)]})


class LoadEmbeds(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IPXLoadEmbeds", display_name="IPX Load Embeds", category=CATEGORY,
            description="Loads embeddings saved by IPX Save Embeds from models/ipx_embeds.",
            inputs=[io.Combo.Input("embeds_name", options=folder_paths.get_filename_list(EMBEDS_FOLDER),
                                   tooltip="A .safetensors file written by IPX Save Embeds.")],
            outputs=[EmbedsSocket.Output(display_name="embeds", tooltip="The saved embeddings.")],
        )

    @classmethod
    def validate_inputs(cls, embeds_name):
        names = folder_paths.get_filename_list(EMBEDS_FOLDER)
        return True if embeds_name in names else f"'{embeds_name}' is not in models/{EMBEDS_FOLDER}"

    @classmethod
    def execute(cls, embeds_name):
        embeds, _ = load_embeds(folder_paths.get_full_path_or_raise(EMBEDS_FOLDER, embeds_name))
        return io.NodeOutput(embeds)


NODES = [CombineEmbeds, SaveEmbeds, LoadEmbeds]
