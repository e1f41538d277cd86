"""Every node of the pack, and the V3 entry point that hands them to ComfyUI. Each nodes/ module lists its own."""
from comfy_api.latest import ComfyExtension

from . import applying, controls, embeds, encoding, loading, prep, training
from .paths import register_model_folders

NODES = [*loading.NODES, *prep.NODES, *encoding.NODES, *embeds.NODES, *applying.NODES, *controls.NODES,
         *training.NODES]


class IPAdapterExtension(ComfyExtension):
    async def get_node_list(self):
        return list(NODES)


async def comfy_entrypoint() -> ComfyExtension:
    register_model_folders()
    return IPAdapterExtension()
