"""IPX Load Adapter: an official SD1.5 IP-Adapter file from models/ipadapter."""
import logging
import os

import comfy.model_management
import comfy.model_patcher
import comfy.ops
import folder_paths
from comfy_api.latest import io

from ..ipadapter_core import load_adapter
from .paths import FOLDER
from .types import CATEGORY, AdapterSocket, LoadedAdapter

log = logging.getLogger(__name__)


def load_adapter_file(name: str) -> LoadedAdapter:
    path = folder_paths.get_full_path_or_raise(FOLDER, name)
    module = load_adapter(path, operations=comfy.ops.manual_cast)
    patcher = comfy.model_patcher.ModelPatcher(module, load_device=comfy.model_management.get_torch_device(),
                                               offload_device=comfy.model_management.unet_offload_device())
    log.info("loaded %s: %s", os.path.basename(path), module.spec.describe())
    return LoadedAdapter(name=name, spec=module.spec, module=module, patcher=patcher)


class LoadAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="IPXLoadAdapter",
            display_name="IPX Load IP-Adapter",
            category=CATEGORY,
            description="Loads an official SD1.5 IP-Adapter file (.bin or .safetensors) from models/ipadapter. The "
                        "variant (base, light, plus, plus-face, full-face, vit-G) is read from the weights, not the "
                        "file name.",
            inputs=[io.Combo.Input("adapter_name", options=folder_paths.get_filename_list(FOLDER),
                                   tooltip="An IP-Adapter file in models/ipadapter, e.g. ip-adapter_sd15.safetensors "
                                           "or ip-adapter-plus_sd15.bin.")],
            outputs=[AdapterSocket.Output(display_name="adapter", tooltip="The loaded adapter and its variant.")],
        )

    @classmethod
    def validate_inputs(cls, adapter_name):
        # The host checks combo values only for V1 list inputs: check here, so a bad name fails at /prompt.
        names = folder_paths.get_filename_list(FOLDER)
        if adapter_name in names:
            return True
        folders = ", ".join(folder_paths.get_folder_paths(FOLDER))
        return (f"'{adapter_name}' is not in models/ipadapter (searched {folders}; found "
                f"{', '.join(names) or 'no adapter files'}). Put the file there and refresh, or pick another.")

    @classmethod
    def execute(cls, adapter_name):
        return io.NodeOutput(load_adapter_file(adapter_name))


NODES = [LoadAdapter]
