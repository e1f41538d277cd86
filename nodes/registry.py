"""Every node of the pack, and the V3 entry point that hands them to ComfyUI."""
from comfy_api.latest import ComfyExtension

from .applying import ApplyAdapter, ApplyAdapterImage
from .encoding import EncodeImage
from .loading import LoadAdapter
from .paths import register_model_folder

NODES = [LoadAdapter, EncodeImage, ApplyAdapter, ApplyAdapterImage]


class IPAdapterExtension(ComfyExtension):
    async def get_node_list(self):
        return list(NODES)


async def comfy_entrypoint() -> ComfyExtension:
    register_model_folder()
    return IPAdapterExtension()
